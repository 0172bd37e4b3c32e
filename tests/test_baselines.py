"""The continual-learning baselines of sal_jax.baselines against numpy."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sal_jax import baselines
from sal_jax._common.tree_utils import MISSING_PARAMS_MESSAGE
from sal_jax.baselines._momentum_filter import _top_fraction_mask
from conftest import enable_x64
from conftest import two_linear_tasks

TOL = dict(rtol=2e-5, atol=1e-6)
SHAPES = {"w": (3, 2), "b": (2,)}


def _trajectory(steps=5, seed=0):
  """Random params and gradients: lists of ``{name: float64 array}``."""
  rng = np.random.default_rng(seed)
  params = [{k: rng.normal(size=s) for k, s in SHAPES.items()}
            for _ in range(steps)]
  grads = [{k: rng.normal(size=s) for k, s in SHAPES.items()}
           for _ in range(steps)]
  return params, grads


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _run(tx, params, grads, jit=True):
  """Feeds the trajectory through ``tx``; returns numpy outputs and state."""
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(_f32(params[0]))
  outs = []
  for p, g in zip(params, grads):
    out, state = update(_f32(g), state, _f32(p))
    outs.append(jax.tree.map(np.asarray, out))
  return outs, state


def _assert_trees_close(actual, expected, **tol):
  for a, e in zip(actual, expected):
    for k in SHAPES:
      np.testing.assert_allclose(a[k], e[k], **(tol or TOL))


# ---------------------------------------------------------------- references


def _np_streaming(params, grads, lam, rho, alpha, signal):
  outs = []
  omega = {k: np.zeros(s) for k, s in SHAPES.items()}
  anchor = dict(params[0])
  for t, (p, g) in enumerate(zip(params, grads), start=1):
    out = {}
    for k in SHAPES:
      omega_hat = omega[k] / (1 - rho ** (t - 1)) if t > 1 else 0.0 * omega[k]
      out[k] = g[k] + lam * omega_hat * (p[k] - anchor[k])
      omega[k] = rho * omega[k] + (1 - rho) * signal(g[k])
      anchor[k] = alpha * anchor[k] + (1 - alpha) * p[k]
    outs.append(out)
  return outs


def _np_streaming_si(params, grads, lam, xi, rho, alpha):
  outs, importances = [], []
  zeros = {k: np.zeros(s) for k, s in SHAPES.items()}
  path, disp, prev_g = dict(zeros), dict(zeros), dict(zeros)
  anchor, prev_p = dict(params[0]), dict(params[0])
  for t, (p, g) in enumerate(zip(params, grads), start=1):
    out, omega = {}, {}
    for k in SHAPES:
      if t > 1:
        path[k] = rho * path[k] - prev_g[k] * (p[k] - prev_p[k])
        disp[k] = rho * disp[k] + (1 - rho) * (p[k] - anchor[k]) ** 2
        omega[k] = (np.maximum(path[k], 0)
                    / (disp[k] / (1 - rho ** (t - 1)) + xi))
      else:
        omega[k] = zeros[k]
      out[k] = g[k] + lam * omega[k] * (p[k] - anchor[k])
      anchor[k] = alpha * anchor[k] + (1 - alpha) * p[k]
      prev_p[k], prev_g[k] = p[k], g[k]
    outs.append(out)
    importances.append(omega)
  return outs, importances


def _np_upgd(params, grads, lr, beta, wd):
  outs = []
  util = {k: np.zeros(s) for k, s in SHAPES.items()}
  for t, (p, g) in enumerate(zip(params, grads), start=1):
    for k in SHAPES:
      util[k] = beta * util[k] + (1 - beta) * (-g[k] * p[k])
    eta = max(u.max() for u in util.values())
    eta = eta if eta > 0 else 1e-300  # the limit eta -> 0+
    out = {}
    for k in SHAPES:
      with np.errstate(over="ignore"):
        s = 1 / (1 + np.exp(-(util[k] / (1 - beta ** t)) / eta))
      out[k] = -lr * (g[k] * (1 - s) + wd * p[k])
    outs.append(out)
  return outs


# ---------------------------------------------------------------- factories

FACTORIES = {
    "ewc": lambda: baselines.ewc(2.0),
    "streaming_ewc": lambda: baselines.streaming_ewc(2.0, 0.9, 0.8),
    "streaming_mas": lambda: baselines.streaming_mas(2.0, 0.9, 0.8),
    "streaming_si": lambda: baselines.streaming_si(2.0, 0.1, 0.9, 0.8),
    "l2_init": lambda: baselines.l2_init(2.0),
    "upgd": lambda: baselines.upgd(0.1, 0.9, 0.01, 0.01, key=3),
    "weight_average": lambda: baselines.weight_average(0.9),
    "momentum_filter": lambda: baselines.momentum_filter(0.1, fraction=0.5),
}


def _in_chain(name):
  tx = FACTORIES[name]()
  if name in ("upgd", "momentum_filter"):  # optimizers of their own
    return tx
  if name == "weight_average":  # sees the final updates
    return optax.chain(optax.adamw(1e-2), tx)
  return optax.chain(tx, optax.adamw(1e-2))


# ---------------------------------------------------------------- generic


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_jitted_chain_compiles_once(name):
  tx = _in_chain(name)
  params, grads = _trajectory(5)
  traces = []

  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step)
  p = _f32(params[0])
  state = tx.init(p)
  for i, g in enumerate(grads):
    p, state = step(p, state, _f32(g))
    if name == "ewc" and i == 1:  # a task boundary between steps
      state = baselines.ewc_consolidate(state, p,
                                        jax.tree.map(jnp.ones_like, p))
  assert len(traces) == 1
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf, jax.Array)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(p))


# MoFO is Adam with a mask: like optax.adam it needs no params.
@pytest.mark.parametrize("name", sorted(set(FACTORIES) - {"momentum_filter"}))
def test_params_are_required_and_checked(name):
  tx = FACTORIES[name]()
  params = {"w": jnp.zeros(2), "b": jnp.zeros(3)}
  state = tx.init(params)
  with pytest.raises(ValueError) as err:
    tx.update(params, state)
  assert str(err.value) == MISSING_PARAMS_MESSAGE
  with pytest.raises(ValueError, match="differ in shape"):
    tx.update({"w": jnp.zeros(3), "b": jnp.zeros(3)}, state, params)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_half_precision_params_keep_float32_state(name):
  tx = FACTORIES[name]()
  params = {"w": jnp.ones(3, jnp.bfloat16)}
  state = tx.init(params)
  out, state = tx.update({"w": jnp.ones(3, jnp.bfloat16)}, state, params)
  assert out["w"].dtype == jnp.bfloat16
  floats = [x for x in jax.tree.leaves(state)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)


# Per field of a baseline's state: whether it is a position (the params'
# dtype, at least float32) or a magnitude (its real counterpart).
_POSITION_FIELDS = ("anchor", "prev_params", "prev_grad", "average", "mu")
_REAL_FIELDS = ("importance", "utility", "path", "displacement", "nu")
_REAL = {"bfloat16": "float32", "float32": "float32", "float64": "float64",
         "complex128": "float64"}
_POSITION = dict(_REAL, complex128="complex128")


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_float64_and_complex_params_under_x64(name):
  """With x64 on, float64 and complex128 params keep their dtype in the
  updates and the anchors; importances are real; jitted steps keep every
  state leaf's dtype (and x64 is off again afterwards)."""
  with enable_x64(True):
    key = jax.random.key(0)
    params = {d: jax.random.normal(jax.random.fold_in(key, i), (3,)).astype(d)
              for i, d in enumerate(_REAL)}
    params["complex128"] = params["complex128"] * (1 + 1j)
    tx = FACTORIES[name]()
    state0 = state = tx.init(params)
    if name == "ewc":
      state0 = state = baselines.ewc_consolidate(
          state, params, jax.tree.map(lambda p: jnp.abs(p) ** 2, params))
    update = jax.jit(tx.update)
    for i in range(3):
      grads = jax.tree.map(lambda p: (i + 1.0) * p, params)
      out, state = update(grads, state, params)
      assert {k: v.dtype for k, v in out.items()} == {
          k: v.dtype for k, v in params.items()}
  assert not jax.config.jax_enable_x64
  chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
  # MoFO is a chain: its own state is the first named one.
  own = [x for x in jax.tree.leaves(state, is_leaf=lambda x: hasattr(
      x, "_asdict")) if hasattr(x, "_asdict")][0]
  for field, value in own._asdict().items():
    if field in _POSITION_FIELDS + _REAL_FIELDS:
      table = _POSITION if field in _POSITION_FIELDS else _REAL
      assert {k: v.dtype.name for k, v in value.items()} == table, field
  for x in jax.tree.leaves((out, state)):
    assert np.all(np.isfinite(np.asarray(x)))


