r"""The anchored pull: the restoring force of protect and of the penalty baselines.

Both protect's pulling estimators and the anchored-penalty baselines (EWC,
SI, MAS, L2-init) add to the update the gradient of a weighted quadratic
pull toward an anchor :math:`\bar\theta`,

.. math::
  F(\theta) = w \odot s \, (\theta - \bar\theta),

and differ only in where the weights :math:`w`, the scale :math:`s` and the
anchor come from.
"""

from __future__ import annotations

import chex
import jax

from sal_jax._common import tree_utils as _tree_utils
from sal_jax._common import units as _units


def anchor_pull(
    params: chex.ArrayTree,
    anchor: chex.ArrayTree,
    weights: chex.ArrayTree | None = None,
    scale: chex.Numeric | None = None,
) -> chex.ArrayTree:
  r"""``w * s * (theta - anchor)`` per leaf: the force toward the anchor.

  .. math::
    F_\ell = w_\ell \, s \, (\theta_\ell - \bar\theta_\ell)

  The difference is taken in the params' and anchor's common dtype, at
  least float32. A weight may be a factored unit (see
  :mod:`sal_jax._common.units`), expanded inside the elementwise pull, or
  a Kronecker one, applied as :math:`L (\theta - \bar\theta)
  \operatorname{diag}(c) / \operatorname{tr} L`.

  Args:
    params: the current params.
    anchor: the anchor, a tree like ``params``.
    weights: per-leaf weights (arrays broadcastable to the leaf, e.g. an
      importance), or ``None`` for weight one everywhere (an L2 pull).
    scale: a scalar multiplying the weights, or ``None`` for one.

  Returns:
    A tree like ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> anchor_pull({"w": jnp.array([3.0])}, {"w": jnp.array([1.0])},
    ...             {"w": jnp.array([0.5])})
    {'w': Array([1.], dtype=float32)}
  """
  def leaf(p, a, w=None):
    difference = _tree_utils.difference(p, a)
    if w is None:
      return difference if scale is None else scale * difference
    if _units.is_kronecker_unit(w, p):
      pulled = _units.weigh(w, p, difference)
      return pulled if scale is None else scale * pulled
    w = _units.dense(w, p)
    weight = w if scale is None else w * scale
    return weight * difference

  if weights is None:
    return jax.tree.map(leaf, params, anchor)
  return jax.tree.map(leaf, params, anchor, weights)
