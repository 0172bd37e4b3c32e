"""L2 regularisation toward the initial parameters ("L2 Init")."""

from __future__ import annotations

from typing import NamedTuple

import chex
import optax

from sal_jax.baselines import _anchor


class L2InitState(NamedTuple):
  """State of :func:`l2_init`.

  Attributes:
    anchor: the params given to ``init`` (:math:`\\theta_0`), in their dtype
      promoted to at least float32.
  """
  anchor: chex.ArrayTree


def l2_init(strength: chex.Numeric) -> optax.GradientTransformationExtraArgs:
  r"""Pulls the parameters back toward their initial values.

  Adds the gradient of :math:`\frac{\lambda}{2}\lVert\theta -
  \theta_0\rVert^2`,

  .. math::
    g \leftarrow g + \lambda \, (\theta - \theta_0),

  with :math:`\theta_0` the params given to ``init``. Unlike weight decay
  (a pull toward zero) it keeps the scale of the initialisation, which helps
  keep plasticity over long streams. Put it first in a chain, before the
  optimizer.

  Args:
    strength: :math:`\lambda \ge 0`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params``; its state is an :class:`L2InitState`.

  Raises:
    TypeError: for a hyperparameter of the wrong type.
    ValueError: for a negative strength; at ``update`` time if ``params`` is
      missing or its tree differs from the updates.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import baselines
    >>> tx = baselines.l2_init(0.5)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> out, _ = tx.update({"w": jnp.ones(2)}, state, {"w": jnp.full(2, 2.)})
    >>> out["w"]  # 1 + 0.5 * (2 - 0)
    Array([2., 2.], dtype=float32)

  References:
    Kumar, Marklund and Van Roy, "Maintaining Plasticity in Continual
    Learning via Regenerative Regularization", arXiv:2308.11958, 2023.
  """
  _anchor.check_range("l2_init", "strength", strength, 0.0, float("inf"))

  def init_fn(params):
    return L2InitState(anchor=_anchor.copy_as_state(params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _anchor.check_params(updates, params)
    return _anchor.apply_penalty(updates, params, state.anchor, None,
                                 strength), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
