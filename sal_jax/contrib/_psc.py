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

This module steps a cascade; :mod:`sal_jax.contrib._psc_init` starts
one. The pulses' statuses, state and
rules are in :mod:`sal_jax.contrib._psc_pulses`, the split in
:mod:`sal_jax.contrib._psc_split`, the merge in
:mod:`sal_jax.contrib._psc_merge`, the emergent pulse in
:mod:`sal_jax.contrib._psc_emerge`, lineages and statistics in
:mod:`sal_jax.contrib._psc_lineage`.

References:
  The original SAL library, ``sal.psc.PulseCascade``.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from sal_jax._common import validation as _validation
from sal_jax.contrib._psc_merge import greedy_merge
from sal_jax.contrib._psc_pulses import CascadeState
from sal_jax.contrib._psc_pulses import PulseStatus
from sal_jax.contrib._psc_pulses import pulse_can_split
from sal_jax.contrib._psc_pulses import pulse_fitness
from sal_jax.contrib._psc_pulses import pulse_is_viable
from sal_jax.contrib._psc_pulses import viable_pulses
from sal_jax.contrib._psc_split import place_children
from sal_jax.contrib._psc_split import spawn_children

_WHERE = "sal_jax.contrib.cascade_step"


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
  _validation.check_number(_WHERE, "max_generations", max_generations, 0)
  _validation.check_number(_WHERE, "noise_scale", noise_scale, 0.0)
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
