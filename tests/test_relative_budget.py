"""The data-free drift budget: ``protect(relative_budget=rho)``.

The shift-consolidation estimator estimates the drift as the
importance-weighted squared distance from the anchor over the one the params
travelled to reach it; the budget's controller keeps that estimate at ``rho``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal


def _estimate(state):
  return float(sal.metrics(state)["estimated_forgetting"])


def test_the_estimate_is_the_weighted_distance_over_the_distance_travelled():
  rng = np.random.default_rng(0)
  start = rng.normal(size=(2, 5)).astype(np.float32)
  learned = rng.normal(size=(2, 5)).astype(np.float32)
  fisher = rng.uniform(0.1, 2.0, size=(2, 5)).astype(np.float32)
  now = rng.normal(size=(2, 5)).astype(np.float32)
  params = {"w": jnp.asarray(start)}
  tx = optax.chain(sal.protect(relative_budget=0.1, granularity="element"), optax.sgd(0.0))
  state = sal.consolidate(tx.init(params), {"w": jnp.asarray(learned)},
                          {"w": jnp.asarray(fisher)})
  # A zero step: the state's estimate is measured at `now`.
  _, state = tx.update({"w": jnp.zeros((2, 5))}, state,
                       {"w": jnp.asarray(now)})
  omega = fisher / fisher.mean()  # consolidate normalises by the mean
  expected = (np.sum(omega * (now - learned) ** 2)
              / np.sum(omega * (learned - start) ** 2))
  np.testing.assert_allclose(_estimate(state), expected, rtol=1e-5)


def test_detected_shifts_set_the_scale_from_the_path_since_init():
  """Task A moves the params from 0 toward 1; at the shift to task B the
  scale is the distance travelled, and the estimate grows as B pulls away."""
  n = 32
  tx = optax.chain(sal.protect(relative_budget=1e9), optax.sgd(0.05))
  params = {"w": jnp.zeros(n)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  key = jax.random.key(0)
  for t in range(200):
    target = 1.0 if t < 100 else -1.0
    key, sub = jax.random.split(key)
    # Task B's gradients are louder: the energy jump the detector sees.
    scale = 1.0 if t < 100 else 4.0
    grads = {"w": scale * (params["w"] - target)
             + 0.1 * jax.random.normal(sub, (n,))}
    seen = params  # the estimate is measured at the params passed
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    if t == 99:
      at_shift = params
  est = sal.find_protect_states(state)[0].estimator_state
  assert int(est.consolidations) >= 1
  assert float(est.reference) > 0
  # The anchor sits near where task A left the params ...
  np.testing.assert_allclose(est.anchor["w"], at_shift["w"], atol=0.2)
  # ... and the estimate is the weighted distance over the reference.
  omega = np.asarray(est.consolidated["w"])
  distance = np.sum(omega * np.square(np.asarray(seen["w"])
                                      - np.asarray(est.anchor["w"])))
  np.testing.assert_allclose(_estimate(state),
                             distance / float(est.reference), rtol=1e-4)
  assert _estimate(state) > 0.5  # B pulled the params far from A's anchor


def _quadratic_run(relative_budget, grad_scale, optimizer, steps=1500):
  """Task A learned 0 -> 1 (the scale), task B pulls toward -1."""
  n = 16
  start = {"w": jnp.zeros(n)}
  learned = {"w": jnp.ones(n)}
  if relative_budget is None:
    protect = sal.protect()
  else:
    protect = sal.protect(relative_budget=relative_budget)
  tx = optax.chain(protect, optimizer)
  state = sal.consolidate(tx.init(start), learned, {"w": jnp.ones(n)})

  def drift_fn(p):  # the estimate's exact value for this quadratic
    return jnp.sum(jnp.square(p["w"] - 1.0)) / n

  @jax.jit
  def run(params, state):
    def body(carry, _):
      params, state = carry
      grads = {"w": grad_scale * (params["w"] + 1.0)}
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), drift_fn(params)
    return jax.lax.scan(body, (params, state), None, steps)

  (_, state), drifts = run(learned, state)
  return np.asarray(drifts), state


@pytest.mark.parametrize("rho", [0.01, 0.1])
@pytest.mark.parametrize("grad_scale", [1e-2, 1e2])
@pytest.mark.parametrize("name", ["adamw", "sgd_momentum"])
def test_relative_budget_holds_the_estimate(rho, grad_scale, name):
  if name == "adamw":
    optimizer = optax.adamw(1e-2)
  else:
    optimizer = optax.sgd(1e-3 / grad_scale, 0.9)
  drifts, state = _quadratic_run(rho, grad_scale, optimizer)
  last = drifts[-len(drifts) // 4:]
  assert 0.5 * rho <= last.mean() <= 2 * rho, (last.mean(), rho)
  assert last.max() <= 2 * rho
  np.testing.assert_allclose(_estimate(state), drifts[-1], rtol=1e-4)
  assert float(sal.metrics(state)["multiplier"]) > 1.0
  # Unbudgeted, the same run drifts far past it.
  free, _ = _quadratic_run(None, grad_scale, optimizer)
  assert free[-1] > 4 * rho


def test_a_state_consolidated_where_it_started_has_no_scale():
  """Fresh protect + consolidate at the same params: the estimate is 0 (the
  budget does not bind) rather than a division by zero."""
  params = {"w": jnp.ones(4)}
  tx = optax.chain(sal.protect(relative_budget=0.1), optax.adam(1e-2))
  state = sal.consolidate(tx.init(params), params, {"w": jnp.ones(4)})
  moved = {"w": jnp.full(4, 3.0)}
  _, state = tx.update({"w": jnp.ones(4)}, state, moved)
  assert _estimate(state) == 0.0
  assert float(sal.metrics(state)["multiplier"]) == 1.0


def test_relative_budget_rejects_bad_configurations():
  with pytest.raises(ValueError, match="not both"):
    sal.protect(budget=0.1, relative_budget=0.1)
  with pytest.raises(ValueError, match="relative_budget"):
    sal.protect(relative_budget=0.0)
  with pytest.raises(TypeError, match="relative_budget"):
    sal.protect(relative_budget="0.1")
  with pytest.raises(ValueError, match="restoring force"):
    sal.protect(relative_budget=0.1, estimator="reference")
  with pytest.raises(ValueError, match="estimates the drift"):
    sal.protect(relative_budget=0.1, estimator=sal.StabilityEstimator(
        *sal.shift_consolidation_estimator()[:4]))
  with pytest.raises(ValueError, match="restore=0"):
    sal.protect(relative_budget=0.1, restore=0.0)


def test_relative_budget_compiles_once_with_fixed_dtypes_and_needs_no_drift():
  params = {"w": jnp.ones(8), "b": jnp.zeros(2)}
  tx = optax.chain(sal.protect(relative_budget=0.1), optax.adamw(1e-3))
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state, g):
    traces.append(None)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  before = jax.tree.map(lambda x: x.dtype, state)
  for t in range(30):
    grads = jax.tree.map(lambda p: (1.0 + 3.0 * (t > 15)) * jnp.ones_like(p),
                         params)
    params, state = step(params, state, grads)
  assert len(traces) == 1
  assert jax.tree.map(lambda x: x.dtype, state) == before
  assert np.isfinite(_estimate(state))
