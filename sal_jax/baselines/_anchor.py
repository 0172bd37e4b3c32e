"""Shared pieces of the anchored-penalty baselines (EWC, SI, MAS, L2-init).

Every such baseline adds the gradient of a quadratic pull toward an anchor,

.. math::
  g \\leftarrow g + \\lambda \\, \\Omega \\odot (\\theta - \\bar\\theta),

to the incoming updates (the pull of ``sal_jax._common.anchored_pull``,
which protect's estimators use too); they differ only in how the importance
:math:`\\Omega` and the anchor :math:`\\bar\\theta` are obtained. This module
holds the penalty, the argument checks, the state dtype rule and the EMA
helpers, and the streaming "EMA importance" transformation that
:func:`~sal_jax.baselines.streaming_ewc` and
:func:`~sal_jax.baselines.streaming_mas` are built from.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax

from sal_jax._common import anchored_pull
from sal_jax._common import tree_utils as _tree_utils
from sal_jax._common import validation as _validation


def check_range(fn: str, name: str, value: Any, low: float,
                high: float = math.inf, low_open: bool = False,
                high_open: bool = False) -> None:
  """``validation.check_number`` for ``sal_jax.baselines.<fn>``.

  A wrong type raises ``TypeError``; a Python number outside the interval
  ``ValueError``; arrays (e.g. from ``optax.inject_hyperparams``) are not
  range-checked: they may be tracers whose value is unknown here.
  """
  _validation.check_number(f"sal_jax.baselines.{fn}", name, value, low, high,
                           low_open=low_open, high_open=high_open)


def find_state(opt_state: Any, state_type: type, where: str) -> Any:
  """The one ``state_type`` inside ``opt_state`` (chains, masks, ...).

  Raises:
    ValueError: naming ``where`` if there is none or more than one.
  """
  def is_state(x):
    return isinstance(x, state_type)

  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state)
           if is_state(x)]
  if len(found) != 1:
    raise ValueError(
        f"sal_jax.baselines.{where}: the optimizer state must hold exactly one "
        f"{state_type.__name__}, found {len(found)}.")
  return found[0]


def check_params(updates: chex.ArrayTree, params: Any) -> None:
  """The checks every baseline's ``update`` runs before anything else."""
  if params is None:
    raise ValueError(_tree_utils.MISSING_PARAMS_MESSAGE)
  _tree_utils.check_same_structure(updates, params)


def state_dtype(x: Any) -> jnp.dtype:
  """Dtype of the copies and averages of a parameter leaf: >= float32.

  bfloat16/float16 params get float32 state (an EMA in half precision
  underflows or stalls); float32, float64 and complex params keep their
  dtype. The same rule with x64 on or off.
  """
  return _tree_utils.state_dtype(x)


def importance_dtype(x: Any) -> jnp.dtype:
  """Dtype of a leaf's importance: the real counterpart of
  :func:`state_dtype` (importances are magnitudes, real for complex
  params)."""
  return _tree_utils.real_dtype(state_dtype(x))


def zeros_like_state(params: chex.ArrayTree) -> chex.ArrayTree:
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), state_dtype(p)),
                      params)


def zeros_like_importance(params: chex.ArrayTree) -> chex.ArrayTree:
  return jax.tree.map(
      lambda p: jnp.zeros(jnp.shape(p), importance_dtype(p)), params)


def copy_as_state(params: chex.ArrayTree) -> chex.ArrayTree:
  return jax.tree.map(lambda p: jnp.asarray(p, state_dtype(p)), params)


def ema(old: chex.ArrayTree, new: chex.ArrayTree, decay) -> chex.ArrayTree:
  """``decay * old + (1 - decay) * new``, in the dtype of ``old``.

  optax's first-moment update, cast back: a float32 average of bfloat16
  params stays float32.
  """
  return optax.tree_utils.tree_cast_like(
      optax.tree_utils.tree_update_moment(new, old, decay, 1), old)


