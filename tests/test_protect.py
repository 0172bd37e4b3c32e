"""Behaviour of `protect` beyond the fixture: granularity, gates, wrappers,
compilation, errors and non-finite steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import sal_jax as sal


def _params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"w": jax.random.normal(k1, (4, 3)), "b": jax.random.normal(k2, (3,))}


def _grads(seed=1):
  return jax.tree.map(lambda p: 0.1 * p, _params(seed))


# --------------------------------------------------------------------------
# Element granularity.


def test_element_scores_have_param_shapes_and_follow_the_formula():
  tx = sal.protect(estimator="reference", granularity="element")
  p0 = _params(0)
  state = tx.init(p0)
  chex.assert_trees_all_equal_shapes(state.scores, p0)
  p1 = jax.tree.map(lambda p: p + 0.3 * jnp.sign(p), p0)
  g = _grads()
  _, state = jax.jit(tx.update)(g, state, p1)
  for k in p0:
    raw = 1.0 / (1.0 + np.abs(np.asarray(p1[k]) - np.asarray(p0[k]))
                 * np.abs(np.asarray(g[k])) + 1e-8)
    np.testing.assert_allclose(state.scores[k], 0.3 * raw + 0.7 * 0.5,
                               rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    motion=hnp.arrays(np.float32, (6,), elements=st.floats(-1e3, 1e3, width=32)),
    grad=hnp.arrays(np.float32, (6,), elements=st.floats(-1e3, 1e3, width=32)),
)
def test_element_scores_are_bounded(motion, grad):
  tx = sal.protect(estimator="reference", granularity="element")
  p0 = {"w": jnp.zeros(6)}
  state = tx.init(p0)
  out, state = tx.update({"w": jnp.asarray(grad)}, state,
                         {"w": jnp.asarray(motion)})
  s = np.asarray(state.scores["w"])
  assert np.all((s >= 0) & (s <= 1))
  assert np.all(np.isfinite(np.asarray(out["w"])))


def test_element_score_decreases_with_motion_times_gradient():
  est = sal.reference_estimator(granularity="element")
  p0 = {"w": jnp.zeros(5)}
  state = est.init(p0)
  motion = jnp.array([0.0, 0.1, 0.5, 1.0, 4.0])
  raw, _ = est.update({"w": jnp.ones(5)}, state, {"w": motion})
  assert np.all(np.diff(np.asarray(raw["w"])) < 0)
  raw_g, _ = est.update({"w": motion}, state, {"w": jnp.ones(5)})
  np.testing.assert_allclose(raw["w"], raw_g["w"])  # symmetric in |dw|, |g|


def test_element_granularity_gates_entries_independently():
  tx = sal.protect(estimator="reference", granularity="element", gate="hard", score_ema=1.0,
                   threshold=0.5, threshold_adaptation=0.0)
  p0 = {"w": jnp.zeros(2)}
  state = tx.init(p0)
  # Entry 0 moved a lot with a large gradient -> low score -> passes;
  # entry 1 did not move -> score ~1 -> blocked.
  out, state = tx.update({"w": jnp.array([2.0, 2.0])}, state,
                         {"w": jnp.array([5.0, 0.0])})
  np.testing.assert_allclose(out["w"], [2.0, 0.0])


# --------------------------------------------------------------------------
# Gates.


@pytest.mark.parametrize("gate,expected", [
    ("soft", 1 - 0.65), ("hard", 0.0), ("linear", 1 - 0.15 / 0.5),
    ("sigmoid", 1 / (1 + np.exp(10 * 0.15)))])
def test_gates_at_first_step(gate, expected):
  # First step: no motion, raw score 1, score 0.3 + 0.35 = 0.65 > 0.5.
  tx = sal.protect(estimator="reference", gate=gate, threshold_adaptation=0.0)
  p = {"w": jnp.ones(3)}
  out, _ = tx.update({"w": jnp.full(3, 2.0)}, tx.init(p), p)
  np.testing.assert_allclose(out["w"], 2.0 * expected, rtol=1e-5)


def test_score_at_threshold_passes_unchanged():
  tx = sal.protect(estimator="reference", threshold=0.65, threshold_adaptation=0.0, gate="hard")
  p = {"w": jnp.ones(3)}
  out, _ = tx.update({"w": jnp.full(3, 2.0)}, tx.init(p), p)
  # float32(0.65) from the EMA equals float32(0.65): not strictly above.
  np.testing.assert_allclose(out["w"], 2.0)


# --------------------------------------------------------------------------
# optax and flax wrappers.


def _run(tx, params, steps=3, seed=1):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(steps):
    updates, state = update(_grads(seed + i), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_chain_with_adamw_metrics():
  params, state = _run(optax.chain(sal.protect(estimator="reference"), optax.adamw(1e-2)),
                       _params())
  m = sal.metrics(state)
  assert int(m["step"]) == 3
  assert 0.0 < float(m["protection_rate"]) < 1.0


def test_masked_only_protects_the_selected_leaves():
  tx = optax.masked(sal.protect(estimator="reference", gate="hard", threshold_adaptation=0.0),
                    {"w": True, "b": False})
  params = _params()
  state = tx.init(params)
  g = _grads()
  out, state = tx.update(g, state, params)
  np.testing.assert_allclose(out["w"], 0.0)  # score 0.65 > 0.5: blocked
  np.testing.assert_allclose(out["b"], g["b"])
  assert int(sal.metrics(state)["step"]) == 1


def test_multi_transform():
  tx = optax.multi_transform(
      {"sal": optax.chain(sal.protect(), optax.sgd(0.1)),
       "plain": optax.sgd(0.1)},
      {"w": "sal", "b": "plain"})
  params, state = _run(tx, _params())
  assert int(sal.metrics(state)["step"]) == 3


def test_inject_hyperparams_threshold_is_injectable():
  tx = optax.inject_hyperparams(sal.protect)(threshold=0.5,
                                             threshold_adaptation=0.0,
                                             gate="hard",
                                             estimator="reference")
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  g = {"w": jnp.ones(3)}
  out, _ = update(g, state, params)
  np.testing.assert_allclose(out["w"], 0.0)  # 0.65 > 0.5
  state.hyperparams["threshold"] = jnp.asarray(0.9)
  out, new_state = update(g, state, params)
  np.testing.assert_allclose(out["w"], 1.0)  # 0.65 < 0.9
  np.testing.assert_allclose(sal.metrics(new_state)["threshold"], 0.9)


def test_multi_steps_updates_protect_every_k_steps():
  tx = optax.MultiSteps(optax.chain(sal.protect(), optax.sgd(0.1)),
                        every_k_schedule=2)
  params, state = _run(tx, _params(), steps=4)
  assert int(sal.metrics(state)["step"]) == 2


def test_apply_if_finite_rejects_nonfinite_step_and_state_survives():
  tx = optax.apply_if_finite(optax.chain(sal.protect(), optax.sgd(0.1)),
                             max_consecutive_errors=5)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update(_grads(), state, params)
  before = sal.find_protect_states(state)[0]
  bad = {"w": jnp.full((4, 3), jnp.nan), "b": jnp.ones(3)}
  out, state = update(bad, state, params)
  after = sal.find_protect_states(state)[0]
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(out))
  chex.assert_trees_all_equal(before, after)
  assert int(state.notfinite_count) == 1


def test_nonfinite_updates_pass_through_and_state_is_unchanged():
  tx = sal.protect()
  params = _params()
  state = tx.init(params)
  _, state = tx.update(_grads(), state, params)
  bad = {"w": jnp.full((4, 3), jnp.inf), "b": jnp.ones(3)}
  out, new_state = jax.jit(tx.update)(bad, state, params)
  chex.assert_trees_all_equal(new_state, state)
  np.testing.assert_array_equal(out["w"], bad["w"])
  np.testing.assert_array_equal(out["b"], bad["b"])


@pytest.mark.parametrize("estimator", sorted(sal.ESTIMATORS))
def test_nonfinite_params_leave_the_state_and_updates_alone(estimator):
  """Finite gradients at non-finite params: a non-finite step, as for
  non-finite updates (count, estimator and scores untouched)."""
  tx = sal.protect(estimator=estimator, granularity="element")
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(3):
    _, state = update(_grads(i), state, params)
  grads = _grads(5)
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    broken = {"w": params["w"], "b": params["b"].at[1].set(bad)}
    out, new_state = update(grads, state, broken)
    chex.assert_trees_all_equal(new_state, state)
    chex.assert_trees_all_equal(out, grads)
  # The next finite step goes on from there.
  _, state = update(grads, new_state, params)
  assert int(state.count) == 4


def test_flax_nnx_optimizer():
  class Model(nnx.Module):

    def __init__(self, rngs):
      self.linear = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.linear(x)

  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, optax.chain(sal.protect(), optax.adamw(1e-2)), wrt=nnx.Param)
  x = jnp.ones((8, 4))

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  kernel0 = jnp.array(model.linear.kernel[...])
  for _ in range(3):
    step(model, optimizer)
  assert int(sal.metrics(optimizer)["step"]) == 3
  m = nnx.jit(sal.metrics)(optimizer)
  assert int(m["step"]) == 3
  assert not np.allclose(model.linear.kernel[...], kernel0)


# --------------------------------------------------------------------------
# Compilation, dtypes, state.


def test_jit_compiles_once():
  traces = []
  tx = optax.chain(sal.protect(), optax.adamw(1e-2))

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = _params()
  state = tx.init(params)
  for i in range(5):
    params, state = step(params, state, _grads(i))
  assert len(traces) == 1


@pytest.mark.parametrize("granularity", ["leaf", "element"])
@pytest.mark.parametrize("param_dtype,state_dtype", [
    (jnp.float32, None), (jnp.bfloat16, jnp.bfloat16),
    (jnp.bfloat16, None)])
def test_state_shapes_and_dtypes_never_change(granularity, param_dtype,
                                              state_dtype):
  tx = sal.protect(gate="soft", granularity=granularity,
                   state_dtype=state_dtype)
  params = jax.tree.map(lambda p: p.astype(param_dtype), _params())
  state0 = tx.init(params)
  state = state0
  for i in range(3):
    g = jax.tree.map(lambda p: p.astype(param_dtype), _grads(i))
    out, state = jax.jit(tx.update)(g, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, g)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
  expected = jnp.float32 if state_dtype is None else state_dtype
  assert all(s.dtype == expected for s in jax.tree.leaves(state.scores))


def test_axis_name_statistics_use_the_cross_device_mean():
  """Per-replica gradients under a named axis: every replica ends with the
  state of a single run on the mean gradient."""
  tx = sal.protect(axis_name="batch")
  tx_single = sal.protect()
  params = _params()
  per_replica = jax.tree.map(
      lambda p: jnp.stack([p * (1.0 + i) for i in range(4)]), _grads())
  mean_grads = jax.tree.map(lambda g: g.mean(0), per_replica)
  state = jax.tree.map(lambda x: jnp.stack([x] * 4), tx.init(params))
  single = tx_single.init(params)
  vupdate = jax.vmap(tx.update, in_axes=(0, 0, None), axis_name="batch")
  for _ in range(3):
    _, state = vupdate(per_replica, state, params)
    _, single = tx_single.update(mean_grads, single, params)
  for leaf, ref in zip(jax.tree.leaves(state), jax.tree.leaves(single)):
    for r in range(4):
      np.testing.assert_allclose(leaf[r], ref, rtol=1e-6)


# --------------------------------------------------------------------------
# Errors.


def test_missing_params_raises_optax_message():
  tx = sal.protect()
  params = _params()
  with pytest.raises(ValueError, match="requires the current value of "
                     "parameters, but you are not passing `params`"):
    tx.update(_grads(), tx.init(params))


def test_tree_structure_mismatch_names_the_leaf():
  tx = sal.protect()
  params = _params()
  with pytest.raises(ValueError, match=r"only in params: \[\"\['b'\]\"\]"):
    tx.update({"w": _grads()["w"]}, tx.init(params), params)


def test_shape_mismatch_names_the_leaf():
  tx = sal.protect()
  params = _params()
  g = dict(_grads(), w=jnp.ones((3, 4)))
  with pytest.raises(ValueError, match=r"shape at \['w'\]: \(3, 4\) vs \(4, 3\)"):
    tx.update(g, tx.init(params), params)


def test_state_for_another_tree_is_rejected():
  tx = sal.protect()
  state = tx.init({"a": jnp.ones(2)})
  with pytest.raises(ValueError, match="initialised for a different params"):
    tx.update(_grads(), state, _params())


@pytest.mark.parametrize("kwargs,match", [
    (dict(threshold=1.5), "threshold must be in"),
    # Inside [0, 1] but outside the clip range: it would act as 0.9.
    (dict(threshold=1.0), "outside threshold_range"),
    (dict(threshold=-0.1), "threshold must be in"),
    (dict(threshold_adaptation=-1.0), "threshold_adaptation must be in"),
    (dict(score_ema=0.0), "score_ema must be in"),
    (dict(score_ema=float("nan")), "score_ema must be in"),
    (dict(gate="smooth"), "unknown gate 'smooth'"),
    (dict(granularity="row"), "unknown granularity 'row'"),
    (dict(estimator="magic"), "unknown estimator 'magic'"),
    (dict(threshold_range=(0.9, 0.1)), "threshold_range"),
    (dict(state_dtype=jnp.int32), "state_dtype must be a float"),
])
def test_bad_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sal.protect(**{"gate": "soft", **kwargs})


def test_metrics_errors():
  with pytest.raises(ValueError, match="no ProtectState"):
    sal.metrics(optax.adam(1e-3).init({"w": jnp.ones(2)}))
  tx = optax.chain(sal.protect(), sal.protect())
  with pytest.raises(ValueError, match="found 2 ProtectStates"):
    sal.metrics(tx.init({"w": jnp.ones(2)}))


def test_metrics_inside_jit_after_training():
  _, state = _run(optax.chain(sal.protect(gate="soft"), optax.sgd(0.1)),
                  _params())
  m = jax.jit(sal.metrics)(state)
  for key in ("threshold", "protection_rate", "mean_protection_rate",
              "protected_fraction", "neutral_fraction", "volatile_fraction"):
    assert m[key].shape == () and m[key].dtype == jnp.float32
  total = m["protected_fraction"] + m["neutral_fraction"] + m["volatile_fraction"]
  np.testing.assert_allclose(total, 1.0, rtol=1e-6)
