"""Precision: bf16 params and ``state_dtype=jnp.bfloat16``; the dtype policy.

A jitted ``chain(protect(...), adamw)`` train step on bf16 (and f32) params
must keep every optimizer-state leaf's shape, dtype and weak type from step
to step (so the step is traced and compiled once: a trace counter says so),
train (the loss falls, the state stays finite and in range) and gate like
the float32 run does.

Every estimator's state follows its documented dtype policy for bf16, f32,
f64 and complex params, with x64 off and on (the x64 cases in a
thread-local ``enable_x64`` block, which does not leak into other tests).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal
from sal_jax._common import units
from conftest import enable_x64

STEPS = 6


def _params(dtype):
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w1": jax.random.normal(k1, (16, 32)) / 4.0,
            "b1": jnp.zeros((32,)),
            "w2": jax.random.normal(k2, (32, 4)) / np.sqrt(32)}
  return jax.tree.map(lambda p: p.astype(dtype), params)


def _batch(i):
  """The same batch at every step, so that the loss must fall."""
  del i
  kx, ky = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (64, 16))
  return x, jax.random.randint(ky, (64,), 0, 4)


def _loss(params, x, y):
  x = x.astype(params["w1"].dtype)
  logits = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), y).mean()


def _avals(tree):
  """(shape, dtype, weak_type) of every leaf: what a jit cache keys on."""
  return jax.tree.map(
      lambda x: (jnp.shape(x), jnp.result_type(x),
                 getattr(x, "weak_type", False)), tree)


def _train(param_dtype, state_dtype, granularity, preserve_rms,
           estimator="reference"):
  gate_args = {} if estimator != "reference" else dict(
      preserve_rms=preserve_rms, state_dtype=state_dtype)
  tx = optax.chain(
      sal.protect(granularity=granularity, estimator=estimator, **gate_args),
      optax.adamw(1e-2))
  traces = []

  @jax.jit
  def step(params, opt_state, x, y):
    traces.append(1)  # runs only when jax traces (i.e. compiles) the step
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = _params(param_dtype)
  opt_state = tx.init(params)
  avals0 = (_avals(params), _avals(opt_state))
  losses = []
  for i in range(STEPS):
    params, opt_state, loss = step(params, opt_state, *_batch(i))
    losses.append(float(loss))
    assert (_avals(params), _avals(opt_state)) == avals0, (
        f"step {i}: a leaf changed shape, dtype or weak type")
  return params, opt_state, losses, len(traces)


CASES = [
    # (param dtype, state dtype, granularity, preserve_rms)
    (jnp.bfloat16, jnp.bfloat16, "leaf", False),
    (jnp.bfloat16, jnp.bfloat16, "element", False),
    (jnp.bfloat16, jnp.bfloat16, "leaf", True),
    (jnp.bfloat16, jnp.bfloat16, "element", True),
    (jnp.float32, jnp.bfloat16, "element", False),
    (jnp.bfloat16, None, "leaf", False),
]


def _id(case):
  p, s, g, rms = case
  return (f"params-{jnp.dtype(p).name}-state-"
          f"{'default' if s is None else jnp.dtype(s).name}-{g}"
          f"{'-rms' if rms else ''}")


@pytest.fixture(scope="module")
def float32_runs():
  """float32 params and state, per (granularity, preserve_rms)."""
  cache = {}

  def get(granularity, preserve_rms):
    key = (granularity, preserve_rms)
    if key not in cache:
      cache[key] = _train(jnp.float32, None, granularity, preserve_rms)
    return cache[key]
  return get


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_low_precision_trains_with_fixed_dtypes_and_one_compile(
    case, float32_runs):
  param_dtype, state_dtype, granularity, preserve_rms = case
  params, opt_state, losses, n_traces = _train(*case)

  assert n_traces == 1, f"the step was traced {n_traces} times"
  assert all(p.dtype == param_dtype for p in jax.tree.leaves(params))
  state = sal.find_protect_states(opt_state)[0]
  expected = jnp.dtype(jnp.float32 if state_dtype is None else state_dtype)
  for tree in (state.scores, state.protection_rates):
    assert all(x.dtype == expected for x in jax.tree.leaves(tree))
  for s, p in zip(jax.tree.leaves(state.scores), jax.tree.leaves(params)):
    assert s.shape == (p.shape if granularity == "element" else ())
  # The reference estimator's copy of the params keeps the params' dtype.
  assert all(x.dtype == param_dtype for x in
             jax.tree.leaves(state.estimator_state.previous_params))
  assert state.count.dtype == jnp.int32 and int(state.count) == STEPS
  assert state.threshold.dtype == jnp.float32
  for x in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(x, np.float32)))
  scores = np.concatenate([np.ravel(np.asarray(s, np.float32))
                           for s in jax.tree.leaves(state.scores)])
  assert np.all((scores >= 0) & (scores <= 1))

  # It trains, and it gates like the float32 run (to bf16 resolution).
  assert losses[-1] < losses[0], losses
  _, ref_state, ref_losses, _ = float32_runs(granularity, preserve_rms)
  ref = sal.find_protect_states(ref_state)[0]
  assert float(state.mean_protection_rate) > 0.05
  np.testing.assert_allclose(float(state.mean_protection_rate),
                             float(ref.mean_protection_rate), atol=0.03)
  np.testing.assert_allclose(float(state.threshold), float(ref.threshold),
                             atol=0.03)
  np.testing.assert_allclose(losses, ref_losses, rtol=0.02)


def test_trace_counter_sees_a_dtype_change():
  """Self-check: a state whose dtype drifts would be caught (the counter
  and the aval comparison do see a retrace)."""
  traces = []

  @jax.jit
  def f(x):
    traces.append(1)
    return x * 2

  f(jnp.ones(3, jnp.bfloat16))
  f(jnp.ones(3, jnp.float32))
  assert len(traces) == 2
  assert _avals(jnp.ones(3, jnp.bfloat16)) != _avals(jnp.ones(3))


def test_default_protect_in_bfloat16_keeps_dtypes_and_compiles_once():
  """The default (shift consolidation, Kronecker-factored, restoring pull,
  no gate) on bf16 params: one compile, fixed dtypes, float32 estimator
  state, and it trains."""
  params, opt_state, losses, n_traces = _train(
      jnp.bfloat16, None, None, False, estimator="shift_consolidation")
  assert n_traces == 1, f"the step was traced {n_traces} times"
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  state = sal.find_protect_states(opt_state)[0]
  est = state.estimator_state
  assert isinstance(est, sal.ShiftConsolidationState)
  # The anchor is an exact copy (bf16); the statistics are float32.
  for x, p in zip(jax.tree.leaves(est.anchor), jax.tree.leaves(params)):
    assert x.dtype == jnp.bfloat16 and x.shape == p.shape
  for x, p in zip(jax.tree.leaves(est.consolidated), jax.tree.leaves(params)):
    assert x.dtype == jnp.float32
    assert x.shape == p.shape or units.is_kronecker_unit(x, p)
  assert all(x.dtype == jnp.float32
             for x in jax.tree.leaves(est.importance))
  assert isinstance(state.scores, optax.EmptyState)
  for x in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(x, np.float32)))
  assert losses[-1] < losses[0], losses


# --------------------------------------------------------------------------
# The dtype policy of every estimator's state, with x64 off and on.

# param dtype -> dtype of the consolidation estimator's average of the
# params (its anchor): the params' own, at least float32. The
# shift-consolidation anchor is an exact copy, in the params' own dtype.
_ANCHOR_DTYPE = {"bfloat16": "float32", "float16": "float32",
                 "float32": "float32", "float64": "float64",
                 "complex64": "complex64", "complex128": "complex128"}


def _mixed_params(x64):
  """One leaf per dtype: the policy is per leaf, and the tree-wide
  statistics see every dtype at once."""
  dtypes = ["bfloat16", "float32"]
  dtypes += ["float64", "complex128"] if x64 else ["complex64"]
  key = jax.random.key(0)
  params = {}
  for i, name in enumerate(dtypes):
    x = jax.random.normal(jax.random.fold_in(key, i), (3, i + 1))
    if name.startswith("complex"):
      x = x + 1j * jax.random.normal(jax.random.fold_in(key, 10 + i), x.shape)
    params[name] = x.astype(name)
  return params


def _expected_estimator_dtypes(state, params, granularity):
  """The documented dtype of every leaf of an estimator state."""
  f32 = jnp.dtype(jnp.float32)

  def unit(p):
    if granularity == "factored":
      return ((p.shape[0] + p.shape[1],), f32)
    return (p.shape if granularity == "element" else (), f32)
  if isinstance(state, sal.ReferenceEstimatorState):
    return sal.ReferenceEstimatorState(
        previous_params={k: (p.shape, p.dtype) for k, p in params.items()})
  anchor = {k: (p.shape, jnp.dtype(_ANCHOR_DTYPE[p.dtype.name]))
            for k, p in params.items()}
  importance = {k: unit(p) for k, p in params.items()}
  if isinstance(state, sal.ConsolidationState):
    return sal.ConsolidationState(
        count=((), jnp.dtype(jnp.int32)), gradient_energy=((), f32),
        importance=importance, anchor=anchor)
  assert isinstance(state, sal.ShiftConsolidationState)
  return sal.ShiftConsolidationState(
      count=((), jnp.dtype(jnp.int32)), fast_energy=((), f32),
      slow_energy=((), f32), log_energy=((2,), f32),
      shifted=((), jnp.dtype(jnp.bool_)),
      consolidations=((), jnp.dtype(jnp.int32)), importance=importance,
      consolidated=importance,
      anchor={k: (p.shape, p.dtype) for k, p in params.items()},
      reference=((), f32))


def _shape_dtype(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


@pytest.mark.parametrize("x64", [False, True], ids=["x64-off", "x64-on"])
@pytest.mark.parametrize("estimator,granularity", [
    (e, g) for e in sorted(sal.ESTIMATORS) for g in ("leaf", "element")]
    + [("shift_consolidation", "factored")])
def test_every_estimator_state_follows_the_dtype_policy(estimator,
                                                        granularity, x64):
  with enable_x64(x64):
    params = _mixed_params(x64)
    tx = sal.protect(estimator=estimator, granularity=granularity)
    state0 = tx.init(params)
    update = jax.jit(tx.update)
    state = state0
    for scale in (1.0, 1.0, 8.0):  # the last step is a shift
      grads = jax.tree.map(lambda p: scale * p, params)
      out, state = update(grads, state, params)
      assert _shape_dtype(out) == _shape_dtype(params)
    assert jax.tree.map(lambda x: getattr(x, "weak_type", False), state) == (
        jax.tree.map(lambda x: getattr(x, "weak_type", False), state0))
  assert not jax.config.jax_enable_x64  # the context did not leak

  f32 = jnp.dtype(jnp.float32)
  gated = estimator == "reference"  # the others pull, ungated
  for s in (state0, state):
    empty = optax.EmptyState()
    gate_state = (jnp.zeros((), f32),
                  {k: jnp.zeros(p.shape if granularity == "element" else (),
                                f32) for k, p in params.items()},
                  {k: jnp.zeros((), f32) for k in params},
                  jnp.zeros((), f32)) if gated else (empty,) * 4
    assert _shape_dtype(s._replace(estimator_state=None)) == _shape_dtype(
        sal.ProtectState(jnp.zeros((), jnp.int32), *gate_state,
                         estimator_state=None, budget_state=empty))
    expected = _expected_estimator_dtypes(s.estimator_state, params,
                                          granularity)
    assert _shape_dtype(s.estimator_state) == expected
  assert int(state.count) == 3
  for x in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(x).astype(np.complex128)))


def test_float64_updates_keep_float64_precision():
  """Under x64 a float64 update is gated and pulled in float64: detail
  below float32's resolution survives."""
  with enable_x64(True):
    params = {"w": jnp.ones(4, jnp.float64)}
    grads = {"w": 1.0 + 1e-12 * jnp.arange(4, dtype=jnp.float64)}
    for tx in (sal.protect(estimator="reference", gate="none"),
               sal.protect(estimator="reference", gate="soft",
                           threshold=0.9),
               sal.protect(estimator="consolidation", restore=0.0)):
      out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
      assert out["w"].dtype == jnp.float64
      np.testing.assert_array_equal(np.asarray(out["w"]),
                                    np.asarray(grads["w"]))
