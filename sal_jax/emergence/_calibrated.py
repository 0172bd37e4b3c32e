r"""A calibrated emergence field: "emergent" relative to the run's own history.

The reference rule (:func:`sal_jax.emergence.observe`) calls a pattern
emergent when its four signals pass fixed constants (``c > 0.6, n > 0.4,
r > 0.5, i > 0.3``), which steady training can never reach (resonance
settles near :math:`e^{-1/0.9} \approx 0.33`). The calibrated field keeps
the reference field and, beside it, a running mean and variance of each of
the four signals; a pattern is emergent when a watched signal is far from
its own running mean in units of its own running spread, i.e. unusual for
this run. All state has fixed shapes, so one compiled function serves a
whole run; the hyperparameters are traced and changing them does not
recompile.

References:
  The original SAL library, ``sal.emergence.EmergenceField`` (the four
  signals); the running moments are exponentially weighted (e.g. Finch,
  "Incremental calculation of weighted mean and variance", 2009).
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sal_jax._common import validation as _validation
from sal_jax.emergence._field import EmergenceFieldState
from sal_jax.emergence._field import emergence_init
from sal_jax.emergence._field import observe
from sal_jax.emergence._scores import EmergenceState

_NUM_SIGNALS = 4  # coherence, novelty, resonance, intensity


class CalibratedFieldState(NamedTuple):
  """State of a calibrated emergence field (fixed shapes; a pytree).

  Attributes:
    field: the reference :class:`EmergenceFieldState` whose signals are
      calibrated.
    mean: ``(4,)`` running mean of coherence, novelty, resonance, intensity.
    var: ``(4,)`` running variance of the same.
    seen: int32 scalar, observations that entered the running moments.
    quiet: int32 scalar, observations since the last event (counts from
      the start before the first one).
  """
  field: EmergenceFieldState
  mean: jax.Array
  var: jax.Array
  seen: jax.Array
  quiet: jax.Array


class CalibratedEmergence(NamedTuple):
  """What :func:`calibrated_observe` reports about one pattern.

  Attributes:
    reference: the reference field's :class:`EmergenceState` (its
      ``is_emergent`` is the original's fixed rule).
    z: ``(4,)`` z-scores of coherence, novelty, resonance, intensity against
      their running moments before this pattern (0 during the warm-up).
    score: the largest ``|z|`` over the watched signals.
    warm: bool, the warm-up is over.
    is_emergent: bool, ``warm``, out of the cool-down, and ``score`` above
      the threshold.
  """
  reference: EmergenceState
  z: jax.Array
  score: jax.Array
  warm: jax.Array
  is_emergent: jax.Array


def calibrated_init(
    dimensions: int = 768,
    history_length: int = 100,
    dtype=jnp.float32,
) -> CalibratedFieldState:
  r"""Starts an empty calibrated emergence field.

  .. math::
    m = 0, \quad v = 0, \quad \mathrm{seen} = 0

  beside an empty reference field (:func:`emergence_init`).

  Args:
    dimensions: entries of an observed pattern, at least 1.
    history_length: patterns the reference field remembers, at least 1.
    dtype: floating dtype of the reference field's state.

  Returns:
    A :class:`CalibratedFieldState` with nothing observed.

  Raises:
    ValueError: if ``dimensions`` or ``history_length`` is not a positive
      integer.

  Examples:
    >>> from sal_jax.emergence import calibrated_init
    >>> state = calibrated_init(16, history_length=4)
    >>> state.mean.shape, int(state.seen)
    ((4,), 0)

  References:
    The reference field, ``sal.emergence.EmergenceField.__init__``.
  """
  field = emergence_init(dimensions, history_length, dtype)
  return CalibratedFieldState(
      field=field,
      mean=jnp.zeros((_NUM_SIGNALS,), jnp.float32),
      var=jnp.zeros((_NUM_SIGNALS,), jnp.float32),
      seen=jnp.zeros((), jnp.int32),
      quiet=jnp.zeros((), jnp.int32))


def _check(name, value, ok, need):
  if _validation.is_python_number(value) and not ok(value):
    raise ValueError(f"sal_jax: {name} must be {need}, got {value!r}.")


def calibrated_observe(
    state: CalibratedFieldState,
    pattern: chex.Array,
    *,
    decay: chex.Numeric = 0.99,
    warmup: chex.Numeric = 100,
    threshold: chex.Numeric = 4.0,
    cooldown: chex.Numeric = 0,
    watch: chex.Array = (True, True, True, True),
    min_std: chex.Numeric = 1e-6,
) -> tuple[CalibratedEmergence, CalibratedFieldState]:
  r"""Observes one pattern; emergent means unusual for this run.

  The reference field measures the pattern (:func:`observe`), giving
  :math:`s = (c, n, r, i)`. With the running moments :math:`m, v` of the
  signals before this pattern, :math:`\epsilon` = ``min_std``, :math:`k` =
  ``threshold`` and :math:`W` the watched signals,

  .. math::
    z_j &= \frac{s_j - m_j}{\max(\sqrt{v_j}, \epsilon)}, \qquad
    \mathrm{score} = \max_{j \in W} |z_j|, \\
    \mathrm{emergent} &= \mathrm{seen} \ge \mathrm{warmup} \wedge
      \mathrm{quiet} \ge \mathrm{cooldown} \wedge \mathrm{score} > k.

  The moments then move with weight :math:`a = \max(1 - \beta,
  1/(\mathrm{seen} + 1))` (a plain average until :math:`1/(1-\beta)`
  observations, then exponential with :math:`\beta` = ``decay``):

  .. math::
    \delta = \tilde s - m, \quad m \leftarrow m + a \delta, \quad
    v \leftarrow (1 - a)(v + a \delta^2),

  where after the warm-up :math:`\tilde s = m + \operatorname{clip}(s - m,
  -k\sigma, k\sigma)` with :math:`\sigma = \max(\sqrt v, \epsilon)`, so one
  outlier cannot inflate the spread it is measured against, and
  :math:`\tilde s = s` before. The field's first pattern does not enter the
  moments (its novelty 1 and resonance 0.5 are conventions, not
  measurements), nor does a non-finite one (the reference field ignores it;
  the report is then not emergent).

  Args:
    state: a calibrated field, from :func:`calibrated_init` or a previous
      call.
    pattern: any array with the field's number of entries.
    decay: :math:`\beta` in (0, 1); the moments' memory is about
      :math:`1/(1-\beta)` observations.
    warmup: observations in the moments before an event can fire, >= 1.
    threshold: :math:`k > 0`, in running standard deviations.
    cooldown: observations after an event during which no other fires,
      >= 0 (0: none).
    watch: four bools, which of coherence, novelty, resonance, intensity
      count toward the score.
    min_std: :math:`\epsilon \ge 0`, floor of the spread (a constant signal
      does not give infinite z-scores).

  Returns:
    ``(report, new_state)``: a :class:`CalibratedEmergence` and the updated
    :class:`CalibratedFieldState`.

  Raises:
    ValueError: for hyperparameters out of range (when they are Python
      numbers), a ``watch`` that is not four entries, or the reference
      field's errors (a pattern of the wrong size, a concrete non-finite
      pattern).

  Examples:
    >>> import functools, jax, jax.numpy as jnp
    >>> from sal_jax.emergence import calibrated_init, calibrated_observe
    >>> state = calibrated_init(8, history_length=4)
    >>> step = jax.jit(functools.partial(calibrated_observe, warmup=20))
    >>> for t in range(30):  # a pattern that slowly rotates ...
    ...   report, state = step(state, jnp.cos(jnp.arange(8.0) + 0.01 * t))
    >>> bool(report.is_emergent)
    False
    >>> report, state = step(state, jnp.sin(3 * jnp.arange(8.0)))  # ... jumps
    >>> bool(report.is_emergent), bool(report.reference.is_emergent)
    (True, False)

  References:
    The reference field, ``sal.emergence.EmergenceField.observe``.
  """
  _check("decay", decay, lambda x: 0.0 < x < 1.0, "in (0, 1)")
  _check("warmup", warmup, lambda x: x >= 1 and float(x).is_integer(),
         "an integer >= 1")
  _check("threshold", threshold, lambda x: x > 0.0, "> 0")
  _check("cooldown", cooldown, lambda x: x >= 0 and float(x).is_integer(),
         "an integer >= 0")
  _check("min_std", min_std, lambda x: x >= 0.0, ">= 0")
  if np.shape(watch) != (_NUM_SIGNALS,):
    raise ValueError(
        "sal_jax: watch must be four bools (coherence, novelty, resonance, "
        f"intensity), got shape {np.shape(watch)}.")
  reference, field = observe(state.field, pattern)  # validates the pattern
  return _calibrate(state, field, reference, decay, warmup, threshold,
                    cooldown, jnp.asarray(watch, bool), min_std)


@jax.jit
def _calibrate(state, field, reference, decay, warmup, threshold, cooldown,
               watch, min_std):
  """The compiled calibration of one reference report."""
  f32 = jnp.float32
  s = jnp.stack([reference.coherence, reference.novelty,
                 reference.resonance, reference.intensity]).astype(f32)
  k = jnp.asarray(threshold, f32)
  sigma = jnp.maximum(jnp.sqrt(state.var), jnp.asarray(min_std, f32))
  warm = state.seen >= jnp.asarray(warmup, jnp.int32)
  z = jnp.where(warm, (s - state.mean) / sigma, 0.0)
  score = jnp.max(jnp.where(watch, jnp.abs(z), 0.0))
  emergent = (warm & (state.quiet >= jnp.asarray(cooldown, jnp.int32))
              & (score > k) & reference.valid)

  # Moments: only real measurements (a valid pattern with a history).
  enters = reference.valid & (state.field.count > 0)
  target = jnp.where(warm, state.mean + jnp.clip(s - state.mean, -k * sigma,
                                                  k * sigma), s)
  a = jnp.maximum(1.0 - jnp.asarray(decay, f32),
                  1.0 / (state.seen + 1).astype(f32))
  delta = jnp.where(enters, target - state.mean, 0.0)
  mean = state.mean + a * delta
  var = jnp.where(enters, (1.0 - a) * (state.var + a * delta * delta),
                  state.var)
  new_state = CalibratedFieldState(
      field=field, mean=mean, var=var,
      seen=state.seen + enters.astype(jnp.int32),
      quiet=jnp.where(emergent, 0, state.quiet + 1))
  report = CalibratedEmergence(reference=reference, z=z, score=score,
                               warm=warm, is_emergent=emergent)
  return report, new_state
