"""The adaptive stability filter: a per-leaf EMA of a stability score.

Each leaf's score is an EMA of ``1 / (1 + 10 * relative change)``; leaves
scoring above a threshold get a gradient mask below 1, and the threshold
drifts toward the mean score. All pure and jittable.

The original keys its adaptive filter by name and updates one name at a time;
here one :func:`adaptive_filter_update` updates a whole pytree, and the
original's ``adapt_threshold()`` is the separate :func:`adaptive_filter_adapt`.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from sal_jax._common import validation as _validation

# Denominator guard of the relative changes (the original's value).
_EPS = 1e-8
# Score of a leaf the adaptive filter has never seen.
_UNSEEN_SCORE = 0.5
_THRESHOLD_MIN = 0.2
_THRESHOLD_MAX = 0.8


def _check_unit_interval(where: str, name: str, value) -> None:
  _validation.check_number(f"sal_jax.analysis.{where}", name, value, 0.0,
                           1.0)


class AdaptiveFilterState(NamedTuple):
  """State of the adaptive stability filter.

  Attributes:
    stability_ema: per leaf, the float32 scalar EMA of the stability score:
      the leaf's score, 0.5 until its first update (the original's default
      for an unknown name).
    seen: per leaf, a bool scalar: whether the leaf was ever updated.
    relative_change: per leaf, the float32 relative change of the last
      update (the original's ``change_history`` is the sequence of these).
    threshold: the float32 scalar threshold.
  """
  stability_ema: chex.ArrayTree
  seen: chex.ArrayTree
  relative_change: chex.ArrayTree
  threshold: jax.Array


def adaptive_filter_init(
    params: chex.ArrayTree,
    initial_threshold: chex.Numeric = 0.5,
) -> AdaptiveFilterState:
  """Initialises the adaptive stability filter for a pytree of parameters.

  Every leaf starts unseen (score 0.5 until its first update).

  Args:
    params: the pytree whose leaves are tracked (only its structure is used).
    initial_threshold: the starting threshold, in [0, 1].

  Returns:
    A fresh :class:`AdaptiveFilterState`.

  Raises:
    ValueError: for a threshold outside [0, 1].

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.analysis import adaptive_filter_init
    >>> adaptive_filter_init({"w": jnp.ones(3)}).threshold
    Array(0.5, dtype=float32)

  References:
    The original SAL library, ``sal.filters.AdaptiveStabilityFilter``.
  """
  _check_unit_interval("adaptive_filter_init", "initial_threshold",
                       initial_threshold)
  fill = lambda value, dtype: jax.tree.map(
      lambda _: jnp.asarray(value, dtype), params)
  return AdaptiveFilterState(
      stability_ema=fill(_UNSEEN_SCORE, jnp.float32),
      seen=fill(False, jnp.bool_),
      relative_change=fill(0.0, jnp.float32),
      threshold=jnp.asarray(initial_threshold, jnp.float32))


def adaptive_filter_update(
    state: AdaptiveFilterState,
    current: chex.ArrayTree,
    previous: chex.ArrayTree,
    decay: chex.Numeric = 0.95,
) -> AdaptiveFilterState:
  r"""Updates the per-leaf stability EMA from one pair of snapshots.

  Per leaf, with :math:`\|\cdot\|` the L2 norm of the whole leaf:

  .. math::
    \rho = \frac{\|w - w_{prev}\|}{\|w_{prev}\| + 10^{-8}}, \quad
    s = \frac{1}{1 + 10 \rho}, \quad
    \bar s \leftarrow \begin{cases} s & \text{first update} \\
      \beta \bar s + (1 - \beta) s & \text{else.} \end{cases}

  The original's ``update`` returns the new :math:`\bar s`: here
  ``new_state.stability_ema``. The threshold is left to
  :func:`adaptive_filter_adapt`.

  Args:
    state: the current state.
    current: the current parameters (same structure as at init).
    previous: the previous parameters.
    decay: the EMA decay :math:`\beta` in [0, 1].

  Returns:
    The updated :class:`AdaptiveFilterState`.

  Raises:
    ValueError: for a decay outside [0, 1].

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import analysis
    >>> state = analysis.adaptive_filter_init({"w": jnp.ones(2)})
    >>> state = analysis.adaptive_filter_update(
    ...     state, {"w": jnp.array([1.0, 1.1])}, {"w": jnp.ones(2)})
    >>> print(round(float(state.stability_ema["w"]), 4))
    0.5858

  References:
    The original SAL library, ``sal.filters.AdaptiveStabilityFilter.update``.
  """
  _check_unit_interval("adaptive_filter_update", "decay", decay)

  norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x)))
  rel = jax.tree.map(
      lambda cur, prev: norm(jnp.asarray(cur, jnp.float32) - prev)
      / (norm(jnp.asarray(prev, jnp.float32)) + _EPS), current, previous)

  def ema(old, seen, rho):
    score = 1.0 / (1.0 + rho * 10.0)
    return jnp.where(seen, decay * old + (1.0 - decay) * score,
                     score).astype(jnp.float32)

  return AdaptiveFilterState(
      stability_ema=jax.tree.map(ema, state.stability_ema, state.seen, rel),
      seen=jax.tree.map(jnp.ones_like, state.seen),
      relative_change=rel,
      threshold=state.threshold)


def adaptive_filter_masks(
    state: AdaptiveFilterState,
    params: chex.ArrayTree,
) -> chex.ArrayTree:
  r"""Constant per-leaf gradient masks from the scores and the threshold.

  .. math::
    m = 1 - \frac{s - \tau}{1 - \tau} \text{ if } s > \tau \text{ (strict),
    else } 1,

  with :math:`s` the leaf's score ``state.stability_ema`` (0.5 for a leaf
  never updated).

  Args:
    state: the filter state.
    params: a pytree of the same structure; gives each mask's shape.

  Returns:
    A pytree of float32 arrays, each filled with its leaf's mask value.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import analysis
    >>> state = analysis.adaptive_filter_init({"w": jnp.ones(2)}, 0.3)
    >>> analysis.adaptive_filter_masks(state, {"w": jnp.ones(2)})["w"].round(4)
    Array([0.7143, 0.7143], dtype=float32)

  References:
    The original SAL library, ``AdaptiveStabilityFilter.get_mask``.
  """
  tau = state.threshold
  # Unused when tau == 1 (no score exceeds 1), but keep it finite.
  span = jnp.maximum(1.0 - tau, 1e-12)

  def mask(score, p):
    value = jnp.where(score > tau, 1.0 - (score - tau) / span, 1.0)
    return jnp.full(jnp.shape(p), value, jnp.float32)

  return jax.tree.map(mask, state.stability_ema, params)


def adaptive_filter_adapt(
    state: AdaptiveFilterState,
    adaptation_rate: chex.Numeric = 0.01,
) -> AdaptiveFilterState:
  r"""Moves the threshold toward the mean score of the leaves seen so far.

  .. math::
    \tau \leftarrow \mathrm{clip}(\tau + \alpha (\bar s_{mean} - \tau),
    0.2, 0.8),

  where the mean runs over the leaves updated at least once; with none, the
  threshold is left unchanged (not even clipped), as in the original.

  Args:
    state: the filter state.
    adaptation_rate: the rate :math:`\alpha` in [0, 1].

  Returns:
    The state with the new threshold.

  Raises:
    ValueError: for a rate outside [0, 1].

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import analysis
    >>> state = analysis.adaptive_filter_init({"w": jnp.ones(2)})
    >>> state = analysis.adaptive_filter_update(state, {"w": jnp.ones(2)},
    ...                                    {"w": jnp.ones(2)})
    >>> analysis.adaptive_filter_adapt(state, 0.5).threshold
    Array(0.75, dtype=float32)

  References:
    The original SAL library,
    ``AdaptiveStabilityFilter.adapt_threshold``.
  """
  _check_unit_interval("adaptive_filter_adapt", "adaptation_rate",
                       adaptation_rate)
  emas = jax.tree.leaves(state.stability_ema)
  if not emas:
    return state
  seen = jnp.stack([jnp.asarray(s, jnp.float32)
                    for s in jax.tree.leaves(state.seen)])
  emas = jnp.stack(emas)
  count = jnp.sum(seen)
  mean = jnp.sum(emas * seen) / jnp.maximum(count, 1.0)
  tau = state.threshold
  moved = jnp.clip(tau + adaptation_rate * (mean - tau), _THRESHOLD_MIN,
                   _THRESHOLD_MAX)
  return state._replace(
      threshold=jnp.where(count > 0, moved, tau).astype(jnp.float32))
