"""Estimators by name: what ``protect(estimator="...")`` accepts."""

from __future__ import annotations

from typing import Callable

from sal_jax._common import units as _units
from sal_jax._protect import consolidation as _consolidation
from sal_jax._protect import estimators as _estimators
from sal_jax._protect import shift_consolidation as _shift_consolidation

# name -> factory(granularity=...) -> StabilityEstimator
ESTIMATORS: dict[str, Callable[..., _estimators.StabilityEstimator]] = {
    "consolidation": _consolidation.consolidation_estimator,
    "reference": _estimators.reference_estimator,
    "shift_consolidation": (
        _shift_consolidation.shift_consolidation_estimator),
}


def get_estimator(estimator: str | _estimators.StabilityEstimator,
                  granularity: str | None = None
                  ) -> _estimators.StabilityEstimator:
  """Resolves an estimator name (or passes an instance through).

  Args:
    estimator: a name in :data:`ESTIMATORS` or a
      :class:`~sal_jax.StabilityEstimator`.
    granularity: ``"leaf"``, ``"element"`` or (shift consolidation only)
      ``"factored"`` or ``"kronecker"``, passed to named estimators
      (``None``: the estimator's own default); for an instance, ``None`` or
      its own granularity.

  Returns:
    The :class:`~sal_jax.StabilityEstimator`.

  Raises:
    TypeError: for an estimator or granularity of the wrong type.
    ValueError: for an unknown name or granularity, or a granularity that
      contradicts the instance's.

  Examples:
    >>> import sal_jax as sal
    >>> sal.get_estimator("reference").restoring_force is None
    True
  """
  if granularity is not None:
    _estimators.validate_granularity(granularity, _units.UNITS)
  if isinstance(estimator, _estimators.StabilityEstimator):
    if granularity not in (None, estimator.granularity):
      raise ValueError(
          f"sal_jax: granularity={granularity!r} contradicts the estimator "
          f"instance, whose granularity is {estimator.granularity!r}.")
    return estimator
  if isinstance(estimator, str) and estimator in ESTIMATORS:
    if granularity is None:
      return ESTIMATORS[estimator]()  # the estimator's own default
    return ESTIMATORS[estimator](granularity=granularity)
  if not isinstance(estimator, str):
    raise TypeError(
        "sal_jax: estimator must be a str or a StabilityEstimator, got "
        f"{type(estimator).__name__} {estimator!r}.")
  raise ValueError(
      f"sal_jax: unknown estimator {estimator!r}; expected one of "
      f"{sorted(ESTIMATORS)} or a StabilityEstimator.")
