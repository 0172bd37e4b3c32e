"""fisher_diagonal, consolidate and prediction_drift: fine-tuning from a
known starting point."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal
from sal_jax._common import nnx_interop

IN, HIDDEN, CLASSES, N = 5, 7, 3, 20


def _mlp_params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {"l1": {"w": jax.random.normal(k1, (IN, HIDDEN)) / np.sqrt(IN),
                 "b": 0.1 * jax.random.normal(k3, (HIDDEN,))},
          "l2": {"w": jax.random.normal(k2, (HIDDEN, CLASSES)) / 2.0,
                 "b": jnp.zeros(CLASSES)}}


def _logits(params, x):
  h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
  return h @ params["l2"]["w"] + params["l2"]["b"]


def _loss_fn(params, batch):
  """Per-example cross-entropy, shape [batch]."""
  logp = jax.nn.log_softmax(_logits(params, batch["x"]))
  return -jnp.take_along_axis(logp, batch["y"][:, None], axis=1)[:, 0]


def _data(n=N, seed=1):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  return {"x": jax.random.normal(kx, (n, IN)),
          "y": jax.random.randint(ky, (n,), 0, CLASSES)}


def _by_hand_fisher(params, data):
  """A Python loop over examples: plain jax.grad of one example's loss."""
  def one_loss(p, x, y):
    return -jax.nn.log_softmax(_logits(p, x[None])[0])[y]
  total = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  n = data["x"].shape[0]
  for i in range(n):
    g = jax.grad(one_loss)(params, data["x"][i], data["y"][i])
    total = jax.tree.map(lambda t, g_: t + np.square(np.float64(g_)),
                         total, g)
  return jax.tree.map(lambda t: t / n, total)


def _split(data, sizes):
  out, start = [], 0
  for s in sizes:
    out.append(jax.tree.map(lambda x: x[start:start + s], data))
    start += s
  assert start == data["x"].shape[0]
  return out


# ------------------------------------------------------------ fisher_diagonal


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("sizes", [(20,), (7, 7, 6), (13, 0, 7), (1,) * 20])
def test_fisher_matches_a_per_example_loop(chunk_size, sizes):
  params, data = _mlp_params(), _data()
  expected = _by_hand_fisher(params, data)
  got = sal.fisher_diagonal(_loss_fn, params, _split(data, sizes),
                            chunk_size=chunk_size)
  chex.assert_trees_all_equal_structs(got, params)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, e, rtol=2e-5, atol=1e-8)
  assert float(jnp.min(got["l2"]["b"])) > 0.0  # a non-trivial Fisher


def test_fisher_accepts_a_generator_and_tuple_batches():
  params, data = _mlp_params(), _data()
  loss = lambda p, b: _loss_fn(p, {"x": b[0], "y": b[1]})  # noqa: E731
  gen = ((b["x"], b["y"]) for b in _split(data, (10, 10)))
  chex.assert_trees_all_close(
      sal.fisher_diagonal(loss, params, gen),
      sal.fisher_diagonal(_loss_fn, params, [data]), rtol=1e-6)


def test_fisher_compiles_once_per_batch_shape():
  params = _mlp_params()
  traces = []

  def counting_loss(p, batch):
    traces.append(batch["x"].shape)
    return _loss_fn(p, batch)

  sal.fisher_diagonal(counting_loss, params, _split(_data(10), (5, 5)))
  per_compile = len(traces)
  assert per_compile > 0
  sal.fisher_diagonal(counting_loss, params, _split(_data(), (5,) * 4))
  assert len(traces) == per_compile  # cached: no new trace at all
  sal.fisher_diagonal(counting_loss, params, _split(_data(), (5, 5, 5, 3, 2)))
  assert len(traces) == 3 * per_compile  # one more per new shape


def test_fisher_takes_an_unhashable_loss_fn():
  class Loss:
    __hash__ = None

    def __call__(self, params, batch):
      return _loss_fn(params, batch)

  params, data = _mlp_params(), _data()
  chex.assert_trees_all_close(
      sal.fisher_diagonal(Loss(), params, [data]),
      sal.fisher_diagonal(_loss_fn, params, [data]), rtol=1e-6)


