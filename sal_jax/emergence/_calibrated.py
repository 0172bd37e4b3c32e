r"""A calibrated emergence field: "emergent" relative to the run's own history.

The reference rule (:func:`sal_jax.emergence.observe`) calls a pattern
emergent when its four signals pass fixed constants (``c > 0.6, n > 0.4,
r > 0.5, i > 0.3``), which steady training can never reach (resonance
settles near :math:`e^{-1/0.9} \approx 0.33`). The calibrated field keeps
the reference field and, beside it, a running mean and variance of each of
the four signals; a pattern is emergent when a watched signal is far from
its own running mean in units of its own running spread, i.e. unusual for
this run. A second detector, ``detector="cusum"``, accumulates the
standardised deviations in a one-sided CUSUM per signal (Page 1954), for
changes that are slow but sustained, which a z-score against moments that
follow them never sees. All state has fixed shapes, so one compiled
function serves a whole run; the numeric hyperparameters are traced and
changing them does not recompile.

References:
  The original SAL library, ``sal.emergence.EmergenceField`` (the four
  signals); the running moments are exponentially weighted (e.g. Finch,
  "Incremental calculation of weighted mean and variance", 2009); Page,
  "Continuous inspection schemes", Biometrika 41, 1954 (CUSUM).
"""

from __future__ import annotations

from typing import NamedTuple

