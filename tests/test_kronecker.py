"""The Kronecker-factored importance: an input-side second moment per kernel."""

import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal
from sal_jax._common import units

from _shift_sequences import SHAPES  # pylint: disable=g-bad-import-order
from _shift_sequences import params as _params
from _shift_sequences import run as _shift_run


def _kron_run(estimator):
  # Uneven steps, so that the displacement has more than one direction.
  return _shift_run(estimator, move=lambda p: p + 0.01 * jnp.sin(p))


# In SHAPES, w1 (6 inputs, 16 outputs) keeps the second moment over its
# inputs, w2 (16 inputs, 2 outputs) over its outputs; the vectors stay per
# element.


def _split(u, a):
  u = np.asarray(u, np.float64)
  return u[:a * a].reshape(a, a), u[a * a:]


def _matrix(x, shape):
  """A kernel as the ``a x b`` matrix its unit describes (``a`` the
  smaller of inputs and outputs)."""
  m = np.asarray(x, np.float64).reshape(-1, shape[-1])
  return m if m.shape[0] <= m.shape[1] else m.T


def _unmatrix(m, shape):
  return (m if m.shape[1] == shape[-1] else m.T).reshape(shape)


def _operator(u, a):
  """The dense ``(a b) x (a b)`` matrix a unit stands for, built with
  ``np.kron`` (row-major flattening of the ``a x b`` matrix)."""
  cov, col = _split(u, a)
  return np.kron(cov, np.diag(col)) / col.sum()


def test_units_keep_their_shapes():
  assert units.zeros(jnp.zeros((6, 16)), "kronecker").shape == (36 + 16,)
  # More inputs than outputs: the second moment over the outputs.
  assert units.zeros(jnp.zeros((16, 2)), "kronecker").shape == (4 + 16,)
  assert units.zeros(jnp.zeros(7), "kronecker").shape == (7,)
  # A kernel's inputs are all its axes but the last.
  assert units.zeros(jnp.zeros((2, 3, 8)), "kronecker").shape == (36 + 8,)
  assert units.zeros(jnp.zeros((4, 3, 8)), "kronecker").shape == (64 + 12,)
  # One row or column: nothing to factor.
  assert units.zeros(jnp.zeros((1, 8)), "kronecker").shape == (1, 8)
  assert units.zeros(jnp.zeros((8, 1)), "kronecker").shape == (8, 1)
  # The flat units tell themselves apart by size.
  p = jnp.zeros((6, 16))
  kron, factored = units.zeros(p, "kronecker"), units.zeros(p, "factored")
  assert units.is_kronecker_unit(kron, p)
  assert not units.is_factored_unit(kron, p)
  assert units.is_factored_unit(factored, p)
  assert not units.is_kronecker_unit(factored, p)


@hypothesis.settings(deadline=None, max_examples=30)
@hypothesis.given(
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=3,
                                            min_side=2, max_side=5),
               elements=dict(min_value=-3.0, max_value=3.0)),
    hypothesis.strategies.floats(0.1, 10.0))
