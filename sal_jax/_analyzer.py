"""Stability analyzers: how settled each parameter leaf is, from its history.

A leaf's score in ``[0, 1]`` is the mean of the signals available: weight
variance ``1 / (1 + 100 mean(var_unbiased(w)))`` and change
``1 / (1 + ||w_last - w_first||)`` (both need two weights in the window), and
gradient consistency, the mean of ``(cos(g_{i-1}, g_i) + 1) / 2`` over the
window's consecutive gradient pairs whose norms both exceed ``1e-8`` (needs
one such pair); 0.5 when none is available.

* windowed (:func:`analyzer_init`): the exact original, a ring buffer of the
  last ``H`` weights per leaf; the gradient window is kept as the
  consistency values of its consecutive pairs (all the score needs).
* running (``analyzer_init(..., running=True)``): memory independent of ``H``;
  equal to the windowed one for the first ``H`` updates, exponential
  forgetting matched to the window afterwards.

States are ``NamedTuple`` s of fixed-shape arrays: an update compiles once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sal_jax import _tree_utils

VOLATILE = 0
NEUTRAL = 1
PROTECTED = 2
STATE_NAMES = ("volatile", "neutral", "protected")  # indexed by code

_EPS = 1e-8
_NO_SIGNAL_SCORE = 0.5
_F32 = jnp.float32


class WindowedAnalyzerState(NamedTuple):
  """State of the windowed (exact) analyzer; ``H`` is ``weights`` axis 0."""
  count: jax.Array  # int32: weights seen
  weights: chex.ArrayTree  # per leaf (H, *shape), ring buffer
  grad_count: jax.Array  # int32: gradients seen
  prev_grads: chex.ArrayTree  # last gradient per leaf
  pairs: chex.ArrayTree  # per leaf (H,) float32: (cos + 1)/2 of pair ending there
  pair_valid: chex.ArrayTree  # per leaf (H,) bool: both norms > 1e-8


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


AnalyzerState = Union[WindowedAnalyzerState, RunningAnalyzerState]


def _check_history_length(history_length) -> int:
  if (isinstance(history_length, bool)
      or not isinstance(history_length, (int, np.integer))
      or history_length < 1):
    raise ValueError(
        "sal_jax: history_length must be an integer >= 1, got "
        f"{history_length!r}.")
  return int(history_length)


def _check_thresholds(protected_threshold, volatile_threshold) -> None:
  """Eager checks of Python-number thresholds (traced ones pass)."""
  vals = (protected_threshold, volatile_threshold)
  if not all(isinstance(x, (int, float)) for x in vals):
    return
  if not all(math.isfinite(x) for x in vals):
    raise ValueError(f"sal_jax: thresholds must be finite, got {vals}.")
  if volatile_threshold > protected_threshold:
    raise ValueError(
        f"sal_jax: volatile_threshold ({volatile_threshold}) must not exceed "
        f"protected_threshold ({protected_threshold}).")


def _pair_consistency(prev, curr):
  """``(cos + 1)/2`` of two gradients and whether both norms exceed 1e-8."""
  a = jnp.ravel(prev).astype(_F32)
  b = jnp.ravel(curr).astype(_F32)
  na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
  cos = jnp.dot(a, b) / jnp.maximum(na * nb, _EPS)
  return (cos + 1.0) / 2.0, (na > _EPS) & (nb > _EPS)


def _map_unzip(fn, n, tree, *rest):
  """``jax.tree.map`` of a function returning an n-tuple -> n trees."""
  treedef = jax.tree.structure(tree)
  out = treedef.flatten_up_to(jax.tree.map(fn, tree, *rest))
  return tuple(treedef.unflatten([o[i] for o in out]) for i in range(n))


def _combine(w_avail, weight_score, change_score, g_avail, grad_score):
  num = 2 * w_avail.astype(_F32) + g_avail.astype(_F32)
  total = (jnp.where(w_avail, weight_score + change_score, 0.0)
           + jnp.where(g_avail, grad_score, 0.0))
  return jnp.where(num > 0, total / jnp.maximum(num, 1.0),
                   _NO_SIGNAL_SCORE).astype(_F32)


def analyzer_init(params: chex.ArrayTree, history_length: int = 50,
                  running: bool = False) -> AnalyzerState:
  r"""Initialises a stability analyzer with empty windows of ``H`` steps.

  .. math::
    s = \operatorname{mean}\{1/(1 + 100\,\overline{\operatorname{var}}(w)),\;
    \overline{(\cos(g_{i-1}, g_i) + 1)/2},\; 1/(1 + \|w_H - w_1\|)\}

  over the signals available in the window (0.5 when none).

  The running analyzer (``running=True``) equals the windowed one for the
  first :math:`H` updates (Welford mean and unbiased variance, the first
  weight as anchor of the change term, cumulative mean of the pair values);
  then the window becomes exponential forgetting, with :math:`d = w - \mu`
  and pair values :math:`p`:

  .. math::
    \mu \leftarrow \mu + \alpha d, \quad
    v \leftarrow (1 - \alpha)(v + \alpha d^2), \quad
    a \leftarrow a + (w - a) / H, \quad
    \bar p \leftarrow \bar p + \tfrac{2}{H} (p - \bar p),
    \qquad \frac{\alpha^2}{1 - \alpha} = \frac{12}{H (H + 1)}.

  Each rate matches the window: for weights drifting linearly
  (:math:`w_t = w_0 + b t`) the steady-state variance is exactly the
  window's :math:`b^2 H (H + 1) / 12` and the anchor exactly the window's
  first weight :math:`w_{t-H+1}`; the pair EMA has the mean age
  :math:`(H - 2)/2` of the window's :math:`H - 1` pairs (exact for
  :math:`H = 2`). Stationary noise gets :math:`2(1-\alpha)/(2-\alpha)` times
  its variance. Whether each signal is available follows the windowed rule
  exactly.

  Args:
    params: the parameter tree to watch.
    history_length: window length ``H >= 1``.
    running: keep running statistics (about four copies of ``params``, no
      shape depends on ``H``) instead of a window of ``H`` weights.

  Returns:
    A :class:`WindowedAnalyzerState` or a :class:`RunningAnalyzerState`.

  Raises:
    ValueError: if ``history_length`` is not an integer ``>= 1``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import analyzer_init
    >>> analyzer_init({"w": jnp.zeros(3)}, history_length=4).weights["w"].shape
    (4, 3)
    >>> analyzer_init({"w": jnp.zeros(3)}, 500, running=True).var["w"].shape
    (3,)

  References:
    The original SAL library, ``sal.stability.StabilityAnalyzer``; T. Finch,
    "Incremental calculation of weighted mean and variance" (2009).
  """
  h = _check_history_length(history_length)
  params = jax.tree.map(jnp.asarray, params)
  fill = lambda dtype, shape=None: jax.tree.map(
      lambda p: jnp.zeros(p.shape if shape is None else shape, dtype), params)
  if not running:
    return WindowedAnalyzerState(
        count=jnp.zeros((), jnp.int32),
        weights=jax.tree.map(lambda p: jnp.zeros((h,) + p.shape, p.dtype),
                             params),
        grad_count=jnp.zeros((), jnp.int32),
        prev_grads=jax.tree.map(jnp.zeros_like, params),
        pairs=fill(_F32, (h,)), pair_valid=fill(bool, (h,)))
  return RunningAnalyzerState(
      history_length=jnp.asarray(h, jnp.int32),
      count=jnp.zeros((), jnp.int32),
      mean=fill(_F32), var=fill(_F32), anchor=fill(_F32),
      change=fill(_F32, ()),
      grad_count=jnp.zeros((), jnp.int32),
      prev_grads=jax.tree.map(jnp.zeros_like, params),
      pair_mean=fill(_F32, ()), pair_count=fill(jnp.int32, ()),
      last_pair=fill(jnp.int32, ()))


def _update_windowed(state, params, grads):
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
    c, ok = _pair_consistency(prev, g)
    return pairs.at[gslot].set(c), valid.at[gslot].set(ok & has_prev)
  pairs, valid = _map_unzip(pair, 2, state.prev_grads, grads, state.pairs,
                            state.pair_valid)
  return state._replace(
      grad_count=state.grad_count + 1, pairs=pairs, pair_valid=valid,
      prev_grads=jax.tree.map(lambda p, g: g.astype(p.dtype),
                              state.prev_grads, grads))


def _update_running(state, params, grads):
  h = state.history_length
  hf = h.astype(_F32)
  t = state.count + 1
  tf = t.astype(_F32)
  c = 12.0 / (hf * (hf + 1.0))
  alpha_var = (jnp.sqrt(c * c + 4.0 * c) - c) / 2.0
  def moments(mean, var, anchor, w):
    w = w.astype(_F32)
    d = w - mean
    new_mean = mean + d * jnp.where(t <= h, 1.0 / tf, alpha_var)
    welford = (var * (tf - 2.0) + d * (w - new_mean)) / jnp.maximum(
        tf - 1.0, 1.0)
    ew = (1.0 - alpha_var) * (var + alpha_var * d * d)
    new_var = jnp.where(t <= h, jnp.where(t >= 2, welford, 0.0), ew)
    new_anchor = jnp.where(t == 1, w, jnp.where(t <= h, anchor,
                                                anchor + (w - anchor) / hf))
    return new_mean, new_var, new_anchor, jnp.linalg.norm(w - new_anchor)
  mean, var, anchor, change = _map_unzip(moments, 4, state.mean, state.var,
                                         state.anchor, params)
  state = state._replace(count=t, mean=mean, var=var, anchor=anchor,
                         change=change)
  if grads is None:
    return state
  index = state.grad_count + 1  # 1-based index of this gradient
  has_prev = state.grad_count > 0
  def pair(prev, g, pmean, pcount, last):
    c, ok = _pair_consistency(prev, g)
    ok = ok & has_prev
    pcount = jnp.minimum(pcount + ok.astype(jnp.int32), h)
    rate = jnp.where(pcount <= h - 1,
                     1.0 / jnp.maximum(pcount, 1).astype(_F32), 2.0 / hf)
    pmean = jnp.where(ok, pmean + (c - pmean) * rate, pmean)
    return pmean, pcount, jnp.where(ok, index, last)
  pmean, pcount, last = _map_unzip(pair, 3, state.prev_grads, grads,
                                   state.pair_mean, state.pair_count,
                                   state.last_pair)
  return state._replace(
      grad_count=index, pair_mean=pmean, pair_count=pcount, last_pair=last,
      prev_grads=jax.tree.map(lambda p, g: g.astype(p.dtype),
                              state.prev_grads, grads))


def analyzer_update(state: AnalyzerState, params: chex.ArrayTree,
                    grads: Optional[chex.ArrayTree] = None) -> AnalyzerState:
  r"""Records one step's weights (and gradients) in an analyzer state.

  Windowed: the weights go to slot :math:`t \bmod H` of the ring; the pair
  value :math:`(\cos(g_{t-1}, g_t) + 1)/2` to slot :math:`t_g \bmod H`.
  Running: see :func:`analyzer_init`.

  Args:
    state: a :class:`WindowedAnalyzerState` or :class:`RunningAnalyzerState`.
    params: current parameters (same structure as at init).
    grads: their gradients, or ``None`` to record weights only (as the
      original does for parameters without ``.grad``).

  Returns:
    The new state, of the same type, shapes and dtypes.

  Raises:
    ValueError: if ``params`` or ``grads`` differ in structure or shape from
      the watched tree.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import analyzer_init, analyzer_update
    >>> s = analyzer_init({"w": jnp.zeros(2)})
    >>> s = analyzer_update(s, {"w": jnp.ones(2)}, {"w": jnp.ones(2)})
    >>> int(s.count), int(s.grad_count)
    (1, 1)

  References:
    The original SAL library, ``sal.stability.StabilityAnalyzer.update``.
  """
  _tree_utils.check_same_structure(params, state.prev_grads, "params",
                                   "analyzer state")
  if grads is not None:
    _tree_utils.check_same_structure(grads, state.prev_grads, "grads",
                                     "analyzer state")
  if isinstance(state, WindowedAnalyzerState):
    return _update_windowed(state, params, grads)
  if isinstance(state, RunningAnalyzerState):
    return _update_running(state, params, grads)
  raise ValueError(f"sal_jax: not an analyzer state: {type(state).__name__}.")


def _scores_windowed(state):
  def leaf(buf, pairs, valid):
    h = buf.shape[0]
    n = jnp.minimum(state.count, h)
    nf = n.astype(_F32)
    w = buf.astype(_F32)
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
        npairs, 1).astype(_F32)
    return _combine(n >= 2, weight_score, change_score, npairs > 0,
                    grad_score)
  return jax.tree.map(leaf, state.weights, state.pairs, state.pair_valid)


def _scores_running(state):
  h = state.history_length
  w_avail = jnp.minimum(state.count, h) >= 2
  first_in_window = state.grad_count - jnp.minimum(state.grad_count, h) + 2
  def leaf(var, change, pmean, last):
    g_avail = (last >= 2) & (last >= first_in_window)
    return _combine(w_avail, 1.0 / (1.0 + 100.0 * jnp.mean(var)),
                    1.0 / (1.0 + change), g_avail, pmean)
  return jax.tree.map(leaf, state.var, state.change, state.pair_mean,
                      state.last_pair)


def analyzer_scores(state: AnalyzerState) -> chex.ArrayTree:
  r"""Stability score of every leaf, in ``[0, 1]``.

  .. math::
    s = \frac{1}{|A|} \sum_{a \in A} a, \quad A \subseteq
    \{s_\text{var}, s_\text{grad}, s_\text{change}\}\ \text{available};
    \quad s = 0.5 \text{ if } A = \emptyset.

  Args:
    state: a windowed or running analyzer state.

  Returns:
    A tree like the params with one float32 scalar per leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import analyzer_init, analyzer_scores, analyzer_update
    >>> s = analyzer_init({"w": jnp.zeros(2)})
    >>> float(analyzer_scores(s)["w"])
    0.5
    >>> for _ in range(2):
    ...   s = analyzer_update(s, {"w": jnp.ones(2)}, {"w": jnp.ones(2)})
    >>> float(analyzer_scores(s)["w"])  # no variance, no change, same grads
    1.0

  References:
    The original SAL library,
    ``sal.stability.StabilityAnalyzer._compute_stability``.
  """
  if isinstance(state, WindowedAnalyzerState):
    return _scores_windowed(state)
  if isinstance(state, RunningAnalyzerState):
    return _scores_running(state)
  raise ValueError(f"sal_jax: not an analyzer state: {type(state).__name__}.")


def classify(scores: chex.ArrayTree, protected_threshold: float = 0.7,
             volatile_threshold: float = 0.3) -> chex.ArrayTree:
  r"""Stability state codes: 2 protected, 1 neutral, 0 volatile.

  .. math::
    c = 2 \text{ if } s \ge \tau_p;\ 0 \text{ if } s \le \tau_v;\ 1
    \text{ otherwise}

  Args:
    scores: a tree of scores (scalars or arrays).
    protected_threshold: :math:`\tau_p`.
    volatile_threshold: :math:`\tau_v \le \tau_p`.

  Returns:
    A tree of int32 codes (``STATE_NAMES[code]`` names them); jittable.

  Raises:
    ValueError: for non-finite thresholds or ``volatile > protected``.

  Examples:
    >>> from sal_jax import classify, state_names
    >>> state_names(classify({"a": 0.9, "b": 0.5, "c": 0.3}))
    {'a': 'protected', 'b': 'neutral', 'c': 'volatile'}

  References:
    The original SAL library,
    ``sal.stability.StabilityAnalyzer._classify_state``.
  """
  _check_thresholds(protected_threshold, volatile_threshold)
  def leaf(s):
    s = jnp.asarray(s, _F32)
    return jnp.where(s >= protected_threshold, PROTECTED,
                     jnp.where(s <= volatile_threshold, VOLATILE,
                               NEUTRAL)).astype(jnp.int32)
  return jax.tree.map(leaf, scores)


def state_names(codes: chex.ArrayTree) -> chex.ArrayTree:
  """Host-side names of state codes: ``"protected"``, ``"neutral"``, ...

  Args:
    codes: a tree of codes from :func:`classify` (concrete, not traced).

  Returns:
    The tree with a ``str`` per scalar code (a numpy array of ``str`` for
    array codes).

  Examples:
    >>> from sal_jax import state_names
    >>> state_names({"a": 2})
    {'a': 'protected'}

  References:
    The original SAL library, ``sal.stability.StabilityState``.
  """
  names = np.asarray(STATE_NAMES)
  def leaf(c):
    c = np.asarray(c)
    return str(names[int(c)]) if c.ndim == 0 else names[c]
  return jax.tree.map(leaf, codes)


@dataclasses.dataclass(frozen=True)
class StabilityAnalyzer:
  """Configuration bundling init / update / scores / states (functional).

  Attributes:
    history_length: window length ``H``.
    protected_threshold: scores ``>=`` this are protected.
    volatile_threshold: scores ``<=`` this are volatile.
    running: use the running analyzer (memory independent of ``H``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import StabilityAnalyzer
    >>> an = StabilityAnalyzer(history_length=4)
    >>> s = an.init({"w": jnp.zeros(2)})
    >>> s = an.update(s, {"w": jnp.ones(2)}, {"w": jnp.ones(2)})
    >>> int(an.states(s)["w"])  # 0.5: neutral
    1

  References:
    The original SAL library, ``sal.stability.StabilityAnalyzer``.
  """
  history_length: int = 50
  protected_threshold: float = 0.7
  volatile_threshold: float = 0.3
  running: bool = False

  def __post_init__(self):
    _check_history_length(self.history_length)
    _check_thresholds(self.protected_threshold, self.volatile_threshold)

  def init(self, params: chex.ArrayTree) -> AnalyzerState:
    return analyzer_init(params, self.history_length, self.running)

  def update(self, state, params, grads=None) -> AnalyzerState:
    return analyzer_update(state, params, grads)

  def scores(self, state) -> chex.ArrayTree:
    return analyzer_scores(state)

  def states(self, state) -> chex.ArrayTree:
    return classify(analyzer_scores(state), self.protected_threshold,
                    self.volatile_threshold)

  def history_lengths(self, state) -> chex.ArrayTree:
    """Weights in each leaf's (effective) window, ``min(count, H)``."""
    return jax.tree.map(
        lambda _: jnp.minimum(state.count, self.history_length),
        state.prev_grads)
