"""The low-rank Kronecker importance: kernels of more inputs than the rank."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal
from sal_jax._common import units


def _truncated(cov, rank):
  """The top ``rank`` eigenpairs of ``cov``, the others their mean (numpy,
  float64)."""
  values, vectors = np.linalg.eigh(cov)
  top = vectors[:, -rank:]
  rest = values[:-rank].mean()
  return (top @ np.diag(values[-rank:]) @ top.T
          + rest * (np.eye(len(cov)) - top @ top.T))


def _operator_check(u, p, cov, col):
  """``u`` weighs like ``cov (x) diag(col) / sum(col)`` (on the kernel as
  an ``a x b`` matrix, ``a`` its smaller side), and its diagonal and total
  are that operator's."""
  flip = p.shape[0] > p.shape[1]
  d = np.cos(np.arange(p.size) * 0.7).reshape(p.shape)
  m = d.T if flip else d
  expected, diagonal = cov @ m * col / col.sum(), np.diag(cov)[:, None] * (
      col / col.sum())
  if flip:
    expected, diagonal = expected.T, diagonal.T
  np.testing.assert_allclose(units.weigh(u, p, jnp.asarray(d, jnp.float32)),
                             expected, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(units.dense(u, p), diagonal, rtol=1e-3,
                             atol=1e-6)
  np.testing.assert_allclose(units.total(u, p), col.sum(), rtol=1e-5)


@pytest.mark.parametrize("flip", [False, True])
def test_low_rank_keeps_the_top_directions_and_the_mean_of_the_rest(flip):
  rng = np.random.default_rng(0)
  n_in, n_out, rank = 12, 20, 4
  # More inputs than outputs: the unit describes the kernel's transpose.
  p = np.zeros((n_out, n_in) if flip else (n_in, n_out), np.float32)
  a = rng.normal(size=(n_in, 30))
  cov, col = a @ a.T, np.abs(rng.normal(size=n_out))
  col *= np.trace(cov) / col.sum()
  u = units.low_rank(jnp.asarray(cov, jnp.float32),
                     jnp.asarray(col, jnp.float32), rank)
  assert u.shape == (n_in * rank + n_out,)
  assert units.is_low_rank_unit(u, p) and units.is_kronecker_unit(u, p)
  assert not units.is_factored_unit(u, p)
  _operator_check(u, p, _truncated(cov, rank), col)
  # A full unit is not low-rank; zeros() sizes each by the rank.
  full = units.zeros(p, "kronecker")
  assert units.is_kronecker_unit(full, p)
  assert not units.is_low_rank_unit(full, p)
  assert units.zeros(p, "kronecker", rank).shape == u.shape
  assert units.zeros(p, "kronecker", n_in).shape == full.shape


def test_accumulate_truncates_the_decayed_sum():
  rng = np.random.default_rng(1)
  n_in, n_out, rank = 10, 16, 3
  p = np.zeros((n_in, n_out), np.float32)
  a = rng.normal(size=(n_in, n_out))
  old = units.low_rank(jnp.asarray(a @ a.T, jnp.float32),
                       jnp.asarray(np.sum(a * a, 0), jnp.float32), rank)
  g = rng.normal(size=(n_in, n_out)).astype(np.float32)
  increment = units.energy(jnp.asarray(g), 2.0, "kronecker")
  new = units.accumulate(old, increment, 0.9, p)
  before = _truncated(a @ a.T, rank)
  cov = 0.9 * before + 2.0 * g @ g.T
  col = 0.9 * np.sum(a * a, 0) + 2.0 * np.sum(g * g, 0)
  _operator_check(new, p, _truncated(cov, rank), col)
  # An element-wise importance enters as the diagonal of its row sums.
  v = np.abs(g) + 0.1
  new = units.accumulate(old, units.factor(jnp.asarray(v), old), 0.5, p)
  cov = 0.5 * before + np.diag(v.sum(1))
  _operator_check(new, p, _truncated(cov, rank),
                  0.5 * np.sum(a * a, 0) + v.sum(0))


def test_the_sketch_is_unbiased():
  """The mean of the sketched G G^T over many draws is G G^T (within 5x
  its Monte-Carlo standard error), and c is exact for every draw."""
  rng = np.random.default_rng(2)
  g = jnp.asarray(rng.normal(size=(8, 24)), jnp.float32)
  keys = jax.random.split(jax.random.key(3), 2000)
  sketched = jax.vmap(lambda k: units.energy(g, 1.5, "kronecker", (k, 3)))(
      keys)
  exact = units.energy(g, 1.5, "kronecker")
  error = np.abs(np.mean(sketched, 0) - exact)
  stderr = np.std(sketched, 0) / np.sqrt(len(keys))
  assert np.all(error <= 5 * stderr + 1e-5), np.max(error / (stderr + 1e-9))
  np.testing.assert_allclose(sketched[:, 64:],
                             np.broadcast_to(exact[64:], (2000, 24)),
                             rtol=1e-5)
  # Not a copy of the exact one: each sketch has rank 3 at most.
  assert max(np.linalg.matrix_rank(np.asarray(u[:64]).reshape(8, 8),
                                   tol=1e-4) for u in sketched[:20]) == 3


def _shift_run(estimator, shapes, scales=(1.0, 3.0, 1.0, 3.0)):
  """Regimes of gradients from different input directions, of energies
  rising and falling (a shift starts where the energy rises)."""
  rng = np.random.default_rng(4)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32)
            for k, s in shapes.items()}
  state = estimator.init(params)
  update = jax.jit(estimator.update)
  for scale in scales:
    basis = rng.normal(size=(shapes["w"][0], 3)) * scale
    for _ in range(60):
      x = basis @ rng.normal(size=(3, 16))
      grads = {"w": jnp.asarray(x @ rng.normal(size=(16, shapes["w"][1])),
                                jnp.float32) / 16,
               "b": jnp.asarray(0.1 * rng.normal(size=shapes["b"]),
                                jnp.float32)}
      _, state = update(grads, state, params)
      params = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
  return state, params