import functools

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
_DETECTORS = ("zscore", "cusum")


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
    cusum: ``(4,)`` one-sided CUSUM statistics of the four signals (stay 0
      with ``detector="zscore"``).
  """
  field: EmergenceFieldState
  mean: jax.Array
  var: jax.Array
  seen: jax.Array
  quiet: jax.Array
  cusum: jax.Array


class CalibratedEmergence(NamedTuple):
  """What :func:`calibrated_observe` reports about one pattern.

  Attributes:
    reference: the reference field's :class:`EmergenceState` (its
      ``is_emergent`` is the original's fixed rule).
    z: ``(4,)`` z-scores of coherence, novelty, resonance, intensity against
      their running moments before this pattern (0 during the warm-up).
    score: the largest ``|z|`` over the watched signals
      (``detector="zscore"``), or their largest CUSUM statistic after this
      pattern (``detector="cusum"``).
    warm: bool, the warm-up is over.
    is_emergent: bool, ``warm``, out of the cool-down, and ``score`` above
      the threshold (with ``detector="cusum"`` and ``reset=False``: and
      not above it before this pattern).
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
    m = 0, \quad v = 0, \quad \mathrm{seen} = 0, \quad g = 0

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
      quiet=jnp.zeros((), jnp.int32),
      cusum=jnp.zeros((_NUM_SIGNALS,), jnp.float32))


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
    detector: str = "zscore",
    allowance: chex.Numeric = 0.5,
    direction: chex.Array = (1.0, 1.0, 1.0, 1.0),
    freeze: chex.Numeric = False,
    reset: chex.Numeric = True,
) -> tuple[CalibratedEmergence, CalibratedFieldState]:
  r"""Observes one pattern; emergent means unusual for this run.

  The reference field measures the pattern (:func:`observe`), giving
  :math:`s = (c, n, r, i)`. With the moments :math:`m, v` of the signals
  before this pattern, :math:`\epsilon` = ``min_std``, :math:`\tau` =
  ``threshold``, :math:`W` the watched signals and
  :math:`\mathrm{warm} = \mathrm{seen} \ge \mathrm{warmup}`,

  .. math::
    z_j = \frac{s_j - m_j}{\max(\sqrt{v_j}, \epsilon)}.

  With ``detector="zscore"`` the score is :math:`\max_{j \in W} |z_j|`.
  With ``detector="cusum"``, one one-sided CUSUM per signal (Page 1954)
  with allowance :math:`k` and side :math:`d_j = \pm 1` (``direction``)
  accumulates the deviations while warm,

  .. math::
    g_j \leftarrow \max(0,\; g_j + d_j z_j - k), \qquad
    \mathrm{score} = \max_{j \in W} g_j,

  so a drift of :math:`\delta` standard deviations (:math:`\delta > k`)
  that lasts :math:`t` observations raises :math:`g` by about
  :math:`(\delta - k) t`, however slowly it came. Then

  .. math::
    \mathrm{emergent} = \mathrm{warm} \wedge
      \mathrm{quiet} \ge \mathrm{cooldown} \wedge \mathrm{score} > \tau
      \;[\wedge\; \mathrm{score}_{\mathrm{before}} \le \tau],

  the bracket with ``detector="cusum"`` and ``reset=False`` (an event
  when the statistic crosses :math:`\tau`: one per excursion); with
  ``reset=True`` every :math:`g_j` restarts from 0 after an event.

  The moments move with weight :math:`a = \max(1 - \beta,
  1/(\mathrm{seen} + 1))` (a plain average until :math:`1/(1-\beta)`
  observations, then exponential with :math:`\beta` = ``decay``):

  .. math::
    \delta = \tilde s - m, \quad m \leftarrow m + a \delta, \quad
    v \leftarrow (1 - a)(v + a \delta^2),

  where, with ``detector="zscore"`` and after the warm-up, :math:`\tilde s
  = m + \operatorname{clip}(s - m, -\tau\sigma, \tau\sigma)` with
  :math:`\sigma = \max(\sqrt v, \epsilon)`, so one outlier cannot inflate
  the spread it is measured against, and :math:`\tilde s = s` otherwise.
  With ``freeze`` the moments stop moving when the warm-up ends: the
  reference is the signals' level and spread at the end of the warm-up.
  The field's first pattern does not enter the moments (its novelty 1 and
  resonance 0.5 are conventions, not measurements), nor does a non-finite
  one (the reference field ignores it; the report is then not emergent and
  the CUSUM statistics do not move).

  Args:
    state: a calibrated field, from :func:`calibrated_init` or a previous
      call.
    pattern: any array with the field's number of entries.
    decay: :math:`\beta` in (0, 1); the moments' memory is about
      :math:`1/(1-\beta)` observations.
    warmup: observations in the moments before an event can fire, >= 1.
    threshold: :math:`\tau > 0`: in running standard deviations
      (``"zscore"``), or the CUSUM decision interval :math:`h`
      (``"cusum"``).
    cooldown: observations after an event during which no other fires,
      >= 0 (0: none).
    watch: four bools, which of coherence, novelty, resonance, intensity
      count toward the score.
    min_std: :math:`\epsilon \ge 0`, floor of the spread (a constant signal
      does not give infinite z-scores).
    detector: ``"zscore"`` or ``"cusum"`` (static: one compilation each).
    allowance: :math:`k \ge 0`, the CUSUM's allowance in standard
      deviations (``"cusum"`` only); about half the shift to detect.
    direction: four signs, +1 or -1: the CUSUM of each signal watches
      increases (+1) or decreases (-1) (``"cusum"`` only).
    freeze: bool, the moments stop moving after the warm-up.
    reset: bool, the CUSUM statistics restart from 0 after an event
      (``True``), or an event needs the score to cross the threshold
      from below (``False``; ``"cusum"`` only).

  Returns:
    ``(report, new_state)``: a :class:`CalibratedEmergence` and the updated
    :class:`CalibratedFieldState`.

  Raises:
    ValueError: for hyperparameters out of range (when they are Python
      numbers), a ``watch`` or ``direction`` that is not four entries, a
      concrete ``direction`` entry other than +1 or -1, an unknown
      ``detector``, or the reference field's errors (a pattern of the
      wrong size, a concrete non-finite pattern).

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

    A CUSUM on coherence, which falls slowly once the pattern's frequency
    starts to rise at t = 150 (one compilation, whatever the settings):

    >>> import numpy as np
    >>> cusum = jax.jit(functools.partial(
    ...     calibrated_observe, detector="cusum", warmup=50, threshold=10.0,
    ...     allowance=1.0, watch=(True, False, False, False),
    ...     direction=(-1.0, 1.0, 1.0, 1.0), freeze=True, reset=False))
    >>> state, fired = calibrated_init(16, history_length=4), []
    >>> noise = 0.01 * np.random.default_rng(0).normal(size=(300, 16))
    >>> for t in range(300):
    ...   omega = 2.0 + 0.02 * max(t - 150, 0)
    ...   pattern = np.cos(omega * np.linspace(0, 1, 16)) + noise[t]
    ...   report, state = cusum(state, jnp.asarray(pattern))
    ...   fired += [t] if report.is_emergent else []
    >>> len(fired), 150 < fired[0] < 170
    (1, True)

  References:
    The reference field, ``sal.emergence.EmergenceField.observe``; Page,
    "Continuous inspection schemes", Biometrika 41, 1954.
  """
  if detector not in _DETECTORS:
    raise ValueError(
        f"sal_jax: detector must be one of {_DETECTORS}, got {detector!r}.")
  _check("decay", decay, lambda x: 0.0 < x < 1.0, "in (0, 1)")
  _check("warmup", warmup, lambda x: x >= 1 and float(x).is_integer(),
         "an integer >= 1")
  _check("threshold", threshold, lambda x: x > 0.0, "> 0")
  _check("cooldown", cooldown, lambda x: x >= 0 and float(x).is_integer(),
         "an integer >= 0")
  _check("min_std", min_std, lambda x: x >= 0.0, ">= 0")
  _check("allowance", allowance, lambda x: x >= 0.0, ">= 0")
  for name, value in (("watch", watch), ("direction", direction)):
    shape = jnp.shape(jnp.asarray(value))  # a tuple may hold tracers
    if shape != (_NUM_SIGNALS,):
      raise ValueError(
          f"sal_jax: {name} must be four entries (coherence, novelty, "
          f"resonance, intensity), got shape {shape}.")
  try:  # Only a concrete direction can be checked (a traced one cannot).
    concrete = np.asarray(direction, np.float64)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    concrete = None
  if concrete is not None and not np.all(np.abs(concrete) == 1.0):
    raise ValueError(
        f"sal_jax: direction entries must be +1 or -1, got {concrete}.")
  reference, field = observe(state.field, pattern)  # validates the pattern
  return _calibrate(state, field, reference, decay, warmup, threshold,
                    cooldown, jnp.asarray(watch, bool), min_std, allowance,
                    jnp.asarray(direction, jnp.float32), freeze, reset,
                    detector=detector)


