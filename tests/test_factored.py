"""The factored importance: row and column means per matrix (Adafactor-style)."""

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
from _shift_sequences import run as _run



@hypothesis.settings(deadline=None, max_examples=40)
@hypothesis.given(hnp.arrays(np.float64, hnp.array_shapes(
    min_dims=2, max_dims=3, min_side=1, max_side=5),
    elements=dict(min_value=1e-3, max_value=1e3)))
def test_reconstruction_keeps_row_and_column_sums(v):
  like = units.zeros(jnp.zeros(v.shape), "factored")
  f = units.factor(jnp.asarray(v, jnp.float32), like)
  d = np.asarray(units.dense(f, v), np.float64) * np.ones(v.shape)
  order = np.argsort(v.shape, kind="stable")  # the two largest axes
  for axis in order[-2:]:
    np.testing.assert_allclose(d.sum(axis), v.sum(axis), rtol=1e-4)
  np.testing.assert_allclose(units.total(f, jnp.zeros(v.shape)), v.sum(),
                             rtol=1e-4)


def test_reconstruction_is_exact_for_rank_one():
  a, b = np.array([1.0, 2.0, 5.0]), np.array([0.5, 3.0])
  v = np.outer(a, b)
  f = units.factor(jnp.asarray(v, jnp.float32),
                   units.zeros(jnp.zeros(v.shape), "factored"))
  np.testing.assert_allclose(units.dense(f, v), v, rtol=1e-6)


def _means(v):
  """The means over the largest axis and over the second largest."""
  order = np.argsort(v.shape, kind="stable")
  return np.mean(v, axis=order[-1]), np.mean(v, axis=order[-2])


def test_units_keep_their_shapes():
  p = jnp.zeros((4, 3, 5))  # factored over its two largest axes, 5 and 4
  f = units.zeros(p, "factored")  # one flat array
  row, col = units.split(f, p)
  assert f.shape == (27,) and row.shape == (4, 3) and col.shape == (3, 5)
  # An attention kernel (d, heads, head_dim) keeps heads * (d + head_dim).
  assert units.zeros(jnp.zeros((256, 4, 64)), "factored").size == 4 * 320
  assert units.zeros(jnp.zeros(7), "factored").shape == (7,)  # vectors
  assert units.zeros(p, "leaf").shape == ()
  assert units.zeros(p, "element").shape == p.shape


def test_factored_estimator_is_the_factored_element_estimator():
  """Every operation on the importance is linear, so the factored state is
  the row and column means of the per-element state, step by step, and the
  pull is the per-element pull with the rank-one reconstruction."""
  element = _run(sal.shift_consolidation_estimator(
      granularity="element", running_unit="element"))
  factored_est = sal.shift_consolidation_estimator(granularity="factored")
  factored = _run(factored_est)
  assert int(element[-1][0].consolidations) >= 2  # both shifts seen
  for (e, _), (f, params) in zip(element, factored):
    assert int(e.consolidations) == int(f.consolidations)
    for k, shape in SHAPES.items():
      for tree_e, tree_f in ((e.importance, f.importance),
                             (e.consolidated, f.consolidated)):
        if len(shape) == 2:
          row, col = units.split(tree_f[k], params[k])
          means = _means(np.asarray(tree_e[k]))
          np.testing.assert_allclose(row, means[0], rtol=1e-5, atol=1e-12)
          np.testing.assert_allclose(col, means[1], rtol=1e-5, atol=1e-12)
        else:
          np.testing.assert_allclose(tree_f[k], tree_e[k], rtol=1e-6)
  state, params = factored[-1]
  force = factored_est.restoring_force(state, params)
  scale = np.sqrt(state.slow_energy / (1 - 0.99 ** int(state.count)))
  for k in SHAPES:
    weight = units.dense(state.consolidated[k], params[k])
    expected = weight * scale * (params[k] - state.anchor[k])
    np.testing.assert_allclose(force[k], expected, rtol=1e-5, atol=1e-9)


def test_factored_running_importance_consolidates_its_reconstruction():
  """Per-element consolidated importance fed by a factored running one."""
  est = sal.shift_consolidation_estimator(
      granularity="element", running_unit="factored")
  factored = _run(sal.shift_consolidation_estimator(granularity="factored"))
  states = _run(est)
  for (s, p), (f, _) in zip(states, factored):
    assert int(s.consolidations) == int(f.consolidations)
    np.testing.assert_allclose(s.importance["w1"], f.importance["w1"],
                               rtol=1e-6)
    assert s.consolidated["w1"].shape == SHAPES["w1"]
    # Its factors are those of the factored estimator's.
    row, col = units.split(f.consolidated["w1"], p["w1"])
    means = _means(np.asarray(s.consolidated["w1"]))
    np.testing.assert_allclose(means[0], row, rtol=1e-5)
    np.testing.assert_allclose(means[1], col, rtol=1e-5)


