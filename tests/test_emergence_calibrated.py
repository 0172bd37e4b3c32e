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
