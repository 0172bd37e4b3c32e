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

References:
  The original SAL library, ``sal.psc.PulseCascade``.
"""

from __future__ import annotations

import enum
import functools
import numbers
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sal_jax import _tree_utils

# Viability: c > 0.3 and r > 0.2; splitting also needs n > 0.3.
_VIABLE_COHERENCE = 0.3
_VIABLE_RESONANCE = 0.2
_SPLIT_NOVELTY = 0.3
# Children: c * 0.9, min(n + 0.1, 1).
_CHILD_COHERENCE_DECAY = 0.9
_CHILD_NOVELTY_GAIN = 0.1
# A lineage with no active member reports 0.8 x its best fitness.
_INACTIVE_LINEAGE_DECAY = 0.8
_COS_EPS = 1e-8


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


def _compiled(fn):
  """Runs ``fn`` as one compiled call (a single dispatch when eager)."""
  jitted = jax.jit(fn)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    return jitted(*args, **kwargs)

  return wrapper


def _is_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_number(name: str, value: Any, low: float) -> None:
  if _is_number(value) and not value >= low:
    raise ValueError(f"sal_jax: {name} must be >= {low}, got {value!r}.")


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
  if not isinstance(embeddings, jax.core.Tracer) and not np.all(
      np.isfinite(np.asarray(embeddings))):
    raise ValueError("sal_jax: the prompt embeddings contain NaN or Inf.")
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
  if not isinstance(embedding, jax.core.Tracer) and not np.all(
      np.isfinite(np.asarray(embedding))):
    raise ValueError("sal_jax: the prompt embedding contains NaN or Inf.")
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


@_compiled
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


def _cos_rows(v: jax.Array, m: jax.Array) -> jax.Array:
  """Cosine of ``v`` (D,) with every row of ``m`` (P, D)."""
  nv = jnp.maximum(jnp.linalg.norm(v), _COS_EPS)
  nm = jnp.maximum(jnp.linalg.norm(m, axis=-1), _COS_EPS)
  return (m @ v) / (nm * nv)


def _greedy_merge(emb, c, n, r, active, merge_threshold):
  """The original's greedy pairwise merge, as one ``lax.while_loop``.

  For ``i`` in slot order (skipping merged ones), ``j > i`` in slot order:
  if ``cos(e_i, e_j) > threshold`` then ``j`` merges into ``i`` and ``e_i``
  changes, so later ``j`` are compared with the updated ``e_i``. Each
  iteration computes the cosine of the current ``e_i`` with all rows and
  takes the first eligible ``j`` past the last merge (the ``j`` the
  sequential scan would merge next), or moves on to row ``i + 1``: at most
  ``P + merges`` iterations.
  """
  p = emb.shape[0]
  idx = jnp.arange(p)
  threshold = jnp.asarray(merge_threshold, emb.dtype)

  def cond(s):
    return s[0] < p

  def body(s):
    i, start, emb, c, n, r, merged, merged_into, count = s
    sims = _cos_rows(emb[i], emb)
    cand = (active[i] & ~merged[i] & active & ~merged & (idx >= start)
            & (sims > threshold))
    found = jnp.any(cand)
    j = jnp.argmax(cand)
    merged_s = (i, j + 1,
                emb.at[i].set((emb[i] + emb[j]) / 2),
                c.at[i].set(jnp.maximum(c[i], c[j])),
                n.at[i].set((n[i] + n[j]) / 2),
                r.at[i].set(jnp.maximum(r[i], r[j])),
                merged.at[j].set(True),
                merged_into.at[j].set(i),
                count + 1)
    next_row = (i + 1, i + 2, emb, c, n, r, merged, merged_into, count)
    return _tree_utils.tree_select(found, merged_s, next_row)

  init = (jnp.zeros((), jnp.int32), jnp.ones((), jnp.int32), emb, c, n, r,
          jnp.zeros((p,), bool), jnp.full((p,), -1, jnp.int32),
          jnp.zeros((), jnp.int32))
  return jax.lax.while_loop(cond, body, init)[2:]


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
  idx = jnp.arange(p, dtype=jnp.int32)
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
  room = jnp.sum(free) // 2
  split = candidates & (jnp.cumsum(candidates) <= room)
  status = jnp.where(split, PulseStatus.SPLIT, status)
  expired = (moved & (c < jnp.asarray(expire_threshold, dtype))) | (
      viable0 & ~finite)
  status = jnp.where(expired, PulseStatus.EXPIRED, status)

  free_slots = jnp.nonzero(free, size=p, fill_value=p)[0]
  rank = jnp.cumsum(split) - 1
  first = 2 * rank
  slot_a = jnp.where(split, free_slots[jnp.clip(first, 0, p - 1)], p)
  slot_b = jnp.where(split, free_slots[jnp.clip(first + 1, 0, p - 1)], p)
  child_parent = (jnp.full((p,), -1, jnp.int32)
                  .at[slot_a].set(idx, mode="drop")
                  .at[slot_b].set(idx, mode="drop"))
  child = child_parent >= 0
  par = jnp.maximum(child_parent, 0)
  noise = jax.random.normal(key, (p, dims), dtype)
  emb = jnp.where(child[:, None], emb[par] + noise_scale * noise, emb)
  c = jnp.where(child, c[par] * _CHILD_COHERENCE_DECAY, c)
  n = jnp.where(child, jnp.minimum(n[par] + _CHILD_NOVELTY_GAIN, 1.0), n)
  r = jnp.where(child, r[par], r)
  status = jnp.where(child, PulseStatus.ACTIVE, status).astype(jnp.int32)

  # Merges among the viable pulses, children included.
  active = pulse_is_viable(status, c, r)
  emb, c, n, r, merged, merged_into, merges = _greedy_merge(
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


@_compiled
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


@_compiled
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


@_compiled
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


@_compiled
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
