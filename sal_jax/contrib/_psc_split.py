"""The Pulse-Split-Cascade's split: where children go and what they start as.

A pulse that splits gets two children in the lowest free slots (slots are
never reused, so slot order stays birth order); a child is its parent's
embedding plus Gaussian noise, with :math:`0.9 c`, :math:`\\min(n + 0.1, 1)`
and the parent's :math:`r`.

References:
  The original SAL library, ``sal.psc.PulseCascade._split_pulse``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

# Children: c * 0.9, min(n + 0.1, 1).
_CHILD_COHERENCE_DECAY = 0.9
_CHILD_NOVELTY_GAIN = 0.1


def place_children(free: jax.Array,
                   candidates: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Which candidates split, and the parent of the child born in each slot.

  In slot order, a candidate splits while two free slots remain for its
  children (so at most ``P`` slots are ever in use); the ``k``-th pulse that
  splits gets free slots ``2k`` and ``2k + 1`` in slot order.

  Args:
    free: ``(P,)`` bool, the free slots.
    candidates: ``(P,)`` bool, the pulses that may split.

  Returns:
    ``(split, child_parent)``: a ``(P,)`` bool mask of the pulses that split
    and a ``(P,)`` int32 array holding, in each slot a child is born into,
    its parent's slot (-1 elsewhere).
  """
  p = free.shape[0]
  idx = jnp.arange(p, dtype=jnp.int32)
  room = jnp.sum(free) // 2
  split = candidates & (jnp.cumsum(candidates) <= room)
  free_slots = jnp.nonzero(free, size=p, fill_value=p)[0]
  rank = jnp.cumsum(split) - 1
  first = 2 * rank
  slot_a = jnp.where(split, free_slots[jnp.clip(first, 0, p - 1)], p)
  slot_b = jnp.where(split, free_slots[jnp.clip(first + 1, 0, p - 1)], p)
  child_parent = (jnp.full((p,), -1, jnp.int32)
                  .at[slot_a].set(idx, mode="drop")
                  .at[slot_b].set(idx, mode="drop"))
  return split, child_parent


def spawn_children(key: chex.PRNGKey, child_parent: jax.Array,
                   emb: jax.Array, c: jax.Array, n: jax.Array, r: jax.Array,
                   noise_scale: chex.Numeric):
  r"""The children's embeddings and measurements (other slots unchanged).

  .. math::
    e \leftarrow e_\mathrm{parent} + \sigma \xi, \quad
    c \leftarrow 0.9\, c_\mathrm{parent}, \quad
    n \leftarrow \min(n_\mathrm{parent} + 0.1, 1), \quad
    r \leftarrow r_\mathrm{parent},

  with :math:`\xi \sim \mathcal N(0, I)` drawn from ``key`` for all ``P``
  slots.

  Args:
    key: a PRNG key.
    child_parent: from :func:`place_children`.
    emb: ``(P, D)`` embeddings.
    c: ``(P,)`` coherence.
    n: ``(P,)`` novelty.
    r: ``(P,)`` resonance.
    noise_scale: :math:`\sigma`.

  Returns:
    ``(emb, c, n, r)`` with the children's slots filled.
  """
  child = child_parent >= 0
  par = jnp.maximum(child_parent, 0)
  noise = jax.random.normal(key, emb.shape, emb.dtype)
  emb = jnp.where(child[:, None], emb[par] + noise_scale * noise, emb)
  c = jnp.where(child, c[par] * _CHILD_COHERENCE_DECAY, c)
  n = jnp.where(child, jnp.minimum(n[par] + _CHILD_NOVELTY_GAIN, 1.0), n)
  r = jnp.where(child, r[par], r)
  return emb, c, n, r
