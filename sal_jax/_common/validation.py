"""Hyperparameter checks shared by protect, the estimators and the baselines.

One rule for every numeric hyperparameter:

* a Python number (``int``, ``float`` or a NumPy scalar; not ``bool``) is
  checked for its range when the transformation is built;
* an array (a JAX or NumPy scalar array, or a tracer, as
  ``optax.inject_hyperparams`` passes them) is checked for its shape and
  dtype only: its value may not be known yet (under ``jit`` it is not);
* anything else (a string, a bool, a list, ``None`` where none is allowed)
  raises ``TypeError`` naming the argument, instead of failing later, or
  not at all (``"0.5" > 0`` raises, but ``float("0.5")`` was never meant).

This module imports nothing from sal_jax.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_python_number(x: Any) -> bool:
  """Whether ``x`` is a real Python (or NumPy scalar) number, not a bool."""
  return (isinstance(x, numbers.Real)
          and not isinstance(x, (bool, np.bool_)))


def _is_scalar_array(x: Any, integer: bool) -> bool:
  if not isinstance(x, (jax.Array, np.ndarray)) or jnp.ndim(x) != 0:
    return False
  kinds = (jnp.integer,) if integer else (jnp.integer, jnp.floating)
  return any(jnp.issubdtype(x.dtype, kind) for kind in kinds)


def _interval(low, high, low_open, high_open) -> str:
  return (f"{'(' if low_open else '['}{low}, {high}"
          f"{')' if high_open or high == math.inf else ']'}")


def check_number(
    where: str,
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> None:
  """Checks a numeric hyperparameter by the rule of this module.

  Args:
    where: the public function, for messages (e.g. ``"sal_jax.protect"``).
    name: the argument's name.
    value: the value given.
    low: lower bound of the allowed interval.
    high: upper bound of the allowed interval.
    low_open: exclude ``low``.
    high_open: exclude ``high``.
    integer: only integers (Python ints, integer scalar arrays).
    optional: ``None`` is allowed.

  Raises:
    TypeError: ``value`` is neither a number nor a scalar array of a real
      dtype (an integer one if ``integer``), or is ``None`` when not
      ``optional``.
    ValueError: ``value`` is a Python number outside the interval, or NaN.
  """
  if value is None and optional:
    return
  if is_python_number(value):
    if integer and not isinstance(value, numbers.Integral):
      raise TypeError(
          f"{where}: {name} must be an integer, got {value!r}.")
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if bad_low or bad_high or value != value:
      raise ValueError(
          f"{where}: {name} must be in "
          f"{_interval(low, high, low_open, high_open)}, got {value!r}.")
    return
  if _is_scalar_array(value, integer):
    return  # possibly a tracer: its value is checked nowhere
  kind = "an integer" if integer else "a real number"
  raise TypeError(
      f"{where}: {name} must be {kind} or a scalar array"
      f"{' or None' if optional else ''}, got {type(value).__name__} "
      f"{value!r}.")


def check_choice(where: str, name: str, value: Any, types: type | tuple,
                 optional: bool = False) -> None:
  """Raises ``TypeError`` unless ``value`` is an instance of ``types``.

  For the non-numeric hyperparameters (names, flags); which values of the
  right type are valid is the caller's business.
  """
  if value is None and optional:
    return
  if isinstance(types, type):
    types = (types,)
  if not isinstance(value, types):
    expected = " or ".join(t.__name__ for t in types)
    raise TypeError(
        f"{where}: {name} must be a {expected}"
        f"{' or None' if optional else ''}, got {type(value).__name__} "
        f"{value!r}.")


def check_pair(where: str, name: str, value: Any, meaning: str) -> tuple:
  """``value`` as a pair (a tuple or list of two); ``meaning`` names them."""
  check_choice(where, name, value, (tuple, list))
  if len(value) != 2:
    raise ValueError(f"{where}: {name} must be {meaning}, got {value!r}.")
  return tuple(value)