@pytest.mark.parametrize("make, match", [
    (lambda: baselines.ewc(-1.0), "strength"),
    (lambda: baselines.l2_init(-0.1), "strength"),
    (lambda: baselines.streaming_ewc(1.0, importance_decay=1.0),
     "importance_decay"),
    (lambda: baselines.streaming_mas(1.0, anchor_decay=-0.1), "anchor_decay"),
    (lambda: baselines.streaming_si(1.0, damping=0.0), "damping"),
    (lambda: baselines.streaming_si(float("nan")), "strength"),
    (lambda: baselines.upgd(0.0), "learning_rate"),
    (lambda: baselines.upgd(0.1, utility_decay=1.0), "utility_decay"),
    (lambda: baselines.upgd(0.1, noise_std=-1.0), "noise_std"),
    (lambda: baselines.upgd(0.1, weight_decay=-1.0), "weight_decay"),
    (lambda: baselines.weight_average(1.0), "decay"),
    (lambda: baselines.momentum_filter(0.1, fraction=0.0), "fraction"),
    (lambda: baselines.momentum_filter(0.1, fraction=1.5), "fraction"),
])
def test_bad_hyperparameters_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_inject_hyperparams_arrays_skip_validation():
  params = {"w": jnp.ones(2)}
  tx = optax.inject_hyperparams(baselines.streaming_si)(
      strength=1.0, importance_decay=0.9)
  state = tx.init(params)
  out, state = jax.jit(tx.update)({"w": jnp.ones(2)}, state, params)
  np.testing.assert_allclose(out["w"], [1.0, 1.0])
  tx = optax.inject_hyperparams(baselines.upgd, static_args=("key",))(
      learning_rate=0.1, noise_std=0.0)
  state = tx.init(params)
  out, state = jax.jit(tx.update)({"w": jnp.ones(2)}, state, params)
  # u = -0.001 * g * theta < 0 everywhere: s = 0, the full step.
  np.testing.assert_allclose(out["w"], [-0.1, -0.1], rtol=1e-6)


