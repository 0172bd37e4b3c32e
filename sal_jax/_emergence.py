r"""The emergence field: coherence, novelty and resonance of observed patterns.

A field observes "patterns" (any array, e.g. a hidden representation), each
flattened and L2-normalised, and reports how internally coherent, how novel
(against the remembered patterns) and how resonant (with the running centroid)
each one is. The original keeps Python lists of tensors; here the memory is a
fixed-capacity ring buffer of the last ``history_length`` normalised patterns
plus a fill count, so :func:`observe` is one pure, jittable function of
fixed-shape arrays: it ``vmap``-s over a batch of independent fields and
``lax.scan``-s over a sequence of patterns.

References:
  The original SAL library, ``sal.emergence.EmergenceField``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sal_jax import _tree_utils

# Norms at or below this leave a pattern unnormalised (as the original).
_NORM_EPS = 1e-8
# The field's exponential-average weight of a new pattern.
_FIELD_ALPHA = 0.1
# Thresholds of EmergenceState.is_emergent (hard-coded in the original).
_EMERGENT_COHERENCE = 0.6
_EMERGENT_NOVELTY = 0.4
_EMERGENT_RESONANCE = 0.5
_EMERGENT_INTENSITY = 0.3
# Below this coherence the intensity is 0.
_INTENSITY_MIN_COHERENCE = 0.3


class EmergenceFieldState(NamedTuple):
  """State of an emergence field (fixed shapes; a pytree of arrays).

  Attributes:
    history: ``(history_length, dimensions)`` ring buffer of the remembered
      normalised patterns; slot ``i`` is filled once ``i < count`` (after
      ``history_length`` observations every slot is filled and the oldest
      is overwritten).
    emergent_history: ``(history_length,)`` bool ring buffer, whether each
      remembered observation was emergent (for :func:`emergence_rate`).
    count: int32 scalar, number of observations accepted so far.
    centroid: ``(dimensions,)`` running centroid of the field.
    variance: scalar, the field's running spread (1 before the second
      observation).
    rejected: int32 scalar, number of non-finite patterns ignored.
  """
  history: jax.Array
  emergent_history: jax.Array
  count: jax.Array
  centroid: jax.Array
  variance: jax.Array
  rejected: jax.Array


class EmergenceState(NamedTuple):
  """What :func:`observe` reports about one pattern.

  Attributes:
    coherence: internal consistency in [0, 1].
    novelty: distance from the remembered patterns in [0, 1].
    resonance: fit with the field in [0, 1].
    intensity: strength of the emergence signal in [0, 1].
    is_emergent: bool, ``c > 0.6 and n > 0.4 and r > 0.5 and i > 0.3``.
    emergence_score: ``c * n * (r + i) / 2``.
    valid: bool, ``False`` when the pattern was non-finite and ignored (all
      scores are then NaN and ``is_emergent`` is ``False``).
  """
  coherence: jax.Array
  novelty: jax.Array
  resonance: jax.Array
  intensity: jax.Array
  is_emergent: jax.Array
  emergence_score: jax.Array
  valid: jax.Array


def _positive_int(name: str, value) -> int:
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise ValueError(
        f"sal_jax: {name} must be a positive integer, got {value!r}.")
  return int(value)


def _flat(x, dtype=jnp.float32) -> jax.Array:
  return jnp.ravel(jnp.asarray(x)).astype(dtype)


def _normalise(p: jax.Array) -> jax.Array:
  norm = jnp.linalg.norm(p)
  ok = norm > _NORM_EPS
  return jnp.where(ok, p / jnp.where(ok, norm, 1.0), p)


def _cos(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarity along the last axis, ``eps``-clamped norms."""
  na = jnp.maximum(jnp.linalg.norm(a, axis=-1), _NORM_EPS)
  nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), _NORM_EPS)
  return jnp.sum(a * b, axis=-1) / (na * nb)