def test_fisher_of_a_linear_gaussian_model_by_formula():
  # loss = (x w - y)^2 / 2 per example: grad = x (x w - y).
  x = np.linspace(-1.0, 2.0, 11).astype(np.float32)
  y = np.cos(x).astype(np.float32)
  w = np.float32(0.3)
  loss = lambda p, b: 0.5 * jnp.square(b[0] * p - b[1])  # noqa: E731
  got = sal.fisher_diagonal(loss, jnp.asarray(w), [(x, y)], chunk_size=4)
  np.testing.assert_allclose(got, np.mean(np.square(x * (x * w - y))),
                             rtol=1e-5)


@pytest.mark.parametrize("batches, error, match", [
    ([], ValueError, "no examples"),
    ((b for b in []), ValueError, "no examples"),
    ([{"x": jnp.zeros((0, IN)), "y": jnp.zeros((0,), jnp.int32)}],
     ValueError, "no examples"),
    ({"x": jnp.zeros((4, IN)), "y": jnp.zeros((4,), jnp.int32)}, TypeError,
     r"pass a single batch as \[batch\]"),
    (jnp.zeros((4, IN)), TypeError, "iterable of batches"),
    (3, TypeError, "iterable of batches"),
    (["xy"], TypeError, "batch 0 is a str"),
    ([{}], ValueError, "holds no arrays"),
    ([{"x": jnp.zeros((4, IN)), "y": jnp.zeros((5,), jnp.int32)}],
     ValueError, r"leading \(example\) axis: sizes \[4, 5\]"),
    ([{"x": jnp.zeros((4, IN)), "y": jnp.zeros((), jnp.int32)}],
     ValueError, "leading example axis"),
])
def test_fisher_rejects_bad_batches(batches, error, match):
  with pytest.raises(error, match=match):
    sal.fisher_diagonal(_loss_fn, _mlp_params(), batches)


@pytest.mark.parametrize("loss_fn, shape", [
    (lambda p, b: jnp.mean(_loss_fn(p, b)), r"\(\)"),
    (lambda p, b: _loss_fn(p, b)[:, None], r"\(6, 1\)"),
    (lambda p, b: _loss_fn(p, b)[:1], r"\(1,\)"),
])
def test_fisher_rejects_a_loss_that_is_not_per_example(loss_fn, shape):
  with pytest.raises(ValueError, match=r"shape \(6,\).*got shape " + shape):
    sal.fisher_diagonal(loss_fn, _mlp_params(), [_data(6)])


@pytest.mark.parametrize("chunk_size", [0, -1, 2.0, True])
def test_fisher_rejects_a_bad_chunk_size(chunk_size):
  with pytest.raises(ValueError, match="chunk_size"):
    sal.fisher_diagonal(_loss_fn, _mlp_params(), [_data()],
                        chunk_size=chunk_size)


# ------------------------------------------------------------ combine_fishers


def _numpy_combined(fishers, weights):
  """The formula, leaf by leaf in numpy (float64)."""
  weights = np.asarray(weights, np.float64) / np.sum(weights)
  out = None
  for fisher, w in zip(fishers, weights):
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(fisher)]
    mean = sum(x.sum() for x in leaves) / sum(x.size for x in leaves)
    part = [w * x / mean if mean > 0 else 0.0 * x for x in leaves]
    out = part if out is None else [a + b for a, b in zip(out, part)]
  return out


@pytest.mark.parametrize("weights", [None, (1.0, 3.0)])
def test_combine_fishers_matches_the_formula(weights):
  broad = sal.fisher_diagonal(_loss_fn, _mlp_params(), [_data(seed=0)])
  narrow = jax.tree.map(lambda f: 1e-4 * f * f, broad)  # a tiny, other shape
  combined = sal.combine_fishers([broad, narrow], weights)
  expected = _numpy_combined([broad, narrow], weights or (1.0, 1.0))
  for got, want in zip(jax.tree.leaves(combined), expected):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)
  leaves = jax.tree.leaves(combined)
  np.testing.assert_allclose(
      sum(float(x.sum()) for x in leaves) / sum(x.size for x in leaves), 1.0,
      rtol=1e-5)


