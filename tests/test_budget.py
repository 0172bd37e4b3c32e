"""The drift budget: ``protect(budget=eps)`` and its controller."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal
from sal_jax._protect import budget as _budget


def _step(state, drift, budget=0.1, gains=(0.05, 0.5), active=True):
  return _budget.step(state, jnp.float32(drift), budget, *gains,
                      jnp.asarray(active))


def test_controller_raises_the_multiplier_over_budget_and_rests_at_one():
  state = _budget.init()
  over = _step(state, 0.4)  # log(4) = 1.386: integral 0.069, total 0.762
  np.testing.assert_allclose(over.log_multiplier, 0.05 * np.log(4), rtol=1e-6)
  np.testing.assert_allclose(over.multiplier, np.exp(0.55 * np.log(4)),
                             rtol=1e-6)
  np.testing.assert_allclose(over.drift, 0.4)
  # Far over budget the error is clipped at 2 (anti-windup).
  far = _step(state, 1e9)
  np.testing.assert_allclose(far.log_multiplier, 0.1, rtol=1e-6)
  # Below budget the multiplier falls back, never under 1 (restore).
  s = far
  for _ in range(10):
    s = _step(s, 0.0)
  assert float(s.log_multiplier) == 0.0 and float(s.multiplier) == 1.0
  # Far over budget for long, it stops at the ceiling.
  for _ in range(2000):
    s = _step(s, 1e3)
  np.testing.assert_allclose(s.multiplier, _budget.MAX_MULTIPLIER, rtol=1e-4)


@pytest.mark.parametrize("drift, active", [(np.nan, True), (np.inf, True),
                                           (0.5, False)])
def test_controller_holds_on_a_bad_drift_or_an_inactive_step(drift, active):
  state = _step(_budget.init(), 0.4)
  held = _step(state, drift, active=active)
  for a, b in zip(held, state):
    np.testing.assert_array_equal(a, b)


def test_controller_is_scale_free():
  """The multiplier's path depends on drift / budget only."""
  paths = []
  for budget in (1e-4, 1.0, 1e4):
    s = _budget.init()
    path = []
    for ratio in (3.0, 5.0, 0.5, 2.0, 0.0, 10.0):
      s = _step(s, ratio * budget, budget=budget)
      path.append(float(s.multiplier))
    paths.append(path)
  np.testing.assert_allclose(paths[0], paths[1], rtol=1e-5)
  np.testing.assert_allclose(paths[2], paths[1], rtol=1e-5)


def _quadratic_run(budget, grad_scale, optimizer, steps=1500):
  """Old behaviour at theta*=0 (drift 0.5 |theta|^2 / n), new target at 1.

  Returns the last drift and the protect metrics.
  """
  n = 16
  anchor = {"w": jnp.zeros(n)}
  target = jnp.ones(n)
  tx = optax.chain(sal.protect(budget=budget), optimizer)
  state = sal.consolidate(tx.init(anchor), anchor, {"w": jnp.ones(n)})

  def drift_fn(p):
    return 0.5 * jnp.mean(jnp.square(p["w"]))

  @jax.jit
  def run(params, state):
    def body(carry, _):
      params, state = carry
      grads = {"w": grad_scale * (params["w"] - target)}
      updates, state = tx.update(grads, state, params, drift=drift_fn(params))
      return (optax.apply_updates(params, updates), state), drift_fn(params)
    (params, state), drifts = jax.lax.scan(body, (params, state), None, steps)
    return params, state, drifts

  params, state, drifts = run(anchor, state)
  return float(drift_fn(params)), sal.metrics(state), np.asarray(drifts)


@pytest.mark.parametrize("budget", [1e-3, 3e-2])
@pytest.mark.parametrize("grad_scale", [1e-2, 1e2])
@pytest.mark.parametrize("name", ["adamw", "sgd_momentum"])
def test_budget_holds_the_drift_at_the_budget(budget, grad_scale, name):
  """Unprotected, the drift reaches 0.5; the budget keeps it near eps."""
  if name == "adamw":
    optimizer = optax.adamw(1e-2)
  else:  # SGD's learning rate has to follow the gradient's scale
    optimizer = optax.sgd(1e-3 / grad_scale, 0.9)
  drift, m, drifts = _quadratic_run(budget, grad_scale, optimizer)
  assert 0.5 * budget <= drift <= 2 * budget, (drift, m)
  # Held, not just passing through: the last quarter stays under 2 eps.
  assert np.max(drifts[-len(drifts) // 4:]) <= 2 * budget
  np.testing.assert_allclose(m["estimated_forgetting"], drifts[-1], rtol=1e-5)
  assert float(m["multiplier"]) > 1.0


def test_budget_update_needs_a_drift():
  params = {"w": jnp.ones(3)}
  tx = optax.chain(sal.protect(budget=0.1), optax.adam(1e-3))
  state = tx.init(params)
  with pytest.raises(ValueError, match="no drift was passed"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="real scalar"):
    tx.update(params, state, params, drift=jnp.ones(2))
  with pytest.raises(ValueError, match="real scalar"):
    tx.update(params, state, params, drift=jnp.ones((), jnp.complex64))


def test_budget_rejects_bad_configurations():
  with pytest.raises(ValueError, match="budget"):
    sal.protect(budget=0.0)
  with pytest.raises(TypeError, match="budget"):
    sal.protect(budget="0.1")
  with pytest.raises(ValueError, match="restoring force"):
    sal.protect(budget=0.1, estimator="reference")
  with pytest.raises(ValueError, match="restore=0"):
    sal.protect(budget=0.1, restore=0.0)
  with pytest.raises(ValueError, match="budget_gains"):
    sal.protect(budget=0.1, budget_gains=(0.1,))
  with pytest.raises(ValueError, match="budget_gains"):
    sal.protect(budget=0.1, budget_gains=(0.0, 0.5))


def test_without_a_budget_the_state_holds_no_controller_and_drift_is_ignored():
  params = {"w": jnp.ones(3)}
  tx = sal.protect()
  state = tx.init(params)
  assert isinstance(state.budget_state, optax.EmptyState)
  a, _ = tx.update(params, state, params)
  b, _ = tx.update(params, state, params, drift=jnp.float32(5.0))
  np.testing.assert_array_equal(a["w"], b["w"])
  assert "multiplier" not in sal.metrics(state)


def test_budget_compiles_once_and_keeps_dtypes():
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  tx = optax.chain(sal.protect(budget=0.1), optax.adam(1e-2))
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state, drift):
    traces.append(1)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params, drift=drift)
    return optax.apply_updates(params, updates), state

  before = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  for d in (0.0, 0.5, 2.0, np.nan):
    params, state = step(params, state, jnp.float32(d))
  assert len(traces) == 1
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == before


def test_a_non_finite_step_leaves_the_controller_intact():
  params = {"w": jnp.ones(3)}
  tx = sal.protect(budget=0.1)
  state = tx.init(params)
  _, state = tx.update(params, state, params, drift=jnp.float32(1.0))
  bad = {"w": jnp.array([1.0, jnp.nan, 0.0])}
  _, after = tx.update(bad, state, params, drift=jnp.float32(1.0))
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
