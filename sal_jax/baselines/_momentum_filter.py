"""MoFO: Adam that applies only the largest-momentum fraction of each tensor."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sal_jax.baselines import _anchor


class MomentumFilterState(NamedTuple):
  """State of :func:`scale_by_momentum_filter`.

  Attributes:
    count: steps taken, int32.
    mu: Adam's first moment, in the params' dtype, at least float32.
    nu: Adam's second moment (of the magnitudes), its real counterpart.
  """
  count: jax.Array
  mu: chex.ArrayTree
  nu: chex.ArrayTree


def _top_fraction_mask(m: jax.Array, fraction: chex.Numeric) -> jax.Array:
  """True on the ``ceil(fraction * size)`` entries of largest ``|m|``.

  ``fraction`` may be traced (a vmapped or injected hyperparameter), so
  ``k`` is not static and ``lax.top_k`` cannot be used. The cut, the
  ``k``-th largest magnitude, is found exactly by bisection on the
  magnitudes' bit patterns (for non-negative floats, ordered like the
  values): one count per bit, an order of magnitude faster than a sort on
  CPU. Ties at the cut are all kept.
  """
  magnitude = jnp.abs(m)  # real, also for complex momentum
  wide = jnp.dtype(magnitude.dtype).itemsize == 8
  magnitude = magnitude.astype(jnp.float64 if wide else jnp.float32)
  int_dtype = jnp.int64 if wide else jnp.int32
  bits = jax.lax.bitcast_convert_type(magnitude, int_dtype)
  k = jnp.clip(jnp.ceil(fraction * bits.size), 1, bits.size).astype(int_dtype)

  def halve(_, bounds):
    # The cut lies in [low, high]: at least k entries are >= low.
    low, high = bounds
    middle = low + (high - low + 1) // 2
    enough = jnp.sum(bits >= middle, dtype=int_dtype) >= k
    return jnp.where(enough, middle, low), jnp.where(enough, high, middle - 1)

  low, _ = jax.lax.fori_loop(
      0, 8 * jnp.dtype(int_dtype).itemsize, halve,
      (jnp.zeros((), int_dtype), jnp.max(bits)))
  return bits >= low


def scale_by_momentum_filter(
    fraction: chex.Numeric = 0.1,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam's direction, kept only where the momentum is largest.

  With Adam's moments :math:`m_t, v_t` (updated by the full gradient) and
  their bias corrections :math:`\hat m_t, \hat v_t`, each tensor's update is

  .. math::
    u_t = \mathbb{1}\big[\,|m_t| \ge q_{1-\alpha}(|m_t|)\,\big] \odot
      \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon},

  where :math:`q_{1-\alpha}` is the magnitude above which the fraction
  :math:`\alpha` of the tensor's entries lies: only the :math:`\alpha`
  share of entries with the largest momentum moves, so a fine-tuned model
  stays closer to where it started.

  Args:
    fraction: :math:`\alpha \in (0, 1]`, the share of each tensor updated
      per step (1 is Adam).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import baselines
    >>> tx = baselines.scale_by_momentum_filter(fraction=0.5)
    >>> grads = jnp.array([1.0, -4.0, 0.5, 3.0])
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> (updates != 0).tolist()  # the two largest |momentum| entries
    [False, True, False, True]

  References:
    Chen et al., "MoFO: Momentum-Filtered Optimizer for Mitigating
    Forgetting in LLM Fine-Tuning", 2024.
  """
  fn = "scale_by_momentum_filter"
  _anchor.check_range(fn, "fraction", fraction, 0.0, 1.0, low_open=True)
  _anchor.check_range(fn, "b1", b1, 0.0, 1.0, high_open=True)
  _anchor.check_range(fn, "b2", b2, 0.0, 1.0, high_open=True)

  def init_fn(params):
    return MomentumFilterState(
        count=jnp.zeros([], jnp.int32),
        mu=_anchor.zeros_like_state(params),
        nu=_anchor.zeros_like_importance(params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    mu = _anchor.ema(state.mu, updates, b1)
    nu = _anchor.ema(state.nu,
                     jax.tree.map(lambda g: jnp.square(jnp.abs(g)), updates),
                     b2)
    count = optax.safe_increment(state.count)
    mu_hat = _anchor.debias(mu, b1, count)
    nu_hat = _anchor.debias(nu, b2, count)

    def leaf(g, m, m_hat, v_hat):
      step = m_hat / (jnp.sqrt(v_hat) + eps)
      return jnp.where(_top_fraction_mask(m, fraction), step,
                       0.0).astype(g.dtype)

    out = jax.tree.map(leaf, updates, mu, mu_hat, nu_hat)
    return out, MomentumFilterState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def momentum_filter(
    learning_rate: optax.ScalarOrSchedule,
    fraction: chex.Numeric = 0.1,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: chex.Numeric = 0.0,
) -> optax.GradientTransformationExtraArgs:
  """MoFO: :func:`scale_by_momentum_filter`, weight decay, learning rate.

  Args:
    learning_rate: a scalar or an optax schedule.
    fraction: the share of each tensor updated per step, in (0, 1].
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: decoupled weight decay, as in ``optax.adamw``, applied to
      every entry.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import optax, jax.numpy as jnp
    >>> from sal_jax import baselines
    >>> tx = baselines.momentum_filter(1e-3, fraction=0.1)
    >>> state = tx.init(jnp.zeros(3))

  References:
    Chen et al., "MoFO: Momentum-Filtered Optimizer for Mitigating
    Forgetting in LLM Fine-Tuning", 2024.
  """
  return optax.chain(
      scale_by_momentum_filter(fraction, b1, b2, eps),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))
