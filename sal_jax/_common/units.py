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
  with the same sums over :math:`a` and over :math:`b` as :math:`v`.

A factored unit is one flat float32 array per leaf, :math:`r` then
:math:`c`, so that every importance tree has one array per parameter leaf,
as optimizer states do (Flax NNX wraps each in a variable; checkpointers
see arrays). Linear updates (decays, sums) apply to it entry by entry.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sal_jax._common import tree_utils as _tree_utils

UNITS = ("leaf", "element", "factored")

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


def is_factored_unit(u: jax.Array, p: jax.Array) -> bool:
  """Whether ``u`` is a factored unit of the leaf ``p`` (from the shapes:
  a factored unit is flat, an element one shaped like ``p``)."""
  return jnp.ndim(p) >= 2 and jnp.ndim(u) == 1


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


def zeros(p: jax.Array, unit: str) -> jax.Array:
  """A zero importance for the leaf ``p``, as ``unit`` keeps it."""
  if unit == "leaf":
    return jnp.zeros((), jnp.float32)
  if is_factored(p, unit):
    row_shape, col_shape = _sizes(jnp.shape(p))
    return jnp.zeros((math.prod(row_shape) + math.prod(col_shape),),
                     jnp.float32)
  return jnp.zeros_like(p, dtype=jnp.float32)  # keeps p's sharding


def energy(g: jax.Array, scale: jax.Array, unit: str) -> jax.Array:
  """``scale * g^2`` as ``unit`` keeps it (per entry, leaf mean, factors)."""
  g = _tree_utils.to_real(g)
  if unit == "leaf":
    return jnp.mean(jnp.square(g)) * scale
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
  if jnp.ndim(like) == 0 and jnp.ndim(v) > 0:
    return jnp.mean(v)
  return v


def dense(u: jax.Array, p: jax.Array) -> jax.Array:
  """The importance a unit of ``p`` stands for, broadcastable to ``p``."""
  if is_factored_unit(u, p):
    a, b = _axes(jnp.shape(p))
    # In float32 whatever the stored dtype: the product is the weight.
    row, col = split(u.astype(jnp.float32), p)
    row, col = jnp.expand_dims(row, a), jnp.expand_dims(col, b)
    norm = jnp.mean(row, axis=b, keepdims=True)
    return row * col / jnp.maximum(norm, _TINY)
  return u


def total(u: jax.Array, p: jax.Array) -> jax.Array:
  """The sum of the importance a unit of ``p`` stands for over ``p``."""
  u = u.astype(jnp.float32)
  if is_factored_unit(u, p):
    # sum_ab r c / mean_b(r) = (size of b) sum c, per other index.
    return jnp.shape(p)[_axes(jnp.shape(p))[1]] * jnp.sum(split(u, p)[1])
  if jnp.ndim(u) == 0:
    return u * jnp.size(p)
  return jnp.sum(u)
