"""Similarity and distance between arrays and between parameter trees.

* :func:`cosine_similarity`: cosine along an axis, each norm padded by eps.
* :func:`weight_distance`: mean per-leaf distance (l2, l1, cosine) between two
  parameter trees, over the leaves they share.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

_METRICS = ("l2", "l1", "cosine")


def cosine_similarity(
    a: chex.Array,
    b: chex.Array,
    axis: int = -1,
    eps: chex.Numeric = 1e-8,
) -> jax.Array:
  r"""Cosine similarity along an axis.

  .. math::
    \cos(a, b) = \frac{\sum a b}{(\|a\| + \epsilon)(\|b\| + \epsilon)}

  ``eps`` is *added to each norm* (the reference's rule, not
  ``torch.nn.functional.cosine_similarity``'s clamp), so a zero vector gives
  0 and a large ``eps`` shrinks every value slightly.

  Args:
    a: first array.
    b: second array, broadcastable against ``a``.
    axis: the axis to reduce.
    eps: added to each norm.

  Returns:
    A float32 array: the broadcast shape with ``axis`` removed.

  Raises:
    ValueError: if the shapes do not broadcast.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.analysis import cosine_similarity
    >>> cosine_similarity(jnp.array([[1.0, 0.0], [0.0, 0.0]]),
    ...                   jnp.array([[1.0, 1.0], [1.0, 2.0]])).round(4)
    Array([0.7071, 0.    ], dtype=float32)

  References:
    The original SAL library, ``sal.utils.cosine_similarity``.
  """
  try:
    np.broadcast_shapes(jnp.shape(a), jnp.shape(b))
  except ValueError:
    raise ValueError(
        f"sal_jax: cosine_similarity got shapes {jnp.shape(a)} and "
        f"{jnp.shape(b)} that do not broadcast.") from None
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  norm_a = jnp.sqrt(jnp.sum(jnp.square(a), axis=axis))
  norm_b = jnp.sqrt(jnp.sum(jnp.square(b), axis=axis))
  return jnp.sum(a * b, axis=axis) / ((norm_a + eps) * (norm_b + eps))


def _named_leaves(tree) -> dict:
  """``{tree path: leaf}``; for a flat dict the path is ``"['name']"``."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def weight_distance(
    weights1: chex.ArrayTree,
    weights2: chex.ArrayTree,
    metric: str = "l2",
) -> jax.Array:
  r"""Mean per-leaf distance between two parameter trees.

  Over the leaves present in both trees (matched by name, or by tree path
  for nested trees) with the same shape, with :math:`d = w_1 - w_2`:

  .. math::
    \text{l2: } \|d\|_2, \qquad \text{l1: } \textstyle\sum |d|, \qquad
    \text{cosine: } 1 - \cos(w_1, w_2) \text{ (flattened)},

  averaged over those leaves; leaves in one tree only, or with different
  shapes, are skipped, and no common leaf gives 0.

  Args:
    weights1: first tree (e.g. a ``{name: array}`` dict).
    weights2: second tree.
    metric: ``"l2"``, ``"l1"`` or ``"cosine"``.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: for an unknown metric.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.analysis import weight_distance
    >>> w1 = {"a": jnp.array([3.0, 4.0]), "b": jnp.ones(2)}
    >>> w2 = {"a": jnp.zeros(2), "c": jnp.ones(2)}
    >>> weight_distance(w1, w2, "l2")
    Array(5., dtype=float32)

  References:
    The original SAL library, ``sal.utils.weight_distance``.
  """
  if metric not in _METRICS:
    raise ValueError(
        f"sal_jax: unknown metric {metric!r}; expected one of {_METRICS}.")
  leaves1 = _named_leaves(weights1)
  leaves2 = _named_leaves(weights2)
  distances = []
  for name, w1 in leaves1.items():
    if name not in leaves2 or jnp.shape(w1) != jnp.shape(leaves2[name]):
      continue
    w1 = jnp.asarray(w1, jnp.float32).ravel()
    w2 = jnp.asarray(leaves2[name], jnp.float32).ravel()
    if metric == "l2":
      distances.append(jnp.sqrt(jnp.sum(jnp.square(w1 - w2))))
    elif metric == "l1":
      distances.append(jnp.sum(jnp.abs(w1 - w2)))
    else:
      distances.append(1.0 - cosine_similarity(w1, w2))
  if not distances:
    return jnp.zeros((), jnp.float32)
  return jnp.mean(jnp.stack(distances))
