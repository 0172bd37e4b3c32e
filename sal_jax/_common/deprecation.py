"""Names that moved: old import paths that still resolve, with a warning.

A package that lost names keeps them reachable for one release through a
module-level ``__getattr__`` (PEP 562), which only runs for names the module
does not define, so current names cost nothing.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable
import warnings


def moved_names(module: str, moved: dict[str, str]) -> Callable[[str], Any]:
  """A module ``__getattr__`` that resolves moved names with a warning.

  Args:
    module: the name of the module that lost the names, e.g. ``"sal_jax"``.
    moved: each old name mapped to the module that holds it now.

  Returns:
    A function for the module's ``__getattr__``: for a moved name it warns
    with a ``DeprecationWarning`` naming the new location and returns the
    object from there; for any other name it raises ``AttributeError``.

  Examples:
    >>> import warnings
    >>> getattr_ = moved_names("old", {"sqrt": "math"})
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   f = getattr_("sqrt")
    >>> f(4.0)
    2.0
    >>> print(caught[0].message)  # doctest: +NORMALIZE_WHITESPACE
    old.sqrt moved to math.sqrt; the old path will be removed in the next
    release.
  """

  def __getattr__(name: str) -> Any:
    new = moved.get(name)
    if new is None:
      raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        f"{module}.{name} moved to {new}.{name}; the old path will be "
        "removed in the next release.", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(new), name)

  return __getattr__
