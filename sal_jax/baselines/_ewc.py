"""Elastic weight consolidation: classic/online (task boundaries) and streaming.

:func:`ewc` keeps an anchor and a Fisher importance that change only at
explicit task boundaries (:func:`ewc_consolidate`, fed by
:func:`empirical_fisher`); :func:`streaming_ewc` needs no boundaries.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sal_jax._common import nnx_interop as _nnx_interop
from sal_jax._common import tree_utils as _tree_utils
from sal_jax._common import validation as _validation
from sal_jax.baselines import _anchor


class EwcState(NamedTuple):
  """State of :func:`ewc`.

  Leaves shaped like the params have the params' dtype promoted to at least
  float32 (see ``_anchor.state_dtype``), with x64 on or off; the importance
  has its real counterpart (float32 for complex64 params).

  Attributes:
    importance: the consolidated importance :math:`\\Omega` (Fisher
      diagonal), like the params; zeros until the first consolidation.
    anchor: the anchor :math:`\\theta^*`, like the params; the params given to
      ``init`` until the first consolidation.
    consolidations: number of consolidations so far, int32.
  """
  importance: chex.ArrayTree
  anchor: chex.ArrayTree
  consolidations: jax.Array


class StreamingEwcState(NamedTuple):
  """State of :func:`streaming_ewc`.

  Dtypes as in :class:`EwcState`.

  Attributes:
    count: number of steps taken, int32.
    importance: the (uncorrected) EMA of ``|g|**2``, like the params.
    anchor: the slow EMA of the params, like the params.
  """
  count: jax.Array
  importance: chex.ArrayTree
  anchor: chex.ArrayTree


def ewc(strength: chex.Numeric) -> optax.GradientTransformationExtraArgs:
  r"""Elastic weight consolidation: a Fisher-weighted pull to an anchor.

  Adds the gradient of :math:`\frac{\lambda}{2}\sum_i \Omega_i
  (\theta_i - \theta^*_i)^2` to the incoming updates,

  .. math::
    g \leftarrow g + \lambda \, \Omega \odot (\theta - \theta^*).

  :math:`\Omega` and :math:`\theta^*` change only when you call
  :func:`ewc_consolidate` at a task boundary; before the first call
  :math:`\Omega = 0` and the transformation passes updates through. Put it
  first in a chain, before the optimizer:
  ``optax.chain(ewc(100.0), optax.adamw(1e-3))``.

  Args:
    strength: :math:`\lambda \ge 0`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params``; its state is an :class:`EwcState`.

  Raises:
    TypeError: for a hyperparameter of the wrong type.
    ValueError: for a negative strength; at ``update`` time if ``params`` is
      missing or its tree differs from the updates.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from sal_jax import baselines
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax.chain(baselines.ewc(1.0), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> fisher = {"w": jnp.array([1., 0.])}
    >>> state = baselines.ewc_consolidate(state, params, fisher)
    >>> moved = {"w": jnp.ones(2)}
    >>> updates, state = tx.update({"w": jnp.zeros(2)}, state, moved)
    >>> updates["w"]  # only the important coordinate is pulled back
    Array([-1., -0.], dtype=float32)

  References:
    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
    networks", PNAS 2017.
  """
  _anchor.check_range("ewc", "strength", strength, 0.0, float("inf"))

  def init_fn(params):
    return EwcState(importance=_anchor.zeros_like_importance(params),
                    anchor=_anchor.copy_as_state(params),
                    consolidations=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _anchor.check_params(updates, params)
    out = _anchor.apply_penalty(updates, params, state.anchor,
                                state.importance, strength)
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_ewc_state(x: Any) -> bool:
  return isinstance(x, EwcState)


def ewc_consolidate(
    opt_state: Any,
    params: chex.ArrayTree,
    fisher: chex.ArrayTree,
    online: bool = False,
    decay: chex.Numeric = 1.0,
) -> Any:
  r"""Task boundary of :func:`ewc`: folds a task's Fisher into the state.

  Classic EWC (``online=False``, Kirkpatrick et al.) keeps one quadratic
  penalty per finished task, :math:`\sum_k \frac{\lambda}{2} F_k \odot
  (\theta - \theta_k)^2`. Its gradient equals
  :math:`\lambda\,\Omega \odot (\theta - \theta^*)` with
  :math:`\Omega = \sum_k F_k` and :math:`\theta^*` the :math:`F`-weighted
  mean of the task anchors, so one anchor is exact in O(1) memory:

  .. math::
    \Omega' = \Omega + F, \qquad
    \theta^{*\prime} = \frac{\Omega \odot \theta^* + F \odot \theta}
      {\Omega + F} \quad (\theta \text{ where } \Omega + F = 0).

  Online EWC (``online=True``, Schwarz et al.) decays the old importance and
  re-anchors at the current params:

  .. math::
    \Omega' = \gamma \, \Omega + F, \qquad \theta^{*\prime} = \theta.

  ``online=True, decay=1.0`` is the common single-anchor simplification of
  EWC (summed Fishers, anchor at the last boundary). Pure and jittable; the
  dtypes and shapes of the state are kept, so a jitted step does not
  recompile after a consolidation.

  Args:
    opt_state: an optimizer state holding exactly one :class:`EwcState`
      (e.g. that of ``optax.chain(ewc(...), optax.adamw(...))``), the
      :class:`EwcState` itself, or a ``flax.nnx.Optimizer`` (updated in
      place).
    params: the params at the end of the task.
    fisher: the task's importance :math:`F \ge 0`, like the params (e.g.
      from :func:`empirical_fisher`).
    online: online EWC instead of classic.
    decay: :math:`\gamma \in [0, 1]`, online EWC only.

  Returns:
    ``opt_state`` with its :class:`EwcState` replaced by the consolidated one
    (an ``nnx.Optimizer``: the same, updated).

  Raises:
    TypeError: for a hyperparameter of the wrong type.
    ValueError: if ``opt_state`` holds no or several :class:`EwcState`, if
      the trees differ, or for a bad ``decay`` (any ``decay != 1`` needs
      ``online=True``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import baselines
    >>> state = baselines.ewc(1.0).init({"w": jnp.zeros(1)})
    >>> state = baselines.ewc_consolidate(state, {"w": jnp.ones(1)},
    ...                                 {"w": jnp.ones(1)})
    >>> state = baselines.ewc_consolidate(state, {"w": jnp.full(1, 3.)},
    ...                                 {"w": jnp.ones(1)})
    >>> state.importance["w"], state.anchor["w"]  # sum; weighted mean
    (Array([2.], dtype=float32), Array([2.], dtype=float32))

  References:
    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
    networks", PNAS 2017. Schwarz et al., "Progress & Compress: A scalable
    framework for continual learning", ICML 2018 (online EWC).
  """
  _anchor.check_range("ewc_consolidate", "decay", decay, 0.0, 1.0)
  _validation.check_choice("sal_jax.baselines.ewc_consolidate", "online",
                           online, (bool, np.bool_))
  if not online and not (_validation.is_python_number(decay)
                         and decay == 1.0):
    raise ValueError(
        "sal_jax.baselines.ewc_consolidate: decay applies to online EWC only; "
        f"pass online=True (got decay={decay!r} with online=False).")
  params = _nnx_interop.unwrap_variables(params)
  fisher = _nnx_interop.unwrap_variables(fisher)

  def rewrite(opt_state):
    state = _anchor.find_state(opt_state, EwcState, "ewc_consolidate")
    _tree_utils.check_same_structure(params, state.anchor, "params",
                                     "the EWC anchor")
    _tree_utils.check_same_structure(fisher, params, "fisher", "params")

    def leaf(omega, anchor, p, f):
      f = jnp.asarray(f).astype(omega.dtype)
      p = jnp.asarray(p).astype(anchor.dtype)
      if online:
        return (decay * omega + f).astype(omega.dtype), p
      total = omega + f
      positive = total > 0
      merged = (omega * anchor + f * p) / jnp.where(positive, total, 1.0)
      return total, jnp.where(positive, merged, p).astype(anchor.dtype)

    pairs = jax.tree.map(leaf, state.importance, state.anchor, params, fisher)
    # Not jax.tree.transpose: it fails on a tree without leaves (optax's
    # tree_map_params initialises with one).
    importance = jax.tree.map(lambda _, pair: pair[0], state.importance, pairs)
    anchor = jax.tree.map(lambda _, pair: pair[1], state.anchor, pairs)
    new_state = EwcState(importance=importance, anchor=anchor,
                         consolidations=state.consolidations + 1)
    return jax.tree.map(lambda x: new_state if _is_ewc_state(x) else x,
                        opt_state, is_leaf=_is_ewc_state)

  return _nnx_interop.rewrite_state(opt_state, rewrite,
                                    "sal_jax.baselines.ewc_consolidate")


def empirical_fisher(
    loss_fn: Callable[..., jax.Array],
    params: chex.ArrayTree,
    batches: chex.ArrayTree,
) -> chex.ArrayTree:
  r"""Diagonal of the empirical Fisher: mean squared gradient over examples.

  .. math::
    F = \frac{1}{N} \sum_{n=1}^{N} \big(\nabla_\theta\,
      \ell(\theta, x_n)\big)^{2}

  with :math:`x_n` the slices of ``batches`` along its leading axis. When
  each slice is one example this is the diagonal of the empirical Fisher
  used by EWC; when each slice is a mini-batch (and ``loss_fn`` averages over
  it) it is a cheaper estimate that is smaller by about the batch size for
  the noise part. All gradients are taken at once with ``jax.vmap``; for
  large sets, call it on chunks and average the results. Jittable (close
  over ``loss_fn``).

  Args:
    loss_fn: ``loss_fn(params, x) -> scalar``, with ``x`` one slice of
      ``batches`` (e.g. ``(inputs, targets)`` of a single example).
    params: where the gradients are taken.
    batches: a pytree of arrays sharing a leading axis of size ``N``.

  Returns:
    The Fisher diagonal, a tree like ``params`` (nonnegative).

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import baselines
    >>> loss = lambda w, xy: 0.5 * (xy[0] @ w - xy[1]) ** 2
    >>> x, y = jnp.array([[1., 0.], [0., 2.]]), jnp.array([1., 1.])
    >>> baselines.empirical_fisher(loss, jnp.zeros(2), (x, y))  # mean of g_n**2
    Array([0.5, 2. ], dtype=float32)

  References:
    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
    networks", PNAS 2017.
  """
  grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batches)
  # |g|**2: complex gradients enter as their modulus.
  return jax.tree.map(
      lambda g: jnp.mean(jnp.square(
          _tree_utils.to_real(g, _tree_utils.real_dtype(g.dtype))), axis=0),
      grads)


def streaming_ewc(
    strength: chex.Numeric,
    importance_decay: chex.Numeric = 0.999,
    anchor_decay: chex.Numeric = 0.999,
) -> optax.GradientTransformationExtraArgs:
  r"""Task-free EWC: EMA of squared gradients pulling toward a slow anchor.

  No task boundaries: the Fisher diagonal is replaced by a bias-corrected
  EMA of the squared incoming gradients, and the anchor by a slow EMA of
  the params that starts at the initial params. At step :math:`t`
  (1-based):

  .. math::
    g_\text{out} = g_t + \lambda \, \hat\Omega_{t-1} \odot
      (\theta_t - \bar\theta_{t-1}), \qquad
    \Omega_t = \rho\,\Omega_{t-1} + (1 - \rho)\, g_t^2, \quad
    \hat\Omega_t = \frac{\Omega_t}{1 - \rho^t}, \quad
    \bar\theta_t = \alpha\,\bar\theta_{t-1} + (1 - \alpha)\,\theta_t,

  with :math:`\Omega_0 = \hat\Omega_0 = 0` and :math:`\bar\theta_0` the
  params given to ``init``. The penalty uses the importance and anchor from
  before the current step, so the first step passes through.

  Args:
    strength: :math:`\lambda \ge 0`.
    importance_decay: :math:`\rho \in [0, 1)`.
    anchor_decay: :math:`\alpha \in [0, 1)`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params``; its state is a :class:`StreamingEwcState`.

  Raises:
    TypeError: for a hyperparameter of the wrong type.
    ValueError: for bad hyperparameters; at ``update`` time if ``params`` is
      missing or its tree differs from the updates.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sal_jax import baselines
    >>> tx = baselines.streaming_ewc(1.0, importance_decay=0.5)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> g = {"w": jnp.array([2., 0.])}
    >>> _, state = tx.update(g, state, {"w": jnp.zeros(2)})
    >>> out, state = jax.jit(tx.update)(g, state, {"w": jnp.ones(2)})
    >>> out["w"]  # g + 1 * [4, 0] * (1 - 0)
    Array([6., 0.], dtype=float32)

  References:
    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
    networks", PNAS 2017. Schwarz et al., "Progress & Compress: A scalable
    framework for continual learning", ICML 2018 (online EWC, of which this
    is the boundary-free limit).
  """
  return _anchor.streaming_importance(
      "streaming_ewc", StreamingEwcState, jnp.square, strength,
      importance_decay, anchor_decay)
