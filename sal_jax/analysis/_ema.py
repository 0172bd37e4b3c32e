"""Exponential moving averages: one step, and a functional tracker.

The tracker mirrors the original ``EMA`` class: with no initial value the
first input becomes the value; afterwards
``value <- alpha * x + (1 - alpha) * value``. Its state is a NamedTuple of
fixed-dtype arrays, so :func:`ema_update` is jittable.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from sal_jax._common import validation as _validation


def _check_alpha(where: str, alpha) -> None:
  _validation.check_number(f"sal_jax.analysis.{where}", "alpha", alpha, 0.0,
                           1.0)


def exponential_moving_average(
    current: chex.ArrayTree,
    previous: chex.ArrayTree,
    alpha: chex.Numeric,
) -> chex.ArrayTree:
  r"""One EMA step, leaf by leaf.

  .. math::
    v = \alpha x + (1 - \alpha) v_{prev}

  Args:
    current: the new value :math:`x` (an array or a pytree).
    previous: the previous average :math:`v_{prev}`, same structure.
    alpha: the weight of the new value, in [0, 1].

  Returns:
    The new average, float32, same structure as ``current``.

  Raises:
    ValueError: for ``alpha`` outside [0, 1].

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.analysis import exponential_moving_average
    >>> exponential_moving_average(jnp.array([1.0, 2.0]), jnp.zeros(2), 0.5)
    Array([0.5, 1. ], dtype=float32)

  References:
    The original SAL library, ``sal.utils.exponential_moving_average``.
  """
  _check_alpha("exponential_moving_average", alpha)
  return jax.tree.map(
      lambda x, v: (alpha * jnp.asarray(x, jnp.float32)
                    + (1.0 - alpha) * jnp.asarray(v, jnp.float32)),
      current, previous)


class EMAState(NamedTuple):
  """State of the EMA tracker.

  Attributes:
    value: the current average (float32 array or pytree of them); zeros
      while ``initialized`` is ``False``.
    count: int32 scalar, the number of updates since init or reset.
    initialized: bool scalar, whether ``value`` holds an average.
  """
  value: chex.ArrayTree
  count: jax.Array
  initialized: jax.Array


def ema_init(
    initial: chex.ArrayTree | None = None,
    like: chex.ArrayTree | None = None,
) -> EMAState:
  """Starts an EMA tracker.

  Args:
    initial: the starting average; ``None`` means "the first input becomes
      the value".
    like: with ``initial=None``, an example of the inputs (array or pytree)
      that fixes the shape of ``value``; a float32 scalar if omitted.

  Returns:
    A fresh :class:`EMAState` with ``count == 0``.

  Examples:
    >>> from sal_jax.analysis import ema_init
    >>> ema_init().initialized
    Array(False, dtype=bool)

  References:
    The original SAL library, ``sal.utils.EMA``.
  """
  if initial is None:
    template = jnp.zeros((), jnp.float32) if like is None else like
    value = jax.tree.map(
        lambda x: jnp.zeros(jnp.shape(x), jnp.float32), template)
    initialized = False
  else:
    value = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), initial)
    initialized = True
  return EMAState(value=value, count=jnp.zeros((), jnp.int32),
                  initialized=jnp.asarray(initialized))


def ema_update(
    state: EMAState,
    x: chex.ArrayTree,
    alpha: chex.Numeric,
) -> EMAState:
  r"""Feeds one value to the EMA tracker.

  .. math::
    v \leftarrow \begin{cases} x & \text{not yet initialised} \\
      \alpha x + (1 - \alpha) v & \text{else.} \end{cases}

  Args:
    state: the tracker state.
    x: the new value, same structure and shapes as ``state.value``.
    alpha: the weight of the new value, in [0, 1].

  Returns:
    The new :class:`EMAState` (``count`` + 1, initialised).

  Raises:
    ValueError: for ``alpha`` outside [0, 1].

  Examples:
    >>> from sal_jax import analysis
    >>> state = analysis.ema_init()
    >>> for x in (1.0, 0.0):
    ...   state = analysis.ema_update(state, x, alpha=0.1)
    >>> state.value, state.count
    (Array(0.9, dtype=float32), Array(2, dtype=int32))

  References:
    The original SAL library, ``sal.utils.EMA.update``.
  """
  _check_alpha("ema_update", alpha)
  averaged = exponential_moving_average(x, state.value, alpha)
  value = jax.tree.map(
      lambda avg, new, old: jnp.where(
          state.initialized, avg,
          jnp.broadcast_to(jnp.asarray(new, jnp.float32), jnp.shape(old))),
      averaged, x, state.value)
  return EMAState(value=value, count=state.count + 1,
                  initialized=jnp.ones((), jnp.bool_))


def ema_reset(state: EMAState) -> EMAState:
  """Forgets the average: value zeros, ``count`` 0, not initialised.

  Args:
    state: the tracker state.

  Returns:
    The reset :class:`EMAState` (same shapes).

  Examples:
    >>> from sal_jax import analysis
    >>> state = analysis.ema_update(analysis.ema_init(), 3.0, 0.5)
    >>> analysis.ema_reset(state).count
    Array(0, dtype=int32)

  References:
    The original SAL library, ``sal.utils.EMA.reset``.
  """
  return EMAState(value=jax.tree.map(jnp.zeros_like, state.value),
                  count=jnp.zeros((), jnp.int32),
                  initialized=jnp.zeros((), jnp.bool_))
