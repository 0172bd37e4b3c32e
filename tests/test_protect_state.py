"""``protect`` keeps only the state its configuration uses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal


def _bytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_the_default_keeps_no_gate_state():
  params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
  state = sal.protect().init(params)
  for field in ("threshold", "scores", "protection_rates",
                "mean_protection_rate"):
    assert isinstance(getattr(state, field), optax.EmptyState), field
  # Beyond the estimator (anchor, importance, consolidated: 3 float32 copies
  # of the params) only the step count remains.
  assert _bytes(state) == _bytes(state.estimator_state) + 4
  assert _bytes(state.estimator_state) < 3 * _bytes(params) + 64
  # A gated protect keeps a score per entry as well.
  gated = sal.protect(gate="soft").init(params)
  assert _bytes(gated) > _bytes(state) + _bytes(params) - 1


@pytest.mark.parametrize("kwargs", [
    {"threshold": 0.7}, {"threshold_adaptation": 0.0}, {"score_ema": 0.5},
    {"initial_score": 0.2}, {"threshold_range": (0.2, 0.8)},
    {"steepness": 3.0}, {"preserve_rms": True},
    {"state_dtype": jnp.bfloat16},
])
def test_gate_only_arguments_without_a_gate_are_rejected(kwargs):
  name = next(iter(kwargs))
  with pytest.raises(ValueError, match=f"{name}=.*only acts through a gate"):
    sal.protect(**kwargs)
  with pytest.raises(ValueError, match="only acts through a gate"):
    sal.protect(gate="none", estimator="reference", **kwargs)
  sal.protect(gate="soft", **kwargs)  # with a gate they act
  sal.protect(estimator="reference", **kwargs)  # the reference gates


def test_defaults_passed_explicitly_or_injected_are_accepted():
  sal.protect(threshold=0.5, preserve_rms=False, state_dtype=None,
              threshold_range=(0.1, 0.9))
  # inject_hyperparams passes every numeric default as an array.
  params = {"w": jnp.ones(3)}
  tx = optax.inject_hyperparams(sal.protect)(restore=2.0)
  state = tx.init(params)
  assert "threshold" in state.hyperparams
  updates, _ = tx.update(params, state, params)
  np.testing.assert_array_equal(updates["w"], params["w"])


def test_ungated_update_is_the_gradient_plus_the_pull():
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  anchor = {"w": jnp.zeros(3)}
  tx = sal.protect(restore=2.0)
  state = sal.consolidate(tx.init(anchor), anchor, {"w": jnp.ones(3)})
  grads = {"w": jnp.array([0.3, 0.1, -0.2])}
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  est = new_state.estimator_state
  slow = float(est.slow_energy) / (1 - 0.99 ** int(est.count))
  expected = grads["w"] + 2.0 * np.sqrt(slow) * (params["w"] - 0.0)
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)
  assert int(new_state.count) == 1
  m = sal.metrics(new_state)
  assert set(m) == {"step", "consolidations"}
  # A non-finite step passes through and leaves the state as it was.
  bad = {"w": jnp.array([np.nan, 0.0, 0.0])}
  out, kept = tx.update(bad, new_state, params)
  assert np.isnan(out["w"][0]) and float(out["w"][1]) == 0.0
  jax.tree.map(np.testing.assert_array_equal, kept, new_state)


def test_ungated_state_checks_the_params_tree():
  tx = sal.protect()
  state = tx.init({"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="different params tree"):
    tx.update({"v": jnp.ones(3)}, state, {"v": jnp.ones(3)})
