r"""Importance units: per leaf, per element, or factored per matrix.

An importance (a running mean of squared gradients, a consolidated Fisher)
is kept per *unit* of a parameter leaf:

* ``"leaf"``: one float32 scalar per leaf;
* ``"element"``: a float32 array shaped like the leaf;
* ``"factored"``: for a leaf of two or more dimensions, the means over its
  last axis and over its second-to-last axis (as Adafactor keeps its
  second moment), :math:`O(m + n)` for an
  :math:`m \times n` matrix; per element for scalars and vectors. The
  element-wise importance it stands for is the rank-one reconstruction

  .. math::
    \hat v_{ij} = \frac{r_i \, c_j}{\operatorname{mean}_i(r_i)},
    \quad r_i = \operatorname{mean}_j v_{ij}, \;
    c_j = \operatorname{mean}_i v_{ij},

  exact when :math:`v` has rank one, and in general the same row and column
  sums as :math:`v`.

A factored unit is one float32 array per leaf, the row means followed by
the column means along its last axis (shape ``shape[:-2] + (m + n,)``), so
that every importance tree has one array per parameter leaf, as optimizer
states do (Flax NNX wraps each in a variable; checkpointers see arrays).
Linear updates (decays, sums) apply to it entry by entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sal_jax._common import tree_utils as _tree_utils

UNITS = ("leaf", "element", "factored")

_TINY = 1e-30


def is_factored(p: jax.Array, unit: str) -> bool:
  """Whether a leaf like ``p`` keeps a factored importance."""
  return unit == "factored" and jnp.ndim(p) >= 2


def is_factored_unit(u: jax.Array, p: jax.Array) -> bool:
  """Whether ``u`` is a factored unit of the leaf ``p`` (from the shapes)."""
  return jnp.ndim(p) >= 2 and jnp.ndim(u) == jnp.ndim(p) - 1


def _pack(row: jax.Array, col: jax.Array) -> jax.Array:
  return jnp.concatenate([row, col], axis=-1)


def split(u: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The row means and the column means of a factored unit of ``p``."""
  rows = jnp.shape(p)[-2]
  return u[..., :rows], u[..., rows:]


def zeros(p: jax.Array, unit: str) -> jax.Array:
  """A zero importance for the leaf ``p``, as ``unit`` keeps it."""
  if unit == "leaf":
    return jnp.zeros((), jnp.float32)
  if is_factored(p, unit):
    shape = jnp.shape(p)
    return jnp.zeros(shape[:-2] + (shape[-2] + shape[-1],), jnp.float32)
  return jnp.zeros_like(p, dtype=jnp.float32)  # keeps p's sharding


def energy(g: jax.Array, scale: jax.Array, unit: str) -> jax.Array:
  """``scale * g^2`` as ``unit`` keeps it (per entry, leaf mean, factors)."""
  g = _tree_utils.to_real(g)
  if unit == "leaf":
    return jnp.mean(jnp.square(g)) * scale
  if is_factored(g, unit):
    square = jnp.square(g)
    return _pack(jnp.mean(square, axis=-1) * scale,
                 jnp.mean(square, axis=-2) * scale)
  # g (g scale), not g^2 scale: an elementwise g^2 shared with the
  # squared-norm reductions would make XLA write it to a temporary.
  return g * (g * scale)


def factor(v: jax.Array, like: jax.Array) -> jax.Array:
  """An element-wise importance ``v`` in the unit of ``like`` (a unit of
  the same leaf)."""
  if is_factored_unit(like, v):
    return _pack(jnp.mean(v, axis=-1), jnp.mean(v, axis=-2))
  if jnp.ndim(like) == 0 and jnp.ndim(v) > 0:
    return jnp.mean(v)
  return v


def dense(u: jax.Array, p: jax.Array) -> jax.Array:
  """The importance a unit of ``p`` stands for, broadcastable to ``p``."""
  if is_factored_unit(u, p):
    row, col = split(u, p)
    norm = jnp.mean(row, axis=-1)[..., None, None]
    return row[..., :, None] * col[..., None, :] / jnp.maximum(norm, _TINY)
  return u


def total(u: jax.Array, p: jax.Array) -> jax.Array:
  """The sum of the importance a unit of ``p`` stands for over ``p``."""
  if is_factored_unit(u, p):
    # sum_ij r_i c_j / mean(r) = (rows) sum_j c_j, per leading index.
    return jnp.shape(p)[-2] * jnp.sum(split(u, p)[1])
  if jnp.ndim(u) == 0:
    return u * jnp.size(p)
  return jnp.sum(u)