def _check_finite_if_concrete(x, what: str) -> None:
  if isinstance(x, jax.core.Tracer):
    return
  if not np.all(np.isfinite(np.asarray(x))):
    raise ValueError(f"sal_jax: {what} contains NaN or Inf.")


def _pad_to(x: jax.Array, n: int) -> jax.Array:
  return jnp.pad(x, (0, n - x.shape[0]))


def coherence_score(x: chex.Array) -> jax.Array:
  r"""Internal coherence of an array (flattened, *not* normalised).

  With :math:`n` entries, chunk size :math:`s = \max(\min(64, \lfloor n/4
  \rfloor), 1)` and :math:`k = \lfloor n/s \rfloor` chunks (the tail is
  dropped), :math:`v` the unbiased variance of the chunk means and :math:`d`
  the mean absolute difference of neighbours inside the chunks,

  .. math::
    \mathrm{coherence} = \operatorname{clip}\Big(\frac{1}{1 + 10 v + 5 d},
      0, 1\Big),

  1 for :math:`n < 2` and 0.5 for :math:`k < 2`.

  Deviation from the original: for sizes 2..7 the chunks have one entry, so
  there are no neighbours and the original returns NaN (mean of an empty
  tensor); here :math:`d = 0` for them, so the score is
  :math:`1 / (1 + 10 v)`.

  Args:
    x: any array (flattened; its shape is static).

  Returns:
    A float32 scalar in [0, 1].

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import coherence_score
    >>> coherence_score(jnp.full(16, 0.25))
    Array(1., dtype=float32)
    >>> round(float(coherence_score(jnp.array([1.0, 2.0, 3.0]))), 4)
    0.0909

  References:
    The original SAL library, ``sal.emergence.coherence_score`` and
    ``EmergenceField.measure_coherence``.
  """
  return _coherence(_flat(x))