def test_running_unit_finer_than_the_consolidated_is_rejected():
  with pytest.raises(ValueError, match="running_unit"):
    sal.shift_consolidation_estimator(granularity="factored",
                                      running_unit="element")
  with pytest.raises(ValueError, match="granularity"):
    sal.protect(estimator="reference", granularity="factored")


def test_factored_state_is_one_anchor_plus_factors():
  """On a transformer-shaped tree the factored default keeps ~1x params."""
  params = {f"layer{i}": {"attn": jnp.zeros((256, 768)),
                          "out": jnp.zeros((256, 256)),
                          "mlp_in": jnp.zeros((256, 1024)),
                          "mlp_out": jnp.zeros((1024, 256)),
                          "ln": jnp.zeros(256), "bias": jnp.zeros(1024)}
            for i in range(2)}
  params["embed"] = jnp.zeros((256, 256))
  size = optax.tree_utils.tree_size(params)
  for granularity, limit in (("factored", 1.1), ("element", 3.01)):
    state = sal.protect(granularity=granularity).init(params)
    ratio = optax.tree_utils.tree_size(state) / size
    assert ratio <= limit, (granularity, ratio)
  state = sal.protect(granularity="factored").init(params)
  assert optax.tree_utils.tree_size(state) > size  # the anchor is there


def test_consolidate_factors_the_fisher():
  params = _params()
  tx = optax.chain(sal.protect(granularity="factored"), optax.adam(1e-3))
  fisher = jax.tree.map(lambda p: jnp.abs(p) + 0.1, params)
  state = sal.consolidate(tx.init(params), params, fisher)
  est = sal.find_protect_states(state)[0].estimator_state
  mean = (sum(float(jnp.sum(f)) for f in jax.tree.leaves(fisher))
          / optax.tree_utils.tree_size(fisher))
  row, col = units.split(est.consolidated["w1"], params["w1"])
  means = _means(np.asarray(fisher["w1"]))
  np.testing.assert_allclose(row, means[0] / mean, rtol=1e-6)
  np.testing.assert_allclose(col, means[1] / mean, rtol=1e-6)
  np.testing.assert_allclose(est.consolidated["b1"], fisher["b1"] / mean,
                             rtol=1e-6)


def _mlp(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def test_factored_protection_keeps_the_first_task():
  """Fine-tuning from a consolidated start: at the same strength the
  factored pull keeps task A and learns task B about as the per-element
  one does, and keeps A much better than AdamW."""
  rng = np.random.default_rng(0)
  x_a = jnp.asarray(rng.normal(size=(128, 6)) * (np.arange(6) < 4),
                    jnp.float32)
  x_b = jnp.asarray(rng.normal(size=(128, 6)) * (np.arange(6) >= 2),
                    jnp.float32)
  teacher_a, teacher_b = _params(1), _params(2)
  y_a, y_b = _mlp(teacher_a, x_a), _mlp(teacher_b, x_b)

  def loss(params, x, y):
    return jnp.mean(jnp.square(_mlp(params, x) - y))

  def train(tx, params, x, y, steps, state=None):
    state = tx.init(params) if state is None else state

    @jax.jit
    def step(params, state):
      grads = jax.grad(loss)(params, x, y)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    for _ in range(steps):
      params, state = step(params, state)
    return params, state

  start, _ = train(optax.adam(1e-2), _params(), x_a, y_a, 600)
  per_example = lambda p, b: jnp.sum(  # noqa: E731
      jnp.square(_mlp(p, b[0]) - b[1]), -1)
  fisher = sal.fisher_diagonal(per_example, start, [(x_a, y_a)])
  rise = {}
  for name in ("adamw", "element", "factored"):
    if name == "adamw":
      tx, state = optax.adamw(1e-2), None
    else:
      tx = optax.chain(sal.protect(granularity=name, restore=10.0),
                       optax.adamw(1e-2))
      state = sal.consolidate(tx.init(start), start, fisher)
    end, _ = train(tx, start, x_b, y_b, 300, state)
    rise[name] = float(loss(end, x_a, y_a) - loss(start, x_a, y_a))
    rise[name + "_b"] = float(loss(end, x_b, y_b))
  # Measured: A's loss rises 3.95 (AdamW), 1.27 (element), 1.17
  # (factored); B's loss ends at 0.015, 0.29, 0.34.
  assert rise["factored"] < 0.5 * rise["adamw"], rise
  assert rise["factored"] < 1.25 * rise["element"], rise
  assert rise["factored_b"] < 1.5 * rise["element_b"], rise
