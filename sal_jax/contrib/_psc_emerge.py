"""The emergent pulse of a Pulse-Split-Cascade: the fittest viable one.

References:
  The original SAL library, ``sal.psc.emergence_select`` and
  ``sal.psc.PulseCascade.emerge``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from sal_jax.contrib._psc_pulses import CascadeState
from sal_jax.contrib._psc_pulses import PulseStatus
from sal_jax.contrib._psc_pulses import compiled
from sal_jax.contrib._psc_pulses import pulse_fitness
from sal_jax.contrib._psc_pulses import pulse_is_viable
from sal_jax.contrib._psc_pulses import viable_pulses


@compiled
def emergence_select(
    status: chex.Array,
    coherence: chex.Array,
    novelty: chex.Array,
    resonance: chex.Array,
) -> jax.Array:
  r"""Index of the emergent pulse among slots.

  The viable pulse with the highest fitness :math:`c (n + r) / 2`; if none
  is viable, the highest fitness among all non-free slots; -1 if every
  slot is free. Ties go to the lowest index (as Python's ``max``).

  Args:
    status: ``(P,)`` :class:`PulseStatus` codes.
    coherence: ``(P,)``.
    novelty: ``(P,)``.
    resonance: ``(P,)``.

  Returns:
    An int32 scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.contrib import emergence_select
    >>> int(emergence_select(jnp.array([1, 1]), jnp.array([0.6, 0.9]),
    ...                      jnp.array([0.2, 0.8]), jnp.array([0.5, 0.7])))
    1

  References:
    The original SAL library, ``sal.psc.emergence_select``.
  """
  status = jnp.asarray(status)
  fitness = pulse_fitness(coherence, novelty, resonance)
  viable = pulse_is_viable(status, coherence, resonance)
  occupied = status != PulseStatus.FREE
  pool = jnp.where(jnp.any(viable), viable, occupied)
  best = jnp.argmax(jnp.where(pool, fitness, -jnp.inf)).astype(jnp.int32)
  return jnp.where(jnp.any(occupied), best, -1)


@compiled
def emerge(state: CascadeState) -> tuple[jax.Array, CascadeState]:
  r"""The emergent pulse: the fittest viable one (else the fittest of all).

  .. math::
    i^\star = \operatorname{arg\,max}_{i \in V} c_i (n_i + r_i) / 2
    \quad (V = \text{viable, else all non-free})

  Counts an emergence event (in ``state.emergence_events``) when a viable
  pulse exists, as the original records one.

  Args:
    state: a cascade.

  Returns:
    ``(slot, new_state)``: the int32 slot (-1 if every slot is free; see
    :func:`emergence_select`) and the state with the event counted.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.contrib import cascade_init, emerge
    >>> slot, state = emerge(cascade_init(jnp.ones((2, 3))))
    >>> int(slot), int(state.emergence_events)
    (0, 1)

  References:
    The original SAL library, ``sal.psc.PulseCascade.emerge``.
  """
  slot = emergence_select(state.status, state.coherence, state.novelty,
                          state.resonance)
  event = jnp.any(viable_pulses(state)).astype(jnp.int32)
  return slot, state._replace(emergence_events=state.emergence_events + event)
