"""Stability estimators: how settled is each parameter?

An estimator is a pair of pure functions. ``init(params)`` builds its state;
``update(updates, state, params)`` returns a *raw* stability score per unit
(one per leaf, or one per element) in ``[0, 1]`` and the new state. The
:func:`sal_jax.protect` transformation smooths the raw scores with an EMA,
adapts its threshold and gates the updates; estimators only measure.

Estimators are looked up by name (see
:mod:`sal_jax._protect.estimator_registry`), so
``protect(estimator="reference")`` and other estimators plug in the same way;
a :class:`StabilityEstimator` instance may also be passed directly.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sal_jax._common import tree_utils as _tree_utils
from sal_jax._common import units as _units
from sal_jax._common import validation as _validation

GRANULARITIES = ("leaf", "element")

TINY = 1e-30  # keeps ratios of all-zero importances finite

EstimatorInitFn = Callable[[chex.ArrayTree], Any]
EstimatorUpdateFn = Callable[
    [chex.ArrayTree, Any, chex.ArrayTree], tuple[chex.ArrayTree, Any]]


class StabilityEstimator(NamedTuple):
  """A stability estimator: ``init(params)`` and ``update(updates, state,
  params) -> (raw_scores, state)``.

  ``raw_scores`` has the tree structure of ``params``; each leaf is a float32
  scalar (leaf granularity) or a float32 array shaped like the parameter
  (element granularity), with values in ``[0, 1]``.

  ``restoring_force(state, params)``, when given, returns a tree like
  ``params`` that :func:`sal_jax.protect` adds to the update (scaled by its
  ``restore`` argument), e.g. a pull back toward settled values.

  ``granularity`` (``"leaf"`` or ``"element"``) says which shape the raw
  scores have; :func:`sal_jax.protect` follows it.

  ``drift_estimate(state, params)``, when given, returns a float32 scalar
  estimate of how far the params drifted from what the estimator protects,
  which ``protect(relative_budget=...)`` keeps at its budget.

  ``guarded``: ``update`` takes a keyword ``finite`` (a bool scalar) and
  returns its state unchanged where it is False. :func:`sal_jax.protect`
  then calls it directly instead of under a ``lax.cond`` on finiteness: a
  conditional around the whole state makes XLA copy the state's large
  arrays out of its branches every step, where selects fuse into the
  updates that read them anyway.
  """
  init: EstimatorInitFn
  update: EstimatorUpdateFn
  restoring_force: Callable[[Any, chex.ArrayTree], chex.ArrayTree] | None = (
      None)
  granularity: str = "leaf"
  drift_estimate: Callable[[Any, chex.ArrayTree], jax.Array] | None = None
  guarded: bool = False


class ReferenceEstimatorState(NamedTuple):
  """State of :func:`reference_estimator`.

  Attributes:
    previous_params: the params seen at the last step, each leaf in the
      param's own dtype (an exact copy: bfloat16 stays bfloat16, float64
      and complex stay so, with x64 on or off).
  """
  previous_params: chex.ArrayTree


def validate_granularity(granularity: str,
                         allowed: tuple[str, ...] = GRANULARITIES) -> None:
  """Raises ``TypeError`` for a non-string, ``ValueError`` for a
  granularity not in ``allowed``."""
  _validation.check_choice("sal_jax", "granularity", granularity, str)
  if granularity not in allowed:
    raise ValueError(
        f"sal_jax: unknown granularity {granularity!r}; expected one of "
        f"{list(allowed)}.")


def reference_estimator(
    granularity: str = "leaf",
    eps: float = 1e-8,
) -> StabilityEstimator:
  r"""The original SAL stability measure: small motion times small gradient.

  Per leaf (``granularity="leaf"``), with :math:`w` the current parameter,
  :math:`w_{prev}` the parameter seen at the previous step (the initial one
  at the first step, so the first motion is 0) and :math:`g` the gradient:

  .. math::
    r = \frac{1}{1 + \lVert w - w_{prev} \rVert \, \lVert g \rVert + \epsilon}

  Per element (``granularity="element"``) the same formula is applied entry
  by entry, :math:`r_j = 1 / (1 + |w_j - w_{prev,j}| \, |g_j| + \epsilon)`.

  This is the measure of the original library, kept exactly. On real
  training it drifts towards 1 for every parameter (it sees a tiny product
  of two small numbers), which is why :func:`sal_jax.protect` offers other
  estimators.

  Args:
    granularity: ``"leaf"`` (one score per parameter tensor) or
      ``"element"`` (one score per entry).
    eps: the constant in the denominator.

  Returns:
    A :class:`StabilityEstimator` whose state is a
    :class:`ReferenceEstimatorState` (one copy of the params).

  Raises:
    TypeError: for an argument of the wrong type.
    ValueError: for an unknown granularity or a negative ``eps``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import reference_estimator
    >>> est = reference_estimator()
    >>> params = {"w": jnp.zeros(3)}
    >>> state = est.init(params)
    >>> raw, state = est.update({"w": jnp.ones(3)}, state, {"w": jnp.ones(3)})
    >>> round(float(raw["w"]), 4)  # 1 / (1 + sqrt(3) * sqrt(3))
    0.25

  References:
    The original SAL library, ``sal.communication.CommunicationLayer``.
  """
  validate_granularity(granularity)
  _validation.check_number("sal_jax.reference_estimator", "eps", eps, 0.0)

  def init_fn(params):
    # A copy, so that a donated params buffer cannot alias the state.
    return ReferenceEstimatorState(
        previous_params=jax.tree.map(jnp.array, params))

  def update_fn(updates, state, params):
    def leaf_score(g, w, w_prev):
      # The motion is taken at the params' precision (at least float32),
      # then measured in float32 like the gradient: the score is float32.
      dtype = _tree_utils.state_dtype(w)
      g = _tree_utils.to_real(g)
      motion = _tree_utils.to_real(w.astype(dtype) - w_prev.astype(dtype))
      if granularity == "leaf":
        product = (jnp.sqrt(jnp.sum(jnp.square(motion)))
                   * jnp.sqrt(jnp.sum(jnp.square(g))))
      else:
        # |a b| == |a| |b| exactly; one abs keeps |g| from being shared
        # with protect's sum of |g| (which would make XLA materialise it).
        product = jnp.abs(motion * g)
      return 1.0 / (1.0 + product + eps)

    raw = jax.tree.map(leaf_score, updates, params, state.previous_params)
    new_prev = jax.tree.map(
        lambda w, w_prev: w.astype(w_prev.dtype), params,
        state.previous_params)
    return raw, ReferenceEstimatorState(previous_params=new_prev)

  return StabilityEstimator(init_fn, update_fn, None, granularity)


def relative_scores(importance: chex.ArrayTree,
                    relative_importance: float) -> chex.ArrayTree:
  """``o / (o + c mean(o))`` per unit, the mean over every unit of the tree.

  A unit with the mean importance scores ``1 / (1 + c)``; one far above it
  scores near 1. Used by the importance-based estimators.
  """
  importance = jax.tree.map(lambda o: o.astype(jnp.float32), importance)
  leaves = jax.tree.leaves(importance)
  mean = (sum(jnp.sum(o) for o in leaves)
          / max(sum(o.size for o in leaves), 1))
  return jax.tree.map(
      lambda o: o / (o + relative_importance * mean + TINY), importance)


def relative_unit_scores(importance: chex.ArrayTree, params: chex.ArrayTree,
                         relative_importance: float) -> chex.ArrayTree:
  """:func:`relative_scores` of units that may be factored (see
  :mod:`sal_jax._common.units`); a factored unit's scores are per element,
  the mean is over every entry of the params."""
  totals = jax.tree.leaves(jax.tree.map(_units.total, importance, params))
  mean = sum(totals) / max(optax.tree_utils.tree_size(params), 1)

  def leaf(o, p):
    d = _units.dense(o, p)
    return d / (d + relative_importance * mean + TINY)

  return jax.tree.map(leaf, importance, params)


def weighted_distance(weights: chex.ArrayTree, params: chex.ArrayTree,
                      anchor: chex.ArrayTree) -> jax.Array:
  r"""``sum(w * |theta - anchor|^2)`` over every unit, a float32 scalar.

  A weight may be a factored or Kronecker unit (see
  :mod:`sal_jax._common.units`; a Kronecker one weighs
  :math:`d^\top (L \otimes \operatorname{diag}(c)) d / \operatorname{tr} L`).
  """
  # anchor - theta, the pull's theta - anchor spelled the other way round:
  # XLA CPU writes a difference that this sum and the pull share to a
  # full-size temporary; apart, each computes it inline.
  def leaf(p, a, w):
    d = _tree_utils.to_real(_tree_utils.difference(a, p))
    if _units.is_kronecker_unit(w, p):
      return jnp.sum(d * _units.weigh(w, p, d))
    return jnp.sum(_units.dense(w, p) * jnp.square(d))

  return sum(jax.tree.leaves(jax.tree.map(leaf, params, anchor, weights)),
             jnp.zeros((), jnp.float32))


def check_score_shapes(raw, scores, granularity) -> None:
  """Raises ``ValueError`` if raw scores do not have the scores' shapes."""
  for r, s in zip(jax.tree.leaves(raw), jax.tree.leaves(scores)):
    if jnp.shape(r) != jnp.shape(s):
      raise ValueError(
          f"sal_jax.protect: the estimator returned scores of shape "
          f"{jnp.shape(r)} where granularity {granularity!r} needs "
          f"{jnp.shape(s)}; set the estimator's granularity to match.")
