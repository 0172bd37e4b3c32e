"""The shift-consolidation estimator: formulas, shift detection, protection."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal

GAMMA, FAST, SLOW = 0.8, 0.5, 0.9  # short horizons keep the replay small
SHIFT, RELEASE, WARMUP, Z, KAPPA = 1.2, 1.0, 3, 1.0, 0.7


def _numpy_reference(grads, params, granularity):
  """Independent numpy replay of the documented recursions."""
  per_element = granularity == "element"
  zeros = lambda v: np.zeros_like(v, np.float64) if per_element else 0.0  # noqa: E731
  omega = {k: zeros(v) for k, v in params[0].items()}
  consolidated = {k: zeros(v) for k, v in params[0].items()}
  anchor = {k: np.asarray(v, np.float64) for k, v in params[0].items()}
  fast = slow = log_mean = log_sq = 0.0
  shifted, count, consolidations = False, 0, 0
  out = []
  for g, p in zip(grads, params):
    count += 1
    n = sum(v.size for v in g.values())
    m = sum(np.sum(np.square(v.astype(np.float64))) for v in g.values()) / n
    fast = FAST * fast + (1 - FAST) * m
    slow = SLOW * slow + (1 - SLOW) * m
    e_fast = fast / (1 - FAST ** count)
    e_slow = slow / (1 - SLOW ** count)
    ratio = e_fast / e_slow
    # Noise of the fast average from the log-energy spread of past steps.
    prev = max(count - 1, 1)
    mu, sq = log_mean / (1 - SLOW ** prev), log_sq / (1 - SLOW ** prev)
    sigma = np.sqrt(max(sq - mu * mu, 0.0))
    bar = max(SHIFT, np.exp(Z * sigma * np.sqrt((1 - FAST) / (1 + FAST))))
    log_mean = SLOW * log_mean + (1 - SLOW) * np.log(m)
    log_sq = SLOW * log_sq + (1 - SLOW) * np.log(m) ** 2
    now = (ratio > RELEASE if shifted else ratio > bar) and count > WARMUP
    onset = now and not shifted
    shifted = now
    if onset:
      consolidations += 1
      corr = 1 - GAMMA ** max(count - 1, 1)
      for k in g:
        consolidated[k] = KAPPA * consolidated[k] + omega[k] / corr
        anchor[k] = np.asarray(p[k], np.float64)
    for k in g:
      sq = np.square(g[k].astype(np.float64))
      unit = sq if per_element else np.mean(sq)
      omega[k] = GAMMA * omega[k] + (1 - GAMMA) * unit / e_slow
    units = np.concatenate([np.ravel(consolidated[k]) for k in g])
    mean = units.mean()
    raw = {k: consolidated[k] / (consolidated[k] + mean + 1e-30) for k in g}
    force = {k: consolidated[k] * np.sqrt(e_slow) * (p[k] - anchor[k])
             for k in g}
    out.append((raw, force, consolidations, shifted, bar))
  return out


def _estimator(granularity):
  # The replay keeps the running importance in the granularity's own unit
  # (tests/test_factored.py checks the factored one against it).
  return sal.shift_consolidation_estimator(
      granularity, running_unit=granularity, importance_decay=GAMMA, fast_decay=FAST, slow_decay=SLOW,
      shift_ratio=SHIFT, release_ratio=RELEASE, warmup_steps=WARMUP,
      consolidation_decay=KAPPA, noise_multiplier=Z)


def _gradient_scales():
  # Settle, shift up (one shift of several steps), settle, shift again.
  return [1.0] * 6 + [3.0] * 4 + [1.0] * 8 + [4.0] * 3 + [1.0] * 3


@pytest.mark.parametrize("granularity", ["element", "leaf"])
def test_matches_numpy_replay(granularity):
  rng = np.random.default_rng(0)
  shapes = {"w": (3, 2), "b": (2,)}
  scales = _gradient_scales()
  grads = [{k: (rng.normal(size=s) * c).astype(np.float32)
            for k, s in shapes.items()} for c in scales]
  params = [{k: rng.normal(size=s).astype(np.float32)
             for k, s in shapes.items()} for _ in scales]
  est = _estimator(granularity)
  state = est.init(params[0])
  update = jax.jit(est.update)
  force_fn = jax.jit(est.restoring_force)
  expected = _numpy_reference(grads, params, granularity)
  assert expected[-1][2] >= 2  # the replay itself sees both shifts
  assert max(e[4] for e in expected) > SHIFT  # and the noise bar acts
  for g, p, (raw_e, force_e, n_e, shifted_e, _) in zip(grads, params,
                                                       expected):
    raw, state = update(g, state, p)
    force = force_fn(state, p)
    assert int(state.consolidations) == n_e
    assert bool(state.shifted) == shifted_e
    for k in g:
      np.testing.assert_allclose(raw[k], raw_e[k], rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(force[k], force_e[k], rtol=1e-4,
                                 atol=1e-6)


def test_consolidates_once_per_shift_and_anchors_the_params():
  est = sal.shift_consolidation_estimator("element")
  state = est.init({"w": jnp.zeros(256)})
  update = jax.jit(est.update)
  key = jax.random.key(0)
  onsets = []
  for t in range(400):
    key, k = jax.random.split(key)
    scale = 3.0 if 200 <= t < 260 else 1.0  # one shift, 60 steps long
    # Many entries, so that the stationary energy fluctuates little.
    g = {"w": scale * jax.random.normal(k, (256,))}
    before = int(state.consolidations)
    _, state = update(g, state, {"w": jnp.full(256, float(t))})
    if int(state.consolidations) > before:
      onsets.append(t)
  # Detected within a few steps of the shift, once, and not in the
  # stationary noise before it (nor when the energy falls back).
  assert len(onsets) == 1 and 200 <= onsets[0] <= 205, onsets
  np.testing.assert_array_equal(state.anchor["w"],
                                jnp.full(256, onsets[0]))


def test_nothing_is_pulled_before_the_first_shift():
  tx = optax.chain(
      sal.protect(estimator="shift_consolidation", granularity="element",
                  restore=10.0, gate="none"),
      optax.sgd(0.1))
  plain = optax.sgd(0.1)
  params = {"w": jnp.arange(3.0)}
  state, plain_state = tx.init(params), plain.init(params)
  for t in range(30):
    g = {"w": jnp.array([1.0, -2.0, 0.5]) * (1 + 0.01 * t)}
    u, state = tx.update(g, state, params)
    v, plain_state = plain.update(g, plain_state, params)
    chex.assert_trees_all_close(u, v)
    params = optax.apply_updates(params, u)


def test_pull_after_a_shift_restores_the_anchor():
  # A parameter that carried the gradient before a shift and is then pushed
  # away is pulled back toward where it stood at the shift.
  est = sal.shift_consolidation_estimator("element", warmup_steps=5)
  tx = optax.chain(sal.protect(estimator=est, restore=1.0, gate="none"),
                   optax.sgd(0.05))
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(50):  # phase 1: w[0] learns toward 1, w[1] sees nothing
    g = {"w": jnp.array([params["w"][0] - 1.0, 0.0])}
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
  learned = float(params["w"][0])
  for _ in range(200):  # phase 2: a strong push of w[0] toward -3
    g = {"w": jnp.array([3.0 * (params["w"][0] + 3.0), 0.0])}
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
  est_state = state[0].estimator_state
  assert int(est_state.consolidations) >= 1
  anchor = float(est_state.anchor["w"][0])
  assert abs(anchor - learned) < 0.2  # anchored near the learned value
  # Without the pull, w[0] would sit at -3; the pull holds it between.
  assert float(params["w"][0]) > -2.9
  assert float(params["w"][1]) == 0.0  # no importance, no pull


def test_compiles_once_and_keeps_dtypes():
  traces = []
  tx = optax.chain(
      sal.protect(estimator="shift_consolidation", granularity="element",
                  restore=1.0), optax.adamw(1e-2))

  @jax.jit
  def step(params, state, g):
    traces.append(1)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3, jnp.bfloat16)}
  state = tx.init(params)
  dtypes = jax.tree.map(lambda x: x.dtype, state)
  for t in range(25):
    g = jax.tree.map(lambda p: jnp.full_like(p, 1.0 + 5.0 * (t > 15)),
                     params)
    params, state = step(params, state, g)
  assert len(traces) == 1
  assert jax.tree.map(lambda x: x.dtype, state) == dtypes
  assert int(state[0].estimator_state.consolidations) == 1


def test_non_finite_step_keeps_the_state():
  tx = sal.protect(estimator="shift_consolidation", granularity="element",
                   restore=1.0)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  for _ in range(12):
    _, state = tx.update({"w": jnp.ones(3)}, state, params)
  _, after = tx.update({"w": jnp.array([1.0, jnp.nan, 1.0])}, state, params)
  chex.assert_trees_all_equal(after, state)


@pytest.mark.parametrize("kwargs", [
    dict(importance_decay=1.0), dict(fast_decay=0.0),
    dict(fast_decay=0.99, slow_decay=0.9), dict(shift_ratio=1.0),
    dict(release_ratio=1.5), dict(warmup_steps=-1),
    dict(consolidation_decay=1.5), dict(relative_importance=0.0),
    dict(noise_multiplier=-1.0),
    dict(granularity="row"),
])
def test_bad_hyperparameters_raise(kwargs):
  with pytest.raises(ValueError):
    sal.shift_consolidation_estimator(**kwargs)


def test_gate_none_is_the_pull_alone():
  # gate="none": the update is g + restore * F(theta), before and after a
  # shift, and no gate state is kept.
  est = sal.shift_consolidation_estimator("element")
  tx = sal.protect(estimator=est, gate="none", restore=2.0)
  params = {"w": jnp.linspace(-1.0, 1.0, 6)}
  state = tx.init(params)
  for t in range(40):
    scale = 4.0 if 20 <= t < 25 else 1.0
    g = {"w": scale * jnp.cos(jnp.arange(6.0) + t)}
    u, state = tx.update(g, state, params)
    force = est.restoring_force(state.estimator_state, params)
    chex.assert_trees_all_close(
        u, jax.tree.map(lambda g_, f: g_ + 2.0 * f, g, force))
    params = jax.tree.map(lambda p, u_: p - 0.1 * u_, params, u)
  assert int(state.estimator_state.consolidations) >= 1
  assert float(jnp.abs(force["w"]).max()) > 0.0
  assert isinstance(state.mean_protection_rate, optax.EmptyState)


def _run_with_a_shift(tx, est):
  """Updates and forces of 40 steps with one shift (steps 20-24)."""
  params = {"w": jnp.linspace(-1.0, 1.0, 6), "b": jnp.zeros(())}
  state = tx.init(params)
  out = []
  for t in range(40):
    scale = 4.0 if 20 <= t < 25 else 1.0
    g = {"w": scale * jnp.cos(jnp.arange(6.0) + t),
         "b": scale * jnp.sin(jnp.asarray(t, jnp.float32))}
    u, state = tx.update(g, state, params)
    out.append((g, u, est.restoring_force(state.estimator_state, params)))
    params = jax.tree.map(lambda p, u_: p - 0.1 * u_, params, u)
  assert int(state.estimator_state.consolidations) >= 1
  return out, state


def test_default_protect_is_the_element_pull_of_strength_one():
  est = sal.shift_consolidation_estimator("element")
  out, state = _run_with_a_shift(sal.protect(), est)
  assert isinstance(state.estimator_state, sal.ShiftConsolidationState)
  # Element granularity: an importance per entry.
  assert state.estimator_state.consolidated["w"].shape == (6,)
  for g, u, force in out:
    chex.assert_trees_all_close(
        u, jax.tree.map(lambda g_, f: g_ + 1.0 * f, g, force))
  assert float(jnp.abs(out[-1][2]["w"]).max()) > 0.0


def test_restore_zero_turns_the_pull_off():
  est = sal.shift_consolidation_estimator("element")
  out, _ = _run_with_a_shift(sal.protect(restore=0.0), est)
  for g, u, force in out:
    chex.assert_trees_all_equal(u, g)
  assert float(jnp.abs(out[-1][2]["w"]).max()) > 0.0  # a pull was there


def test_metrics_report_the_consolidations():
  tx = sal.protect(estimator="shift_consolidation", granularity="element",
                   gate="none", restore=1.0)
  params = {"w": jnp.zeros(256)}
  state = tx.init(params)
  assert "consolidations" not in sal.metrics(
      sal.protect(estimator="reference").init(params))
  for t in range(30):
    g = {"w": jnp.full(256, 5.0 if t >= 20 else 1.0)}
    _, state = tx.update(g, state, params)
  m = jax.jit(sal.metrics)(state)
  assert m["consolidations"].dtype == jnp.int32
  assert int(m["consolidations"]) == 1