def test_the_estimator_consolidates_the_directions_the_gradients_used():
  """A 24-input kernel at rank 4: the running L is sketched, the
  consolidated one low-rank; its top directions hold most of what the
  exact estimator's consolidated L has in its own top 4, its total is the
  exact one's, and the pull is the stated formula."""
  shapes = {"w": (24, 32), "b": (32,)}
  low = sal.shift_consolidation_estimator(granularity="kronecker",
                                          kronecker_rank=4)
  exact = sal.shift_consolidation_estimator(granularity="kronecker",
                                            kronecker_rank=None)
  state, params = _shift_run(low, shapes)
  exact_state, _ = _shift_run(exact, shapes)
  assert int(state.consolidations) == int(exact_state.consolidations) >= 2
  w = params["w"]
  assert state.importance["w"].shape == (24 * 24 + 32,)
  assert state.consolidated["w"].shape == (24 * 4 + 32,)
  assert exact_state.consolidated["w"].shape == (24 * 24 + 32,)
  np.testing.assert_allclose(units.total(state.consolidated["w"], w),
                             units.total(exact_state.consolidated["w"], w),
                             rtol=1e-4)
  cov = np.asarray(exact_state.consolidated["w"][:576], np.float64)
  cov = cov.reshape(24, 24)
  values, vectors = np.linalg.eigh(cov)
  head = np.asarray(state.consolidated["w"][:96]).reshape(24, 4)
  basis = np.linalg.qr(head)[0]
  captured = np.trace(basis.T @ cov @ basis) / values[-4:].sum()
  assert captured > 0.9, captured
  # The pull: lambda-free, sqrt(e_s) L_hat (theta - anchor) diag(c) / tr L.
  force = low.restoring_force(state, params)
  col = np.asarray(state.consolidated["w"][96:], np.float64)
  rho = (col.sum() - np.sum(head.astype(np.float64) ** 2)) / 24
  cov_hat = head @ head.T + rho * np.eye(24)
  scale = np.sqrt(state.slow_energy / (1 - 0.99 ** int(state.count)))
  d = np.asarray(params["w"] - state.anchor["w"], np.float64)
  np.testing.assert_allclose(force["w"], scale * cov_hat @ d * col
                             / col.sum(), rtol=1e-3, atol=1e-8)
  np.testing.assert_allclose(
      force["b"], scale * state.consolidated["b"]
      * (params["b"] - state.anchor["b"]), rtol=1e-5, atol=1e-9)
  del vectors


