r"""Importance units: per leaf, per element, or factored per matrix.

An importance (a running mean of squared gradients, a consolidated Fisher)
is kept per *unit* of a parameter leaf:

* ``"leaf"``: one float32 scalar per leaf;
* ``"element"``: a float32 array shaped like the leaf;
* ``"factored"``: for a leaf of two or more dimensions, the means over its
  last axis and over its second-to-last axis (a :class:`Factored` pair, as
  Adafactor keeps its second moment), :math:`O(m + n)` for an
  :math:`m \times n` matrix; per element for scalars and vectors. The
  element-wise importance it stands for is the rank-one reconstruction

  .. math::
    \hat v_{ij} = \frac{r_i \, c_j}{\operatorname{mean}_i(r_i)},
    \quad r_i = \operatorname{mean}_j v_{ij}, \;
    c_j = \operatorname{mean}_i v_{ij},

  exact when :math:`v` has rank one, and in general the same row and column
  sums as :math:`v`.

Linear updates (decays, sums) apply to a unit with ``jax.tree.map``: a
:class:`Factored` is a pytree of its two arrays, so a running average of
factored units is the running average of their factors.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sal_jax._common import tree_utils as _tree_utils

UNITS = ("leaf", "element", "factored")

_TINY = 1e-30


class Factored(NamedTuple):
  """A factored importance of one leaf of two or more dimensions.

  Attributes:
    row: the mean over the last axis, shape ``shape[:-1]``, float32.
    col: the mean over the second-to-last axis, shape
      ``shape[:-2] + shape[-1:]``, float32.
  """
  row: jax.Array
  col: jax.Array


def is_factored(p: jax.Array, unit: str) -> bool:
  """Whether a leaf like ``p`` keeps a :class:`Factored` importance."""
  return unit == "factored" and jnp.ndim(p) >= 2


def zeros(p: jax.Array, unit: str):
  """A zero importance for the leaf ``p``, as ``unit`` keeps it."""
  if unit == "leaf":
    return jnp.zeros((), jnp.float32)
  if is_factored(p, unit):
    shape = jnp.shape(p)
    return Factored(jnp.zeros(shape[:-1], jnp.float32),
                    jnp.zeros(shape[:-2] + shape[-1:], jnp.float32))
  return jnp.zeros_like(p, dtype=jnp.float32)  # keeps p's sharding


def energy(g: jax.Array, scale: jax.Array, unit: str):
  """``scale * g^2`` as ``unit`` keeps it (per entry, leaf mean, factors)."""
  g = _tree_utils.to_real(g)
  if unit == "leaf":
    return jnp.mean(jnp.square(g)) * scale
  if is_factored(g, unit):
    square = jnp.square(g)
    return Factored(jnp.mean(square, axis=-1) * scale,
                    jnp.mean(square, axis=-2) * scale)
  # g (g scale), not g^2 scale: an elementwise g^2 shared with the
  # squared-norm reductions would make XLA write it to a temporary.
  return g * (g * scale)


def factor(v: jax.Array, like):
  """An element-wise importance ``v`` in the unit of ``like`` (a zero unit)."""
  if isinstance(like, Factored):
    return Factored(jnp.mean(v, axis=-1), jnp.mean(v, axis=-2))
  if jnp.ndim(like) == 0 and jnp.ndim(v) > 0:
    return jnp.mean(v)
  return v


def dense(unit) -> jax.Array:
  """The importance a unit stands for, broadcastable to its leaf."""
  if isinstance(unit, Factored):
    norm = jnp.mean(unit.row, axis=-1)[..., None, None]
    return (unit.row[..., :, None] * unit.col[..., None, :]
            / jnp.maximum(norm, _TINY))
  return unit


def total(unit, p: jax.Array) -> jax.Array:
  """The sum of the importance a unit stands for over the leaf ``p``."""
  if isinstance(unit, Factored):
    # sum_ij r_i c_j / mean(r) = (rows) sum_j c_j, per leading index.
    return jnp.shape(p)[-2] * jnp.sum(unit.col)
  if jnp.ndim(unit) == 0:
    return unit * jnp.size(p)
  return jnp.sum(unit)
