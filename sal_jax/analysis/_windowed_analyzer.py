"""The windowed stability analyzer: the exact original, over a ring buffer.

The state keeps the last ``H`` weights per leaf; the gradient window is kept
as the consistency values of its consecutive pairs (all the score needs).
The public entry points are ``analyzer_init`` / ``analyzer_update`` /
``analyzer_scores`` in :mod:`sal_jax.analysis._analyzer`.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from sal_jax.analysis import _analyzer_score as score
from sal_jax.analysis._analyzer_score import F32


class WindowedAnalyzerState(NamedTuple):
  """State of the windowed (exact) analyzer; ``H`` is ``weights`` axis 0."""
  count: jax.Array  # int32: weights seen
  weights: chex.ArrayTree  # per leaf (H, *shape), ring buffer
  grad_count: jax.Array  # int32: gradients seen
  prev_grads: chex.ArrayTree  # last gradient per leaf
  pairs: chex.ArrayTree  # per leaf (H,) float32: (cos + 1)/2 of pair ending there
  pair_valid: chex.ArrayTree  # per leaf (H,) bool: both norms > 1e-8


def windowed_init(params: chex.ArrayTree, h: int) -> WindowedAnalyzerState:
  """Empty windows of ``h`` steps for the (array) leaves of ``params``."""
  fill = lambda dtype, shape: jax.tree.map(
      lambda p: jnp.zeros(shape, dtype), params)
  return WindowedAnalyzerState(
      count=jnp.zeros((), jnp.int32),
      weights=jax.tree.map(lambda p: jnp.zeros((h,) + p.shape, p.dtype),
                           params),
      grad_count=jnp.zeros((), jnp.int32),
      prev_grads=jax.tree.map(jnp.zeros_like, params),
      pairs=fill(F32, (h,)), pair_valid=fill(bool, (h,)))


def windowed_update(state, params, grads):
  """Weights to slot ``t mod H``, the pair value to slot ``t_g mod H``."""
  leaves = jax.tree.leaves(state.pairs)
  h = leaves[0].shape[0] if leaves else 1
  slot = state.count % h
  weights = jax.tree.map(lambda buf, w: buf.at[slot].set(w.astype(buf.dtype)),
                         state.weights, params)
  state = state._replace(count=state.count + 1, weights=weights)
  if grads is None:
    return state
  gslot = state.grad_count % h
  has_prev = state.grad_count > 0
  def pair(prev, g, pairs, valid):
    c, ok = score.pair_consistency(prev, g)
    return pairs.at[gslot].set(c), valid.at[gslot].set(ok & has_prev)
  pairs, valid = score.map_unzip(pair, 2, state.prev_grads, grads,
                                 state.pairs, state.pair_valid)
  return state._replace(
      grad_count=state.grad_count + 1, pairs=pairs, pair_valid=valid,
      prev_grads=jax.tree.map(lambda p, g: g.astype(p.dtype),
                              state.prev_grads, grads))


def windowed_scores(state):
  """The score of every leaf, from the filled part of its window."""
  def leaf(buf, pairs, valid):
    h = buf.shape[0]
    n = jnp.minimum(state.count, h)
    nf = n.astype(F32)
    w = buf.astype(F32)
    filled = (jnp.arange(h) < n).reshape((h,) + (1,) * (w.ndim - 1))
    mean = jnp.sum(jnp.where(filled, w, 0.0), 0) / jnp.maximum(nf, 1.0)
    var = jnp.sum(jnp.where(filled, jnp.square(w - mean), 0.0), 0) / (
        jnp.maximum(nf - 1.0, 1.0))
    weight_score = 1.0 / (1.0 + 100.0 * jnp.mean(var))
    first = w[jnp.where(state.count >= h, state.count % h, 0)]
    last = w[(state.count - 1) % h]
    change_score = 1.0 / (1.0 + jnp.linalg.norm(last - first))
    # The slot of the window's oldest gradient holds a pair whose first
    # gradient has left the window.
    oldest = jnp.where(state.grad_count >= h, state.grad_count % h, -1)
    mask = valid & (jnp.arange(h) != oldest)
    npairs = jnp.sum(mask)
    grad_score = jnp.sum(jnp.where(mask, pairs, 0.0)) / jnp.maximum(
        npairs, 1).astype(F32)
    return score.combine(n >= 2, weight_score, change_score, npairs > 0,
                         grad_score)
  return jax.tree.map(leaf, state.weights, state.pairs, state.pair_valid)