# ---------------------------------------------------------------- l2_init


def test_l2_init_matches_numpy():
  params, grads = _trajectory(4)
  outs, _ = _run(baselines.l2_init(0.7), params, grads)
  expected = [{k: g[k] + 0.7 * (p[k] - params[0][k]) for k in SHAPES}
              for p, g in zip(params, grads)]
  _assert_trees_close(outs, expected)


# ---------------------------------------------------------------- ewc


def test_ewc_is_a_pass_through_before_consolidation():
  params, grads = _trajectory(3)
  outs, _ = _run(baselines.ewc(100.0), params, grads)
  _assert_trees_close(outs, grads)


def test_ewc_classic_equals_sum_of_task_penalties():
  rng = np.random.default_rng(1)
  params, grads = _trajectory(2, seed=2)
  anchors = [{k: rng.normal(size=s) for k, s in SHAPES.items()}
             for _ in range(3)]
  fishers = [{k: rng.uniform(size=s) for k, s in SHAPES.items()}
             for _ in range(3)]
  fishers[0]["b"][0] = 0.0  # a zero Fisher entry in one task
  tx = baselines.ewc(0.5)
  state = tx.init(_f32(params[0]))
  consolidate = jax.jit(baselines.ewc_consolidate)
  for a, f in zip(anchors, fishers):
    state = consolidate(state, _f32(a), _f32(f))
  assert int(state.consolidations) == 3
  out, _ = tx.update(_f32(grads[1]), state, _f32(params[1]))
  for k in SHAPES:
    pull = sum(f[k] * (params[1][k] - a[k]) for a, f in zip(anchors, fishers))
    np.testing.assert_allclose(out[k], grads[1][k] + 0.5 * pull, **TOL)
    np.testing.assert_allclose(state.importance[k],
                               sum(f[k] for f in fishers), **TOL)


