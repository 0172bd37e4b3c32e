"""Memory aware synapses in task-free streaming form."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sal_jax.baselines import _anchor


class StreamingMasState(NamedTuple):
  """State of :func:`streaming_mas`.

  Dtypes as in :class:`~sal_jax.baselines.EwcState`.

  Attributes:
    count: number of steps taken, int32.
    importance: the (uncorrected) EMA of ``|g|``, like the params.
    anchor: the slow EMA of the params, like the params.
  """
  count: jax.Array
  importance: chex.ArrayTree
  anchor: chex.ArrayTree


def streaming_mas(
    strength: chex.Numeric,
    importance_decay: chex.Numeric = 0.999,
    anchor_decay: chex.Numeric = 0.999,
) -> optax.GradientTransformationExtraArgs:
  r"""Task-free MAS: EMA of gradient magnitudes pulling toward a slow anchor.

  Memory aware synapses weighs the pull toward the anchor by the mean
  absolute gradient. At step :math:`t` (1-based):

  .. math::
    g_\text{out} = g_t + \lambda \, \hat\Omega_{t-1} \odot
      (\theta_t - \bar\theta_{t-1}), \qquad
    \Omega_t = \rho\,\Omega_{t-1} + (1 - \rho)\, |g_t|, \quad
    \hat\Omega_t = \frac{\Omega_t}{1 - \rho^t}, \quad
    \bar\theta_t = \alpha\,\bar\theta_{t-1} + (1 - \alpha)\,\theta_t,

  with :math:`\Omega_0 = \hat\Omega_0 = 0` and :math:`\bar\theta_0` the
  params given to ``init``; the penalty uses the importance and anchor from
  before the current step, so the first step passes through.

  Deviation from the paper: MAS measures importance with the gradient of the
  squared L2 norm of the network's output, which needs no labels. A
  transformation only sees the gradient it is given, so here the importance
  is the magnitude of the incoming (loss) gradient; feed it output-norm
  gradients to get the original signal.

  Args:
    strength: :math:`\lambda \ge 0`.
    importance_decay: :math:`\rho \in [0, 1)`.
    anchor_decay: :math:`\alpha \in [0, 1)`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params``; its state is a :class:`StreamingMasState`.

  Raises:
    TypeError: for a hyperparameter of the wrong type.
    ValueError: for bad hyperparameters; at ``update`` time if ``params`` is
      missing or its tree differs from the updates.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sal_jax import baselines
    >>> tx = baselines.streaming_mas(1.0, importance_decay=0.5)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> g = {"w": jnp.array([-2., 0.])}
    >>> _, state = tx.update(g, state, {"w": jnp.zeros(2)})
    >>> out, state = jax.jit(tx.update)(g, state, {"w": jnp.ones(2)})
    >>> out["w"]  # g + 1 * |g| * (1 - 0)
    Array([0., 0.], dtype=float32)

  References:
    Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget",
    ECCV 2018.
  """
  return _anchor.streaming_importance(
      "streaming_mas", StreamingMasState, jnp.abs, strength,
      importance_decay, anchor_decay)
