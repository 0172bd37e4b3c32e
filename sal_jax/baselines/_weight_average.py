"""Weight averaging: an exponential moving average of the params."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sal_jax.baselines import _anchor


class WeightAverageState(NamedTuple):
  r"""State of :func:`weight_average`.

  Attributes:
    count: updates seen, int32.
    weight: the average's total weight :math:`1 - \delta^t`, float32
      (its bias correction).
    average: EMA (not bias-corrected) of the params after each update, in
      the params' dtype, at least float32 (half-precision params are
      averaged in float32; float64 and complex params keep their dtype).
  """
  count: jax.Array
  weight: jax.Array
  average: chex.ArrayTree


def weight_average(decay: chex.Numeric = 0.999
                   ) -> optax.GradientTransformationExtraArgs:
  r"""Keeps an exponential moving average of the weights; updates unchanged.

  Placed last in a chain, it sees the final update :math:`u_t` and the
  params :math:`\theta_{t-1}` it applies to, and tracks

  .. math::
    a_t = \delta\, a_{t-1} + (1 - \delta)\,(\theta_{t-1} + u_t), \qquad
    \bar\theta_t = a_t / (1 - \delta^t),

  the bias-corrected average that :func:`averaged_params` returns for
  evaluation. Training continues from the raw params: the average only
  serves predictions, as in Polyak averaging or the EMA teachers of
  continual learning.

  Args:
    decay: :math:`\delta \in [0, 1)`; the average's horizon is about
      :math:`1 / (1 - \delta)` steps.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (needs ``params``).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from sal_jax import baselines
    >>> tx = optax.chain(optax.sgd(1.0), baselines.weight_average(0.5))
    >>> params = jnp.zeros(1)
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update(jnp.full(1, -1.0), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> baselines.averaged_params(state)  # (0.25 * 1 + 0.5 * 2) / 0.75
    Array([1.6666667], dtype=float32)

  References:
    Polyak & Juditsky, "Acceleration of stochastic approximation by
    averaging", SIAM J. Control Optim. 1992. Wortsman et al., "Robust
    fine-tuning of zero-shot models", CVPR 2022 (weight-space ensembles).
  """
  _anchor.check_range("weight_average", "decay", decay, 0.0, 1.0,
                      high_open=True)

  def init_fn(params):
    return WeightAverageState(
        count=jnp.zeros([], jnp.int32), weight=jnp.zeros([], jnp.float32),
        average=_anchor.zeros_like_state(params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _anchor.check_params(updates, params)
    new_params = jax.tree.map(
        lambda p, u, a: p.astype(a.dtype) + u.astype(a.dtype),
        params, updates, state.average)
    average = _anchor.ema(state.average, new_params, decay)
    weight = (decay * state.weight + (1.0 - decay)).astype(jnp.float32)
    return updates, WeightAverageState(
        count=optax.safe_increment(state.count), weight=weight,
        average=average)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def averaged_params(opt_state: Any) -> chex.ArrayTree:
  r"""The bias-corrected average of a :func:`weight_average` state.

  Args:
    opt_state: an optimizer state holding exactly one
      :class:`WeightAverageState` (or that state itself).

  Returns:
    :math:`a_t / (1 - \delta^t)`, a tree like the params in the state's
    dtypes (zeros before the first update). Jittable.

  Raises:
    ValueError: if ``opt_state`` holds no or several such states.
  """
  state = _anchor.find_state(opt_state, WeightAverageState,
                             "averaged_params")
  scale = 1.0 / jnp.maximum(state.weight, jnp.finfo(jnp.float32).tiny)
  return jax.tree.map(lambda a: (a * scale).astype(a.dtype), state.average)
