"""Stability spectrum: how many leaves are protected, neutral, volatile.

A spectrum is three percentages. Healthy, as the original defines it:
``5 < protected < 25``, ``50 < neutral < 85``, ``10 < volatile < 30``. This
module also builds per-leaf protection masks from scores and summarises a
scores tree. Everything that takes arrays is jittable; strings
(:meth:`StabilitySpectrum.diagnosis`) are host-side.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from sal_jax._common import stability_states
from sal_jax._common import validation as _validation

_F32 = jnp.float32
_DEFAULT_SCORE = 0.5  # protect_mask: score of a leaf missing from the scores

HEALTHY = 0
OVER_PROTECTED = 1
UNDER_PROTECTED = 2
TOO_VOLATILE = 3
TOO_STABLE = 4
UNBALANCED_NEUTRAL = 5
DIAGNOSES = (  # indexed by diagnosis code
    "Healthy: Balanced stability spectrum",
    "Over-protected: Model may be too rigid",
    "Under-protected: Identity at risk",
    "Too volatile: Unstable learning",
    "Too stable: Limited learning capacity",
    "Unbalanced: Neutral share outside 50-85%",
)


def _check_thresholds(protected_threshold, volatile_threshold) -> None:
  vals = (protected_threshold, volatile_threshold)
  if not all(_validation.is_python_number(x) for x in vals):
    return  # traced or array thresholds are not checked
  if not all(math.isfinite(x) for x in vals):
    raise ValueError(f"sal_jax: thresholds must be finite, got {vals}.")
  if volatile_threshold > protected_threshold:
    raise ValueError(
        f"sal_jax: volatile_threshold ({volatile_threshold}) must not exceed "
        f"protected_threshold ({protected_threshold}).")


def _flat_scores(scores) -> jax.Array:
  leaves = jax.tree.leaves(scores)
  if not leaves:
    return jnp.zeros((0,), _F32)
  return jnp.concatenate([jnp.ravel(jnp.asarray(x, _F32)) for x in leaves])


class StabilitySpectrum(NamedTuple):
  """Percentages of protected, neutral and volatile leaves.

  Fields may be Python floats or jnp scalars; the constructor stores them as
  given (it is a pytree). :meth:`create` renormalises like the original.
  """
  protected: Any
  neutral: Any
  volatile: Any

  @classmethod
  def create(cls, protected, neutral, volatile) -> "StabilitySpectrum":
    r"""A spectrum, renormalised to 100 when its sum is off by more than 0.1.

    .. math::
      x_i \leftarrow 100\, x_i / \textstyle\sum_j x_j
      \quad \text{if } |\textstyle\sum_j x_j - 100| > 0.1

    Args:
      protected: percent protected (Python number or jnp scalar).
      neutral: percent neutral.
      volatile: percent volatile.

    Returns:
      The spectrum: Python floats from Python numbers (float64 arithmetic,
      as the original), else float32 jnp scalars (jittable).

    Raises:
      ValueError: if the three values are concrete and sum to 0 (the
        original raises ``ZeroDivisionError``); traced zeros give NaN.

    Examples:
      >>> from sal_jax.analysis import StabilitySpectrum
      >>> StabilitySpectrum.create(1, 1, 2)
      StabilitySpectrum(protected=25.0, neutral=25.0, volatile=50.0)

    References:
      The original SAL library,
      ``sal.stability.StabilitySpectrum.__post_init__``.
    """
    vals = (protected, neutral, volatile)
    if all(_validation.is_python_number(x) for x in vals):
      total = protected + neutral + volatile
      if abs(total - 100.0) > 0.1:
        if total == 0:
          raise ValueError("sal_jax: cannot renormalise a stability spectrum "
                           "whose percentages sum to 0.")
        vals = tuple((x / total) * 100 for x in vals)
      return cls(*(float(x) for x in vals))
    vals = tuple(jnp.asarray(x, _F32) for x in vals)
    total = vals[0] + vals[1] + vals[2]
    if not isinstance(total, jax.core.Tracer) and float(total) == 0.0:
      raise ValueError("sal_jax: cannot renormalise a stability spectrum "
                       "whose percentages sum to 0.")
    off = jnp.abs(total - 100.0) > 0.1
    return cls(*(jnp.where(off, (x / total) * 100.0, x) for x in vals))

  def is_healthy(self):
    r"""Whether all three shares lie strictly inside the healthy ranges.

    .. math::
      5 < p < 25 \;\wedge\; 50 < n < 85 \;\wedge\; 10 < v < 30

    Returns:
      A Python bool for Python fields, else a jnp bool scalar (jittable).

    Examples:
      >>> from sal_jax.analysis import StabilitySpectrum
      >>> StabilitySpectrum(10.0, 70.0, 20.0).is_healthy()
      True

    References:
      The original SAL library, ``sal.stability.StabilitySpectrum.is_healthy``.
    """
    p, n, v = self
    return (5 < p) & (p < 25) & (50 < n) & (n < 85) & (10 < v) & (v < 30)

  def diagnosis_code(self):
    r"""The index into ``DIAGNOSES`` of :meth:`diagnosis` (jittable).

    .. math::
      p \ge 25 \to 1;\ p \le 5 \to 2;\ v \ge 30 \to 3;\ v \le 10 \to 4;\
      n \notin (50, 85) \to 5;\ \text{else } 0 \text{ (healthy)}

    Returns:
      A Python int for Python fields, else a jnp int32 scalar.

    Examples:
      >>> from sal_jax.analysis import StabilitySpectrum
      >>> StabilitySpectrum(30.0, 50.0, 20.0).diagnosis_code()
      1

    References:
      The original SAL library, ``sal.stability.StabilitySpectrum.diagnosis``.
    """
    p, n, v = self
    conds = (p >= 25, p <= 5, v >= 30, v <= 10, (n <= 50) | (n >= 85))
    codes = (OVER_PROTECTED, UNDER_PROTECTED, TOO_VOLATILE, TOO_STABLE,
             UNBALANCED_NEUTRAL)
    if all(isinstance(c, bool) for c in conds):
      return next((k for c, k in zip(conds, codes) if c), HEALTHY)
    return jnp.select([jnp.asarray(c) for c in conds], codes,
                      HEALTHY).astype(jnp.int32)

  def diagnosis(self) -> str:
    """Human-readable diagnosis, "Healthy..." exactly when :meth:`is_healthy`.

    Checks, in order: protected ``>= 25`` over-protected, ``<= 5``
    under-protected, volatile ``>= 30`` too volatile, ``<= 10`` too stable,
    neutral outside ``(50, 85)`` unbalanced, else healthy.

    Deviation from the original: the original tests ``> 25``, ``< 5``,
    ``> 30``, ``< 10`` and never looks at the neutral share, so it calls
    ``[5, 75, 20]``, ``[25, 60, 15]`` or ``[6, 84, 10]`` "Healthy" while
    ``is_healthy()`` (strict) says no. Here the boundaries are those of
    ``is_healthy`` and a neutral share out of range gets its own message.

    Returns:
      One of ``DIAGNOSES`` (host-side; fields must be concrete).

    Examples:
      >>> from sal_jax.analysis import StabilitySpectrum
      >>> StabilitySpectrum(5.0, 75.0, 20.0).diagnosis()
      'Under-protected: Identity at risk'

    References:
      The original SAL library, ``sal.stability.StabilitySpectrum.diagnosis``.
    """
    return DIAGNOSES[int(self.diagnosis_code())]


def spectrum(
    scores: chex.ArrayTree,
    protected_threshold: float = stability_states.PROTECTED_THRESHOLD,
    volatile_threshold: float = stability_states.VOLATILE_THRESHOLD,
) -> StabilitySpectrum:
  r"""The percentage of leaves in each stability state.

  .. math::
    p = 100\, \#\{s \ge \tau_p\} / N, \quad
    v = 100\, \#\{\tau_p > s,\ s \le \tau_v\} / N, \quad n = 100 - p - v

  A scores leaf that is an array (per-element scores) counts each of its
  elements as one; with one scalar per leaf this is the original per-leaf
  count. An empty tree gives ``(0, 100, 0)`` as the original.

  Args:
    scores: a tree of stability scores.
    protected_threshold: :math:`\tau_p`.
    volatile_threshold: :math:`\tau_v`.

  Returns:
    A :class:`StabilitySpectrum` of float32 jnp scalars (jittable).

  Raises:
    ValueError: for non-finite thresholds or ``volatile > protected``.

  Examples:
    >>> from sal_jax.analysis import spectrum
    >>> sp = spectrum({"a": 0.9, "b": 0.5, "c": 0.1, "d": 0.6})
    >>> [float(x) for x in sp]
    [25.0, 50.0, 25.0]

  References:
    The original SAL library, ``sal.stability.StabilityAnalyzer.classify``.
  """
  _check_thresholds(protected_threshold, volatile_threshold)
  s = _flat_scores(scores)
  if s.size == 0:
    return StabilitySpectrum(*(jnp.asarray(x, _F32) for x in (0, 100, 0)))
  prot, vol = stability_states.state_masks(s, protected_threshold,
                                           volatile_threshold)
  n_prot = jnp.sum(prot).astype(_F32)
  n_vol = jnp.sum(vol).astype(_F32)
  total = float(s.size)
  return StabilitySpectrum(n_prot / total * 100.0,
                           (total - n_prot - n_vol) / total * 100.0,
                           n_vol / total * 100.0)


def _lookup(scores, path):
  """The score for a param path: missing mapping keys give 0.5."""
  node = scores
  for key in path:
    if isinstance(node, Mapping):
      if isinstance(key, jax.tree_util.DictKey) and key.key in node:
        node = node[key.key]
      else:
        return _DEFAULT_SCORE
    elif (isinstance(node, (list, tuple))
          and isinstance(key, jax.tree_util.SequenceKey)):
      node = node[key.idx]
    else:
      return node  # one score for a whole sub-tree
  return node


def protect_mask(scores: chex.ArrayTree, params: chex.ArrayTree,
                 threshold: float = 0.7) -> chex.ArrayTree:
  r"""Per-leaf update multipliers: 1 below the threshold, ramping to 0 at 1.

  .. math::
    m = 1 - \frac{s - \tau}{1 - \tau} \text{ if } s \ge \tau
    \text{ else } 1

  Args:
    scores: one score per leaf (scalar, or an array broadcastable to the
      leaf). When ``params`` is a mapping, ``scores`` may be a mapping with
      missing names (score 0.5, as the original) or extra names (ignored);
      otherwise it must have the structure of ``params``.
    params: the parameter tree.
    threshold: :math:`\tau`, ``0 <= tau < 1``.

  Returns:
    A tree like ``params``: each mask broadcast to the leaf's shape, in the
    leaf's dtype.

  Raises:
    ValueError: if ``threshold`` is a number outside ``[0, 1)`` (at 1 the
      original divides by zero) or the structures do not match.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.analysis import protect_mask
    >>> m = protect_mask({"a": 0.85}, {"a": jnp.ones(2), "b": jnp.ones(1)})
    >>> [round(float(x), 4) for x in (m["a"][0], m["b"][0])]
    [0.5, 1.0]

  References:
    The original SAL library, ``sal.stability.protect_mask``.
  """
  if _validation.is_python_number(threshold) and not 0.0 <= threshold < 1.0:
    raise ValueError(
        f"sal_jax: protect_mask threshold must be in [0, 1), got {threshold} "
        "(the ramp 1 - (s - t) / (1 - t) is undefined at t = 1).")
  t = jnp.asarray(threshold, _F32)
  def mask(s, p):
    p = jnp.asarray(p)
    s = jnp.asarray(s, _F32)
    m = jnp.where(s >= t, 1.0 - (s - t) / (1.0 - t), 1.0)
    dtype = p.dtype if jnp.issubdtype(p.dtype, jnp.floating) else _F32
    return jnp.broadcast_to(m, p.shape).astype(dtype)
  if isinstance(params, Mapping) and isinstance(scores, Mapping):
    return jax.tree_util.tree_map_with_path(
        lambda path, p: mask(_lookup(scores, path), p), params)
  if jax.tree.structure(scores) != jax.tree.structure(params):
    raise ValueError(
        "sal_jax: scores and params have different tree structures "
        f"({jax.tree.structure(scores)} vs {jax.tree.structure(params)}).")
  return jax.tree.map(mask, scores, params)


def stability_summary(
    scores: chex.ArrayTree,
    protected_threshold: float = stability_states.PROTECTED_THRESHOLD,
    volatile_threshold: float = stability_states.VOLATILE_THRESHOLD,
) -> dict[str, jax.Array]:
  r"""Mean, spread and state shares of a scores tree.

  .. math::
    \bar s,\ \sigma = \sqrt{\tfrac{1}{N} \textstyle\sum (s - \bar s)^2},\
    \min s,\ \max s,\ 100 \#\{s \ge \tau_p\} / N,\
    100 \#\{\tau_p > s,\ s \le \tau_v\} / N

  The states are counted as by :func:`spectrum` and :func:`classify`.
  Deviation from the original: its summary counts strictly
  (:math:`s > \tau_p`, :math:`s < \tau_v`) while its classifier counts a
  score at a threshold in that state; here every count follows the
  classifier. The standard deviation is the population one. Array leaves
  contribute every element.

  Args:
    scores: a tree of scores.
    protected_threshold: :math:`\tau_p`.
    volatile_threshold: :math:`\tau_v`.

  Returns:
    A dict of float32 scalars: ``mean, std, min, max, protected_pct,
    neutral_pct, volatile_pct`` (all 0 for an empty tree).

  Examples:
    >>> from sal_jax.analysis import stability_summary
    >>> out = stability_summary({"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.3})
    >>> round(float(out["mean"]), 4), float(out["volatile_pct"])  # b and d
    (0.45, 50.0)

  References:
    The original SAL library, ``sal.utils.stability_summary``.
  """
  _check_thresholds(protected_threshold, volatile_threshold)
  keys = ("mean", "std", "min", "max", "protected_pct", "neutral_pct",
          "volatile_pct")
  s = _flat_scores(scores)
  if s.size == 0:
    return {k: jnp.zeros((), _F32) for k in keys}
  masks = stability_states.state_masks(s, protected_threshold,
                                       volatile_threshold)
  prot, vol = (jnp.mean(m.astype(_F32)) * 100.0 for m in masks)
  vals = (jnp.mean(s), jnp.std(s), jnp.min(s), jnp.max(s), prot,
          100.0 - prot - vol, vol)
  return dict(zip(keys, vals))
