"""The importances' storage dtype: bfloat16 halves them, float32 is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal

SHAPES = {"w1": (24, 32), "b1": (32,), "w2": (32, 4), "b2": (4,)}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32)
          for k, s in SHAPES.items()}


def _gradients(steps, seed=1):
  """A stationary stream, then one at 4x the scale: a shift."""
  rng = np.random.default_rng(seed)
  for t in range(steps):
    scale = 1.0 if t < steps // 2 else 4.0
    yield {k: jnp.asarray(scale * rng.normal(size=s) * (1 + np.arange(s[-1])),
                          jnp.float32) for k, s in SHAPES.items()}


def _run(dtype, steps=60):
  est = sal.shift_consolidation_estimator(importance_dtype=dtype)
  params = _params()
  state = est.init(params)
  update = jax.jit(est.update)
  for g in _gradients(steps):
    _, state = update(g, state, params)
    params = jax.tree.map(lambda p, u: p - 1e-3 * u, params, g)
  return state


def _bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float16])
def test_importances_are_stored_in_the_dtype_asked_for(dtype):
  state = _run(dtype, steps=4)
  for tree in (state.importance, state.consolidated):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(dtype)}
  assert {x.dtype for x in jax.tree.leaves(state.anchor)} == {
      jnp.dtype(jnp.float32)}


def test_bfloat16_importances_follow_the_float32_ones():
  exact, half = _run(jnp.float32), _run(jnp.bfloat16)
  assert int(exact.consolidations) >= 1
  assert int(half.consolidations) == int(exact.consolidations)
  for tree in ("importance", "consolidated"):
    for a, b in zip(jax.tree.leaves(getattr(exact, tree)),
                    jax.tree.leaves(getattr(half, tree))):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      # bfloat16 keeps 8 bits: each store rounds by <= 2^-9 relative, and
      # an EMA over ~100 steps accumulates a few of those.
      np.testing.assert_allclose(b, a, rtol=0.03, atol=1e-3 * a.max())
      assert np.abs(b - a).max() > 0  # it did round: the test can fail


def _extra_state(protect, params):
  base = _bytes(optax.adamw(1e-3).init(params))
  state = optax.chain(protect, optax.adamw(1e-3)).init(params)
  return (_bytes(state) - base) / _bytes(params)


def test_bfloat16_importances_keep_two_param_copies_beyond_the_optimizer():
  params = _params()
  scalars = 256 / _bytes(params)  # counts, energies, the budget's state
  half = _extra_state(sal.protect(estimator=sal.shift_consolidation_estimator(
        granularity="element", importance_dtype=jnp.bfloat16)), params)
  # The anchor (1x) and two bfloat16 importances (0.5x each).
  assert 2.0 <= half < 2.0 + scalars, half
  default = _extra_state(sal.protect(granularity="element"), params)  # float32 importances
  assert 3.0 <= default < 3.0 + scalars, default


def test_consolidate_writes_the_fisher_in_the_importance_dtype():
  params = _params()
  tx = optax.chain(sal.protect(
      restore=1.0, estimator=sal.shift_consolidation_estimator(
        granularity="element", importance_dtype=jnp.bfloat16)), optax.adamw(1e-3))
  fisher = jax.tree.map(lambda p: jnp.square(p) + 0.1, params)
  state = sal.consolidate(tx.init(params), params, fisher)
  (found,) = sal.find_protect_states(state)
  mean = np.mean(np.concatenate([np.ravel(f) for f in
                                 jax.tree.leaves(fisher)]))
  for c, f in zip(jax.tree.leaves(found.estimator_state.consolidated),
                  jax.tree.leaves(fisher)):
    assert c.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(c, np.float32), f / mean,
                               rtol=2 ** -8)


def test_a_non_float_importance_dtype_is_rejected():
  with pytest.raises(TypeError, match="importance_dtype"):
    sal.shift_consolidation_estimator(importance_dtype=jnp.int32)
