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
This module is the public face (init / update / scores dispatch on the
state, :func:`classify`, :class:`StabilityAnalyzer`); the two analyzers
live in :mod:`sal_jax.analysis._windowed_analyzer` and
:mod:`sal_jax.analysis._running_analyzer`, their shared score in
:mod:`sal_jax.analysis._analyzer_score`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sal_jax.analysis import _spectrum
from sal_jax._common import tree_utils as _tree_utils
from sal_jax._common import stability_states
from sal_jax.analysis._analyzer_score import F32
from sal_jax.analysis._analyzer_score import check_history_length
from sal_jax.analysis._running_analyzer import RunningAnalyzerState
from sal_jax.analysis._running_analyzer import running_init
from sal_jax.analysis._running_analyzer import running_scores
from sal_jax.analysis._running_analyzer import running_update
from sal_jax.analysis._windowed_analyzer import WindowedAnalyzerState
from sal_jax.analysis._windowed_analyzer import windowed_init
from sal_jax.analysis._windowed_analyzer import windowed_scores
from sal_jax.analysis._windowed_analyzer import windowed_update

VOLATILE = 0
NEUTRAL = 1
PROTECTED = 2
STATE_NAMES = ("volatile", "neutral", "protected")  # indexed by code

AnalyzerState = Union[WindowedAnalyzerState, RunningAnalyzerState]


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
    >>> from sal_jax.analysis import analyzer_init
    >>> analyzer_init({"w": jnp.zeros(3)}, history_length=4).weights["w"].shape
    (4, 3)
    >>> analyzer_init({"w": jnp.zeros(3)}, 500, running=True).var["w"].shape
    (3,)

  References:
    The original SAL library, ``sal.stability.StabilityAnalyzer``; T. Finch,
    "Incremental calculation of weighted mean and variance" (2009).
  """
  h = check_history_length(history_length)
  params = jax.tree.map(jnp.asarray, params)
  if not running:
    return windowed_init(params, h)
  return running_init(params, h)


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
    >>> from sal_jax.analysis import analyzer_init, analyzer_update
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
    return windowed_update(state, params, grads)
  if isinstance(state, RunningAnalyzerState):
    return running_update(state, params, grads)
  raise ValueError(f"sal_jax: not an analyzer state: {type(state).__name__}.")



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
    >>> from sal_jax.analysis import (analyzer_init, analyzer_scores,
    ...                               analyzer_update)
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
    return windowed_scores(state)
  if isinstance(state, RunningAnalyzerState):
    return running_scores(state)
  raise ValueError(f"sal_jax: not an analyzer state: {type(state).__name__}.")


def classify(
    scores: chex.ArrayTree,
    protected_threshold: float = stability_states.PROTECTED_THRESHOLD,
    volatile_threshold: float = stability_states.VOLATILE_THRESHOLD,
) -> chex.ArrayTree:
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
    >>> from sal_jax.analysis import classify, state_names
    >>> state_names(classify({"a": 0.9, "b": 0.5, "c": 0.3}))
    {'a': 'protected', 'b': 'neutral', 'c': 'volatile'}

  References:
    The original SAL library,
    ``sal.stability.StabilityAnalyzer._classify_state``.
  """
  _spectrum._check_thresholds(protected_threshold, volatile_threshold)
  def leaf(s):
    prot, vol = stability_states.state_masks(
        jnp.asarray(s, F32), protected_threshold, volatile_threshold)
    return jnp.where(prot, PROTECTED,
                     jnp.where(vol, VOLATILE, NEUTRAL)).astype(jnp.int32)
  return jax.tree.map(leaf, scores)


def state_names(codes: chex.ArrayTree) -> chex.ArrayTree:
  """Host-side names of state codes: ``"protected"``, ``"neutral"``, ...

  Args:
    codes: a tree of codes from :func:`classify` (concrete, not traced).

  Returns:
    The tree with a ``str`` per scalar code (a numpy array of ``str`` for
    array codes).

  Examples:
    >>> from sal_jax.analysis import state_names
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
    >>> from sal_jax.analysis import StabilityAnalyzer
    >>> an = StabilityAnalyzer(history_length=4)
    >>> s = an.init({"w": jnp.zeros(2)})
    >>> s = an.update(s, {"w": jnp.ones(2)}, {"w": jnp.ones(2)})
    >>> int(an.states(s)["w"])  # 0.5: neutral
    1

  References:
    The original SAL library, ``sal.stability.StabilityAnalyzer``.
  """
  history_length: int = 50
  protected_threshold: float = stability_states.PROTECTED_THRESHOLD
  volatile_threshold: float = stability_states.VOLATILE_THRESHOLD
  running: bool = False

  def __post_init__(self):
    check_history_length(self.history_length)
    _spectrum._check_thresholds(self.protected_threshold,
                                self.volatile_threshold)

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