def test_ewc_online_decay_and_reanchoring():
  p0 = {"w": jnp.zeros(2)}
  tx = optax.chain(baselines.ewc(1.0), optax.sgd(0.1))
  state = tx.init(p0)
  f1 = {"w": jnp.array([4.0, 0.0])}
  f2 = {"w": jnp.array([0.0, 2.0])}
  state = baselines.ewc_consolidate(state, {"w": jnp.ones(2)}, f1, online=True,
                                    decay=0.5)
  state = baselines.ewc_consolidate(state, {"w": jnp.full(2, 3.0)}, f2,
                                    online=True, decay=0.5)
  ewc_state = state[0]
  np.testing.assert_allclose(ewc_state.importance["w"], [2.0, 2.0])
  np.testing.assert_allclose(ewc_state.anchor["w"], [3.0, 3.0])
  assert isinstance(state[1], type(tx.init(p0)[1]))  # the rest is untouched
  with pytest.raises(ValueError, match="online=True"):
    baselines.ewc_consolidate(state, p0, f1, decay=0.5)
  with pytest.raises(ValueError, match="exactly one EwcState"):
    baselines.ewc_consolidate(optax.sgd(0.1).init(p0), p0, f1)
  with pytest.raises(ValueError, match="decay"):
    baselines.ewc_consolidate(state, p0, f1, online=True, decay=1.5)


def test_ewc_pulls_toward_anchor_after_consolidation():
  anchor = {"w": jnp.array([1.0, -1.0, 0.5])}
  tx = optax.chain(baselines.ewc(1.0), optax.sgd(0.2))
  state = baselines.ewc_consolidate(tx.init(anchor), anchor,
                                    {"w": jnp.array([1.0, 1.0, 0.0])})
  p = {"w": jnp.array([3.0, 2.0, 4.0])}
  step = jax.jit(tx.update)
  for _ in range(30):
    u, state = step({"w": jnp.zeros(3)}, state, p)
    p = optax.apply_updates(p, u)
  np.testing.assert_allclose(p["w"][:2], [1.0, -1.0], atol=1e-2)
  assert float(p["w"][2]) == 4.0  # zero importance: not pulled


def test_empirical_fisher_is_mean_squared_per_example_gradient():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(7, 3)).astype(np.float32)
  y = rng.normal(size=7).astype(np.float32)
  params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32),
            "b": jnp.float32(0.3)}

  def loss(p, example):
    xi, yi = example
    return 0.5 * (xi @ p["w"] + p["b"] - yi) ** 2

  fisher = jax.jit(lambda p, d: baselines.empirical_fisher(loss, p, d))(
      params, (x, y))
  r = x @ np.asarray(params["w"]) + 0.3 - y  # dloss/dpred per example
  np.testing.assert_allclose(fisher["w"], np.mean((r[:, None] * x) ** 2, 0),
                             rtol=1e-5)
  np.testing.assert_allclose(fisher["b"], np.mean(r ** 2), rtol=1e-5)


def test_ewc_forgets_the_first_task_less_than_sgd():
  x_a, y_a, x_b, y_b = (jnp.asarray(v) for v in two_linear_tasks())

  def loss(w, example):
    xi, yi = example
    return 0.5 * jnp.mean((xi @ w - yi) ** 2)

  def train(tx, w, state, x, y, steps=300):
    def body(carry, _):
      w, state = carry
      g = jax.grad(loss)(w, (x, y))
      u, state = tx.update(g, state, w)
      return (optax.apply_updates(w, u), state), None
    return jax.lax.scan(body, (w, state), None, length=steps)[0]

  sgd = optax.sgd(0.05)
  w_a, _ = jax.jit(lambda w: train(sgd, w, sgd.init(w), x_a, y_a))(
      jnp.zeros(x_a.shape[1]))
  loss_a_before = float(loss(w_a, (x_a, y_a)))

  ewc_tx = optax.chain(baselines.ewc(5.0), optax.sgd(0.05))
  fisher = baselines.empirical_fisher(loss, w_a, (x_a, y_a))
  ewc_state = baselines.ewc_consolidate(ewc_tx.init(w_a), w_a, fisher)
  w_sgd, _ = jax.jit(lambda w: train(sgd, w, sgd.init(w), x_b, y_b))(w_a)
  w_ewc, _ = jax.jit(lambda w, s: train(ewc_tx, w, s, x_b, y_b))(
      w_a, ewc_state)

  forget_sgd = float(loss(w_sgd, (x_a, y_a))) - loss_a_before
  forget_ewc = float(loss(w_ewc, (x_a, y_a))) - loss_a_before
  assert forget_sgd > 1.0  # the second task really overwrites the first
  assert forget_ewc < 0.25 * forget_sgd  # measured: 0.29 vs 2.80
  # ... while still learning the second task.
  assert float(loss(w_ewc, (x_b, y_b))) < 0.5 * float(loss(w_a, (x_b, y_b)))


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("name, signal", [("streaming_ewc", np.square),
                                          ("streaming_mas", np.abs)])
