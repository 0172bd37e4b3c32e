"""Calibrated emergence field: events relative to the run's own history."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sal_jax import emergence

D = 32


def _stream(steps, jump_at, seed=0):
  """A slowly, noisily rotating pattern that jumps to a new one at jump_at."""
  rng = np.random.default_rng(seed)
  base = np.cos(np.linspace(0.0, 3.0, D))
  other = rng.normal(size=D)
  out = []
  for t in range(steps):
    p = (base if t < jump_at else other) + 0.01 * t / steps
    out.append(p + 1e-3 * rng.normal(size=D))
  return jnp.asarray(np.stack(out), jnp.float32)


# One compiled step for every test: the settings are traced arguments.
_STEP = jax.jit(emergence.calibrated_observe)
_DEFAULTS = dict(decay=0.99, warmup=100, threshold=4.0, cooldown=0,
                 watch=(True, True, True, True), min_std=1e-6)


def _run(patterns, **kw):
  kw = {**_DEFAULTS, **kw}
  kw["watch"] = jnp.asarray(kw["watch"])
  state = emergence.calibrated_init(D, history_length=8)
  reports = []
  for p in patterns:
    report, state = _STEP(state, p, **kw)
    reports.append(report)
  return jax.device_get(reports), state


def test_step_change_fires_at_the_change_and_not_in_steady_state():
  reports, _ = _run(_stream(120, jump_at=90), warmup=30, threshold=5.0)
  fired = [t for t, r in enumerate(reports) if r.is_emergent]
  assert fired and fired[0] == 90, fired
  assert all(t >= 90 for t in fired), fired
  # The reference rule, fixed thresholds, sees nothing in the same stream.
  assert not any(r.reference.is_emergent for r in reports[1:])


def test_no_event_during_warmup_and_z_is_zero_there():
  reports, state = _run(_stream(40, jump_at=20), warmup=100)
  assert not any(r.is_emergent for r in reports)
  assert not any(r.warm for r in reports)
  assert all(np.all(r.z == 0) for r in reports)
  # The first pattern (novelty 1 by convention) stays out of the moments.
  assert int(state.seen) == 39


def test_cooldown_suppresses_repeated_events():
  patterns = _stream(120, jump_at=90)
  patterns = patterns.at[95].set(-patterns[95])  # a second jump soon after
  fired_free = [t for t, r in enumerate(
      _run(patterns, warmup=30, threshold=5.0)[0]) if r.is_emergent]
  fired_cool = [t for t, r in enumerate(
      _run(patterns, warmup=30, threshold=5.0, cooldown=50)[0])
                if r.is_emergent]
  assert fired_cool == [90]
  assert len(fired_free) > 1 and fired_free[0] == 90


def test_watch_restricts_the_score_to_chosen_signals():
  patterns = _stream(120, jump_at=90)
  reports, _ = _run(patterns, warmup=30, threshold=5.0,
                    watch=(False, False, False, False))
  assert not any(r.is_emergent for r in reports)
  assert all(r.score == 0 for r in reports)


def test_nan_pattern_is_ignored_inside_jit():
  patterns = _stream(60, jump_at=1000)
  patterns = patterns.at[45].set(jnp.nan)
  reports, state = _run(patterns, warmup=10)
  assert not bool(reports[45].is_emergent)
  assert not bool(reports[45].reference.valid)
  assert int(state.seen) == 58 and int(state.field.rejected) == 1
  assert np.all(np.isfinite(state.mean)) and np.all(np.isfinite(state.var))


def test_compiles_once_and_keeps_shapes_and_dtypes():
  traces = []

  def body(state, pattern, threshold):
    traces.append(1)
    return emergence.calibrated_observe(state, pattern, threshold=threshold,
                                        warmup=5)

  step = jax.jit(body)
  state = emergence.calibrated_init(D, history_length=4)
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), state)
  for t, p in enumerate(_stream(12, jump_at=8)):
    _, state = step(state, p, 3.0 + t)  # a new threshold: no retrace
  assert len(traces) == 1
  assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == shapes


@pytest.mark.parametrize("kw, message", [
    (dict(decay=1.0), "decay"),
    (dict(decay=0.0), "decay"),
    (dict(warmup=0), "warmup"),
    (dict(warmup=2.5), "warmup"),
    (dict(threshold=0.0), "threshold"),
    (dict(cooldown=-1), "cooldown"),
    (dict(min_std=-1e-3), "min_std"),
    (dict(watch=(True, False)), "watch"),
])
def test_bad_arguments_raise(kw, message):
  state = emergence.calibrated_init(D)
  with pytest.raises(ValueError, match=message):
    emergence.calibrated_observe(state, jnp.ones(D), **kw)


def test_wrong_pattern_size_and_bad_init_raise():
  with pytest.raises(ValueError, match="entries"):
    emergence.calibrated_observe(emergence.calibrated_init(D), jnp.ones(D + 1))
  with pytest.raises(ValueError, match="dimensions"):
    emergence.calibrated_init(0)


# --- The CUSUM detector: slow, sustained drifts. ---------------------------

_X = np.linspace(0.0, 1.0, D)


def _chirp(steps, drift_at, rate=0.02, noise=0.01, seed=0):
  """cos(w x) plus noise; w rises by `rate` a step from drift_at on.

  The rising frequency makes the pattern less smooth: coherence falls
  slowly (about 0.005 a step at first), with no jump anywhere.
  """
  rng = np.random.default_rng(seed)
  t = np.arange(steps)[:, None]
  omega = 2.0 + rate * np.maximum(t - drift_at, 0)
  return jnp.asarray(np.cos(omega * _X) + noise * rng.normal(size=(steps, D)),
                     jnp.float32)


_CUSUM = dict(decay=0.99, warmup=100, threshold=10.0, cooldown=0,
              watch=(True, False, False, False), min_std=1e-6,
              allowance=1.0, direction=(-1.0, 1.0, 1.0, 1.0), freeze=True,
              reset=False)
_CUSUM_TRACES = []


@jax.jit
def _cusum_scan(patterns, settings):
  """All patterns through one field; the settings are traced."""
  _CUSUM_TRACES.append(1)

  def body(state, pattern):
    report, state = emergence.calibrated_observe(
        state, pattern, detector="cusum", **settings)
    return state, report

  state = emergence.calibrated_init(D, history_length=8)
  return jax.lax.scan(body, state, patterns)


def _cusum_run(patterns, **kw):
  settings = {k: jnp.asarray(v) for k, v in {**_CUSUM, **kw}.items()}
  state, reports = jax.device_get(_cusum_scan(patterns, settings))
  return np.flatnonzero(reports.is_emergent), reports, state


def test_cusum_fires_once_after_a_slow_drift_starts_and_not_before():
  fired, reports, _ = _cusum_run(_chirp(400, drift_at=250))
  assert fired.tolist() and fired.size == 1, fired
  assert 250 < fired[0] < 290, fired
  # The statistic stays near 0 on the flat stretch, then grows.
  assert reports.score[101:250].max() < 10.0
  assert reports.score[-1] > 100.0


def test_cusum_with_reset_fires_repeatedly_during_the_drift_only():
  fired, _, _ = _cusum_run(_chirp(400, drift_at=250), reset=True)
  assert fired.size > 3 and fired.min() > 250, fired


def test_zscore_against_running_moments_misses_a_drift_the_cusum_sees():
  # The contrast that motivates the CUSUM: on a noisier, slower drift the
  # running moments follow it and the z-score stays below 4 (it peaks near
  # 3.7), while the CUSUM on the same signal fires once, soon after it starts.
  patterns = _chirp(600, drift_at=250, rate=0.004, noise=0.05)
  reports, _ = _run(patterns, warmup=100, threshold=4.0,
                    watch=(True, False, False, False))
  assert not any(r.is_emergent for r in reports)
  fired, _, _ = _cusum_run(patterns)
  assert fired.size == 1 and 250 < fired[0] < 320, fired


def test_cusum_direction_chooses_the_side():
  fired, _, _ = _cusum_run(_chirp(400, drift_at=250),
                           direction=(1.0, 1.0, 1.0, 1.0))
  assert fired.size == 0, fired


@pytest.mark.parametrize("seed", [1, 2])
def test_cusum_is_quiet_on_a_long_stationary_noisy_stream(seed):
  # The example's settings (examples/grokking.py), every signal watched,
  # each on both sides (two fields), over 3000 noisy, stationary patterns.
  patterns = _chirp(3000, drift_at=10**6, noise=0.05, seed=seed)
  kw = dict(warmup=300, threshold=20.0, allowance=5.0,
            watch=(True, True, True, True))
  for direction in ((1.0,) * 4, (-1.0,) * 4):
    fired, reports, _ = _cusum_run(patterns, direction=direction, **kw)
    assert fired.size == 0, (direction, fired)
    assert reports.warm[-1]


def test_cusum_compiles_once_and_keeps_shapes():
  _cusum_run(_chirp(64, drift_at=32))
  before = len(_CUSUM_TRACES)
  for kw in (dict(threshold=3.0), dict(allowance=0.0, freeze=False),
             dict(reset=True, direction=(1.0, -1.0, 1.0, -1.0)),
             dict(warmup=10, watch=(True, True, True, True))):
    _, _, state = _cusum_run(_chirp(64, drift_at=32), **kw)
  assert len(_CUSUM_TRACES) == before
  assert state.cusum.shape == (4,) and state.cusum.dtype == np.float32


def test_cusum_ignores_a_nan_pattern_and_freeze_stops_the_moments():
  patterns = _chirp(120, drift_at=10**6).at[110].set(jnp.nan)
  fired, reports, state = _cusum_run(patterns, warmup=50)
  assert fired.size == 0 and not reports.is_emergent[110]
  np.testing.assert_array_equal(reports.score[110], reports.score[109])
  assert int(state.seen) == 50  # frozen at the end of the warm-up
  assert np.all(np.isfinite(state.cusum))


@pytest.mark.parametrize("kw, message", [
    (dict(detector="page"), "detector"),
    (dict(detector="cusum", allowance=-0.5), "allowance"),
    (dict(detector="cusum", direction=(1.0, 0.0, 1.0, 1.0)), "direction"),
    (dict(detector="cusum", direction=(1.0, -1.0)), "direction"),
])
def test_cusum_bad_arguments_raise(kw, message):
  state = emergence.calibrated_init(D)
  with pytest.raises(ValueError, match=message):
    emergence.calibrated_observe(state, jnp.ones(D), **kw)
