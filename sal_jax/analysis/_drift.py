"""Drift: how far parameters have moved from a reference point.

The original's rough, bounded measure of "semantic drift": the summed L2
distance of the shared leaves, scaled by the square root of their size.
"""

from __future__ import annotations

from collections.abc import Mapping
import math

import chex
import jax
import jax.numpy as jnp

from sal_jax._common import tree_utils as _tree_utils

_F32 = jnp.float32


def _shared_pairs(reference, current, path=""):
  """(reference leaf, current leaf) pairs of the names both trees hold."""
  if isinstance(reference, Mapping) and isinstance(current, Mapping):
    pairs = []
    for name, cur in current.items():  # the original iterates `current`
      if name in reference:
        pairs += _shared_pairs(reference[name], cur, f"{path}[{name!r}]")
    return pairs
  _tree_utils.check_same_structure(current, reference, f"current{path}",
                                   f"reference{path}")
  return list(zip(jax.tree.leaves(reference), jax.tree.leaves(current)))


def drift_estimator(reference: chex.ArrayTree, current: chex.ArrayTree,
                    normalize: bool = True) -> jax.Array:
  r"""Summed L2 distance from a reference, scaled and capped at 1.

  .. math::
    D = \sum_{\ell \in S} \|w_\ell - w^\text{ref}_\ell\|, \qquad
    \text{normalize: } \min\Big(D / \sqrt{\textstyle\sum_{\ell \in S}
    |w_\ell|},\ 1\Big)

  over the set :math:`S` of shared leaves (:math:`|w_\ell|` its entry
  count). With mappings, names present in only one of the two trees are
  skipped (recursively for nested mappings); other trees must match in
  structure. ``normalize=False`` returns the raw sum :math:`D`. No shared
  leaf gives 0.

  Args:
    reference: the reference parameters (e.g. the model before fine-tuning).
    current: the current parameters.
    normalize: scale by the square root of the shared entry count and cap
      at 1.

  Returns:
    A float32 scalar (jittable).

  Raises:
    ValueError: if a shared leaf differs in shape, non-mapping trees differ
      in structure, or ``normalize`` is not a bool.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.analysis import drift_estimator
    >>> ref = {"w": jnp.zeros(4), "only_ref": jnp.zeros(2)}
    >>> cur = {"w": jnp.full(4, 0.1), "only_cur": jnp.ones(3)}
    >>> round(float(drift_estimator(ref, cur)), 4)  # 0.2 / sqrt(4)
    0.1
    >>> round(float(drift_estimator(ref, cur, normalize=False)), 4)
    0.2

  References:
    The original SAL library, ``sal.stability.drift_estimator`` (whose
    argument order is ``(current, reference)``; the value is symmetric).
  """
  if not isinstance(normalize, bool):
    raise ValueError(f"sal_jax: normalize must be a bool, got {normalize!r}.")
  pairs = _shared_pairs(reference, current)
  if not pairs:
    return jnp.zeros((), _F32)
  total = sum(
      jnp.linalg.norm(jnp.ravel(c).astype(_F32) - jnp.ravel(r).astype(_F32))
      for r, c in pairs)
  if not normalize:
    return total
  count = sum(math.prod(jnp.shape(c)) for _, c in pairs)
  if count == 0:
    return total
  return jnp.minimum(total / math.sqrt(count), 1.0)
