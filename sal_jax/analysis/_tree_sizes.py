"""Sizes of parameter trees: their global norm and their number of entries."""

from __future__ import annotations

import chex
import jax
import optax

from sal_jax._common import tree_utils as _tree_utils


def tree_norm(tree: chex.ArrayTree) -> jax.Array:
  r"""Global L2 norm over all leaves, accumulated in float32.

  .. math::
    \|x\| = \Big(\textstyle\sum_\ell \sum_j |x_{\ell j}|^2\Big)^{1/2}

  ``optax.tree_utils.tree_norm`` of the leaves cast to float32 (complex
  leaves to their magnitudes), so half-precision gradients do not
  accumulate their squares in half precision.

  Args:
    tree: a pytree of arrays (real or complex).

  Returns:
    A float32 scalar; 0 for an empty tree.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.analysis import tree_norm
    >>> tree_norm({"a": jnp.array([3.0]), "b": jnp.array([[4.0]])})
    Array(5., dtype=float32)

  References:
    The original SAL library, ``sal.utils`` (the norm of a model's gradients).
  """
  real = jax.tree.map(lambda x: _tree_utils.to_real(jax.numpy.asarray(x)),
                      tree)
  return jax.numpy.asarray(optax.tree_utils.tree_norm(real), jax.numpy.float32)


def parameter_count(tree: chex.ArrayTree) -> int:
  """Total number of entries over all leaves (a Python int).

  ``optax.tree_utils.tree_size``, under the original's name.

  Args:
    tree: a pytree of arrays or numbers.

  Returns:
    The number of entries.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.analysis import parameter_count
    >>> parameter_count({"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)})
    16

  References:
    The original SAL library, ``sal.utils`` (the parameter count of a model).
  """
  return int(optax.tree_utils.tree_size(tree))
