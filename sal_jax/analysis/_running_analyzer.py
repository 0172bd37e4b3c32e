"""The running stability analyzer: memory independent of the window length.

Equal to the windowed analyzer for the first ``H`` updates (Welford mean and
unbiased variance, the first weight as anchor of the change term, cumulative
mean of the pair values), exponential forgetting matched to the window
afterwards; the rates are derived in ``analyzer_init``'s docstring
(:mod:`sal_jax.analysis._analyzer`), the public entry point.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from sal_jax.analysis import _analyzer_score as score
from sal_jax.analysis._analyzer_score import F32


class RunningAnalyzerState(NamedTuple):
  """State of the running analyzer; no leaf's shape depends on ``H``."""
  history_length: jax.Array  # int32 scalar H
  count: jax.Array  # int32: weights seen
  mean: chex.ArrayTree  # float32, running mean of the weights
  var: chex.ArrayTree  # float32, running (unbiased while count <= H) variance
  anchor: chex.ArrayTree  # float32, the window's first weight
  change: chex.ArrayTree  # float32 scalar per leaf: ||w_last - anchor||
  grad_count: jax.Array  # int32: gradients seen
  prev_grads: chex.ArrayTree  # last gradient per leaf
  pair_mean: chex.ArrayTree  # float32 scalar per leaf
  pair_count: chex.ArrayTree  # int32 scalar per leaf, valid pairs (capped H)
  last_pair: chex.ArrayTree  # int32 scalar per leaf: gradient index, 0 none


def running_init(params: chex.ArrayTree, h: int) -> RunningAnalyzerState:
  """Empty running statistics for the (array) leaves of ``params``."""
  fill = lambda dtype, shape=None: jax.tree.map(
      lambda p: jnp.zeros(p.shape if shape is None else shape, dtype), params)
  return RunningAnalyzerState(
      history_length=jnp.asarray(h, jnp.int32),
      count=jnp.zeros((), jnp.int32),
      mean=fill(F32), var=fill(F32), anchor=fill(F32),
      change=fill(F32, ()),
      grad_count=jnp.zeros((), jnp.int32),
      prev_grads=jax.tree.map(jnp.zeros_like, params),
      pair_mean=fill(F32, ()), pair_count=fill(jnp.int32, ()),
      last_pair=fill(jnp.int32, ()))


def running_update(state, params, grads):
  """Welford while ``count <= H``, window-matched forgetting afterwards."""
  h = state.history_length
  hf = h.astype(F32)
  t = state.count + 1
  tf = t.astype(F32)
  c = 12.0 / (hf * (hf + 1.0))
  alpha_var = (jnp.sqrt(c * c + 4.0 * c) - c) / 2.0
  def moments(mean, var, anchor, w):
    w = w.astype(F32)
    d = w - mean
    new_mean = mean + d * jnp.where(t <= h, 1.0 / tf, alpha_var)
    welford = (var * (tf - 2.0) + d * (w - new_mean)) / jnp.maximum(
        tf - 1.0, 1.0)
    ew = (1.0 - alpha_var) * (var + alpha_var * d * d)
    new_var = jnp.where(t <= h, jnp.where(t >= 2, welford, 0.0), ew)
    new_anchor = jnp.where(t == 1, w, jnp.where(t <= h, anchor,
                                                anchor + (w - anchor) / hf))
    return new_mean, new_var, new_anchor, jnp.linalg.norm(w - new_anchor)
  mean, var, anchor, change = score.map_unzip(
      moments, 4, state.mean, state.var, state.anchor, params)
  state = state._replace(count=t, mean=mean, var=var, anchor=anchor,
                         change=change)
  if grads is None:
    return state
  index = state.grad_count + 1  # 1-based index of this gradient
  has_prev = state.grad_count > 0
  def pair(prev, g, pmean, pcount, last):
    c, ok = score.pair_consistency(prev, g)
    ok = ok & has_prev
    pcount = jnp.minimum(pcount + ok.astype(jnp.int32), h)
    rate = jnp.where(pcount <= h - 1,
                     1.0 / jnp.maximum(pcount, 1).astype(F32), 2.0 / hf)
    pmean = jnp.where(ok, pmean + (c - pmean) * rate, pmean)
    return pmean, pcount, jnp.where(ok, index, last)
  pmean, pcount, last = score.map_unzip(pair, 3, state.prev_grads, grads,
                                        state.pair_mean, state.pair_count,
                                        state.last_pair)
  return state._replace(
      grad_count=index, pair_mean=pmean, pair_count=pcount, last_pair=last,
      prev_grads=jax.tree.map(lambda p, g: g.astype(p.dtype),
                              state.prev_grads, grads))


def running_scores(state):
  """The score of every leaf; signal availability as the windowed rule."""
  h = state.history_length
  w_avail = jnp.minimum(state.count, h) >= 2
  first_in_window = state.grad_count - jnp.minimum(state.grad_count, h) + 2
  def leaf(var, change, pmean, last):
    g_avail = (last >= 2) & (last >= first_in_window)
    return score.combine(w_avail, 1.0 / (1.0 + 100.0 * jnp.mean(var)),
                         1.0 / (1.0 + change), g_avail, pmean)
  return jax.tree.map(leaf, state.var, state.change, state.pair_mean,
                      state.last_pair)
