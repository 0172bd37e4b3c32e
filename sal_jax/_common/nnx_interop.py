"""Optimizer states held by a ``flax.nnx.Optimizer``, without importing flax.

An ``nnx.Optimizer`` keeps its optax state in ``.opt_state`` with every array
wrapped in an nnx ``Variable``. The helpers here let functions that rewrite an
optax state (``sal.consolidate``, ``baselines.ewc_consolidate``) accept the
optimizer itself; flax is looked up in ``sys.modules`` only, so the library
never imports it.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import jax


def _nnx():
  return sys.modules.get("flax.nnx")


def unwrap_variables(tree: Any) -> Any:
  """A pytree with any ``flax.nnx`` Variable replaced by its value."""
  nnx = _nnx()
  if nnx is None:
    return tree
  is_variable = lambda v: isinstance(v, nnx.Variable)  # noqa: E731
  return jax.tree.map(lambda v: v.get_value() if is_variable(v) else v,
                      tree, is_leaf=is_variable)


def rewrite_state(opt_state: Any, fn: Callable[[Any], Any],
                  caller: str) -> Any:
  """``fn(opt_state)``, or for an ``nnx.Optimizer`` the same rewrite in place.

  Args:
    opt_state: an optax state (a pytree of arrays) or an ``nnx.Optimizer``.
    fn: maps an optax state to the new optax state, same structure.
    caller: the public name, for errors.

  Returns:
    The new optax state, or the optimizer itself, updated.

  Raises:
    ValueError: for a state holding nnx Variables outside an optimizer (its
      arrays could not be updated in place).
  """
  nnx = _nnx()
  if nnx is not None and isinstance(opt_state, nnx.Optimizer):
    new = fn(unwrap_variables(opt_state.opt_state))
    nnx.update(opt_state.opt_state, nnx.state(new))
    return opt_state
  if nnx is not None and any(
      isinstance(v, nnx.Variable) for v in jax.tree.leaves(
          opt_state, is_leaf=lambda v: isinstance(v, nnx.Variable))):
    raise ValueError(
        f"{caller}: the optimizer state holds flax.nnx Variables; pass the "
        "nnx.Optimizer itself.")
  return fn(opt_state)