def test_combine_fishers_ignores_each_sources_scale():
  a = sal.fisher_diagonal(_loss_fn, _mlp_params(0), [_data(seed=0)])
  b = sal.fisher_diagonal(_loss_fn, _mlp_params(1), [_data(seed=1)])
  once = sal.combine_fishers([a, b])
  rescaled = sal.combine_fishers([jax.tree.map(lambda x: 1e3 * x, a),
                                  jax.tree.map(lambda x: 1e-6 * x, b)])
  chex.assert_trees_all_close(once, rescaled, rtol=1e-5)
  # Pooled, b at 1e-6 would vanish; combined, it keeps half the weight.
  assert not np.allclose(jax.tree.leaves(once)[0],
                         jax.tree.leaves(sal.combine_fishers([a]))[0])


def test_combine_fishers_a_zero_source_adds_nothing_and_jit_agrees():
  a = {"w": jnp.array([1.0, 3.0]), "b": jnp.array([[2.0]])}
  zero = jax.tree.map(jnp.zeros_like, a)
  chex.assert_trees_all_close(sal.combine_fishers([a, zero], (1.0, 1.0)),
                              jax.tree.map(lambda x: 0.5 * x / 2.0, a))
  chex.assert_trees_all_close(
      jax.jit(sal.combine_fishers)([a, zero]), sal.combine_fishers([a, zero]))


@pytest.mark.parametrize("fishers,weights,match", [
    ([], None, "no Fishers"),
    ([{"w": jnp.ones(2)}, {"v": jnp.ones(2)}], None, "Fisher 1 differs"),
    ([{"w": jnp.ones(2)}, {"w": jnp.ones(3)}], None, "Fisher 1 differs"),
    ([{"w": jnp.ones(2)}] * 2, (1.0,), "2 positive numbers"),
    ([{"w": jnp.ones(2)}] * 2, (1.0, 0.0), "2 positive numbers"),
    ([{"w": jnp.ones(2)}] * 2, (1.0, float("nan")), "2 positive numbers"),
])
def test_combine_fishers_rejects_bad_input(fishers, weights, match):
  with pytest.raises(ValueError, match=match):
    sal.combine_fishers(fishers, weights)


# ---------------------------------------------------------------- consolidate

PARAMS = {"a": jnp.arange(4.0), "b": jnp.ones((2, 3))}
FISHER = {"a": jnp.array([1.0, 2.0, 3.0, 4.0]), "b": jnp.full((2, 3), 0.5)}
FISHER_MEAN = (10.0 + 3.0) / 10


def _protect_state(state):
  (found,) = sal.find_protect_states(state)
  return found


def _check_consolidated(est, params=PARAMS, fisher=FISHER, mean=FISHER_MEAN,
                        before=None, decay=0.9):
  for k in params:
    np.testing.assert_array_equal(est.anchor[k], params[k])
    expected = fisher[k] / mean
    if before is not None:
      expected = expected + decay * before[k]
    np.testing.assert_allclose(est.consolidated[k], expected, rtol=1e-6)


def test_consolidate_in_a_chain_sets_anchor_and_importance():
  tx = optax.chain(sal.protect(granularity="element"), optax.adamw(1e-3))
  state = tx.init(jax.tree.map(jnp.zeros_like, PARAMS))
  new = sal.consolidate(state, PARAMS, FISHER)
  est = _protect_state(new).estimator_state
  _check_consolidated(est)
  assert int(est.consolidations) == 1
  assert int(sal.metrics(new)["consolidations"]) == 1
  chex.assert_trees_all_equal(new[1], state[1])  # adamw's state untouched
  # The consolidated importance is scale-free: 1000 F gives the same.
  big = sal.consolidate(state, PARAMS, jax.tree.map(lambda f: 1e3 * f,
                                                    FISHER))
  chex.assert_trees_all_close(_protect_state(big).estimator_state
                              .consolidated, est.consolidated, rtol=1e-6)
  # A second consolidation decays the first (online EWC), kappa = 0.9.
  params2 = jax.tree.map(lambda p: p + 1.0, PARAMS)
  again = _protect_state(sal.consolidate(new, params2, FISHER)
                         ).estimator_state
  _check_consolidated(again, params=params2, before=est.consolidated)
  assert int(again.consolidations) == 2
  again = _protect_state(sal.consolidate(new, params2, FISHER, decay=0.5)
                         ).estimator_state
  _check_consolidated(again, params=params2, before=est.consolidated,
                      decay=0.5)


