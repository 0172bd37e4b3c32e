"""`protect(estimator="reference", granularity="leaf")` replays the original.

Every run of the fixture's `communication` section is replayed twice:
injecting the recorded gradients (pure SAL parity), and recomputing the
gradients of the tiny model in JAX (end-to-end parity with the optimizer).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal
from conftest import ARRAY_TOL, SCALAR_TOL, load_fixture, param_dict, tiny_model_loss

_COMM = load_fixture()["communication"]
RUNS = {"main": _COMM, **_COMM["variants"]}

_KWARG_MAP = {"threshold": "threshold",
              "threshold_adaptation": "threshold_adaptation"}


def _protect_kwargs(constructor_kwargs):
  kwargs = {"estimator": "reference"}
  for k, v in constructor_kwargs.items():
    if k == "soft_protection":
      kwargs["gate"] = "soft" if v else "hard"
    else:
      kwargs[_KWARG_MAP[k]] = v
  return kwargs


def _inner_optimizer(spec):
  if spec["type"] == "SGD":
    return optax.sgd(spec["lr"])
  b1, b2 = spec["betas"]
  return optax.adam(spec["lr"], b1=b1, b2=b2, eps=spec["eps"])


@pytest.mark.parametrize("run_name", sorted(RUNS))
def test_recorded_gradients_replay(run_name):
  run = RUNS[run_name]
  tx = sal.protect(**_protect_kwargs(run["constructor_kwargs"]))
  state = tx.init(param_dict(run["initial_params"]))
  np.testing.assert_allclose(state.threshold, run["initial_state"]["threshold"])
  for name, s in run["initial_state"]["stability_scores"].items():
    np.testing.assert_allclose(state.scores[name], s)
  update = jax.jit(tx.update)
  for step in run["steps"]:
    grads = param_dict(step["grads"])
    params = param_dict(step["params"])
    out, state = update(grads, state, params)
    for name in grads:
      np.testing.assert_allclose(state.scores[name], step["scores"][name],
                                 **SCALAR_TOL, err_msg=f"score {name}")
      np.testing.assert_allclose(out[name], step["protected_grads"][name],
                                 **ARRAY_TOL, err_msg=f"grad {name}")
      np.testing.assert_allclose(state.protection_rates[name],
                                 step["protection_rates"][name], rtol=1e-5,
                                 atol=2e-6, err_msg=f"rate {name}")
    np.testing.assert_allclose(state.threshold, step["threshold"], **SCALAR_TOL)
    assert int(state.count) == step["step_count"]
    np.testing.assert_allclose(state.mean_protection_rate,
                               step["total_protection_rate"], rtol=1e-5,
                               atol=2e-6)
    m = sal.metrics(state)
    summary = step["stability_summary"]
    np.testing.assert_allclose(100 * m["protected_fraction"],
                               summary["protected"], atol=1e-4)
    np.testing.assert_allclose(100 * m["neutral_fraction"], summary["neutral"],
                               atol=1e-4)
    np.testing.assert_allclose(100 * m["volatile_fraction"],
                               summary["volatile"], atol=1e-4)
  final = run["final_state"]
  np.testing.assert_allclose(state.threshold, final["threshold"], **SCALAR_TOL)
  np.testing.assert_allclose(state.mean_protection_rate,
                             final["total_protection_rate"], rtol=1e-5,
                             atol=2e-6)


@pytest.mark.parametrize("run_name", sorted(RUNS))
def test_end_to_end_training_replay(run_name):
  """Recompute gradients in JAX and let optax apply the step."""
  run = RUNS[run_name]
  data = _COMM["data"]
  x = jnp.asarray(data["X"], jnp.float32)
  y = jnp.asarray(data["y"], jnp.int32)
  tx = optax.chain(sal.protect(**_protect_kwargs(run["constructor_kwargs"])),
                   _inner_optimizer(run["optimizer"]))
  params = jax.tree.map(jnp.asarray, param_dict(run["initial_params"]))
  state = tx.init(params)

  @jax.jit
  def train_step(params, state):
    loss, grads = jax.value_and_grad(tiny_model_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  for step in run["steps"]:
    for name in params:
      np.testing.assert_allclose(params[name], step["params"][name],
                                 rtol=1e-5, atol=2e-6)
    params, state, loss = train_step(params, state)
    np.testing.assert_allclose(loss, step["loss"], rtol=1e-5)
    for name in params:
      np.testing.assert_allclose(state[0].scores[name], step["scores"][name],
                                 **SCALAR_TOL)
  for name in params:
    np.testing.assert_allclose(params[name], run["final_params"][name],
                               rtol=1e-5, atol=2e-6)


def test_hard_gate_freezes_the_model_from_step_zero():
  """The original's hard mode zeroes everything from the first step."""
  run = RUNS["hard_default"]
  losses = [s["loss"] for s in run["steps"]]
  assert len(set(losses)) == 1
  tx = optax.chain(sal.protect(estimator="reference", gate="hard"),
                   optax.sgd(0.1))
  params = param_dict(run["initial_params"])
  state = tx.init(params)
  updates, _ = tx.update(param_dict(run["steps"][0]["grads"]), state, params)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))


def test_soft_threshold_08_mixed_decisions_at_step_two():
  """At step 2 layer 0 is gated and layer 2 is not (one step, mixed)."""
  run = RUNS["soft_threshold_0.8"]
  step = run["steps"][2]
  gated = {n: not np.allclose(step["protected_grads"][n], step["grads"][n])
           for n in step["grads"]}
  assert gated == {"0.weight": True, "0.bias": True, "2.weight": False,
                   "2.bias": False}