@functools.partial(jax.jit, static_argnames=("detector",))
def _calibrate(state, field, reference, decay, warmup, threshold, cooldown,
               watch, min_std, allowance, direction, freeze, reset, *,
               detector):
  """The compiled calibration of one reference report."""
  f32 = jnp.float32
  s = jnp.stack([reference.coherence, reference.novelty,
                 reference.resonance, reference.intensity]).astype(f32)
  tau = jnp.asarray(threshold, f32)
  sigma = jnp.maximum(jnp.sqrt(state.var), jnp.asarray(min_std, f32))
  warm = state.seen >= jnp.asarray(warmup, jnp.int32)
  z = jnp.where(warm, (s - state.mean) / sigma, 0.0)
  out_of_cooldown = state.quiet >= jnp.asarray(cooldown, jnp.int32)
  if detector == "cusum":
    g = jnp.maximum(0.0, state.cusum + direction * z
                    - jnp.asarray(allowance, f32))
    g = jnp.where(warm & reference.valid, g, state.cusum)
    score = jnp.max(jnp.where(watch, g, 0.0))
    before = jnp.max(jnp.where(watch, state.cusum, 0.0))
    crossing = jnp.asarray(reset, bool) | (before <= tau)
    emergent = (warm & out_of_cooldown & (score > tau) & crossing
                & reference.valid)
    cusum = jnp.where(emergent & jnp.asarray(reset, bool), 0.0, g)
    target = s
  else:
    score = jnp.max(jnp.where(watch, jnp.abs(z), 0.0))
    emergent = warm & out_of_cooldown & (score > tau) & reference.valid
    cusum = state.cusum
    target = jnp.where(warm, state.mean + jnp.clip(
        s - state.mean, -tau * sigma, tau * sigma), s)

  # Moments: only real measurements (a valid pattern with a history), and
  # with `freeze` only during the warm-up.
  enters = (reference.valid & (state.field.count > 0)
            & ~(jnp.asarray(freeze, bool) & warm))
  a = jnp.maximum(1.0 - jnp.asarray(decay, f32),
                  1.0 / (state.seen + 1).astype(f32))
  delta = jnp.where(enters, target - state.mean, 0.0)
  mean = state.mean + a * delta
  var = jnp.where(enters, (1.0 - a) * (state.var + a * delta * delta),
                  state.var)
  new_state = CalibratedFieldState(
      field=field, mean=mean, var=var,
      seen=state.seen + enters.astype(jnp.int32),
      quiet=jnp.where(emergent, 0, state.quiet + 1), cusum=cusum)
  report = CalibratedEmergence(reference=reference, z=z, score=score,
                               warm=warm, is_emergent=emergent)
  return report, new_state