def test_consolidate_is_jittable():
  tx = optax.chain(sal.protect(), optax.adamw(1e-3))
  state = tx.init(PARAMS)
  eager = sal.consolidate(state, PARAMS, FISHER)
  jitted = jax.jit(sal.consolidate)(state, PARAMS, FISHER)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-6)
  traced_decay = jax.jit(lambda s, d: sal.consolidate(s, PARAMS, FISHER,
                                                      decay=d))
  chex.assert_trees_all_close(traced_decay(state, 0.9), eager, rtol=1e-6)


def test_consolidate_at_leaf_granularity_reduces_per_leaf():
  est_fn = sal.shift_consolidation_estimator(granularity="leaf")
  tx = optax.chain(sal.protect(estimator=est_fn), optax.adamw(1e-3))
  est = _protect_state(sal.consolidate(tx.init(PARAMS), PARAMS, FISHER)
                       ).estimator_state
  assert est.consolidated["a"].shape == ()
  np.testing.assert_allclose(est.consolidated["a"], 2.5 / FISHER_MEAN,
                             rtol=1e-6)
  np.testing.assert_allclose(est.consolidated["b"], 0.5 / FISHER_MEAN,
                             rtol=1e-6)


def test_consolidate_inside_masked_covers_the_masked_in_entries_only():
  tx = optax.masked(optax.chain(sal.protect(), optax.adamw(1e-3)),
                    {"a": True, "b": False})
  est = _protect_state(sal.consolidate(tx.init(PARAMS), PARAMS, FISHER)
                       ).estimator_state
  assert isinstance(est.anchor["b"], optax.MaskedNode)
  assert isinstance(est.consolidated["b"], optax.MaskedNode)
  np.testing.assert_array_equal(est.anchor["a"], PARAMS["a"])
  np.testing.assert_allclose(est.consolidated["a"], FISHER["a"] / 2.5,
                             rtol=1e-6)


def test_consolidate_inside_inject_hyperparams_and_multisteps():
  inject = optax.inject_hyperparams(
      lambda learning_rate: optax.chain(sal.protect(granularity="element"),
                                        optax.adamw(learning_rate)))(1e-3)
  multi = optax.MultiSteps(optax.chain(sal.protect(granularity="element"), optax.adamw(1e-3)),
                           every_k_schedule=2)
  for tx in (inject, multi):
    state = tx.init(jax.tree.map(jnp.zeros_like, PARAMS))
    new = sal.consolidate(state, PARAMS, FISHER)
    assert type(new) is type(state)
    _check_consolidated(_protect_state(new).estimator_state)


def test_consolidate_every_protect_state_of_a_multi_transform():
  leaf_est = sal.shift_consolidation_estimator(granularity="leaf")
  tx = optax.multi_transform(
      {"x": sal.protect(), "y": sal.protect(estimator=leaf_est)},
      {"a": "x", "b": "y"})
  found = sal.find_protect_states(
      sal.consolidate(tx.init(PARAMS), PARAMS, FISHER))
  assert len(found) == 2
  x, y = (s.estimator_state for s in found)
  # Each is normalised over the entries it covers.
  np.testing.assert_allclose(x.consolidated["a"], FISHER["a"] / 2.5,
                             rtol=1e-6)
  np.testing.assert_allclose(y.consolidated["b"], 1.0, rtol=1e-6)
  np.testing.assert_array_equal(y.anchor["b"], PARAMS["b"])


