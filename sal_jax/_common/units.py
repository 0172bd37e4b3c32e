r"""Importance units: per leaf, per element, or factored per matrix.

An importance (a running mean of squared gradients, a consolidated Fisher)
is kept per *unit* of a parameter leaf:

* ``"leaf"``: one float32 scalar per leaf;
* ``"element"``: a float32 array shaped like the leaf;
* ``"factored"``: for a leaf of two or more dimensions, its means over
  each of its two largest axes (as Adafactor keeps its second moment):
  :math:`O(m + n)` for an :math:`m \times n` matrix, and an attention
  kernel ``(d, heads, head_dim)`` keeps ``heads * (d + head_dim)``; per
  element for scalars and vectors. With :math:`a` the largest axis and
  :math:`b` the second largest, the element-wise importance it stands for
  is the rank-one reconstruction (per index of the other axes)

  .. math::
    \hat v = \frac{r \, c}{\operatorname{mean}_b(r)},
    \quad r = \operatorname{mean}_a v, \; c = \operatorname{mean}_b v,

  exact when :math:`v` has rank one over :math:`(a, b)`, and in general
  with the same sums over :math:`a` and over :math:`b` as :math:`v`;
* ``"kronecker"``: for a kernel :math:`W` of ``n_in`` inputs (all axes but
  the last) and ``n_out`` outputs (the last axis), seen as an
  :math:`a \times b` matrix :math:`G` with :math:`a` the smaller side
  (the inputs where ``n_in <= n_out``, else the outputs; :math:`a \ge 2`),
  a Kronecker-factored importance :math:`L \otimes \operatorname{diag}(c)`:
  :math:`L` (``a x a``) the second moment of the gradient over that side,
  :math:`G G^\top`, and :math:`c` its energy along the other,
  :math:`\sum_i G_{ij}^2`. Applied to a displacement :math:`D` (as
  :math:`G`) it weighs

  .. math::
    D \mapsto L D \operatorname{diag}(c) / \operatorname{tr} L,

  so it protects *directions* a task used, not only entries; its diagonal
  is the factored reconstruction :math:`L_{ii} c_j / \operatorname{tr} L`
  and its sum :math:`\operatorname{tr} L = \sum_j c_j` that of the
  per-element importance. Vectors keep it per element. A unit has
  :math:`a^2 + b` entries (about the kernel's size where it is square,
  fewer the more oblong it is). A *low-rank* one keeps :math:`L` as its top :math:`r`
  eigendirections and the mean of the others, :math:`\hat L = B B^\top +
  \rho I` with :math:`B` (``a x r``) and :math:`\rho = (\sum_j c_j -
  \lVert B \rVert_F^2) / a`, the same trace: :math:`a r + b` entries, and
  applying it costs :math:`O(r a b)` instead of :math:`O(a^2 b)`.

A factored unit is one flat float32 array per leaf, :math:`r` then
:math:`c` (a Kronecker one: :math:`L` flattened, then :math:`c`; a
low-rank one: :math:`B` flattened, then :math:`c`), so that
every importance tree has one array per parameter leaf, as optimizer
states do (Flax NNX wraps each in a variable; checkpointers see arrays).
Linear updates (decays, sums) apply to it entry by entry, except to a
low-rank one (:func:`accumulate` truncates the sum).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sal_jax._common import tree_utils as _tree_utils

UNITS = ("leaf", "element", "factored", "kronecker")

_TINY = 1e-30


def is_factored(p: jax.Array, unit: str) -> bool:
  """Whether a leaf like ``p`` keeps a factored importance."""
  return unit == "factored" and jnp.ndim(p) >= 2


def _axes(shape: tuple[int, ...]) -> tuple[int, int]:
  """(largest axis a, second largest axis b) of a shape, as Adafactor."""
  order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
  return order[-1], order[-2]


def _sizes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  a, b = _axes(shape)
  return (tuple(n for i, n in enumerate(shape) if i != a),
          tuple(n for i, n in enumerate(shape) if i != b))


def _factored_size(shape: tuple[int, ...]) -> int:
  row_shape, col_shape = _sizes(shape)
  return math.prod(row_shape) + math.prod(col_shape)


def _kronecker_dims(shape: tuple[int, ...]) -> tuple[int, int]:
  """(a, b) of a kernel: the side whose second moment a Kronecker unit
  keeps (the smaller of its inputs, all axes but the last, and its
  outputs, the last axis) and the other."""
  n_in, n_out = math.prod(shape[:-1]), shape[-1]
  return (n_in, n_out) if n_in <= n_out else (n_out, n_in)


def _oriented(x: jax.Array, shape: tuple[int, ...]):
  """``x`` (shaped like the kernel) as an ``n_in x n_out`` matrix, and
  whether the kept side ``a`` is its second axis (the outputs). The
  functions below work on it in place rather than on its transpose: XLA
  CPU would copy a large transpose, at the cost of several matmuls."""
  m = x.reshape(-1, shape[-1])
  return m, m.shape[0] > m.shape[1]


def _kronecker_size(shape: tuple[int, ...]) -> int | None:
  """The size of a Kronecker unit of a leaf of ``shape``, or ``None`` where
  the leaf keeps its importance per element."""
  if len(shape) < 2:
    return None
  a, b = _kronecker_dims(shape)
  size = a * a + b
  # The size tells the flat units apart: where it would equal a factored
  # unit's (never for a matrix of two or more rows and columns), stay per
  # element.
  if a < 2 or size == _factored_size(shape):
    return None
  return size


def is_factored_unit(u: jax.Array, p: jax.Array) -> bool:
  """Whether ``u`` is a factored unit of the leaf ``p`` (from the shapes:
  a factored unit is flat, of the size of the leaf's two means; an element
  one is shaped like ``p``)."""
  return (jnp.ndim(p) >= 2 and jnp.ndim(u) == 1
          and jnp.size(u) == _factored_size(jnp.shape(p)))


def _pack(head: jax.Array, col: jax.Array) -> jax.Array:
  """A Kronecker unit: ``head`` flattened, then ``col``. (A pad and an
  update-slice: XLA CPU's concatenate of a large array is ~10x slower.)"""
  flat = jnp.ravel(head)
  return jax.lax.dynamic_update_slice(
      jnp.pad(flat, (0, jnp.size(col))), col.astype(flat.dtype),
      (jnp.size(flat),))


def _kronecker_rank(u: jax.Array, p: jax.Array) -> int | None:
  """The rank a Kronecker unit ``u`` of the leaf ``p`` keeps (``a`` for
  a full one, whose head is :math:`L`; fewer for a low-rank one, whose head
  is :math:`B`), or ``None`` if ``u`` is not a Kronecker unit of ``p``."""
  shape = jnp.shape(p)
  if _kronecker_size(shape) is None or jnp.ndim(u) != 1:
    return None
  a, b = _kronecker_dims(shape)
  rank, rest = divmod(jnp.size(u) - b, a)
  if rest or not 2 <= rank <= a or jnp.size(u) == _factored_size(shape):
    return None
  return rank


def is_kronecker_unit(u: jax.Array, p: jax.Array) -> bool:
  """Whether ``u`` is a Kronecker unit of the leaf ``p``, full (flat, of
  size ``a ** 2 + b``) or low-rank (``a * r + b``)."""
  return _kronecker_rank(u, p) is not None


def is_low_rank_unit(u: jax.Array, p: jax.Array) -> bool:
  """Whether ``u`` is a low-rank Kronecker unit of the leaf ``p``."""
  rank = _kronecker_rank(u, p)
  return rank is not None and rank < _kronecker_dims(jnp.shape(p))[0]


def _kronecker_split(u: jax.Array, p: jax.Array):
  """The head (:math:`L`, ``a x a``, or :math:`B`, ``a x r``) and
  :math:`c` (``b``) of a Kronecker unit of ``p``, in float32."""
  a, _ = _kronecker_dims(jnp.shape(p))
  rank = _kronecker_rank(u, p)
  u = u.astype(jnp.float32)
  return u[:a * rank].reshape(a, rank), u[a * rank:]


def _kronecker_operator(u: jax.Array, p: jax.Array):
  """(:math:`X \\mapsto L X` or, with ``right=True``, :math:`X L`; the
  diagonal of :math:`L`; :math:`c`) of a Kronecker unit of ``p``."""
  head, col = _kronecker_split(u, p)
  a = head.shape[0]
  if head.shape[1] == a:  # L is symmetric
    return (lambda x, right=False: x @ head if right else head @ x,
            jnp.diagonal(head), col)
  kept = jnp.sum(jnp.square(head), axis=1)
  rho = jnp.maximum(jnp.sum(col) - jnp.sum(kept), 0.0) / a

  def apply(x, right=False):
    if right:
      return (x @ head) @ head.T + rho * x
    return head @ (head.T @ x) + rho * x
  return apply, kept + rho, col


@jax.custom_batching.custom_vmap
def _eigh(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return tuple(jnp.linalg.eigh(x))


@_eigh.def_vmap
def _eigh_one_at_a_time(axis_size, in_batched, x):
  # jaxlib's CPU eigh spreads a batch over the intra-op thread pool and
  # can stall there when vmapped twice inside a loop (seeds x configs of
  # a scanned training run); consolidations are rare, so one matrix at a
  # time costs little.
  del axis_size, in_batched
  return jax.lax.map(_eigh, x), (True, True)


def low_rank(cov: jax.Array, col: jax.Array, rank: int) -> jax.Array:
  """The low-rank Kronecker unit of rank ``rank`` of :math:`L` = ``cov``
  and :math:`c` = ``col``: the top ``rank`` eigenpairs of :math:`L` (its
  trace set to :math:`\\sum c`), the other eigenvalues replaced by their
  mean :math:`\\rho`, :math:`B = V \\sqrt{\\lambda - \\rho}`."""
  a = cov.shape[0]
  total_energy = jnp.sum(col)
  trace = jnp.trace(cov)
  cov = cov * jnp.where(trace > _TINY, total_energy / jnp.where(
      trace > _TINY, trace, 1.0), 0.0)
  values, vectors = _eigh((cov + cov.T) / 2)
  top, vectors = values[a - rank:], vectors[:, a - rank:]
  rho = jnp.maximum(total_energy - jnp.sum(top), 0.0) / (a - rank)
  head = vectors * jnp.sqrt(jnp.maximum(top - rho, 0.0))
  return _pack(head, col)


def _full(u: jax.Array, p: jax.Array) -> jax.Array:
  """A Kronecker unit of ``p`` as a full one (:math:`\\hat L` dense)."""
  if not is_low_rank_unit(u, p):
    return u.astype(jnp.float32)
  apply, _, col = _kronecker_operator(u, p)
  a, _ = _kronecker_dims(jnp.shape(p))
  return _pack(apply(jnp.eye(a)), col)


def accumulate(u: jax.Array, increment: jax.Array, decay: jax.Array,
               p: jax.Array) -> jax.Array:
  """``decay * u + increment`` in the unit of ``u``, in float32
  (``increment`` in that unit, or a full Kronecker unit where ``u`` is a
  low-rank one: the sum is truncated to the rank again)."""
  if not is_low_rank_unit(u, p):
    return decay * u.astype(jnp.float32) + increment
  total_unit = decay * _full(u, p) + _full(increment, p)
  a, _ = _kronecker_dims(jnp.shape(p))
  return low_rank(total_unit[:a * a].reshape(a, a),
                  total_unit[a * a:], _kronecker_rank(u, p))


def _factors(v: jax.Array) -> jax.Array:
  a, b = _axes(jnp.shape(v))
  return jnp.concatenate([jnp.ravel(jnp.mean(v, axis=a)),
                          jnp.ravel(jnp.mean(v, axis=b))])


def split(u: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """:math:`r` (the mean over ``p``'s largest axis) and :math:`c` (over its
  second largest) of a factored unit of ``p``, each shaped like ``p``
  without that axis."""
  row_shape, col_shape = _sizes(jnp.shape(p))
  n = math.prod(row_shape)
  return u[:n].reshape(row_shape), u[n:].reshape(col_shape)


def zeros(p: jax.Array, unit: str, rank: int | None = None) -> jax.Array:
  """A zero importance for the leaf ``p``, as ``unit`` keeps it (a
  Kronecker unit whose kept side exceeds ``rank``: low-rank)."""
  if unit == "leaf":
    return jnp.zeros((), jnp.float32)
  size = _kronecker_size(jnp.shape(p)) if unit == "kronecker" else None
  if size is not None:
    a, b = _kronecker_dims(jnp.shape(p))
    if rank is not None and rank < a:
      size = a * rank + b
    return jnp.zeros((size,), jnp.float32)
  if is_factored(p, unit):
    row_shape, col_shape = _sizes(jnp.shape(p))
    return jnp.zeros((math.prod(row_shape) + math.prod(col_shape),),
                     jnp.float32)
  return jnp.zeros_like(p, dtype=jnp.float32)  # keeps p's sharding


def energy(g: jax.Array, scale: jax.Array, unit: str,
           sketch: tuple[jax.Array, int] | None = None) -> jax.Array:
  """``scale * g^2`` as ``unit`` keeps it (per entry, leaf mean, factors).

  With ``sketch = (key, k)``, a kernel whose kept side has more than
  ``k`` rows gets an
  unbiased estimate of :math:`G G^\\top` from ``k`` of its columns drawn
  (from ``key``, with replacement) with probabilities :math:`p_j \\propto
  c_j`, their energies: :math:`\\sum_{s} g_{j_s} g_{j_s}^\\top / (k
  p_{j_s})` (length-squared sampling), :math:`O(k \\, a^2)` instead
  of :math:`O(a^2 b)`.

  References:
    Drineas, Kannan & Mahoney, "Fast Monte Carlo algorithms for matrices
    I: approximating matrix multiplication", SIAM J. Comput. 2006.
  """
  g = _tree_utils.to_real(g)
  if unit == "leaf":
    return jnp.mean(jnp.square(g)) * scale
  if unit == "kronecker" and _kronecker_size(jnp.shape(g)) is not None:
    a, b = _kronecker_dims(jnp.shape(g))
    m, flip = _oriented(g, jnp.shape(g))
    # With flip, the kept side is m's columns: L = m^T m, c per row. |m|^2
    # spelled apart from the leaf's sum of squares (as for "factored"):
    # shared, XLA CPU writes the square to a full-size temporary.
    col = jnp.sum(jnp.abs(m) * jnp.abs(m), axis=1 if flip else 0)
    if sketch is not None and sketch[1] < a:
      key, k = sketch
      cumulative = jnp.cumsum(col)
      picks = jnp.searchsorted(
          cumulative, jax.random.uniform(key, (k,)) * cumulative[-1])
      picks = jnp.minimum(picks, b - 1)
      # A zero column is never drawn (unless every column is zero).
      weights = jax.lax.rsqrt(k * jnp.maximum(col[picks], _TINY)) * jnp.sqrt(
          cumulative[-1])
      y = m[picks, :].T if flip else m[:, picks]
      cov = (y * weights * scale) @ (y * weights).T
    else:
      cov = (m.T * scale) @ m if flip else (m * scale) @ m.T
    return _pack(cov, col * scale)
  if is_factored(g, unit):
    # g^2 spelled apart from the energy sums' square (and the scale in one
    # reduction only): XLA CPU writes a square or a broadcast that several
    # reductions share to a full-size temporary; apart, each computes
    # inline (checked on the compiled step's memory analysis).
    a, b = _axes(jnp.shape(g))
    return jnp.concatenate([
        jnp.ravel(jnp.mean(jnp.abs(g) * jnp.abs(g), axis=a) * scale),
        jnp.ravel(jnp.mean(g * (g * scale), axis=b))])
  # g (g scale), not g^2 scale: an elementwise g^2 shared with the
  # squared-norm reductions would make XLA write it to a temporary.
  return g * (g * scale)


def factor(v: jax.Array, like: jax.Array) -> jax.Array:
  """An element-wise importance ``v`` in the unit of ``like`` (a unit of
  the same leaf)."""
  if is_factored_unit(like, v):
    return _factors(v)
  if is_kronecker_unit(like, v):
    # L = diag of the row sums: the diagonal it stands for is the rank-one
    # (factored) reconstruction of v, with v's sums. A full unit: for a
    # low-rank `like`, `accumulate` truncates the sum it enters.
    m, flip = _oriented(v, jnp.shape(v))
    kept, other = (0, 1) if flip else (1, 0)
    return _pack(jnp.diag(jnp.sum(m, axis=kept)), jnp.sum(m, axis=other))
  if jnp.ndim(like) == 0 and jnp.ndim(v) > 0:
    return jnp.mean(v)
  return v


def dense(u: jax.Array, p: jax.Array) -> jax.Array:
  """The importance a unit of ``p`` stands for, broadcastable to ``p`` (of
  a Kronecker unit: its diagonal)."""
  if is_kronecker_unit(u, p):
    _, diagonal, col = _kronecker_operator(u, p)
    col = col / jnp.maximum(jnp.sum(col), _TINY)
    _, flip = _oriented(p, jnp.shape(p))
    w = col[:, None] * diagonal if flip else diagonal[:, None] * col
    return w.reshape(jnp.shape(p))
  if is_factored_unit(u, p):
    a, b = _axes(jnp.shape(p))
    # In float32 whatever the stored dtype: the product is the weight.
    row, col = split(u.astype(jnp.float32), p)
    row, col = jnp.expand_dims(row, a), jnp.expand_dims(col, b)
    norm = jnp.mean(row, axis=b, keepdims=True)
    return row * col / jnp.maximum(norm, _TINY)
  return u


def weigh(u: jax.Array, p: jax.Array, d: jax.Array) -> jax.Array:
  """The importance a unit of ``p`` stands for, applied to ``d`` (shaped
  like ``p``): ``w * d`` entry by entry, ``L D diag(c) / tr L`` for a
  Kronecker unit."""
  if is_kronecker_unit(u, p):
    apply, _, col = _kronecker_operator(u, p)
    col = col / jnp.maximum(jnp.sum(col), _TINY)
    m, flip = _oriented(d, jnp.shape(p))
    pulled = apply(m, right=True) * col[:, None] if flip else apply(m) * col
    return pulled.reshape(jnp.shape(d))
  return dense(u, p) * d


def total(u: jax.Array, p: jax.Array) -> jax.Array:
  """The sum of the importance a unit of ``p`` stands for over ``p``."""
  u = u.astype(jnp.float32)
  if is_kronecker_unit(u, p):
    return jnp.sum(_kronecker_split(u, p)[1])
  if is_factored_unit(u, p):
    # sum_ab r c / mean_b(r) = (size of b) sum c, per other index.
    return jnp.shape(p)[_axes(jnp.shape(p))[1]] * jnp.sum(split(u, p)[1])
  if jnp.ndim(u) == 0:
    return u * jnp.size(p)
  return jnp.sum(u)
