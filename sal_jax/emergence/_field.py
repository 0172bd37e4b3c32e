r"""The emergence field: coherence, novelty and resonance of observed patterns.

A field observes "patterns" (any array, e.g. a hidden representation), each
flattened and L2-normalised, and reports how internally coherent, how novel
(against the remembered patterns) and how resonant (with the running centroid)
each one is (the measures themselves are in
:mod:`sal_jax.emergence._scores`). The original keeps Python lists of
tensors; here the memory is a fixed-capacity ring buffer of the last
``history_length`` normalised patterns plus a fill count, so
:func:`observe` is one pure, jittable function of fixed-shape arrays: it
``vmap``-s over a batch of independent fields and ``lax.scan``-s over a
sequence of patterns.

References:
  The original SAL library, ``sal.emergence.EmergenceField``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sal_jax.emergence._scores import EmergenceState
from sal_jax.emergence._scores import cosine
from sal_jax.emergence._scores import emergence_state
from sal_jax.emergence._scores import flat
from sal_jax.emergence._scores import flat_coherence
from sal_jax.emergence._scores import normalise

# The field's exponential-average weight of a new pattern.
_FIELD_ALPHA = 0.1
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


def _positive_int(name: str, value) -> int:
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise ValueError(
        f"sal_jax: {name} must be a positive integer, got {value!r}.")
  return int(value)


def _check_finite_if_concrete(x, what: str) -> None:
  if isinstance(x, jax.core.Tracer):
    return
  if not np.all(np.isfinite(np.asarray(x))):
    raise ValueError(f"sal_jax: {what} contains NaN or Inf.")


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
    >>> from sal_jax.emergence import emergence_init
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
    >>> from sal_jax.emergence import emergence_init, observe
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
  raw = flat(pattern, dtype)
  valid = jnp.all(jnp.isfinite(raw))
  p = normalise(jnp.where(valid, raw, 0.0))
  history_length = state.history.shape[0]
  filled = jnp.arange(history_length) < state.count

  coherence = flat_coherence(p)
  sims = jnp.abs(cosine(p[None], state.history))
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
  new_state = optax.tree_utils.tree_where(valid, updated, rejected)

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
    >>> from sal_jax.emergence import (emergence_history_size, emergence_init,
    ...                                observe)
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
    >>> from sal_jax.emergence import emergence_init, emergence_rate
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