def test_consolidate_an_nnx_optimizer_in_place():
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.linear = nnx.Linear(4, 2, rngs=rngs)

  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(sal.protect(granularity="element"),
                                               optax.adamw(1e-3)),
                            wrt=nnx.Param)
  params = nnx.state(model, nnx.Param)
  fisher = jax.tree.map(lambda p: jnp.square(p) + 1.0, params)
  assert sal.consolidate(optimizer, params, fisher) is optimizer
  est = _protect_state(optimizer).estimator_state
  plain = jax.tree.leaves(nnx_interop.unwrap_variables(params))
  f_leaves = [jnp.square(p) + 1.0 for p in plain]
  mean = sum(jnp.sum(f) for f in f_leaves) / sum(f.size for f in f_leaves)
  for a, c, p, f in zip(jax.tree.leaves(est.anchor),
                        jax.tree.leaves(est.consolidated), plain, f_leaves):
    np.testing.assert_array_equal(a, p)
    np.testing.assert_allclose(c, f / mean, rtol=1e-6)
  assert int(est.consolidations) == 1

  @nnx.jit
  def jitted(optimizer, model):
    sal.consolidate(optimizer, nnx.state(model, nnx.Param), fisher)

  jitted(optimizer, model)
  assert int(_protect_state(optimizer).estimator_state.consolidations) == 2


def test_consolidate_errors():
  tx = optax.chain(sal.protect(), optax.adamw(1e-3))
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="no ProtectState"):
    sal.consolidate(optax.adamw(1e-3).init(PARAMS), PARAMS, FISHER)
  for name in ("reference", "consolidation"):
    ref = optax.chain(sal.protect(estimator=name), optax.sgd(0.1))
    with pytest.raises(ValueError, match="no anchor and consolidated"):
      sal.consolidate(ref.init(PARAMS), PARAMS, FISHER)
  with pytest.raises(ValueError, match="different tree structures"):
    sal.consolidate(state, PARAMS, {"a": FISHER["a"]})
  with pytest.raises(ValueError, match="differ in shape"):
    sal.consolidate(state, PARAMS, {"a": FISHER["a"], "b": jnp.ones(6)})
  wrong = {"a": jnp.zeros(5), "b": jnp.zeros((2, 3))}
  with pytest.raises(ValueError, match=r"params leaf 0 has shape \(5,\)"):
    sal.consolidate(state, wrong, jax.tree.map(jnp.ones_like, wrong))
  with pytest.raises(ValueError, match="does not have the tree"):
    sal.consolidate(state, {"c": PARAMS["a"]}, {"c": FISHER["a"]})
  with pytest.raises(ValueError, match="decay"):
    sal.consolidate(state, PARAMS, FISHER, decay=1.5)


def test_after_consolidate_the_protect_step_pulls_toward_the_anchor():
  anchor = PARAMS
  protect = sal.protect(restore=2.0)
  state = sal.consolidate(protect.init(anchor), anchor, FISHER)
  params = jax.tree.map(lambda p: p + 0.5, anchor)
  grads = {"a": jnp.full(4, 0.2), "b": jnp.full((2, 3), -0.1)}
  updates, state = protect.update(grads, state, params)
  energy = np.mean(np.concatenate([np.ravel(g) ** 2
                                   for g in jax.tree.leaves(grads)]))
  for k in grads:  # g + restore * Omega* sqrt(e_s) (theta - theta*)
    expected = grads[k] + 2.0 * FISHER[k] / FISHER_MEAN * np.sqrt(
        energy) * 0.5
    np.testing.assert_allclose(updates[k], expected, rtol=1e-5)