def test_streaming_ewc_mas_match_numpy(name, signal):
  params, grads = _trajectory(6, seed=5)
  factory = getattr(baselines, name)
  outs, state = _run(factory(1.5, importance_decay=0.7, anchor_decay=0.6),
                     params, grads)
  _assert_trees_close(outs, _np_streaming(params, grads, 1.5, 0.7, 0.6,
                                          signal))
  assert int(state.count) == 6


@pytest.mark.parametrize("name", ["streaming_ewc", "streaming_mas",
                                  "streaming_si"])
def test_streaming_importance_follows_gradient_size(name):
  # Coordinate 0 gets large gradients, coordinate 1 small ones; both are
  # displaced from the anchor by the same amount afterwards.
  tx = optax.chain(getattr(baselines, name)(1.0, importance_decay=0.9,
                                            anchor_decay=0.99),
                   optax.sgd(0.1))
  p = {"w": jnp.zeros(2)}
  state = tx.init(p)
  step = jax.jit(tx.update)
  for _ in range(20):
    u, state = step({"w": jnp.array([-1.0, -0.01])}, state, p)
    p = optax.apply_updates(p, u)
  displaced = {"w": p["w"][0] * jnp.ones(2)}
  out, _ = step({"w": jnp.zeros(2)}, state, displaced)
  pull = -np.asarray(out["w"]) / 0.1  # the penalty term per coordinate
  assert pull[0] > 0 and pull[0] > 10 * max(pull[1], 0.0)


@pytest.mark.parametrize("name", ["streaming_ewc", "streaming_mas",
                                  "streaming_si"])
def test_zero_strength_is_identity(name):
  params, grads = _trajectory(4, seed=6)
  outs, _ = _run(getattr(baselines, name)(0.0), params, grads)
  _assert_trees_close(outs, grads)


def test_streaming_si_matches_numpy():
  params, grads = _trajectory(7, seed=7)
  outs, state = _run(baselines.streaming_si(1.3, damping=0.2,
                                            importance_decay=0.8,
                                            anchor_decay=0.7), params, grads)
  expected, importances = _np_streaming_si(params, grads, 1.3, 0.2, 0.8, 0.7)
  _assert_trees_close(outs, expected)
  # Random gradients and moves: some path integrals are negative, and those
  # coordinates get zero importance (never a push away from the anchor).
  assert (np.asarray(state.path["w"]) < 0).any()
  assert all((o[k] >= 0).all() for o in importances for k in SHAPES)
  assert any((o[k] == 0).any() for o in importances[1:] for k in SHAPES)


def test_streaming_si_importance_is_the_path_integral_under_sgd():
  # Under plain SGD the path integral -g_{t-1} (theta_t - theta_{t-1}) =
  # lr * g_{t-1}**2 >= 0: the coordinate that did the work gets importance.
  lr = 0.1
  si = baselines.streaming_si(1.0, damping=0.1, importance_decay=0.9,
                              anchor_decay=0.9)
  curvature = jnp.array([1.0, 0.0])
  p = {"w": jnp.array([2.0, 2.0])}
  state = si.init(p)
  for _ in range(10):
    g = {"w": curvature * p["w"]}
    _, state = si.update(g, state, p)
    p = {"w": p["w"] - lr * g["w"]}  # SGD on the task gradient only
  path = np.asarray(state.path["w"])
  assert path[0] > 0 and path[1] == 0.0


# ---------------------------------------------------------------- upgd