def test_consolidate_truncates_a_kronecker_fisher():
  params = {"w": jnp.zeros((12, 16)), "b": jnp.zeros(16)}
  rng = np.random.default_rng(6)
  a = rng.normal(size=(12, 40))
  col = np.abs(rng.normal(size=16)) + 0.1
  col *= np.trace(a @ a.T) / col.sum()
  fisher = {"w": jnp.asarray(np.concatenate([(a @ a.T).ravel(), col]),
                             jnp.float32),
            "b": jnp.ones(16)}
  tx = optax.chain(sal.protect(estimator=sal.shift_consolidation_estimator(
      granularity="kronecker", kronecker_rank=3)), optax.adam(1e-3))
  state = sal.consolidate(tx.init(params), params, fisher)
  consolidated = sal.find_protect_states(state)[0].estimator_state.consolidated
  mean = (col.sum() + 16) / (12 * 16 + 16)
  _operator_check(consolidated["w"], params["w"],
                  _truncated(a @ a.T / mean, 3), col / mean)
  np.testing.assert_allclose(consolidated["b"], np.ones(16) / mean,
                             rtol=1e-5)


def test_state_fits_two_copies_on_a_transformer_tree():
  """At the default rank, with widths above it: the anchor, the running L
  (at most the kernel's size) and low-rank consolidated factors."""
  params = {f"layer{i}": {"attn": jnp.zeros((256, 768)),
                          "out": jnp.zeros((256, 256)),
                          "mlp_in": jnp.zeros((256, 1024)),
                          "mlp_out": jnp.zeros((1024, 256)),
                          "ln": jnp.zeros(256)}
            for i in range(2)}
  size = optax.tree_utils.tree_size(params)
  kron = optax.tree_utils.tree_size(
      sal.protect(granularity="kronecker").init(params))
  element = optax.tree_utils.tree_size(
      sal.protect(granularity="element").init(params))
  assert kron / size < 2.0, kron / size
  assert element / size > 2.9


def test_rank_is_checked():
  with pytest.raises(ValueError, match="kronecker_rank"):
    sal.shift_consolidation_estimator(granularity="kronecker",
                                      kronecker_rank=1)
  with pytest.raises((TypeError, ValueError), match="kronecker_rank"):
    sal.shift_consolidation_estimator(granularity="kronecker",
                                      kronecker_rank=2.5)


_NESTED_VMAP = """
import jax, jax.numpy as jnp, numpy as np, optax
import sal_jax as sal
tx = optax.chain(sal.protect(), optax.adamw(1e-3))
params = {"w1": jnp.zeros((64, 64)), "w2": jnp.zeros((64, 64)),
          "b": jnp.zeros(64)}

def train(key, lr):
  def step(carry, i):
    p, s = carry
    k = jax.random.fold_in(key, i)
    scale = jnp.where(i < 25, 1.0, 30.0)  # a shift: a consolidation
    g = jax.tree.map(lambda x: scale * jax.random.normal(k, x.shape), p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, jax.tree.map(lambda x: lr * x, u)),
            s), None
  (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(60))
  return p["w1"].sum() + p["w2"].sum()

keys = jax.random.split(jax.random.key(1), 3)
lrs = jnp.linspace(0.1, 1.0, 12)
grid = jax.jit(jax.vmap(jax.vmap(train, in_axes=(None, 0)),
                        in_axes=(0, None)))(keys, lrs)
one = jax.jit(train)(keys[2], lrs[5])
np.testing.assert_allclose(grid[2, 5], one, rtol=1e-4, atol=1e-4)
print("ok")
"""


@pytest.mark.slow
def test_a_grid_of_runs_vmapped_twice_completes_and_matches_one_run():
  # Seeds x configs of a scanned run, as the benchmarks vmap them: batched,
  # the consolidation's eigendecompositions can stall jaxlib's CPU thread
  # pool. In a subprocess, so that a stall fails on the timeout.
  out = subprocess.run([sys.executable, "-c", _NESTED_VMAP], timeout=180,
                       capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "ok"