def test_fine_tuning_with_consolidate_stays_near_the_pretrained_params():
  """A fresh protect equals plain AdamW; consolidated, it holds on."""
  pretrained = {"w": jnp.linspace(-1.0, 1.0, 8)}
  target = {"w": pretrained["w"] + 3.0}
  # The old task cared about the first half of the entries only.
  fisher = {"w": jnp.where(jnp.arange(8) < 4, 1.0, 1e-3)}
  grad_fn = jax.grad(lambda p: 0.5 * jnp.sum(jnp.square(p["w"] - target["w"])))

  def fine_tune(tx, steps, consolidate):
    params, state = pretrained, tx.init(pretrained)
    if consolidate:
      state = sal.consolidate(state, pretrained, fisher)
    step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p))
    for _ in range(steps):
      updates, state = step(params, state)
      params = optax.apply_updates(params, updates)
    return params, state

  adamw = optax.adamw(0.05)
  protected = optax.chain(sal.protect(restore=30.0), optax.adamw(0.05))
  plain, _ = fine_tune(adamw, 100, False)
  fresh, _ = fine_tune(protected, 100, False)
  chex.assert_trees_all_close(fresh, plain, rtol=1e-6)  # nothing protected
  held, state = fine_tune(protected, 100, True)
  assert int(sal.metrics(state)["consolidations"]) == 1  # no shift seen
  moved_plain = np.abs(plain["w"] - pretrained["w"])
  moved_held = np.abs(held["w"] - pretrained["w"])
  assert np.all(moved_held[:4] < 0.5 * moved_plain[:4])  # held
  assert np.all(moved_held[4:] > 0.8 * moved_plain[4:])  # free to learn


# ----------------------------------------------------------- prediction_drift


def _numpy_kl(a, b):
  a, b = np.float64(a), np.float64(b)
  p = np.exp(a - a.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  q = np.exp(b - b.max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def test_prediction_drift_is_the_mean_kl():
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = 3.0 * jax.random.normal(ka, (2, 3, 5))
  b = 3.0 * jax.random.normal(kb, (2, 3, 5))
  kl = _numpy_kl(a, b)
  np.testing.assert_allclose(sal.prediction_drift(a, b), kl.mean(),
                             rtol=1e-5)
  mask = np.array([[True, False, True], [False, False, True]])
  np.testing.assert_allclose(sal.prediction_drift(a, b, where=mask),
                             kl[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(  # a mask over the first axis broadcasts
      sal.prediction_drift(a, b, where=np.array([[True], [False]])),
      kl[0].mean(), rtol=1e-5)
  np.testing.assert_allclose(jax.jit(sal.prediction_drift)(a, b), kl.mean(),
                             rtol=1e-5)
  assert float(sal.prediction_drift(a, a)) == 0.0
  assert float(sal.prediction_drift(a, a + 7.0)) == pytest.approx(
      0.0, abs=1e-6)  # a shift of the logits is no change of prediction
  assert np.isnan(float(sal.prediction_drift(a, b, where=np.zeros((2, 3),
                                                                  bool))))


def test_prediction_drift_is_stable():
  a = jnp.array([[1e4, 0.0, -1e4]])
  b = jnp.array([[0.0, 1e4, 0.0]])
  assert float(sal.prediction_drift(a, b)) == pytest.approx(1e4, rel=1e-5)
  assert float(sal.prediction_drift(a, a)) == 0.0
  masked = jnp.array([[0.0, -jnp.inf, 1.0]])  # a class the old model ruled out
  drift, grad = jax.value_and_grad(sal.prediction_drift, argnums=1)(
      masked, jnp.array([[0.5, -jnp.inf, 1.0]]))
  assert np.isfinite(float(drift)) and np.all(np.isfinite(grad[:, ::2]))
  np.testing.assert_allclose(
      drift, _numpy_kl(masked[:, ::2], jnp.array([[0.5, 1.0]]))[0],
      rtol=1e-5)
  half = sal.prediction_drift(jnp.zeros((4, 3), jnp.bfloat16),
                              jnp.ones((4, 3), jnp.bfloat16))
  assert half.dtype == jnp.float32


def test_prediction_drift_errors():
  with pytest.raises(ValueError, match="same shape"):
    sal.prediction_drift(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="same shape"):
    sal.prediction_drift(jnp.zeros(()), jnp.zeros(()))
  with pytest.raises(ValueError, match="does not broadcast"):
    sal.prediction_drift(jnp.zeros((2, 3)), jnp.zeros((2, 3)),
                         where=jnp.ones(3, bool))
