"""Filters: which entries are stable or large, in a few elementary ways.

Low-change mask, rFFT band-pass and gradient-magnitude filter: pure,
jittable functions of arrays. The adaptive stability filter, which keeps
state, is in :mod:`sal_jax.analysis._adaptive_filter`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sal_jax._common import validation as _validation

# Denominator guard of the relative changes (the original's value).
_EPS = 1e-8


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
    >>> from sal_jax.analysis import low_change_mask
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
    >>> from sal_jax.analysis import frequency_filter
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
    >>> from sal_jax.analysis import gradient_magnitude_filter
    >>> gradient_magnitude_filter({"w": jnp.array([0.1, -0.2, 0.3, -4.0])})
    {'w': Array([1. , 1. , 1. , 0.5], dtype=float32)}

  References:
    The original SAL library, ``sal.filters.gradient_magnitude_filter``.
  """
  _validation.check_number("sal_jax.analysis.gradient_magnitude_filter",
                           "percentile", percentile, 0.0, 100.0)

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
