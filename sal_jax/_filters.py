"""Filters: which entries or leaves are stable, in a few elementary ways.

Low-change mask, rFFT band-pass, gradient-magnitude filter, and the adaptive
stability filter (``adaptive_filter_*``: a per-leaf EMA of a stability score
with a threshold drifting toward the mean score). All pure and jittable.

The original keys its adaptive filter by name and updates one name at a time;
here one :func:`adaptive_filter_update` updates a whole pytree, and the
original's ``adapt_threshold()`` is the separate :func:`adaptive_filter_adapt`.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Denominator guard of the relative changes (the original's value).
_EPS = 1e-8
# Score of a leaf the adaptive filter has never seen.
_UNSEEN_SCORE = 0.5
_THRESHOLD_MIN = 0.2
_THRESHOLD_MAX = 0.8


def _check_unit_interval(value, name: str) -> None:
  if isinstance(value, (int, float)) and not 0.0 <= value <= 1.0:
    raise ValueError(f"sal_jax: {name} must lie in [0, 1], got {value!r}.")


def low_change_mask(
    current: chex.Array,
    previous: chex.Array,
    threshold: chex.Numeric = 0.1,
    relative: bool = True,
) -> jax.Array:
  r"""Marks the entries that changed less than a threshold.

  .. math::
    c = |x - x_{prev}|, \qquad
    m = [\, c / \max(|x_{prev}|, 10^{-8}) < t \,] \text{ (relative)}
    \quad\text{or}\quad m = [\, c < t \,] \text{ (absolute)}.

  The comparison is strict; the relative change clamps its denominator at
  ``1e-8`` (so an entry that moves away from an exact zero is "changing").

  Args:
    current: the current array.
    previous: the previous array, same shape as ``current``.
    threshold: the change threshold :math:`t`.
    relative: relative change if ``True``, absolute change otherwise.

  Returns:
    A float32 array of the shape of ``current``, 1 where stable, else 0.

  Raises:
    ValueError: if the shapes differ.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import low_change_mask
    >>> low_change_mask(jnp.array([1.0, 2.0, 0.5]), jnp.array([1.05, 1.0, 0.0]))
    Array([1., 0., 0.], dtype=float32)

  References:
    The original SAL library, ``sal.filters.low_change_mask``.
  """
  if jnp.shape(current) != jnp.shape(previous):
    raise ValueError(
        f"sal_jax: low_change_mask needs arrays of the same shape, got "
        f"{jnp.shape(current)} and {jnp.shape(previous)}.")
  current = jnp.asarray(current, jnp.float32)
  previous = jnp.asarray(previous, jnp.float32)
  change = jnp.abs(current - previous)
  if relative:
    change = change / jnp.maximum(jnp.abs(previous), _EPS)
  return (change < threshold).astype(jnp.float32)


def frequency_filter(
    x: chex.Array,
    low_cutoff: chex.Numeric = 0.0,
    high_cutoff: chex.Numeric = 0.5,
    preserve_dc: bool = True,
) -> jax.Array:
  r"""Band-passes an array along its last axis in the rFFT domain.

  With :math:`n` the length of the last axis, the :math:`n//2 + 1` rFFT bins
  get the float32 frequencies :math:`f = \mathrm{linspace}(0, 1, n//2+1)`
  (fractions of Nyquist), and bin :math:`k` is kept iff

  .. math::
    \text{low} \le f_k \le \text{high} \quad (\text{both bounds inclusive,
    compared in float32}),

  plus the DC bin when ``preserve_dc`` and ``low > 0`` (with ``low == 0`` the
  DC bin is inside the band anyway). The result is
  :math:`\mathrm{irfft}(\mathrm{rfft}(x) \cdot \text{mask}, n)`.

  Args:
    x: an array with at least one axis.
    low_cutoff: the lower band edge, a fraction of Nyquist in [0, 1].
    high_cutoff: the upper band edge, a fraction of Nyquist in [0, 1].
    preserve_dc: keep the mean (DC bin) even when ``low_cutoff > 0``.

  Returns:
    The filtered array, float32, same shape as ``x``.

  Raises:
    ValueError: for a scalar or an empty last axis.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import frequency_filter
    >>> x = jnp.array([1.0, -1.0, 1.0, -1.0])
    >>> frequency_filter(x + 2.0, 0.0, 0.5)  # Nyquist bin removed
    Array([2., 2., 2., 2.], dtype=float32)

  References:
    The original SAL library, ``sal.filters.frequency_filter``.
  """
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 0 or x.shape[-1] == 0:
    raise ValueError(
        f"sal_jax: frequency_filter needs a non-empty last axis, got shape "
        f"{x.shape}.")
  n = x.shape[-1]
  # The reference grid is float32 linspace; a float64 grid rounded to float32
  # is the same set of values (checked against the fixture's grids).
  freqs = jnp.asarray(np.linspace(0.0, 1.0, n // 2 + 1).astype(np.float32))
  low = jnp.asarray(low_cutoff, jnp.float32)
  high = jnp.asarray(high_cutoff, jnp.float32)
  mask = jnp.logical_and(freqs >= low, freqs <= high)
  if preserve_dc:
    mask = mask.at[0].set(jnp.logical_or(mask[0], low > 0))
  spectrum = jnp.fft.rfft(x, axis=-1) * mask.astype(jnp.float32)
  return jnp.fft.irfft(spectrum, n=n, axis=-1).astype(jnp.float32)


def gradient_magnitude_filter(
    grads: chex.ArrayTree,
    percentile: chex.Numeric = 90.0,
) -> chex.ArrayTree:
  r"""Halves the gradient entries above a per-leaf percentile of ``|g|``.

  For every leaf :math:`g`, with :math:`q` the ``percentile``-th percentile
  of :math:`|g|` over that leaf alone (linear interpolation, as
  ``jnp.percentile``'s default and ``torch.quantile``):

  .. math::
    m = 0.5 \text{ where } |g| > q \text{ (strict), else } 1.

  Args:
    grads: a pytree of gradients.
    percentile: the percentile in [0, 100].

  Returns:
    A pytree of float32 masks with the shapes of ``grads``.

  Raises:
    ValueError: for a percentile outside [0, 100].

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import gradient_magnitude_filter
    >>> gradient_magnitude_filter({"w": jnp.array([0.1, -0.2, 0.3, -4.0])})
    {'w': Array([1. , 1. , 1. , 0.5], dtype=float32)}

  References:
    The original SAL library, ``sal.filters.gradient_magnitude_filter``.
  """
  if isinstance(percentile, (int, float)) and not 0.0 <= percentile <= 100.0:
    raise ValueError(
        f"sal_jax: percentile must lie in [0, 100], got {percentile!r}.")

  def mask(g):
    magnitude = jnp.abs(jnp.asarray(g, jnp.float32))
    if magnitude.size == 0:
      return jnp.ones(magnitude.shape, jnp.float32)
    cut = _quantile(magnitude.ravel(), percentile)
    return jnp.where(magnitude > cut, 0.5, 1.0).astype(jnp.float32)

  return jax.tree.map(mask, grads)


def _quantile(values: jax.Array, percentile) -> jax.Array:
  """Linear-interpolation quantile, computed as ``torch.quantile`` does.

  A concrete percentile gets torch's float32 rank on the host: under ``jit``
  XLA folds ``p / 100 * (n - 1)`` into one rounded constant, which at
  ``p = 100`` lands below the maximum and flips the strict comparison.
  """
  n = values.size
  try:
    rank = np.float32(np.float32(float(percentile) / 100.0) * np.float32(n - 1))
  except (TypeError, jax.errors.ConcretizationTypeError):
    rank = jax.lax.optimization_barrier(
        jnp.asarray(percentile, jnp.float32) * (n - 1)) / 100.0
  below = jnp.clip(jnp.floor(rank), 0, n - 1)
  weight = rank - below
  ordered = jnp.sort(values)
  lo = ordered[below.astype(jnp.int32)]
  hi = ordered[jnp.clip(jnp.ceil(rank), 0, n - 1).astype(jnp.int32)]
  # torch.lerp's two-sided form.
  return jnp.where(weight < 0.5, lo + weight * (hi - lo),
                   hi - (hi - lo) * (1.0 - weight))


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
    >>> from sal_jax import adaptive_filter_init
    >>> adaptive_filter_init({"w": jnp.ones(3)}).threshold
    Array(0.5, dtype=float32)

  References:
    The original SAL library, ``sal.filters.AdaptiveStabilityFilter``.
  """
  _check_unit_interval(initial_threshold, "initial_threshold")
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
    >>> import sal_jax as sal
    >>> state = sal.adaptive_filter_init({"w": jnp.ones(2)})
    >>> state = sal.adaptive_filter_update(
    ...     state, {"w": jnp.array([1.0, 1.1])}, {"w": jnp.ones(2)})
    >>> print(round(float(state.stability_ema["w"]), 4))
    0.5858

  References:
    The original SAL library, ``sal.filters.AdaptiveStabilityFilter.update``.
  """
  _check_unit_interval(decay, "decay")

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
    >>> import sal_jax as sal
    >>> state = sal.adaptive_filter_init({"w": jnp.ones(2)}, 0.3)
    >>> sal.adaptive_filter_masks(state, {"w": jnp.ones(2)})["w"].round(4)
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
    >>> import sal_jax as sal
    >>> state = sal.adaptive_filter_init({"w": jnp.ones(2)})
    >>> state = sal.adaptive_filter_update(state, {"w": jnp.ones(2)},
    ...                                    {"w": jnp.ones(2)})
    >>> sal.adaptive_filter_adapt(state, 0.5).threshold
    Array(0.75, dtype=float32)

  References:
    The original SAL library,
    ``AdaptiveStabilityFilter.adapt_threshold``.
  """
  _check_unit_interval(adaptation_rate, "adaptation_rate")
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