def test_upgd_without_noise_matches_numpy():
  params, grads = _trajectory(6, seed=8)
  outs, state = _run(baselines.upgd(0.05, utility_decay=0.8, noise_std=0.0,
                                    weight_decay=0.1), params, grads)
  _assert_trees_close(outs, _np_upgd(params, grads, 0.05, 0.8, 0.1))
  assert int(state.count) == 6


def test_upgd_non_positive_max_utility_is_guarded():
  # u = -g * theta <= 0 everywhere: no division by zero, no sign flip.
  params = [{"w": np.ones(SHAPES["w"]), "b": np.zeros(SHAPES["b"])}]
  grads = [{"w": np.ones(SHAPES["w"]), "b": np.ones(SHAPES["b"])}]
  outs, _ = _run(baselines.upgd(0.1, noise_std=0.0), params, grads)
  np.testing.assert_allclose(outs[0]["w"], -0.1)  # s = 0: full step
  np.testing.assert_allclose(outs[0]["b"], -0.05)  # s = 1/2
  _assert_trees_close(outs, _np_upgd(params, grads, 0.1, 0.999, 0.0))


def test_upgd_noise_is_deterministic_given_the_key():
  params, grads = _trajectory(3, seed=9)
  run = lambda key: _run(baselines.upgd(0.1, noise_std=0.5, key=key),
                         params, grads)[0]
  a, b, c = run(7), run(7), run(8)
  _assert_trees_close(a, b, rtol=0, atol=0)
  assert not np.allclose(a[0]["w"], c[0]["w"])
  typed, raw = run(jax.random.key(7)), run(jax.random.PRNGKey(7))
  _assert_trees_close(typed, a, rtol=0, atol=0)
  _assert_trees_close(raw, a, rtol=0, atol=0)
  # Steps draw fresh noise.
  tx = baselines.upgd(1.0, noise_std=1.0)
  p = {"w": jnp.zeros(4096)}
  state = tx.init(p)
  first, state = tx.update({"w": jnp.zeros(4096)}, state, p)
  second, _ = tx.update({"w": jnp.zeros(4096)}, state, p)
  # Zero utility everywhere: s = 1/2, so the step is -0.5 * xi.
  assert abs(float(jnp.std(first["w"])) - 0.5) < 0.03
  assert abs(float(jnp.corrcoef(first["w"], second["w"])[0, 1])) < 0.1


def test_upgd_protects_high_utility_weights():
  # Same gradient magnitude; weight 0 is useful (-g * theta > 0), weight 1
  # is not. The useful one moves less, step after step.
  tx = baselines.upgd(0.01, utility_decay=0.9, noise_std=0.001, key=1)
  p = {"w": jnp.array([1.0, 1.0])}
  g = {"w": jnp.array([-1.0, 1.0])}
  state = tx.init(p)
  step = jax.jit(tx.update)
  for _ in range(20):
    u, state = step(g, state, p)
    p = optax.apply_updates(p, u)
  moved = np.abs(np.asarray(p["w"]) - 1.0)
  assert moved[0] < 0.5 * moved[1]


# ---------------------------------------------------------------- averaging


def test_weight_average_matches_numpy_and_passes_updates():
  params, grads = _trajectory(6)
  tx = optax.chain(optax.sgd(0.1), baselines.weight_average(0.8))
  p = _f32(params[0])
  state = tx.init(p)
  average, weight = {k: np.zeros(s) for k, s in SHAPES.items()}, 0.0
  current = {k: np.asarray(v) for k, v in params[0].items()}
  for g in grads:
    updates, state = tx.update(_f32(g), state, p)
    p = optax.apply_updates(p, updates)
    for k in SHAPES:
      np.testing.assert_allclose(updates[k], -0.1 * g[k], **TOL)
      current[k] = current[k] - 0.1 * g[k]
      average[k] = 0.8 * average[k] + 0.2 * current[k]
    weight = 0.8 * weight + 0.2
  got = baselines.averaged_params(state)
  for k in SHAPES:
    np.testing.assert_allclose(got[k], average[k] / weight, **TOL)


def test_averaged_params_needs_exactly_one_state():
  with pytest.raises(ValueError, match="exactly one WeightAverageState"):
    baselines.averaged_params(optax.adam(1e-3).init(jnp.zeros(2)))


# ---------------------------------------------------------------- MoFO


