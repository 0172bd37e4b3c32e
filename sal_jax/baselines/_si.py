"""Synaptic intelligence in task-free streaming form."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sal_jax._common import tree_utils as _tree_utils
from sal_jax.baselines import _anchor


class StreamingSiState(NamedTuple):
  """State of :func:`streaming_si`.

  Leaves like the params have the params' dtype promoted to at least
  float32, with x64 on or off; ``path`` and ``displacement`` (loss changes
  and squared distances) its real counterpart.

  Attributes:
    count: number of steps taken, int32.
    prev_params: the params of the previous step, :math:`\\theta_{t-1}`.
    prev_grad: the incoming gradient of the previous step, :math:`g_{t-1}`.
    path: the discounted path integral :math:`W` (may be negative).
    displacement: the (uncorrected) EMA :math:`D` of the squared distance
      from the anchor.
    anchor: the slow EMA :math:`\\bar\\theta` of the params.
  """
  count: jax.Array
  prev_params: chex.ArrayTree
  prev_grad: chex.ArrayTree
  path: chex.ArrayTree
  displacement: chex.ArrayTree
  anchor: chex.ArrayTree


def streaming_si(
    strength: chex.Numeric,
    damping: chex.Numeric = 0.1,
    importance_decay: chex.Numeric = 0.999,
    anchor_decay: chex.Numeric = 0.999,
) -> optax.GradientTransformationExtraArgs:
  r"""Task-free synaptic intelligence: path-integral importance, slow anchor.

  SI credits each parameter with its share of the loss decrease along the
  training path, :math:`\omega = -\sum_t g_{t-1} \odot (\theta_t -
  \theta_{t-1})`, and at a task boundary sets the importance
  :math:`\omega / (\Delta^2 + \xi)`, :math:`\Delta` the parameter's total
  move over the task. Here the sum forgets exponentially and the
  squared move is a running mean of the squared distance from a slow
  anchor, so no boundaries are needed. At step :math:`t` (1-based), with
  :math:`g_t` the incoming gradient (the task gradient, not the penalised
  one) and :math:`\theta_t` the params:

  .. math::
    W_t = \rho\,W_{t-1} - g_{t-1} \odot (\theta_t - \theta_{t-1}), \qquad
    D_t = \rho\,D_{t-1} + (1 - \rho)\,(\theta_t - \bar\theta_{t-1})^2,

  .. math::
    \Omega_t = \frac{\max(W_t, 0)}{D_t / (1 - \rho^{t-1}) + \xi}, \qquad
    g_\text{out} = g_t + \lambda\,\Omega_t \odot (\theta_t -
      \bar\theta_{t-1}), \qquad
    \bar\theta_t = \alpha\,\bar\theta_{t-1} + (1 - \alpha)\,\theta_t.

  :math:`W` and :math:`D` are updated from step 2 on (step 1 has no
  previous step; :math:`W_1 = D_1 = \Omega_1 = 0`, so the first step passes
  through); :math:`\bar\theta_0` is the params given to ``init``.
  :math:`W` is SI's :math:`\omega` summed with discount :math:`\rho` (an
  effective window of :math:`1/(1-\rho)` steps), and :math:`D/(1-\rho^n)`
  the bias-corrected mean squared distance from the anchor over that
  window, so for a parameter moving steadily with :math:`\alpha = \rho`,
  :math:`\Omega` matches SI's importance for a task of
  :math:`1/(1-\rho)` steps. Only information from before :math:`g_t`
  enters :math:`\Omega_t`.

  :math:`W` can be negative (the parameter's moves raised the loss: noise,
  overshoot, or moves caused by other terms such as this penalty or weight
  decay). SI leaves that sign in; here it is clipped, so
  :math:`\Omega \ge 0` always and the penalty never pushes a parameter away
  from its anchor.

  Args:
    strength: :math:`\lambda \ge 0` (SI's :math:`c`).
    damping: :math:`\xi > 0`.
    importance_decay: :math:`\rho \in [0, 1)`, for :math:`W` and :math:`D`.
    anchor_decay: :math:`\alpha \in [0, 1)`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params``; its state is a :class:`StreamingSiState` (five copies of
    the params).

  Raises:
    TypeError: for a hyperparameter of the wrong type.
    ValueError: for bad hyperparameters; at ``update`` time if ``params`` is
      missing or its tree differs from the updates.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import baselines
    >>> tx = baselines.streaming_si(1.0, damping=1.0, importance_decay=0.5,
    ...                           anchor_decay=0.5)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> _, state = tx.update({"w": jnp.ones(1)}, state, {"w": jnp.zeros(1)})
    >>> # the step moved w to -1 against g = 1: W = 1, D / (1 - 0.5) = 1
    >>> out, state = tx.update({"w": jnp.zeros(1)}, state, {"w": -jnp.ones(1)})
    >>> out["w"]  # 0 + 1 * (1 / (1 + 1)) * (-1 - 0)
    Array([-0.5], dtype=float32)

  References:
    Zenke, Poole and Ganguli, "Continual Learning Through Synaptic
    Intelligence", ICML 2017.
  """
  fn = "streaming_si"
  _anchor.check_range(fn, "strength", strength, 0.0, float("inf"))
  _anchor.check_range(fn, "damping", damping, 0.0, float("inf"),
                      low_open=True)
  _anchor.check_range(fn, "importance_decay", importance_decay, 0.0, 1.0,
                      high_open=True)
  _anchor.check_range(fn, "anchor_decay", anchor_decay, 0.0, 1.0,
                      high_open=True)

  def init_fn(params):
    real_zeros = _anchor.zeros_like_importance(params)
    return StreamingSiState(
        count=jnp.zeros((), jnp.int32),
        prev_params=_anchor.copy_as_state(params),
        prev_grad=_anchor.zeros_like_state(params),
        path=real_zeros,
        displacement=real_zeros,
        anchor=_anchor.copy_as_state(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _anchor.check_params(updates, params)
    params_s = jax.tree.map(lambda p, a: jnp.asarray(p).astype(a.dtype),
                            params, state.anchor)
    has_prev = state.count > 0  # a previous step exists: one more interval

    def path_leaf(w, g_prev, p, p_prev):
      # The loss change along the move; for complex params the real inner
      # product of the gradient and the move.
      move = _tree_utils.real_product(g_prev, p - p_prev)
      return jnp.where(has_prev, importance_decay * w - move,
                       w).astype(w.dtype)

    def displacement_leaf(d, p, a):
      distance = _tree_utils.to_real(p - a, d.dtype)
      return jnp.where(has_prev,
                       importance_decay * d
                       + (1.0 - importance_decay) * jnp.square(distance),
                       d).astype(d.dtype)

    path = jax.tree.map(path_leaf, state.path, state.prev_grad, params_s,
                        state.prev_params)
    displacement = jax.tree.map(displacement_leaf, state.displacement,
                                params_s, state.anchor)
    # state.count intervals have been seen once this step's is added.
    mean_displacement = _anchor.debias(displacement, importance_decay,
                                       state.count)
    importance = jax.tree.map(
        lambda w, d: (jnp.maximum(w, 0.0) / (d + damping)).astype(w.dtype),
        path, mean_displacement)
    out = _anchor.apply_penalty(updates, params, state.anchor, importance,
                                strength)
    new_state = StreamingSiState(
        count=state.count + 1,
        prev_params=params_s,
        prev_grad=jax.tree.map(lambda g, w: g.astype(w.dtype), updates,
                               state.prev_grad),
        path=path,
        displacement=displacement,
        anchor=_anchor.ema(state.anchor, params_s, anchor_decay),
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