def debias(tree: chex.ArrayTree, decay, count: jax.Array) -> chex.ArrayTree:
  """``tree / (1 - decay**count)`` (Adam's bias correction); 0 at count 0."""
  # The decay in float32 whatever x64 says, as protect's decay_power.
  corrected = optax.tree_utils.tree_bias_correction(
      tree, jnp.asarray(decay, jnp.float32), jnp.maximum(count, 1))
  return jax.tree.map(
      lambda x: jnp.where(count > 0, x, jnp.zeros_like(x)), corrected)


def apply_penalty(updates: chex.ArrayTree, params: chex.ArrayTree,
                  anchor: chex.ArrayTree, importance: chex.ArrayTree | None,
                  strength) -> chex.ArrayTree:
  """``g + strength * importance * (params - anchor)`` leafwise.

  ``importance=None`` means an importance of one everywhere (L2 pull). The
  result has the dtype of each update leaf.
  """
  force = anchored_pull.anchor_pull(params, anchor, importance)
  return jax.tree.map(lambda g, f: (g + strength * f).astype(g.dtype),
                      updates, force)


def streaming_importance(
    fn: str,
    state_cls: type,
    signal: Callable[[jax.Array], jax.Array],
    strength,
    importance_decay,
    anchor_decay,
) -> optax.GradientTransformationExtraArgs:
  """The task-free anchored penalty with an EMA importance (EWC/MAS forms).

  With :math:`\\rho` = ``importance_decay``, :math:`\\alpha` =
  ``anchor_decay``, :math:`s(g)` the per-element importance signal and
  :math:`t` the step (1-based):

  .. math::
    g_\\text{out} = g_t + \\lambda \\hat\\Omega_{t-1} \\odot
      (\\theta_t - \\bar\\theta_{t-1}),\\quad
    \\Omega_t = \\rho \\Omega_{t-1} + (1 - \\rho) s(g_t),\\quad
    \\hat\\Omega_t = \\Omega_t / (1 - \\rho^t),\\quad
    \\bar\\theta_t = \\alpha \\bar\\theta_{t-1} + (1 - \\alpha) \\theta_t,

  with :math:`\\Omega_0 = 0` (so :math:`\\hat\\Omega_0 = 0`) and
  :math:`\\bar\\theta_0 = \\theta_0` (the params given to ``init``, so the
  anchor needs no bias correction). The penalty uses the importance and
  anchor from before the current step: a gradient is not evidence of its own
  parameter's importance.

  Args:
    fn: public name, for error messages.
    state_cls: the NamedTuple with fields ``count``, ``importance``,
      ``anchor``.
    signal: elementwise importance signal of a gradient leaf, a function
      of its magnitude (complex gradients enter as ``|g|``).
    strength: :math:`\\lambda`.
    importance_decay: :math:`\\rho`.
    anchor_decay: :math:`\\alpha`.

  Returns:
    The transformation.
  """
  check_range(fn, "strength", strength, 0.0, float("inf"))
  check_range(fn, "importance_decay", importance_decay, 0.0, 1.0,
              high_open=True)
  check_range(fn, "anchor_decay", anchor_decay, 0.0, 1.0, high_open=True)

  def init_fn(params):
    return state_cls(count=jnp.zeros((), jnp.int32),
                     importance=zeros_like_importance(params),
                     anchor=copy_as_state(params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    check_params(updates, params)
    importance = debias(state.importance, importance_decay, state.count)
    out = apply_penalty(updates, params, state.anchor, importance, strength)
    # The signals are functions of |g|: a complex g enters as its modulus.
    signals = jax.tree.map(
        lambda g, o: signal(_tree_utils.to_real(g, o.dtype)), updates,
        state.importance)
    new_state = state_cls(
        count=state.count + 1,
        importance=ema(state.importance, signals, importance_decay),
        anchor=ema(state.anchor, params, anchor_decay),
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