@jax.jit
def _coherence(p: jax.Array) -> jax.Array:
  n = p.shape[0]
  if n < 2:
    return jnp.ones((), p.dtype)
  chunk = max(min(64, n // 4), 1)
  k = n // chunk
  if k < 2:
    return jnp.full((), 0.5, p.dtype)
  chunks = p[:k * chunk].reshape(k, chunk)
  variance = jnp.var(jnp.mean(chunks, axis=1), ddof=1)
  if chunk > 1:
    diffs = jnp.mean(jnp.abs(chunks[:, 1:] - chunks[:, :-1]))
  else:  # No neighbours inside a chunk (the original's NaN).
    diffs = jnp.zeros((), p.dtype)
  return jnp.clip(1.0 / (1.0 + variance * 10.0 + diffs * 5.0), 0.0, 1.0)


def novelty_score(
    x: chex.Array,
    reference: chex.Array | None = None,
) -> jax.Array:
  r"""Novelty of an array against one reference: one minus |cosine|.

  Both are flattened and L2-normalised (norms :math:`\le 10^{-8}` are left
  as they are); the shorter is zero-padded to the longer;

  .. math::
    \mathrm{novelty} = \operatorname{clip}(1 - |\cos(x, r)|, 0, 1),

  and 1 without a reference.

  Deviation from the original: the value is clipped to [0, 1] (the
  original returns about -1.2e-7 for identical inputs).

  Args:
    x: any array.
    reference: any array, or ``None``.

  Returns:
    A float32 scalar in [0, 1].

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import novelty_score
    >>> novelty_score(jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0]))
    Array(1., dtype=float32)
    >>> novelty_score(jnp.array([1.0, 2.0]), -jnp.array([1.0, 2.0]))
    Array(0., dtype=float32)

  References:
    The original SAL library, ``sal.emergence.novelty_score``.
  """
  if reference is None:
    return jnp.ones((), jnp.float32)
  return _novelty(jnp.asarray(x), jnp.asarray(reference))


@jax.jit
def _novelty(x: jax.Array, reference: jax.Array) -> jax.Array:
  p = _normalise(_flat(x))
  r = _normalise(_flat(reference))
  n = max(p.shape[0], r.shape[0])
  sim = _cos(_pad_to(p, n), _pad_to(r, n))
  return jnp.clip(1.0 - jnp.abs(sim), 0.0, 1.0)


def resonance_measure(
    pattern: chex.Array,
    field: chex.Array | Sequence[chex.Array],
) -> jax.Array:
  r"""Resonance of a pattern with a set of field patterns.

  All are flattened and L2-normalised, pairs are zero-padded to the longer,

  .. math::
    \mathrm{resonance} = \operatorname{clip}\Big(\frac{1}{F} \sum_{f=1}^{F}
      \frac{\cos(p, h_f) + 1}{2}, 0, 1\Big),

  and 0.5 for an empty field.

  Deviation from the original: the value is clipped to [0, 1] (the
  original returns 1.00000006 for a pattern against itself).

  Args:
    pattern: any array.
    field: a ``(F, m)`` array of patterns, or a sequence of arrays of any
      sizes (padded per pair, as the original).

  Returns:
    A float32 scalar in [0, 1].

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import resonance_measure
    >>> resonance_measure(jnp.array([1.0, 0.0]), jnp.array([[1.0, 0.0],
    ...                                                      [0.0, 1.0]]))
    Array(0.75, dtype=float32)
    >>> resonance_measure(jnp.ones(3), [])
    Array(0.5, dtype=float32)

  References:
    The original SAL library, ``sal.emergence.resonance_measure``.
  """
  pattern = jnp.asarray(pattern)
  if isinstance(field, (list, tuple)):
    if not field:
      return jnp.full((), 0.5, jnp.float32)
    return _resonance_rows(pattern, tuple(jnp.asarray(f) for f in field))
  field = jnp.asarray(field)
  if field.ndim == 0:
    raise ValueError("sal_jax: field must be a (F, m) array or a sequence "
                     "of arrays, got a scalar.")
  if field.ndim == 1:
    field = field[None] if field.shape[0] else field.reshape(0, 0)
  if field.shape[0] == 0:
    return jnp.full((), 0.5, jnp.float32)
  return _resonance_array(pattern, field.reshape(field.shape[0], -1))


@jax.jit
def _resonance_rows(pattern: jax.Array, rows: tuple) -> jax.Array:
  p = _normalise(_flat(pattern))
  sims = []
  for f in rows:  # Sizes may differ: each pair is padded on its own.
    h = _normalise(_flat(f))
    n = max(p.shape[0], h.shape[0])
    sims.append(_cos(_pad_to(p, n), _pad_to(h, n)))
  return jnp.clip(jnp.mean((jnp.stack(sims) + 1.0) / 2.0), 0.0, 1.0)


@jax.jit
def _resonance_array(pattern: jax.Array, field: jax.Array) -> jax.Array:
  p = _normalise(_flat(pattern))
  h = jax.vmap(_normalise)(field.astype(jnp.float32))
  n = max(p.shape[0], h.shape[1])
  sims = _cos(_pad_to(p, n)[None], jnp.pad(h, ((0, 0), (0, n - h.shape[1]))))
  return jnp.clip(jnp.mean((sims + 1.0) / 2.0), 0.0, 1.0)


def emergence_state(
    coherence: chex.Numeric,
    novelty: chex.Numeric,
    resonance: chex.Numeric,
    intensity: chex.Numeric,
) -> EmergenceState:
  r"""Builds an :class:`EmergenceState` from its four signals.

  .. math::
    \mathrm{emergent} = c > 0.6 \wedge n > 0.4 \wedge r > 0.5 \wedge
      i > 0.3, \qquad \mathrm{score} = c \, n \, (r + i) / 2.

  The comparisons are strict and done in the signals' dtype (float32), so a
  signal exactly on a threshold is not emergent.

  Args:
    coherence: scalar or array.
    novelty: same shape.
    resonance: same shape.
    intensity: same shape.

  Returns:
    An :class:`EmergenceState` (``valid`` is ``True``).

  Examples:
    >>> from sal_jax import emergence_state
    >>> s = emergence_state(0.7, 0.5, 0.6, 0.4)
    >>> bool(s.is_emergent), round(float(s.emergence_score), 4)
    (True, 0.175)

  References:
    The original SAL library, ``sal.emergence.EmergenceState``.
  """
  c, n, r, i = (jnp.asarray(v, jnp.float32)
                for v in (coherence, novelty, resonance, intensity))
  emergent = ((c > _EMERGENT_COHERENCE) & (n > _EMERGENT_NOVELTY)
              & (r > _EMERGENT_RESONANCE) & (i > _EMERGENT_INTENSITY))
  return EmergenceState(
      coherence=c, novelty=n, resonance=r, intensity=i,
      is_emergent=emergent, emergence_score=c * n * (r + i) / 2.0,
      valid=jnp.ones(jnp.shape(emergent), bool))


def emergence_init(
    dimensions: int = 768,
    history_length: int = 100,
    dtype=jnp.float32,
) -> EmergenceFieldState:
  r"""Starts an empty emergence field.

  .. math::
    H = \emptyset, \quad \mu = 0, \quad \sigma = 1, \quad
    \mathrm{count} = 0

  Args:
    dimensions: number of entries of an observed pattern (after
      flattening), at least 1.
    history_length: how many past patterns (and emergence flags) the field
      remembers, at least 1.
    dtype: floating dtype of the stored patterns and statistics.

  Returns:
    An :class:`EmergenceFieldState` with nothing observed (``count == 0``,
    zero centroid, variance 1).

  Raises:
    ValueError: if ``dimensions`` or ``history_length`` is not a positive
      integer.

  Examples:
    >>> from sal_jax import emergence_init
    >>> state = emergence_init(16, history_length=3)
    >>> state.history.shape, int(state.count)
    ((3, 16), 0)

  References:
    The original SAL library, ``sal.emergence.EmergenceField.__init__``.
  """
  d = _positive_int("dimensions", dimensions)
  h = _positive_int("history_length", history_length)
  return _init(d, h, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init(d: int, h: int, dtype) -> EmergenceFieldState:
  return EmergenceFieldState(
      history=jnp.zeros((h, d), dtype),
      emergent_history=jnp.zeros((h,), bool),
      count=jnp.zeros((), jnp.int32),
      centroid=jnp.zeros((d,), dtype),
      variance=jnp.ones((), dtype),
      rejected=jnp.zeros((), jnp.int32))


def observe(
    state: EmergenceFieldState,
    pattern: chex.Array,
) -> tuple[EmergenceState, EmergenceFieldState]:
  r"""Observes one pattern: measures it, then remembers it.

  The pattern is flattened and L2-normalised to :math:`p` (unless its norm
  is :math:`\le 10^{-8}`). With :math:`H` the remembered patterns,
  :math:`\mu` the centroid and :math:`\sigma` the field variance:

  .. math::
    c &= \mathrm{coherence}(p) \quad \text{(see } \texttt{coherence\_score}),
    \\ n &= \operatorname{clip}(1 - \max_{h \in H} |\cos(p, h)|, 0, 1)
      \quad (1 \text{ if } H = \emptyset), \\
    r &= \operatorname{clip}(e^{-\lVert p - \mu \rVert / (\sigma + 10^{-8})},
      0, 1) \quad (0.5 \text{ before the first pattern}), \\
    i &= \begin{cases} 0 & c < 0.3 \\ \operatorname{clip}(c\, n\,
      (0.5 + 0.5 r), 0, 1) & \text{else,} \end{cases}

  then :math:`p` (and whether it was emergent) enters the ring buffer and
  the field moves: the first pattern sets :math:`\mu = p, \sigma = 1`; later
  :math:`\mu \leftarrow 0.1 p + 0.9 \mu` and
  :math:`\sigma \leftarrow 0.1 \lVert p - \mu \rVert + 0.9 \sigma` (with the
  updated :math:`\mu`). Novelty is taken over the filled slots only, exactly
  as the original's list.

  A pattern with NaN or Inf raises ``ValueError`` when it is a concrete
  array; inside ``jit`` / ``vmap`` / ``scan`` it is ignored and flagged
  instead: the returned state is the input state with ``rejected`` + 1, and
  the report has ``valid=False``, NaN scores and ``is_emergent=False``.

  Deviation from the original: the field has a fixed dimension (the
  original resets its centroid when the flattened size changes, and skips
  history patterns of another size); a pattern of another size raises.
  Coherence has the size-2..7 fix of :func:`coherence_score`.

  Args:
    state: the field, from :func:`emergence_init` or a previous call.
    pattern: any array with ``dimensions`` entries.

  Returns:
    ``(report, new_state)``: an :class:`EmergenceState` and the updated
    :class:`EmergenceFieldState`.

  Raises:
    ValueError: if the pattern's size differs from the field's dimension
      (at trace time), or a concrete pattern is non-finite.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sal_jax import emergence_init, observe
    >>> state = emergence_init(8)
    >>> report, state = jax.jit(observe)(state, jnp.arange(8.0))
    >>> float(report.novelty), float(report.resonance), int(state.count)
    (1.0, 0.5, 1)
    >>> report, state = observe(state, 2 * jnp.arange(8.0))  # same direction
    >>> float(report.novelty)
    0.0

  References:
    The original SAL library, ``sal.emergence.EmergenceField.observe``.
  """
  dims = state.centroid.shape[-1]
  size = int(np.prod(jnp.shape(pattern)))
  if size != dims:
    raise ValueError(
        f"sal_jax: the pattern has {size} entries (shape "
        f"{jnp.shape(pattern)}) but the emergence field has {dims} "
        "dimensions.")
  _check_finite_if_concrete(pattern, "the observed pattern")
  return _observe(state, jnp.asarray(pattern))


@jax.jit
def _observe(state: EmergenceFieldState, pattern: jax.Array):
  """The compiled body of :func:`observe` (one dispatch when eager)."""
  dtype = state.centroid.dtype
  raw = _flat(pattern, dtype)
  valid = jnp.all(jnp.isfinite(raw))
  p = _normalise(jnp.where(valid, raw, 0.0))
  history_length = state.history.shape[0]
  filled = jnp.arange(history_length) < state.count

  coherence = _coherence(p)
  sims = jnp.abs(_cos(p[None], state.history))
  max_sim = jnp.max(jnp.where(filled, sims, -jnp.inf))
  novelty = jnp.where(state.count > 0,
                      jnp.clip(1.0 - max_sim, 0.0, 1.0), 1.0)
  distance = jnp.linalg.norm(p - state.centroid)
  resonance = jnp.where(
      state.count > 0,
      jnp.clip(jnp.exp(-distance / (state.variance + 1e-8)), 0.0, 1.0), 0.5)
  intensity = jnp.where(
      coherence < _INTENSITY_MIN_COHERENCE, 0.0,
      jnp.clip(coherence * novelty * (0.5 + 0.5 * resonance), 0.0, 1.0))
  report = emergence_state(coherence, novelty, resonance, intensity)

  slot = state.count % history_length
  first = state.count == 0
  centroid = jnp.where(
      first, p, _FIELD_ALPHA * p + (1.0 - _FIELD_ALPHA) * state.centroid)
  new_distance = jnp.linalg.norm(p - centroid)
  variance = jnp.where(
      first, jnp.ones((), dtype),
      _FIELD_ALPHA * new_distance + (1.0 - _FIELD_ALPHA) * state.variance)
  updated = EmergenceFieldState(
      history=state.history.at[slot].set(p),
      emergent_history=state.emergent_history.at[slot].set(
          report.is_emergent),
      count=state.count + 1,
      centroid=centroid.astype(dtype),
      variance=variance.astype(dtype),
      rejected=state.rejected)
  rejected = state._replace(rejected=state.rejected + 1)
  new_state = _tree_utils.tree_select(valid, updated, rejected)

  nan = jnp.full((), jnp.nan, jnp.float32)
  report = EmergenceState(
      *(jnp.where(valid, v, nan) for v in report[:4]),
      is_emergent=report.is_emergent & valid,
      emergence_score=jnp.where(valid, report.emergence_score, nan),
      valid=valid)
  return report, new_state


def emergence_history_size(state: EmergenceFieldState) -> jax.Array:
  r"""Number of filled history slots.

  .. math::
    |H| = \min(\mathrm{count}, \mathrm{history\_length})

  Args:
    state: an emergence field.

  Returns:
    An int32 scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import emergence_init, emergence_history_size, observe
    >>> state = emergence_init(4, history_length=2)
    >>> for _ in range(3):
    ...   _, state = observe(state, jnp.arange(4.0))
    >>> int(emergence_history_size(state))
    2

  References:
    The original SAL library, ``len(EmergenceField.pattern_history)``.
  """
  return jnp.minimum(state.count, state.history.shape[-2])


def emergence_rate(state: EmergenceFieldState) -> jax.Array:
  r"""Fraction of the remembered observations that were emergent.

  .. math::
    \mathrm{rate} = \frac{\#\{\text{emergent among the last }
      \min(\mathrm{count}, H)\}}{\min(\mathrm{count}, H)}
      \quad (0 \text{ if nothing was observed}).

  Args:
    state: an emergence field.

  Returns:
    A float32 scalar in [0, 1].

  Examples:
    >>> from sal_jax import emergence_init, emergence_rate
    >>> emergence_rate(emergence_init(4))
    Array(0., dtype=float32)

  References:
    The original SAL library,
    ``sal.emergence.EmergenceField.get_emergence_rate``.
  """
  filled_n = emergence_history_size(state)
  filled = jnp.arange(state.emergent_history.shape[-1]) < filled_n[..., None]
  emergent = jnp.sum(state.emergent_history & filled, axis=-1)
  return jnp.where(filled_n > 0,
                   emergent / jnp.maximum(filled_n, 1), 0.0).astype(
                       jnp.float32)


def detect_emergence(
    coherence: chex.Numeric,
    novelty: chex.Numeric,
    coherence_threshold: chex.Numeric = 0.6,
    novelty_threshold: chex.Numeric = 0.4,
) -> jax.Array:
  r"""Simple emergence test on coherence and novelty (non-strict).

  .. math::
    c \ge \tau_c \wedge n \ge \tau_n

  Both sides are compared in float32, so ``(0.6, 0.4)`` with the default
  thresholds is emergent.

  Args:
    coherence: scalar or array.
    novelty: scalar or array.
    coherence_threshold: :math:`\tau_c`, the original's
      ``EmergenceField(coherence_threshold=...)``.
    novelty_threshold: :math:`\tau_n`.

  Returns:
    A bool array of the broadcast shape.

  Examples:
    >>> from sal_jax import detect_emergence
    >>> bool(detect_emergence(0.6, 0.4)), bool(detect_emergence(0.59, 0.5))
    (True, False)

  References:
    The original SAL library,
    ``sal.emergence.EmergenceField.detect_emergence``.
  """
  c = jnp.asarray(coherence, jnp.float32)
  n = jnp.asarray(novelty, jnp.float32)
  return ((c >= jnp.asarray(coherence_threshold, jnp.float32))
          & (n >= jnp.asarray(novelty_threshold, jnp.float32)))
