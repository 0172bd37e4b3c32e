r"""Pulses of the Pulse-Split-Cascade: statuses, the population, the rules.

The population has a fixed capacity ``P``: :class:`CascadeState` holds every
per-pulse quantity as a ``(P,)`` (or ``(P, D)``) array, and a slot's
:class:`PulseStatus` says whether it is free or holds a pulse. The per-pulse
rules are fitness :math:`c (n + r) / 2`, viability (active, :math:`c > 0.3`,
:math:`r > 0.2`) and splitting (viable, :math:`c > \tau_s`, :math:`n > 0.3`).
The cascade itself (init and step) is in :mod:`sal_jax.contrib._psc`.

References:
  The original SAL library, ``sal.psc.Pulse`` and ``sal.psc.PulseState``.
"""

from __future__ import annotations

import enum
import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

# Viability: c > 0.3 and r > 0.2; splitting also needs n > 0.3.
_VIABLE_COHERENCE = 0.3
_VIABLE_RESONANCE = 0.2
_SPLIT_NOVELTY = 0.3


class PulseStatus(enum.IntEnum):
  """Status codes of a pulse slot (``CascadeState.status``).

  ``FREE`` marks an unused slot; the others are the original's
  ``PulseState`` values (``DORMANT`` exists there but is never set).
  """
  FREE = 0
  ACTIVE = 1
  SPLIT = 2
  MERGED = 3
  DORMANT = 4
  EXPIRED = 5


class CascadeState(NamedTuple):
  """State of a Pulse-Split-Cascade with capacity ``P`` and dimension ``D``.

  Attributes:
    embeddings: ``(P, D)`` pulse embeddings (zeros in free slots).
    coherence: ``(P,)`` coherence of each pulse.
    novelty: ``(P,)`` novelty.
    resonance: ``(P,)`` resonance.
    generation: ``(P,)`` int32, 0 for roots.
    parent: ``(P,)`` int32 slot of the parent, -1 for roots and free slots.
    root: ``(P,)`` int32 slot of the lineage's root, -1 for free slots.
    status: ``(P,)`` int32 :class:`PulseStatus` codes.
    birth_step: ``(P,)`` int32 step at which the pulse was born.
    merged_into: ``(P,)`` int32 slot that absorbed the pulse, else -1.
    best_fitness: ``(P,)`` highest fitness the pulse has had (at birth or at
      the end of any step), 0 in free slots.
    step: int32 scalar, steps taken.
    total_created: int32 scalar, pulses ever created.
    total_merges: int32 scalar, merges ever done.
    emergence_events: int32 scalar, :func:`emerge` calls that found a
      viable pulse.
  """
  embeddings: jax.Array
  coherence: jax.Array
  novelty: jax.Array
  resonance: jax.Array
  generation: jax.Array
  parent: jax.Array
  root: jax.Array
  status: jax.Array
  birth_step: jax.Array
  merged_into: jax.Array
  best_fitness: jax.Array
  step: jax.Array
  total_created: jax.Array
  total_merges: jax.Array
  emergence_events: jax.Array


def compiled(fn):
  """Runs ``fn`` as one compiled call (a single dispatch when eager)."""
  jitted = jax.jit(fn)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    return jitted(*args, **kwargs)

  return wrapper


def pulse_fitness(
    coherence: chex.Numeric,
    novelty: chex.Numeric,
    resonance: chex.Numeric,
) -> jax.Array:
  r"""Fitness of pulses, :math:`c (n + r) / 2`.

  Args:
    coherence: scalar or array.
    novelty: same shape.
    resonance: same shape.

  Returns:
    The fitness, elementwise.

  Examples:
    >>> from sal_jax.contrib import pulse_fitness
    >>> float(pulse_fitness(1.0, 1.0, 0.5))
    0.75

  References:
    The original SAL library, ``sal.psc.Pulse.fitness``.
  """
  c, n, r = (jnp.asarray(v) for v in (coherence, novelty, resonance))
  return c * (n + r) / 2


def pulse_is_viable(
    status: chex.Array,
    coherence: chex.Numeric,
    resonance: chex.Numeric,
) -> jax.Array:
  r"""Whether pulses are viable: :math:`\mathrm{active} \wedge c > 0.3
  \wedge r > 0.2`.

  Comparisons are strict and done in the dtype of the values, so a
  coherence of exactly 0.3 is not viable.

  Args:
    status: :class:`PulseStatus` codes.
    coherence: same shape.
    resonance: same shape.

  Returns:
    A bool array.

  Examples:
    >>> from sal_jax.contrib import PulseStatus, pulse_is_viable
    >>> bool(pulse_is_viable(PulseStatus.ACTIVE, 0.31, 0.21))
    True
    >>> bool(pulse_is_viable(PulseStatus.ACTIVE, 0.3, 0.9))
    False

  References:
    The original SAL library, ``sal.psc.Pulse.is_viable``.
  """
  c = jnp.asarray(coherence, jnp.result_type(coherence, jnp.float32))
  r = jnp.asarray(resonance, jnp.result_type(resonance, jnp.float32))
  return ((jnp.asarray(status) == PulseStatus.ACTIVE)
          & (c > _VIABLE_COHERENCE) & (r > _VIABLE_RESONANCE))


def pulse_can_split(
    status: chex.Array,
    coherence: chex.Numeric,
    novelty: chex.Numeric,
    resonance: chex.Numeric,
    split_threshold: chex.Numeric = 0.5,
) -> jax.Array:
  r"""Whether pulses may split: viable :math:`\wedge\ c > \tau_s \wedge n >
  0.3` (strict).

  Deviation from the original: the original stores ``split_threshold``
  (default 0.6) but never uses it, testing a hard-coded :math:`c > 0.5`;
  here :math:`\tau_s` is ``split_threshold`` and its default is 0.5, so the
  default behaviour is the original's.

  Args:
    status: :class:`PulseStatus` codes.
    coherence: same shape.
    novelty: same shape.
    resonance: same shape.
    split_threshold: :math:`\tau_s`.

  Returns:
    A bool array.

  Examples:
    >>> from sal_jax.contrib import PulseStatus, pulse_can_split
    >>> bool(pulse_can_split(PulseStatus.ACTIVE, 0.51, 0.31, 0.3))
    True
    >>> bool(pulse_can_split(PulseStatus.ACTIVE, 0.5, 0.31, 0.3))
    False

  References:
    The original SAL library, ``sal.psc.Pulse.can_split``.
  """
  c = jnp.asarray(coherence, jnp.result_type(coherence, jnp.float32))
  n = jnp.asarray(novelty, jnp.result_type(novelty, jnp.float32))
  return (pulse_is_viable(status, c, resonance)
          & (c > jnp.asarray(split_threshold, c.dtype))
          & (n > _SPLIT_NOVELTY))


@compiled
def viable_pulses(state: CascadeState) -> jax.Array:
  r"""Mask of the viable pulses (what the original's ``step`` returns).

  .. math::
    \mathrm{viable}_i = \mathrm{active}_i \wedge c_i > 0.3 \wedge
    r_i > 0.2

  Args:
    state: a cascade.

  Returns:
    A ``(P,)`` bool array, see :func:`pulse_is_viable`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.contrib import cascade_init, viable_pulses
    >>> viable_pulses(cascade_init(jnp.ones(2), max_pulses=3)).tolist()
    [True, False, False]

  References:
    The original SAL library, ``sal.psc.PulseCascade.step`` (return value).
  """
  return pulse_is_viable(state.status, state.coherence, state.resonance)