def test_energy_weigh_and_dense_match_the_kronecker_product(g, scale):
  # (Where a unit's size would equal a factored one's, it stays per
  # element: a kernel 2 x 2 x 2, say.)
  hypothesis.assume(units.is_kronecker_unit(units.zeros(g, "kronecker"), g))
  m = _matrix(g, g.shape)
  a = m.shape[0]
  hypothesis.assume(np.sum(m * m) > 1e-3)
  u = units.energy(jnp.asarray(g, jnp.float32), scale, "kronecker")
  cov, col = _split(u, a)
  np.testing.assert_allclose(cov, scale * m @ m.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(col, scale * np.sum(m * m, 0), rtol=1e-4,
                             atol=1e-4)
  operator = _operator(u, a)
  d = np.cos(np.arange(g.size)).reshape(g.shape)
  np.testing.assert_allclose(
      units.weigh(u, g, jnp.asarray(d, jnp.float32)),
      _unmatrix((operator @ _matrix(d, g.shape).ravel()).reshape(m.shape),
                g.shape), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      units.dense(u, g), _unmatrix(np.diag(operator).reshape(m.shape),
                                   g.shape), rtol=1e-4, atol=1e-6)
  # Its sum is that of the per-element importance g^2.
  np.testing.assert_allclose(units.total(u, g), scale * np.sum(g * g),
                             rtol=1e-4)


def test_an_element_importance_enters_with_its_row_and_column_sums():
  v = np.abs(np.cos(np.arange(24.0))).reshape(4, 6) + 0.1
  like = units.zeros(jnp.zeros(v.shape), "kronecker")
  u = units.factor(jnp.asarray(v, jnp.float32), like)
  dense = np.asarray(units.dense(u, v), np.float64)
  np.testing.assert_allclose(dense.sum(0), v.sum(0), rtol=1e-5)
  np.testing.assert_allclose(dense.sum(1), v.sum(1), rtol=1e-5)
  cov, _ = _split(u, 4)
  np.testing.assert_allclose(cov, np.diag(v.sum(1)), rtol=1e-6)


def test_kronecker_estimator_sums_the_element_estimator():
  """The diagonal of L and the output energies c are the row and column
  sums of the per-element importances, step by step (every operation on
  the importance is linear), and the pull is L (theta - anchor) diag(c)
  over tr L, in gradient units."""
  element = _kron_run(sal.shift_consolidation_estimator(granularity="element"))
  kron_est = sal.shift_consolidation_estimator(granularity="kronecker")
  kron = _kron_run(kron_est)
  assert int(element[-1][0].consolidations) >= 2  # both shifts seen
  for (e, _), (k, params) in zip(element, kron):
    assert int(e.consolidations) == int(k.consolidations)
    for tree_e, tree_k in ((e.importance, k.importance),
                           (e.consolidated, k.consolidated)):
      for name, a in (("w1", 6), ("w2", 2)):
        cov, col = _split(tree_k[name], a)
        element = _matrix(tree_e[name], SHAPES[name])
        np.testing.assert_allclose(np.diag(cov), np.sum(element, 1),
                                   rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(col, np.sum(element, 0), rtol=1e-4,
                                   atol=1e-9)
      for name in ("b1", "b2"):
        np.testing.assert_allclose(tree_k[name], tree_e[name], rtol=1e-5)
  state, params = kron[-1]
  force = kron_est.restoring_force(state, params)
  scale = np.sqrt(state.slow_energy / (1 - 0.99 ** int(state.count)))
  for name, a in (("w1", 6), ("w2", 2)):
    d = _matrix(params[name] - state.anchor[name], SHAPES[name])
    expected = scale * (_operator(state.consolidated[name], a) @ d.ravel())
    np.testing.assert_allclose(
        force[name], _unmatrix(expected.reshape(d.shape), SHAPES[name]),
        rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(
      force["b2"], scale * state.consolidated["b2"]
      * (params["b2"] - state.anchor["b2"]), rtol=1e-5, atol=1e-9)


def test_state_is_no_larger_than_per_element():
  """On a transformer-shaped tree (the full L everywhere): every kernel
  keeps the second moment over its smaller side, vectors per element."""
  params = {f"layer{i}": {"attn": jnp.zeros((64, 192)),
                          "out": jnp.zeros((64, 64)),
                          "mlp_in": jnp.zeros((64, 256)),
                          "mlp_out": jnp.zeros((256, 64)),
                          "ln": jnp.zeros(64), "bias": jnp.zeros(256)}
            for i in range(2)}
  size = optax.tree_utils.tree_size(params)
  kron = optax.tree_utils.tree_size(sal.protect(
      estimator=sal.shift_consolidation_estimator(
          granularity="kronecker", kronecker_rank=None)).init(params))
  element = optax.tree_utils.tree_size(
      sal.protect(granularity="element").init(params))
  assert kron <= element, (kron / size, element / size)
  assert kron / size < 2.0  # the oblong kernels' factors are smaller


def test_consolidate_writes_the_fisher_as_its_row_and_column_sums():
  params = _params()
  tx = optax.chain(sal.protect(granularity="kronecker"), optax.adam(1e-3))
  fisher = jax.tree.map(lambda p: jnp.abs(p) + 0.1, params)
  state = sal.consolidate(tx.init(params), params, fisher)
  est = sal.find_protect_states(state)[0].estimator_state
  mean = (sum(float(jnp.sum(f)) for f in jax.tree.leaves(fisher))
          / optax.tree_utils.tree_size(fisher))
  for name, a in (("w1", 6), ("w2", 2)):
    cov, col = _split(est.consolidated[name], a)
    f = _matrix(fisher[name], SHAPES[name]) / mean
    np.testing.assert_allclose(cov, np.diag(f.sum(1)), rtol=1e-5)
    np.testing.assert_allclose(col, f.sum(0), rtol=1e-5)
  np.testing.assert_allclose(est.consolidated["b2"], fisher["b2"] / mean,
                             rtol=1e-6)


def test_with_a_gate_the_scores_are_per_element():
  params = _params()
  tx = sal.protect(granularity="kronecker", gate="soft")
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = jax.jit(tx.update)(grads, state, params)
  assert jax.tree.map(jnp.shape, state.scores) == jax.tree.map(jnp.shape,
                                                               params)


def test_other_estimators_reject_it():
  with pytest.raises(ValueError, match="granularity"):
    sal.protect(estimator="reference", granularity="kronecker")
  with pytest.raises(ValueError, match="running_unit"):
    sal.shift_consolidation_estimator(granularity="kronecker",
                                      running_unit="element")


def _digits_tasks():
  """The digits, then the digits with their sixteen 2x2 pixel blocks
  shuffled: the same classes from inputs in other directions."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  blocks = np.arange(64).reshape(4, 2, 4, 2).transpose(0, 2, 1, 3)
  blocks = blocks.reshape(16, 4)
  order = np.random.default_rng(0).permutation(16)
  shuffle = np.empty(64, int)
  shuffle[blocks.ravel()] = blocks[order].ravel()
  return x, x[:, shuffle], y


def _mlp_init(key):
  keys = jax.random.split(key, 3)
  sizes = ((64, 64), (64, 64), (64, 10))
  return [{"w": jax.random.normal(k, s) * np.sqrt(2.0 / s[0]),
           "b": jnp.zeros(s[1])} for k, s in zip(keys, sizes)]


def _mlp_logits(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def test_it_keeps_a_task_whose_inputs_move_to_other_directions():
  """Digits, then block-shuffled digits (an MLP 64-64, Adam, two seeds): at
  the same strength the Kronecker pull keeps the first task's test
  accuracy well above the per-element pull's, and learns the second as
  well as plain Adam (within 3 points)."""
  x_a, x_b, y = _digits_tasks()
  train, test = slice(0, 1400), slice(1400, None)

  def loss(params, x, labels):
    logp = jax.nn.log_softmax(_mlp_logits(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1))

  def accuracy(params, x):
    return float(jnp.mean(jnp.argmax(_mlp_logits(params, x[test]), -1)
                          == y[test]))

  def run(granularity, seed):
    tx = optax.adam(1e-3)
    if granularity is not None:
      tx = optax.chain(sal.protect(granularity=granularity, restore=3.0), tx)

    @jax.jit
    def train_task(params, state, xs, ys):
      def step(carry, batch):
        params, state = carry
        updates, state = tx.update(jax.grad(loss)(params, *batch), state,
                                   params)
        return (optax.apply_updates(params, updates), state), None
      return jax.lax.scan(step, (params, state), (xs, ys))[0]

    params = _mlp_init(jax.random.key(seed))
    state = tx.init(params)
    rng = np.random.default_rng(seed)
    for x in (x_a, x_b):
      index = rng.integers(train.start, train.stop, size=(300, 32))
      params, state = train_task(params, state, jnp.asarray(x[index]),
                                 jnp.asarray(y[index]))
    return accuracy(params, x_a), accuracy(params, x_b)

  results = {g: np.mean([run(g, seed) for seed in range(2)], axis=0)
             for g in (None, "element", "kronecker")}
  (plain_a, plain_b), (element_a, _), (kron_a, kron_b) = (
      results[None], results["element"], results["kronecker"])
  assert kron_a > element_a + 0.05, results
  assert element_a > plain_a, results
  assert kron_b > plain_b - 0.03, results


def _regression_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  out = h @ params["w2"] + params["b2"]
  return 0.5 * jnp.sum(jnp.square(out - batch["y"]), axis=-1)


def _regression_batches():
  rng = np.random.default_rng(5)
  return [{"x": jnp.asarray(rng.normal(size=(n, 6)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)}
          for n in (40, 9)]


def test_fisher_kronecker_is_the_mean_of_per_example_products():
  """Checked against per-example gradients taken one at a time."""
  params, batches = _params(), _regression_batches()
  fisher = sal.fisher_kronecker(_regression_loss, params, batches,
                                chunk_size=16)
  grads = [jax.grad(lambda p, e: _regression_loss(
      p, jax.tree.map(lambda a: a[None], e))[0])(params, e)
           for b in batches for e in (jax.tree.map(lambda a: a[i], b)
                                      for i in range(len(b["y"])))]
  diagonal = sal.fisher_diagonal(_regression_loss, params, batches)
  for name, a in (("w1", 6), ("w2", 2)):
    per_example = np.stack([_matrix(g[name], SHAPES[name]) for g in grads])
    cov, col = _split(fisher[name], a)
    np.testing.assert_allclose(
        cov, np.einsum("nio,njo->ij", per_example, per_example)
        / len(grads), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
        col, np.mean(np.sum(per_example * per_example, 1), 0), rtol=1e-4)
    # Its diagonal: the diagonal Fisher's row sums, c its column sums.
    np.testing.assert_allclose(
        np.diag(cov), np.sum(_matrix(diagonal[name], SHAPES[name]), 1),
        rtol=1e-4)
  # The vectors: the diagonal Fisher.
  for name in ("b1", "b2"):
    np.testing.assert_allclose(fisher[name], diagonal[name], rtol=1e-5)


def test_consolidate_takes_the_kronecker_fisher_as_it_is():
  params, batches = _params(), _regression_batches()
  tx = optax.chain(sal.protect(granularity="kronecker"), optax.adam(1e-3))
  fisher = sal.fisher_kronecker(_regression_loss, params, batches)
  state = sal.consolidate(tx.init(params), params, fisher)
  est = sal.find_protect_states(state)[0].estimator_state
  # Normalised by the mean over the params' entries of the per-element
  # Fisher it stands for (its trace for a kernel).
  diagonal = sal.fisher_diagonal(_regression_loss, params, batches)
  mean = (sum(float(jnp.sum(f)) for f in jax.tree.leaves(diagonal))
          / optax.tree_utils.tree_size(params))
  np.testing.assert_allclose(est.consolidated["w1"], fisher["w1"] / mean,
                             rtol=1e-4)
  np.testing.assert_allclose(est.consolidated["b1"], diagonal["b1"] / mean,
                             rtol=1e-4)
  # combine_fishers, told the params, normalises each source the same way.
  combined = sal.combine_fishers([fisher, fisher], params=params)
  np.testing.assert_allclose(combined["w1"], fisher["w1"] / mean, rtol=1e-4)
  # A Kronecker Fisher does not fit a per-element state.
  element = optax.chain(sal.protect(granularity="element"), optax.adam(1e-3))
  with pytest.raises(ValueError, match="shape"):
    sal.consolidate(element.init(params), params, fisher)
