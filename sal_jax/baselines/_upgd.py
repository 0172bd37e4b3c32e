"""Utility-based perturbed gradient descent (UPGD), first-order global form."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sal_jax._common import tree_utils as _tree_utils
from sal_jax.baselines import _anchor


class UpgdState(NamedTuple):
  """State of :func:`upgd`.

  Attributes:
    count: number of steps taken, int32.
    utility: the (uncorrected) EMA :math:`u` of the utility ``-g * theta``,
      like the params, in their dtype promoted to at least float32 (its
      real counterpart for complex params), with x64 on or off.
    key: the raw PRNG key (uint32) the next step's noise is drawn from.
  """
  count: jax.Array
  utility: chex.ArrayTree
  key: jax.Array


def _raw_key(key: Any) -> jax.Array:
  """A raw uint32 key from an int seed, a raw key or a typed key."""
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype,
                                                   jax.dtypes.prng_key):
    return jax.random.key_data(key)
  key = jnp.asarray(key)
  if key.ndim == 0:
    return jax.random.PRNGKey(key)
  return key.astype(jnp.uint32)


def upgd(
    learning_rate: optax.ScalarOrSchedule,
    utility_decay: chex.Numeric = 0.999,
    noise_std: chex.Numeric = 0.001,
    weight_decay: chex.Numeric = 0.0,
    key: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""UPGD: gradient plus noise, gated off for useful weights (an optimizer).

  First-order, global UPGD. Each weight's utility (the first-order estimate
  of the loss increase if it were set to zero) is tracked as an EMA,
  normalised by the largest utility in the whole model, and squashed into a
  protection :math:`s \in (0, 1)`; the perturbed gradient step is scaled by
  :math:`1 - s`. At step :math:`t` (1-based), with :math:`g` the incoming
  gradient:

  .. math::
    u_t = \beta\,u_{t-1} + (1 - \beta)\,(-g \odot \theta), \qquad
    \tilde u_t = \frac{u_t}{1 - \beta^t}, \qquad
    \eta_t = \max_{\text{all leaves, entries}} u_t,

  .. math::
    s_t = \sigma(\tilde u_t / \eta_t), \qquad
    \xi \sim \mathcal N(0, \sigma_\xi^2), \qquad
    \Delta\theta = -\alpha_t \big[(g + \xi) \odot (1 - s_t)
      + \lambda_\text{wd}\,\theta\big].

  As in the authors' code, :math:`\eta` is the maximum of the *uncorrected*
  trace; the ratio is :math:`u_t / ((1-\beta^t)\max u_t)`, so the gate is
  close to binary in the first :math:`\sim 1/(1-\beta)` steps (normalising by
  :math:`\max \tilde u` instead would cancel the correction). The weight
  decay is decoupled and not gated, as in the authors' code
  (:math:`\theta \leftarrow (1 - \alpha\lambda_\text{wd})\theta - \dots`).
  Deviation: where :math:`\max u_t \le 0` (no weight has positive utility)
  the gate takes its limit as :math:`\eta \to 0^+` instead of dividing by
  zero or flipping signs: weights of zero utility get :math:`s = 1/2`, weights
  of negative utility :math:`s = 0`.

  The noise comes only from the key kept in the state, split at every step,
  so a run is reproducible from ``key``. UPGD is a complete optimizer: use it
  alone, not in front of another one (it returns the final update).

  Args:
    learning_rate: :math:`\alpha > 0`, or an optax schedule of the step
      count.
    utility_decay: :math:`\beta \in [0, 1)`.
    noise_std: :math:`\sigma_\xi \ge 0`.
    weight_decay: :math:`\lambda_\text{wd} \ge 0`.
    key: an int seed or a JAX PRNG key (typed or raw).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params``; its state is an :class:`UpgdState`.

  Raises:
    TypeError: for a hyperparameter of the wrong type.
    ValueError: for bad hyperparameters; at ``update`` time if ``params`` is
      missing or its tree differs from the updates.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sal_jax import baselines
    >>> tx = baselines.upgd(0.1, utility_decay=0.0, noise_std=0.0)
    >>> params = {"w": jnp.array([1., 0.])}
    >>> state = tx.init(params)
    >>> out, state = jax.jit(tx.update)({"w": jnp.array([-1., 1.])}, state,
    ...                                 params)
    >>> out["w"]  # u = [1, 0]: s = [sigmoid(1), 1/2]
    Array([ 0.02689414, -0.05      ], dtype=float32)

  References:
    Elsayed and Mahmood, "Addressing Loss of Plasticity and Catastrophic
    Forgetting in Continual Learning", ICLR 2024.
  """
  fn = "upgd"
  if not callable(learning_rate):
    _anchor.check_range(fn, "learning_rate", learning_rate, 0.0,
                        float("inf"), low_open=True)
  _anchor.check_range(fn, "utility_decay", utility_decay, 0.0, 1.0,
                      high_open=True)
  _anchor.check_range(fn, "noise_std", noise_std, 0.0, float("inf"))
  _anchor.check_range(fn, "weight_decay", weight_decay, 0.0, float("inf"))

  def init_fn(params):
    return UpgdState(count=jnp.zeros((), jnp.int32),
                     utility=_anchor.zeros_like_importance(params),
                     key=_raw_key(key))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _anchor.check_params(updates, params)
    lr = learning_rate(state.count) if callable(learning_rate) else (
        learning_rate)
    count = state.count + 1
    def utility_leaf(u, g, p):
      dtype = _anchor.state_dtype(p)  # complex params: Re(conj(g) theta)
      product = _tree_utils.real_product(
          (1.0 - utility_decay) * g.astype(dtype), p.astype(dtype))
      return (utility_decay * u - product).astype(u.dtype)

    utility = jax.tree.map(utility_leaf, state.utility, updates, params)
    leaves = jax.tree.leaves(utility)
    if not leaves:
      return updates, state._replace(count=count)
    eta = jnp.max(jnp.stack([jnp.max(u).astype(jnp.float32)
                             for u in leaves]))
    positive = eta > 0
    eta = jnp.where(positive, eta, 1.0)
    correction = 1.0 - jnp.asarray(utility_decay, jnp.float32) ** count.astype(
        jnp.float32)

    new_key, noise_key = jax.random.split(state.key)
    noise_keys = jax.random.split(noise_key, len(leaves))
    treedef = jax.tree.structure(utility)
    noise_keys = jax.tree.unflatten(treedef, list(noise_keys))

    def leaf(g, p, u, k):
      dtype = u.dtype
      scaled = jax.nn.sigmoid(u / correction.astype(dtype) / eta.astype(dtype))
      # No positive utility anywhere: the limit eta -> 0+ of the sigmoid.
      scaled = jnp.where(positive, scaled,
                         jnp.where(u < 0, 0.0, 0.5).astype(dtype))
      gate = 1.0 - scaled
      dtype = _anchor.state_dtype(p)  # complex params: complex noise
      noise = noise_std * jax.random.normal(k, jnp.shape(g), dtype)
      step = (g.astype(dtype) + noise) * gate + weight_decay * p.astype(dtype)
      return (-lr * step).astype(g.dtype)

    out = jax.tree.map(leaf, updates, params, utility, noise_keys)
    return out, UpgdState(count=count, utility=utility, key=new_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
