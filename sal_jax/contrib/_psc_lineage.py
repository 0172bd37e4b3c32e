"""Lineages and statistics of a Pulse-Split-Cascade.

A lineage is a root pulse and all its descendants (``CascadeState.root``);
:func:`cascade_lineages` summarises each one, :func:`best_lineage` picks the
fittest, and :func:`cascade_statistics` counts the population.

References:
  The original SAL library, ``sal.psc.Lineage`` and
  ``sal.psc.PulseCascade.get_statistics``.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from sal_jax.contrib._psc_pulses import CascadeState
from sal_jax.contrib._psc_pulses import PulseStatus
from sal_jax.contrib._psc_pulses import compiled
from sal_jax.contrib._psc_pulses import pulse_fitness
from sal_jax.contrib._psc_pulses import viable_pulses

# A lineage with no active member reports 0.8 x its best fitness.
_INACTIVE_LINEAGE_DECAY = 0.8


class LineageStats(NamedTuple):
  """Per-lineage summary, indexed by the root's slot (``(P,)`` arrays).

  Attributes:
    is_lineage: bool, whether the slot holds a root (the other entries are
      then meaningful).
    best_index: int32 slot of the member with the highest ``best_fitness``
      (ties: lowest slot); -1 where ``is_lineage`` is ``False``.
    best_fitness: highest fitness any member has had.
    overall_fitness: mean fitness of the ``ACTIVE`` members, or
      ``0.8 * best_fitness`` if none is active.
    total_generations: int32, ``1 + max generation`` over the members.
    num_members: int32 number of pulses in the lineage.
    num_active: int32 number of ``ACTIVE`` members.
  """
  is_lineage: jax.Array
  best_index: jax.Array
  best_fitness: jax.Array
  overall_fitness: jax.Array
  total_generations: jax.Array
  num_members: jax.Array
  num_active: jax.Array


@compiled
def cascade_lineages(state: CascadeState) -> LineageStats:
  r"""Per-lineage statistics: best pulse, fitness, generations.

  A lineage is a root and all its descendants (``state.root``). For the
  lineage of root :math:`\ell`, with members :math:`M_\ell` and the active
  ones :math:`A_\ell`:

  .. math::
    \mathrm{best}_\ell = \max_{i \in M_\ell} \mathrm{best\_fitness}_i, \quad
    \mathrm{overall}_\ell = \begin{cases}
      \frac{1}{|A_\ell|}\sum_{i \in A_\ell} c_i (n_i + r_i)/2 & A_\ell \ne
      \emptyset \\ 0.8\, \mathrm{best}_\ell & \text{else.} \end{cases}

  Deviation from the original: the original only ever adds the root pulse
  to its lineage (children are never added), so its lineage statistics
  follow the root alone; here they cover every descendant, and
  ``num_active`` counts the currently active members (the original counts
  members that were active when added).

  Args:
    state: a cascade.

  Returns:
    A :class:`LineageStats` of ``(P,)`` arrays indexed by root slot.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.contrib import cascade_init, cascade_lineages
    >>> stats = cascade_lineages(cascade_init(jnp.ones((2, 3)), 4))
    >>> stats.is_lineage.tolist(), stats.best_fitness.tolist()
    ([True, True, False, False], [0.75, 0.75, 0.0, 0.0])

  References:
    The original SAL library, ``sal.psc.Lineage``.
  """
  p = state.status.shape[0]
  idx = jnp.arange(p, dtype=jnp.int32)
  occupied = state.status != PulseStatus.FREE
  member = (state.root[None, :] == idx[:, None]) & occupied[None, :]
  is_lineage = occupied & (state.root == idx)
  dtype = state.best_fitness.dtype
  scores = jnp.where(member, state.best_fitness[None, :], -jnp.inf)
  best_index = jnp.where(is_lineage, jnp.argmax(scores, axis=1), -1)
  best_fitness = jnp.where(is_lineage, jnp.max(scores, axis=1), 0.0)
  active = member & (state.status == PulseStatus.ACTIVE)[None, :]
  num_active = jnp.sum(active, axis=1, dtype=jnp.int32)
  fitness = pulse_fitness(state.coherence, state.novelty, state.resonance)
  mean_active = (jnp.sum(jnp.where(active, fitness[None, :], 0.0), axis=1)
                 / jnp.maximum(num_active, 1))
  overall = jnp.where(num_active > 0, mean_active,
                      _INACTIVE_LINEAGE_DECAY * best_fitness)
  generations = jnp.max(jnp.where(member, state.generation[None, :] + 1, 0),
                        axis=1)
  return LineageStats(
      is_lineage=is_lineage,
      best_index=best_index.astype(jnp.int32),
      best_fitness=best_fitness.astype(dtype),
      overall_fitness=jnp.where(is_lineage, overall, 0.0).astype(dtype),
      total_generations=generations.astype(jnp.int32),
      num_members=jnp.sum(member, axis=1, dtype=jnp.int32),
      num_active=num_active)


@compiled
def best_lineage(state: CascadeState) -> jax.Array:
  r"""Root slot of the lineage with the highest overall fitness.

  .. math::
    \ell^\star = \operatorname{arg\,max}_\ell\ \mathrm{overall}_\ell
    \quad \text{(see } \texttt{cascade\_lineages})

  Ties go to the lowest root slot; -1 if there is no lineage.

  Args:
    state: a cascade.

  Returns:
    An int32 scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.contrib import best_lineage, cascade_init
    >>> int(best_lineage(cascade_init(jnp.ones((3, 2)))))
    0

  References:
    The original SAL library, ``sal.psc.PulseCascade.get_best_lineage``.
  """
  stats = cascade_lineages(state)
  best = jnp.argmax(jnp.where(stats.is_lineage, stats.overall_fitness,
                              -jnp.inf)).astype(jnp.int32)
  return jnp.where(jnp.any(stats.is_lineage), best, -1)


def lineage_members(state: CascadeState, root: chex.Numeric) -> jax.Array:
  r"""Mask of the pulses that descend from (or are) the given root.

  .. math::
    M_\ell = \{i : \mathrm{root}_i = \ell,\ \mathrm{status}_i \ne
    \mathrm{FREE}\}

  Args:
    state: a cascade.
    root: the root's slot.

  Returns:
    A ``(P,)`` bool array.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.contrib import cascade_init, lineage_members
    >>> lineage_members(cascade_init(jnp.ones((2, 2)), 3), 1).tolist()
    [False, True, False]

  References:
    The original SAL library, ``sal.psc.Lineage.pulses``.
  """
  return (state.root == root) & (state.status != PulseStatus.FREE)


def cascade_statistics(state: CascadeState) -> dict[str, jax.Array]:
  r"""Counts describing the cascade (jittable; int32 scalars).

  .. math::
    \mathrm{active\_pulses} = \#\{i : \mathrm{viable}_i\}, \quad
    \mathrm{num\_lineages} = \#\{i : \mathrm{root}_i = i\}, \ \ldots

  Keys: the original's ``current_step``, ``total_pulses_created``,
  ``active_pulses`` (viable), ``expired_pulses``, ``merged_pulses``,
  ``total_merges``, ``num_lineages``, ``emergence_events``; and
  ``split_pulses`` and ``free_slots``.

  Args:
    state: a cascade.

  Returns:
    A dict of int32 scalars.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.contrib import cascade_init, cascade_statistics
    >>> stats = cascade_statistics(cascade_init(jnp.ones(3), 4))
    >>> int(stats["active_pulses"]), int(stats["free_slots"])
    (1, 3)

  References:
    The original SAL library, ``sal.psc.PulseCascade.get_statistics``.
  """
  stats = _statistics(state)  # (jit returns the keys sorted)
  return {k: stats[k] for k in _STATISTICS_KEYS}


_STATISTICS_KEYS = ("current_step", "total_pulses_created", "active_pulses",
                    "expired_pulses", "merged_pulses", "total_merges",
                    "num_lineages", "emergence_events", "split_pulses",
                    "free_slots")


@jax.jit
def _statistics(state: CascadeState) -> dict[str, jax.Array]:
  count = lambda mask: jnp.sum(mask, dtype=jnp.int32)
  idx = jnp.arange(state.status.shape[0], dtype=jnp.int32)
  occupied = state.status != PulseStatus.FREE
  return {
      "current_step": state.step,
      "total_pulses_created": state.total_created,
      "active_pulses": count(viable_pulses(state)),
      "expired_pulses": count(state.status == PulseStatus.EXPIRED),
      "merged_pulses": count(state.status == PulseStatus.MERGED),
      "total_merges": state.total_merges,
      "num_lineages": count(occupied & (state.root == idx)),
      "emergence_events": state.emergence_events,
      "split_pulses": count(state.status == PulseStatus.SPLIT),
      "free_slots": count(~occupied),
  }
