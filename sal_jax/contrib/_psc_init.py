"""Starting a Pulse-Split-Cascade: the initial roots, and more roots later.

Both functions validate their inputs in Python and run a compiled body, so a
cascade is started without recompiling for every prompt of the same shape.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sal_jax.contrib._psc_pulses import CascadeState
from sal_jax.contrib._psc_pulses import PulseStatus
from sal_jax.contrib._psc_pulses import pulse_fitness


def _check_finite_if_concrete(x: Any, message: str) -> None:
  """Raises ``ValueError(message)`` for a concrete non-finite array."""
  if not isinstance(x, jax.core.Tracer) and not np.all(
      np.isfinite(np.asarray(x))):
    raise ValueError(message)


def cascade_init(
    embeddings: chex.Array,
    max_pulses: int = 32,
    dtype: Any = None,
) -> CascadeState:
  r"""Starts a cascade from one or several prompt embeddings.

  Each embedding becomes a root pulse (its own lineage) with
  :math:`c = 1, n = 1, r = 0.5` in slots ``0, 1, ...`` (initiation order);
  the other slots are free.

  Args:
    embeddings: ``(D,)`` for one prompt, or ``(R, D)`` for ``R`` roots.
    max_pulses: the capacity ``P`` (pulses ever alive at once, all statuses
      counted, as the original's population), at least ``R``.
    dtype: floating dtype of the state (default: the embeddings' dtype if
      floating, else float32).

  Returns:
    A :class:`CascadeState` at step 0.

  Raises:
    ValueError: for a zero dimension, no room for the roots, or non-finite
      embeddings.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.contrib import cascade_init
    >>> state = cascade_init(jnp.ones(4), max_pulses=8)
    >>> state.embeddings.shape, state.status.tolist()
    ((8, 4), [1, 0, 0, 0, 0, 0, 0, 0])

  References:
    The original SAL library, ``sal.psc.PulseCascade.initiate``.
  """
  embeddings = jnp.asarray(embeddings)
  if embeddings.ndim == 1:
    embeddings = embeddings[None]
  if embeddings.ndim != 2:
    raise ValueError(
        "sal_jax: cascade_init expects a (D,) embedding or (R, D) "
        f"embeddings, got shape {embeddings.shape}.")
  num_roots, dims = embeddings.shape
  if dims < 1 or num_roots < 1:
    raise ValueError(
        f"sal_jax: embeddings must have a non-zero size, got shape "
        f"{embeddings.shape}.")
  if (isinstance(max_pulses, bool)
      or not isinstance(max_pulses, (int, np.integer)) or max_pulses < 1):
    raise ValueError(
        f"sal_jax: max_pulses must be a positive integer, got {max_pulses!r}.")
  if num_roots > max_pulses:
    raise ValueError(
        f"sal_jax: {num_roots} root embeddings do not fit in max_pulses="
        f"{max_pulses}.")
  _check_finite_if_concrete(
      embeddings, "sal_jax: the prompt embeddings contain NaN or Inf.")
  if dtype is None:
    dtype = (embeddings.dtype if jnp.issubdtype(embeddings.dtype,
                                                jnp.floating)
             else jnp.float32)
  return _init_state(embeddings.astype(dtype), int(max_pulses))


@functools.partial(jax.jit, static_argnums=1)
def _init_state(embeddings: jax.Array, p: int) -> CascadeState:
  """The compiled body of :func:`cascade_init`."""
  num_roots, dims = embeddings.shape
  dtype = embeddings.dtype
  idx = jnp.arange(p, dtype=jnp.int32)
  is_root = idx < num_roots
  emb = jnp.zeros((p, dims), dtype).at[:num_roots].set(embeddings)

  def per_root(value, fill):
    return jnp.where(is_root, jnp.asarray(value, dtype), fill).astype(dtype)

  coherence = per_root(1.0, 0.0)
  novelty = per_root(1.0, 0.0)
  resonance = per_root(0.5, 0.0)
  return CascadeState(
      embeddings=emb,
      coherence=coherence,
      novelty=novelty,
      resonance=resonance,
      generation=jnp.zeros((p,), jnp.int32),
      parent=jnp.full((p,), -1, jnp.int32),
      root=jnp.where(is_root, idx, -1),
      status=jnp.where(is_root, PulseStatus.ACTIVE,
                       PulseStatus.FREE).astype(jnp.int32),
      birth_step=jnp.zeros((p,), jnp.int32),
      merged_into=jnp.full((p,), -1, jnp.int32),
      best_fitness=jnp.where(
          is_root, pulse_fitness(coherence, novelty, resonance), 0.0).astype(
              dtype),
      step=jnp.zeros((), jnp.int32),
      total_created=jnp.asarray(num_roots, jnp.int32),
      total_merges=jnp.zeros((), jnp.int32),
      emergence_events=jnp.zeros((), jnp.int32))


def cascade_initiate(
    state: CascadeState,
    embedding: chex.Array,
) -> tuple[CascadeState, jax.Array]:
  """Adds one more root pulse (a new lineage) in the first free slot.

  The root starts with :math:`c = 1, n = 1, r = 0.5`, born at the current
  step. Jittable: when no slot is free the state is returned unchanged and
  the index is -1.

  Args:
    state: a cascade.
    embedding: a ``(D,)`` prompt embedding.

  Returns:
    ``(new_state, slot)`` with ``slot`` an int32 scalar (-1 if full).

  Raises:
    ValueError: if the embedding's size is not ``D``, or a concrete
      embedding is non-finite.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.contrib import cascade_init, cascade_initiate
    >>> state = cascade_init(jnp.ones(4), max_pulses=2)
    >>> state, slot = cascade_initiate(state, jnp.zeros(4))
    >>> int(slot), int(state.total_created)
    (1, 2)
    >>> int(cascade_initiate(state, jnp.zeros(4))[1])  # full
    -1

  References:
    The original SAL library, ``sal.psc.PulseCascade.initiate``.
  """
  p, dims = state.embeddings.shape
  embedding = jnp.asarray(embedding)
  if embedding.size != dims:
    raise ValueError(
        f"sal_jax: the embedding has {embedding.size} entries but the "
        f"cascade's pulses have {dims}.")
  _check_finite_if_concrete(
      embedding, "sal_jax: the prompt embedding contains NaN or Inf.")
  return _initiate(state, embedding.reshape(dims))


@jax.jit
def _initiate(state: CascadeState, embedding: jax.Array):
  """The compiled body of :func:`cascade_initiate`."""
  dims = state.embeddings.shape[1]
  dtype = state.embeddings.dtype
  free = state.status == PulseStatus.FREE
  has_room = jnp.any(free)
  slot = jnp.argmax(free).astype(jnp.int32)
  one = lambda v: jnp.asarray(v, dtype)
  new = state._replace(
      embeddings=state.embeddings.at[slot].set(
          embedding.reshape(dims).astype(dtype)),
      coherence=state.coherence.at[slot].set(one(1.0)),
      novelty=state.novelty.at[slot].set(one(1.0)),
      resonance=state.resonance.at[slot].set(one(0.5)),
      generation=state.generation.at[slot].set(0),
      parent=state.parent.at[slot].set(-1),
      root=state.root.at[slot].set(slot),
      status=state.status.at[slot].set(PulseStatus.ACTIVE),
      birth_step=state.birth_step.at[slot].set(state.step),
      merged_into=state.merged_into.at[slot].set(-1),
      best_fitness=state.best_fitness.at[slot].set(
          pulse_fitness(one(1.0), one(1.0), one(0.5))),
      total_created=state.total_created + 1)
  return (optax.tree_utils.tree_where(has_room, new, state),
          jnp.where(has_room, slot, -1))
