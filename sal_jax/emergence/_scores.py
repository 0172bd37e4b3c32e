r"""Emergence scores: coherence, novelty and resonance of arrays.

The stateless measures behind the emergence field
(:mod:`sal_jax.emergence._field`): a pattern's internal coherence, its novelty
against a reference, its resonance with a set of patterns,
:class:`EmergenceState` (the four signals with the emergence rule), and the
simple :func:`detect_emergence` test. All pure and jittable.

References:
  The original SAL library, ``sal.emergence``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp

# Norms at or below this leave a pattern unnormalised (as the original).
_NORM_EPS = 1e-8
# Thresholds of EmergenceState.is_emergent (hard-coded in the original).
_EMERGENT_COHERENCE = 0.6
_EMERGENT_NOVELTY = 0.4
_EMERGENT_RESONANCE = 0.5
_EMERGENT_INTENSITY = 0.3


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


def flat(x, dtype=jnp.float32) -> jax.Array:
  """The array flattened, in ``dtype``."""
  return jnp.ravel(jnp.asarray(x)).astype(dtype)


def normalise(p: jax.Array) -> jax.Array:
  """``p / ||p||``, or ``p`` itself when its norm is at most 1e-8."""
  norm = jnp.linalg.norm(p)
  ok = norm > _NORM_EPS
  return jnp.where(ok, p / jnp.where(ok, norm, 1.0), p)


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarity along the last axis, ``eps``-clamped norms."""
  na = jnp.maximum(jnp.linalg.norm(a, axis=-1), _NORM_EPS)
  nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), _NORM_EPS)
  return jnp.sum(a * b, axis=-1) / (na * nb)


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
    >>> from sal_jax.emergence import coherence_score
    >>> coherence_score(jnp.full(16, 0.25))
    Array(1., dtype=float32)
    >>> round(float(coherence_score(jnp.array([1.0, 2.0, 3.0]))), 4)
    0.0909

  References:
    The original SAL library, ``sal.emergence.coherence_score`` and
    ``EmergenceField.measure_coherence``.
  """
  return flat_coherence(flat(x))


@jax.jit
def flat_coherence(p: jax.Array) -> jax.Array:
  """:func:`coherence_score` of a flat array (compiled per size)."""
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
  r"""Novelty of an array against a reference: one minus the absolute cosine.

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
    >>> from sal_jax.emergence import novelty_score
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
  p = normalise(flat(x))
  r = normalise(flat(reference))
  n = max(p.shape[0], r.shape[0])
  sim = cosine(_pad_to(p, n), _pad_to(r, n))
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
    >>> from sal_jax.emergence import resonance_measure
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
  p = normalise(flat(pattern))
  sims = []
  for f in rows:  # Sizes may differ: each pair is padded on its own.
    h = normalise(flat(f))
    n = max(p.shape[0], h.shape[0])
    sims.append(cosine(_pad_to(p, n), _pad_to(h, n)))
  return jnp.clip(jnp.mean((jnp.stack(sims) + 1.0) / 2.0), 0.0, 1.0)


@jax.jit
def _resonance_array(pattern: jax.Array, field: jax.Array) -> jax.Array:
  p = normalise(flat(pattern))
  h = jax.vmap(normalise)(field.astype(jnp.float32))
  n = max(p.shape[0], h.shape[1])
  sims = cosine(_pad_to(p, n)[None], jnp.pad(h, ((0, 0), (0, n - h.shape[1]))))
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
    >>> from sal_jax.emergence import emergence_state
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
    >>> from sal_jax.emergence import detect_emergence
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