def test_momentum_filter_matches_numpy_adam_on_the_top_fraction():
  params, grads = _trajectory(5)
  fraction, b1, b2, eps = 0.5, 0.9, 0.999, 1e-8
  outs, _ = _run(baselines.scale_by_momentum_filter(fraction), params, grads)
  m = {k: np.zeros(s) for k, s in SHAPES.items()}
  v = {k: np.zeros(s) for k, s in SHAPES.items()}
  for t, (g, out) in enumerate(zip(grads, outs), start=1):
    for k in SHAPES:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      step = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      keep = int(np.ceil(fraction * m[k].size))
      cut = np.sort(np.abs(m[k]).ravel())[-keep]
      expected = np.where(np.abs(m[k]) >= cut, step, 0.0)
      np.testing.assert_allclose(out[k], expected, rtol=1e-4, atol=1e-6)
      assert (out[k] != 0).sum() == keep  # no ties in random data


def test_momentum_filter_with_fraction_one_is_adam():
  params, grads = _trajectory(4)
  outs, _ = _run(baselines.momentum_filter(0.01, fraction=1.0), params, grads)
  adam, _ = _run(optax.adam(0.01), params, grads)
  _assert_trees_close(outs, adam, rtol=1e-5, atol=1e-7)


def test_momentum_filter_fraction_may_be_traced():
  params, grads = _trajectory(2)

  @jax.jit
  def first_update(fraction):
    tx = baselines.scale_by_momentum_filter(fraction)
    return tx.update(_f32(grads[0]), tx.init(_f32(params[0])))[0]

  assert int((first_update(0.5)["w"] != 0).sum()) == 3
  assert int((first_update(1.0)["w"] != 0).sum()) == 6


def _nnx_ewc_optimizer():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(baselines.ewc(1.0),
                                               optax.sgd(0.1)),
                            wrt=nnx.Param)
  return nnx, model, optimizer, nnx.state(model, nnx.Param)


def test_ewc_consolidate_an_nnx_optimizer_in_place():
  nnx, model, optimizer, params = _nnx_ewc_optimizer()
  fisher = jax.tree.map(lambda p: jnp.abs(p[...]) + 1.0, params)
  assert baselines.ewc_consolidate(optimizer, params, fisher) is optimizer
  state = optimizer.opt_state[0]
  for omega, anchor, f, p in zip(
      jax.tree.leaves(state.importance), jax.tree.leaves(state.anchor),
      jax.tree.leaves(fisher), jax.tree.leaves(params)):
    np.testing.assert_array_equal(omega, f)
    np.testing.assert_allclose(anchor, p, rtol=1e-6)
  assert int(state.consolidations[...]) == 1
  # The pull acts in the jitted step: moved params are pulled back.
  model.kernel[...] = model.kernel[...] + 1.0

  @nnx.jit
  def step(model, optimizer):
    zero = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    optimizer.update(model, zero)

  before = np.asarray(model.kernel[...])
  step(model, optimizer)
  assert np.all(np.asarray(model.kernel[...]) < before)


def test_ewc_consolidate_rejects_an_nnx_state_outside_its_optimizer():
  _, _, optimizer, params = _nnx_ewc_optimizer()
  fisher = jax.tree.map(lambda p: jnp.ones_like(p[...]), params)
  # Its Variables could not be updated in place: ask for the optimizer.
  with pytest.raises(ValueError, match="pass the nnx.Optimizer itself"):
    baselines.ewc_consolidate(optimizer.opt_state, params, fisher)


@pytest.mark.parametrize("fraction", [1e-3, 0.01, 0.1, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("kind", ["normal", "ties", "tiny"])
def test_momentum_filter_cut_is_the_sorted_kth_largest(fraction, kind):
  rng = np.random.default_rng(7)
  m = {"normal": rng.normal(size=(37, 29)),
       "ties": rng.integers(-3, 4, size=(37, 29)).astype(float),
       "tiny": rng.normal(size=(37, 29)) * 1e-38}[kind].astype(np.float32)
  keep = int(np.ceil(fraction * m.size))
  cut = np.sort(np.abs(m).ravel())[-keep]
  mask = _top_fraction_mask(jnp.asarray(m), fraction)
  np.testing.assert_array_equal(np.asarray(mask), np.abs(m) >= cut)
