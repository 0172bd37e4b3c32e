"""Tree utilities used across sal_jax.

This is the bottom of the package: it imports nothing from sal_jax.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

# optax's own wording, so users see the message they know from optax.
MISSING_PARAMS_MESSAGE = (
    "You are using a transformation that requires the current value of "
    "parameters, but you are not passing `params` when calling `update`."
)


def check_same_structure(
    updates: chex.ArrayTree,
    params: chex.ArrayTree,
    what: str = "updates",
    other: str = "params",
) -> None:
  """Raises ``ValueError`` if two trees differ in structure or leaf shapes.

  Runs at trace time only (structures and shapes are static), so it costs
  nothing inside a compiled step.

  Args:
    updates: first tree.
    params: second tree.
    what: name of the first tree in the error message.
    other: name of the second tree in the error message.

  Raises:
    ValueError: naming the first path whose structure or shape differs.
  """
  treedef_u = jax.tree.structure(updates)
  treedef_p = jax.tree.structure(params)
  if treedef_u != treedef_p:
    paths_u = {jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(updates)[0]}
    paths_p = {jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(params)[0]}
    only_u = sorted(paths_u - paths_p)[:5]
    only_p = sorted(paths_p - paths_u)[:5]
    detail = []
    if only_u:
      detail.append(f"only in {what}: {only_u}")
    if only_p:
      detail.append(f"only in {other}: {only_p}")
    if not detail:
      detail.append(f"{what} structure {treedef_u} vs {other} structure "
                    f"{treedef_p}")
    raise ValueError(
        f"sal_jax: {what} and {other} have different tree structures "
        f"({'; '.join(detail)}).")
  leaves_u = jax.tree_util.tree_flatten_with_path(updates)[0]
  leaves_p = jax.tree.leaves(params)
  for (path, u), p in zip(leaves_u, leaves_p):
    if jnp.shape(u) != jnp.shape(p):
      raise ValueError(
          f"sal_jax: {what} and {other} differ in shape at "
          f"{jax.tree_util.keystr(path)}: {jnp.shape(u)} vs {jnp.shape(p)}.")


def check_state_tree(seen: chex.ArrayTree, params: chex.ArrayTree,
                     where: str) -> None:
  """Raises ``ValueError`` if a state tree kept per param (``seen``) has
  another structure than ``params``: the state was initialised for other
  params."""
  if jax.tree.structure(seen) != jax.tree.structure(params):
    raise ValueError(
        f"{where}: the optimizer state was initialised for a different "
        "params tree than the one passed to update "
        f"({jax.tree.structure(seen)} vs {jax.tree.structure(params)}).")


def state_dtype(x: chex.Array) -> jnp.dtype:
  """Dtype of a copy or running average of a parameter leaf: >= float32.

  bfloat16 and float16 params get float32 (a running average in half
  precision loses the small steps it adds up); float32, float64 and complex
  params keep their own dtype, so that a pull toward an anchor is exact at
  the params' precision.
  """
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def difference(p: chex.Array, a: chex.Array) -> jax.Array:
  """``p - a`` in their common dtype promoted to at least float32.

  An anchor kept in bfloat16 (an exact copy of bfloat16 params) is then
  subtracted without rounding the difference to bfloat16.
  """
  dtype = jnp.promote_types(jnp.promote_types(jnp.result_type(p),
                                              jnp.result_type(a)),
                            jnp.float32)
  return p.astype(dtype) - a.astype(dtype)


def real_dtype(dtype: Any) -> jnp.dtype:
  """The real counterpart of a float dtype (complex64 -> float32)."""
  return jnp.finfo(dtype).dtype


def to_real(x: chex.Array, dtype: Any = jnp.float32) -> jax.Array:
  """``x`` as a real ``dtype`` array, for statistics of its magnitude.

  A real ``x`` is only cast (its sign kept); a complex ``x`` becomes
  ``|x|``. Either way the squares and absolute values of the result are
  those of ``x``, so norms, energies and ``|g|`` sums work on both.
  """
  if jnp.iscomplexobj(x):
    return jnp.abs(x).astype(dtype)
  return x.astype(dtype)


def real_product(a: chex.Array, b: chex.Array) -> jax.Array:
  """``a * b``, or ``Re(conj(a) b)`` (the real inner product) if complex."""
  if jnp.iscomplexobj(a) or jnp.iscomplexobj(b):
    return jnp.real(jnp.conj(a) * b)
  return a * b


def decay_power(decay: Any, count: jax.Array) -> jax.Array:
  """``decay ** count`` in float32 (with x64 on, a Python float raised to an
  int32 count would be float64)."""
  return jnp.asarray(decay, jnp.float32) ** count


def all_finite(tree: chex.ArrayTree) -> jax.Array:
  """Whether every entry of every leaf is finite (a bool scalar).

  As the sum of ``0 * x``: NaN exactly when an entry is NaN or infinite,
  one reduction per leaf with no elementwise boolean temporary (XLA writes
  ``isfinite(x)`` to a full-size array before reducing it).
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.ones((), jnp.bool_)
  return jnp.isfinite(sum(jnp.sum(jnp.zeros((), x.dtype) * x)
                          for x in leaves))


def square_sums(tree: chex.ArrayTree) -> chex.ArrayTree:
  """Each leaf's sum of squared magnitudes, float32 scalars (same tree).

  The estimators and ``protect`` spell it alike, so that XLA computes it
  once per step however many of them ask for it.
  """
  return jax.tree.map(lambda x: jnp.sum(jnp.square(to_real(x))), tree)


def leaf_norms(tree: chex.ArrayTree) -> chex.ArrayTree:
  """L2 norm of every leaf, as float32 scalars (same tree structure)."""
  return jax.tree.map(jnp.sqrt, square_sums(tree))


def mean_square(tree: chex.ArrayTree) -> jax.Array:
  """Mean of the squared entries over all leaves (float32 scalar)."""
  size = max(sum(x.size for x in jax.tree.leaves(tree)), 1)
  return sum(jax.tree.leaves(square_sums(tree))) / size
