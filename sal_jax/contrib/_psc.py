r"""Pulse-Split-Cascade (PSC): a population of evolving, splitting, merging pulses.

A *pulse* is an embedding with a coherence :math:`c`, novelty :math:`n` and
resonance :math:`r`. Every step, each viable pulse evolves and is
re-measured; pulses that can split spawn two noisy children; incoherent
pulses expire; similar viable pulses merge. The best viable pulse "emerges".

The original keeps a dict of pulse objects and loops over them in Python.
Here the population has a fixed capacity ``max_pulses``: every per-pulse
quantity is a ``(P,)`` (or ``(P, D)``) array and a slot is *free* until a
pulse is born into it, so :func:`cascade_step` is one compiled program whose
shapes never change (no recompilation across steps). Slots are never reused:
slot order is birth order, exactly the original's dict order, so the greedy
merge order is the original's.

This module starts and steps a cascade; the pulses' statuses, state and
rules are in :mod:`sal_jax.contrib._psc_pulses`, the split in
:mod:`sal_jax.contrib._psc_split`, the merge in
:mod:`sal_jax.contrib._psc_merge`, the emergent pulse in
:mod:`sal_jax.contrib._psc_emerge`, lineages and statistics in
:mod:`sal_jax.contrib._psc_lineage`.

References:
  The original SAL library, ``sal.psc.PulseCascade``.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sal_jax import _tree_utils
from sal_jax.contrib._psc_merge import greedy_merge
from sal_jax.contrib._psc_pulses import CascadeState
from sal_jax.contrib._psc_pulses import PulseStatus
from sal_jax.contrib._psc_pulses import pulse_can_split
from sal_jax.contrib._psc_pulses import pulse_fitness
from sal_jax.contrib._psc_pulses import pulse_is_viable
from sal_jax.contrib._psc_pulses import viable_pulses
from sal_jax.contrib._psc_split import place_children
from sal_jax.contrib._psc_split import spawn_children


def _is_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_number(name: str, value: Any, low: float) -> None:
  if _is_number(value) and not value >= low:
    raise ValueError(f"sal_jax: {name} must be >= {low}, got {value!r}.")


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
  return (_tree_utils.tree_select(has_room, new, state),
          jnp.where(has_room, slot, -1))


def cascade_step(
    state: CascadeState,
    key: chex.PRNGKey,
    evolve_fn: Callable[[jax.Array], jax.Array],
    measure_fn: Callable[[jax.Array], tuple[Any, Any, Any]] | None = None,
    *,
    max_generations: chex.Numeric = 10,
    split_threshold: chex.Numeric = 0.5,
    merge_threshold: chex.Numeric = 0.8,
    expire_threshold: chex.Numeric = 0.3,
    noise_scale: chex.Numeric = 0.1,
) -> CascadeState:
  r"""Advances the cascade by one step (jittable, fixed shapes).

  With :math:`V` the pulses viable at the start of the step:

  1. every pulse in :math:`V` evolves, :math:`e \leftarrow
     \mathrm{evolve}(e)`, and is re-measured, :math:`(c, n, r) \leftarrow
     \mathrm{measure}(e)` (both ``vmap``-ed over all slots; the results of
     the others are discarded);
  2. a pulse of :math:`V` that can split (:func:`pulse_can_split` with
     :math:`\tau_s`) and has generation :math:`<` ``max_generations`` is
     marked split and gets two children in the lowest free slots:
     :math:`e + \sigma \xi` (:math:`\xi \sim \mathcal N(0, I)` from ``key``),
     generation + 1, :math:`0.9 c`, :math:`\min(n + 0.1, 1)`, :math:`r`;
  3. a pulse of :math:`V` with :math:`c <` ``expire_threshold`` expires;
  4. viable pulses merge greedily in slot order: for :math:`i < j` with
     :math:`\cos(e_i, e_j) >` ``merge_threshold``, :math:`e_i \leftarrow
     (e_i + e_j)/2`, :math:`c_i, r_i \leftarrow \max`, :math:`n_i \leftarrow`
     mean, and :math:`j` is marked merged (exactly the original's order,
     with the updated :math:`e_i` compared to later :math:`j`).

  Population cap. Deviation from the original: the original compares the
  population at the *start* of the step with ``max_pulses``, so children
  added during the step can push 32 to 63 pulses. Here the cap is the
  capacity: in slot order, a pulse splits only if two free slots remain
  for its children, so at most ``max_pulses`` slots are ever in use. With
  enough room (e.g. 64 slots where the original's cap was 32) the
  population grows exactly as the original's. ``split_threshold`` is used,
  see :func:`pulse_can_split`.

  A pulse of :math:`V` whose evolved embedding or measurement is not
  finite keeps its previous values and expires (it cannot split or merge).

  The step is compiled once per ``(evolve_fn, measure_fn)`` pair and state
  shape (the functions are static; hashable callables are cached, so pass
  the same function objects every step rather than fresh lambdas). The
  thresholds are traced, so changing them does not recompile.

  Args:
    state: a cascade.
    key: a PRNG key; the only source of randomness (the children's noise).
    evolve_fn: ``(D,) -> (D,)``, a pure function of one embedding.
    measure_fn: ``(D,) -> (c, n, r)`` scalars, a pure function; ``None``
      keeps the measurements (as the original without ``measure_fn``).
    max_generations: the generation cap (children have generation at most
      this).
    split_threshold: :math:`\tau_s` (default 0.5, the original's rule).
    merge_threshold: cosine above which viable pulses merge.
    expire_threshold: coherence below which an evolved pulse expires.
    noise_scale: :math:`\sigma`, scale of the children's noise.

  Returns:
    The new :class:`CascadeState` (``step`` + 1).

  Raises:
    ValueError: at trace time, if ``evolve_fn`` does not return a ``(D,)``
      array or ``measure_fn`` does not return three scalars, or for a
      negative ``max_generations`` / ``noise_scale``.

  Examples:
    >>> import functools, jax, jax.numpy as jnp
    >>> from sal_jax.contrib import cascade_init, cascade_step
    >>> step = jax.jit(functools.partial(
    ...     cascade_step, evolve_fn=lambda e: e,
    ...     measure_fn=lambda e: (0.9, 0.5, 0.6)))
    >>> state = cascade_init(jnp.ones(4), max_pulses=8)
    >>> state = step(state, jax.random.key(0))
    >>> state.status.tolist(), int(state.total_created)  # twins merge
    ([2, 1, 3, 0, 0, 0, 0, 0], 3)

  References:
    The original SAL library, ``sal.psc.PulseCascade.step``,
    ``_split_pulse`` and ``_attempt_merges``.
  """
  _check_number("max_generations", max_generations, 0)
  _check_number("noise_scale", noise_scale, 0.0)
  try:
    hash((evolve_fn, measure_fn))
    body = _cascade_step_jit
  except TypeError:  # Unhashable callables: trace the body directly.
    body = _cascade_step
  return body(
      state, key, evolve_fn, measure_fn, max_generations=max_generations,
      split_threshold=split_threshold, merge_threshold=merge_threshold,
      expire_threshold=expire_threshold, noise_scale=noise_scale)


def _cascade_step(state, key, evolve_fn, measure_fn, *, max_generations,
                  split_threshold, merge_threshold, expire_threshold,
                  noise_scale):
  """The compiled body of :func:`cascade_step` (one dispatch when eager)."""
  p, dims = state.embeddings.shape
  dtype = state.embeddings.dtype
  step = state.step + 1

  viable0 = viable_pulses(state)
  evolved = jax.vmap(evolve_fn)(state.embeddings)
  if jnp.shape(evolved) != (p, dims):
    raise ValueError(
        f"sal_jax: evolve_fn must map a ({dims},) embedding to a ({dims},) "
        f"array, got shape {jnp.shape(evolved)[1:]}.")
  evolved = jnp.asarray(evolved).astype(dtype)
  if measure_fn is None:
    mc, mn, mr = state.coherence, state.novelty, state.resonance
  else:
    def measure(e):
      out = measure_fn(e)
      if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise ValueError(
            "sal_jax: measure_fn must return (coherence, novelty, "
            f"resonance), got {type(out).__name__}.")
      out = tuple(jnp.asarray(v) for v in out)
      if any(v.shape != () for v in out):
        raise ValueError(
            "sal_jax: measure_fn must return three scalars, got shapes "
            f"{[v.shape for v in out]}.")
      return tuple(v.astype(dtype) for v in out)
    mc, mn, mr = jax.vmap(measure)(evolved)
  finite = (jnp.all(jnp.isfinite(evolved), axis=1) & jnp.isfinite(mc)
            & jnp.isfinite(mn) & jnp.isfinite(mr))
  moved = viable0 & finite
  emb = jnp.where(moved[:, None], evolved, state.embeddings)
  c = jnp.where(moved, mc, state.coherence)
  n = jnp.where(moved, mn, state.novelty)
  r = jnp.where(moved, mr, state.resonance)

  # Splits: candidates in slot order while two free slots remain each.
  status = state.status
  free = status == PulseStatus.FREE
  candidates = (moved & pulse_can_split(status, c, n, r, split_threshold)
                & (state.generation < max_generations))
  split, child_parent = place_children(free, candidates)
  status = jnp.where(split, PulseStatus.SPLIT, status)
  expired = (moved & (c < jnp.asarray(expire_threshold, dtype))) | (
      viable0 & ~finite)
  status = jnp.where(expired, PulseStatus.EXPIRED, status)

  child = child_parent >= 0
  par = jnp.maximum(child_parent, 0)
  emb, c, n, r = spawn_children(key, child_parent, emb, c, n, r, noise_scale)
  status = jnp.where(child, PulseStatus.ACTIVE, status).astype(jnp.int32)

  # Merges among the viable pulses, children included.
  active = pulse_is_viable(status, c, r)
  emb, c, n, r, merged, merged_into, merges = greedy_merge(
      emb, c, n, r, active, merge_threshold)
  status = jnp.where(merged, PulseStatus.MERGED, status).astype(jnp.int32)

  occupied = status != PulseStatus.FREE
  fitness = pulse_fitness(c, n, r)
  best = jnp.where(child, fitness, jnp.maximum(state.best_fitness, fitness))
  return CascadeState(
      embeddings=emb,
      coherence=c,
      novelty=n,
      resonance=r,
      generation=jnp.where(child, state.generation[par] + 1,
                           state.generation),
      parent=jnp.where(child, child_parent, state.parent),
      root=jnp.where(child, state.root[par], state.root),
      status=status,
      birth_step=jnp.where(child, step, state.birth_step),
      merged_into=jnp.where(merged, merged_into, state.merged_into),
      best_fitness=jnp.where(occupied, best, state.best_fitness).astype(dtype),
      step=step,
      total_created=state.total_created + 2 * jnp.sum(split, dtype=jnp.int32),
      total_merges=state.total_merges + merges,
      emergence_events=state.emergence_events)


_cascade_step_jit = jax.jit(_cascade_step,
                            static_argnames=("evolve_fn", "measure_fn"))
