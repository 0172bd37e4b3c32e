"""The stability score, as both analyzers compute it.

What the windowed and the running analyzer (:mod:`sal_jax.analysis._analyzer`)
compute alike: one gradient pair's consistency ``(cos + 1) / 2`` (and
whether both norms exceed ``1e-8``), and a leaf's score, the mean of the
signals available (weight variance, change, gradient consistency; 0.5 when
none is).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-8
NO_SIGNAL_SCORE = 0.5
F32 = jnp.float32


def check_history_length(history_length) -> int:
  if (isinstance(history_length, bool)
      or not isinstance(history_length, (int, np.integer))
      or history_length < 1):
    raise ValueError(
        "sal_jax: history_length must be an integer >= 1, got "
        f"{history_length!r}.")
  return int(history_length)


def pair_consistency(prev, curr):
  """``(cos + 1)/2`` of two gradients and whether both norms exceed 1e-8."""
  a = jnp.ravel(prev).astype(F32)
  b = jnp.ravel(curr).astype(F32)
  na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
  cos = jnp.dot(a, b) / jnp.maximum(na * nb, EPS)
  return (cos + 1.0) / 2.0, (na > EPS) & (nb > EPS)


def map_unzip(fn, n, tree, *rest):
  """``jax.tree.map`` of a function returning an n-tuple -> n trees."""
  treedef = jax.tree.structure(tree)
  out = treedef.flatten_up_to(jax.tree.map(fn, tree, *rest))
  return tuple(treedef.unflatten([o[i] for o in out]) for i in range(n))


def combine(w_avail, weight_score, change_score, g_avail, grad_score):
  """Mean of the available signals (0.5 when none is available)."""
  num = 2 * w_avail.astype(F32) + g_avail.astype(F32)
  total = (jnp.where(w_avail, weight_score + change_score, 0.0)
           + jnp.where(g_avail, grad_score, 0.0))
  return jnp.where(num > 0, total / jnp.maximum(num, 1.0),
                   NO_SIGNAL_SCORE).astype(F32)
