"""The ``protect`` transformation: SAL as an optax ``GradientTransformation``."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sal_jax._protect import budget as _budget
from sal_jax._protect import estimator_registry as _estimator_registry
from sal_jax._protect import estimators as _estimators
from sal_jax._protect import gates as _gates
from sal_jax._common import tree_utils as _tree_utils
from sal_jax._common import validation as _validation

# The restoring pull's strength when an estimator has one and none is given:
# the continual-learning benchmark's validation chose 1 on permuted MNIST-1D
# and the stream, 30 on split digits.
DEFAULT_RESTORE = 1.0

_WHERE = "sal_jax.protect"

class ProtectState(NamedTuple):
  """State of :func:`protect`.

  No leaf here follows the params' dtype, and none depends on
  ``jax_enable_x64``: scores and rates are fractions in ``[0, 1]`` kept in
  ``state_dtype`` (float32 unless set, e.g. bfloat16 to halve their memory),
  the scalars are float32 or int32. The estimator's state documents its own
  policy (its anchors follow the params). Without a gate (``gate="none"``)
  ``threshold``, ``scores``, ``protection_rates`` and
  ``mean_protection_rate`` are ``optax.EmptyState()``: nothing is kept
  that nothing uses.

  Attributes:
    count: number of (finite) steps taken, int32.
    threshold: the adapted threshold used at the last step, float32.
    scores: smoothed stability score per unit, ``state_dtype``; the tree of
      the params with a scalar per leaf (leaf granularity) or an array
      shaped like the leaf (element granularity).
    protection_rates: per leaf, ``1 - ||g_out|| / ||g||`` at the last step,
      ``state_dtype``.
    mean_protection_rate: running mean over steps of the per-step mean (over
      leaves) protection rate, float32.
    estimator_state: the state of the stability estimator.
    budget_state: with ``protect(budget=...)`` or ``relative_budget``, the
      controller's :class:`~sal_jax.BudgetState`; ``optax.EmptyState()``
      otherwise.
  """
  count: jax.Array
  threshold: jax.Array
  scores: chex.ArrayTree
  protection_rates: chex.ArrayTree
  mean_protection_rate: jax.Array
  estimator_state: Any
  budget_state: Any


def protect(
    threshold: chex.Numeric = 0.5,
    threshold_adaptation: chex.Numeric = 0.1,
    gate: str | None = None,
    score_ema: chex.Numeric = 0.3,
    granularity: str | None = None,
    estimator: str | _estimators.StabilityEstimator = "shift_consolidation",
    axis_name: str | None = None,
    state_dtype: Any = None,
    *,
    initial_score: float = 0.5,
    threshold_range: tuple[float, float] = (0.1, 0.9),
    steepness: float = _gates.DEFAULT_STEEPNESS,
    preserve_rms: bool = False,
    restore: chex.Numeric | None = None,
    budget: chex.Numeric | None = None,
    relative_budget: chex.Numeric | None = None,
    budget_gains: tuple[chex.Numeric, chex.Numeric] = (
        _budget.DEFAULT_INTEGRAL_GAIN, _budget.DEFAULT_PROPORTIONAL_GAIN),
) -> optax.GradientTransformationExtraArgs:
  r"""Protects what training has settled (Self-Alignment Learning).

  At every step, for each unit :math:`i` (a parameter leaf, or one entry of
  it), the estimator measures a raw stability :math:`r_i \in [0, 1]` from the
  incoming update :math:`g` and the current params; the score is smoothed,

  .. math::
    s_i \leftarrow \beta r_i + (1 - \beta) s_i, \qquad s_i^{(0)} = 0.5,

  the threshold adapts to the spread of the update magnitudes
  :math:`m_i = \lVert g_i \rVert` (per element: :math:`|g_j|`),

  .. math::
    \tau = \operatorname{clip}\Big(\tau_0 + \alpha
      \frac{\operatorname{std}(m)}{\operatorname{mean}(m) + 10^{-8}},
      0.1, 0.9\Big) \quad \text{(kept if } \operatorname{mean}(m) < 10^{-8}),

  and the update is gated and pulled,
  :math:`g_i \leftarrow g_i \, f(s_i, \tau) + \lambda F_i(\theta)`, with
  ``gate`` :math:`f` one of ``"soft"`` (:math:`1 - s` above :math:`\tau`,
  the original rule), ``"hard"``, ``"linear"``, ``"sigmoid"`` or ``"none"``
  (see :mod:`sal_jax._protect.gates`), :math:`F` the estimator's restoring
  force (if it has one) and :math:`\lambda` = ``restore``.

  With a drift budget :math:`\varepsilon` (``budget``), the pull's strength
  is :math:`\lambda m` and the multiplier :math:`m \ge 1` adapts so that
  the drift :math:`D` passed to every ``update`` (``drift=``, measured at
  the current params, e.g. :func:`sal_jax.prediction_drift` on a few
  earlier inputs) stays at or below :math:`\varepsilon`: with gains
  :math:`(k_i, k_p)` = ``budget_gains``, a PI controller in log space,

  .. math::
    e = \operatorname{clip}(\log(D / \varepsilon), -2, 2), \quad
    \ell \leftarrow \operatorname{clip}(\ell + k_i e, 0, \log 10^6),
    \quad m = \exp(\operatorname{clip}(\ell + k_p e, 0, \log 10^6)),

  scale-free: the gains mean the same whatever the budget, the loss or the
  pull's units (see :mod:`sal_jax._protect.budget`). Without data, a
  ``relative_budget`` runs the same controller on the estimator's own
  estimate (see :func:`sal_jax.shift_consolidation_estimator`): the
  importance-weighted squared distance from the anchor over the one the
  params travelled to reach it, a fraction, not nats.

  Defaults: the shift-consolidation estimator (Kronecker-factored) and a
  restoring pull of strength 1 (a task-free online EWC, see
  :func:`sal_jax.shift_consolidation_estimator`), with no gate: the state
  then holds only the step count, the estimator's state and the budget's
  controller (no scores, threshold or rates), and the gate's arguments are
  rejected. With ``estimator="reference"`` (soft gate, leaf granularity, no
  pull) this reproduces the original library's ``CommunicationLayer`` step
  for step.

  A step whose updates or params contain NaN or Inf leaves the state
  unchanged (the step count included) and passes the updates through
  untouched, so that ``optax.apply_if_finite`` (or your own check) can
  reject it.

  Float64 (under x64) and complex params are supported (see the states'
  dtype policies); magnitudes of complex entries are their moduli.

  Args:
    threshold: base threshold :math:`\tau_0`, in ``[0, 1]``.
    threshold_adaptation: :math:`\alpha \ge 0`, how much the spread of update
      magnitudes raises the threshold.
    gate: ``"soft"``, ``"hard"``, ``"linear"``, ``"sigmoid"`` or ``"none"``
      (protection by the restoring pull alone). ``None`` (the default):
      ``"none"`` for an estimator with a restoring force, ``"soft"`` for
      one without (the reference).
    score_ema: weight :math:`\beta \in (0, 1]` of the new raw score.
    granularity: ``"leaf"`` (one score per parameter tensor), ``"element"``
      (one per entry), or for shift consolidation ``"factored"`` or
      ``"kronecker"`` (see its docs). ``None``: the estimator's own
      (kronecker for shift consolidation, leaf for the others; an
      instance brings its own).
    estimator: name of a stability estimator (``"shift_consolidation"``,
      ``"consolidation"``, ``"reference"``) or a
      :class:`~sal_jax.StabilityEstimator`.
    axis_name: under ``jax.pmap``, the mapped axis name. Pass it when the
      updates reaching ``protect`` are per-device (not yet averaged):
      ``protect`` then averages them across devices (a ``pmean``) and gates
      the mean, so every replica keeps the same state and returns the same
      update. Updates that are already averaged need none.
    state_dtype: dtype of the scores and rates (default float32).
    initial_score: the score every unit starts from.
    threshold_range: the clip range of the adapted threshold.
    steepness: steepness of the ``"sigmoid"`` gate.
    preserve_rms: keep each entry's RMS while the gate scales its mean (see
      :func:`sal_jax.apply_factor`). Set it when ``protect`` sits in front
      of a scale-invariant optimizer such as ``optax.adam(w)``, which would
      otherwise undo a slowly varying gate within ~``1 / (1 - b2)`` steps.
    restore: strength :math:`\lambda` of a restoring pull
      :math:`\lambda F(\theta)` added to the gated update, where
      :math:`F` is the estimator's ``restoring_force`` (e.g. a pull of
      settled parameters back toward the value they settled at). Only for
      estimators that define one. ``None`` (the default): 1.0 for such an
      estimator, no pull otherwise; 0 turns the pull off. With a
      ``budget``, the strength below which the multiplier never goes.
    budget: :math:`\varepsilon > 0`, the largest drift of the earlier
      behaviour to allow, in the units of the ``drift`` passed to
      ``update`` (nats for :func:`sal_jax.prediction_drift`). ``None``
      (the default): the fixed strength ``restore``. With a budget every
      ``update`` needs ``drift=``; a non-finite drift leaves the
      controller as it was.
    relative_budget: the data-free alternative to ``budget``: the largest
      estimated drift, :math:`\sum_i \Omega^*_i (\theta_i - \theta^*_i)^2`
      over the same sum for the distance travelled before the
      consolidations (under a quadratic loss with curvature
      :math:`\propto \Omega^*`, the share of the earlier loss decrease
      given back). A relative knob, not calibrated in nats.
    budget_gains: :math:`(k_i, k_p)`, the controller's integral and
      proportional gains, per step, on the log of the multiplier.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params``.

  Raises:
    TypeError: for a hyperparameter of the wrong type (a string, a bool, a
      list where a number is expected). Scalar arrays are accepted wherever
      a number is, as ``optax.inject_hyperparams`` passes them; only Python
      numbers are range-checked (see :mod:`sal_jax._common.validation`).
    ValueError: for bad hyperparameters, or a gate-only one (``threshold``,
      ``threshold_adaptation``, ``score_ema``, ``initial_score``,
      ``threshold_range``, ``steepness``, ``preserve_rms``, ``state_dtype``)
      set without a gate; at ``update`` time if ``params`` is missing or
      its tree differs from the updates.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sal_jax as sal
    >>> params = {"w": jnp.ones(3)}
    >>> tx = optax.chain(sal.protect(estimator="reference"), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.full(3, 0.5)}
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> updates["w"]  # score 0.65 > threshold 0.5: g * (1 - 0.65) * -0.1
    Array([-0.0175, -0.0175, -0.0175], dtype=float32)

  References:
    The original SAL library, ``sal.communication.CommunicationLayer``.
  """
  check = functools.partial(_validation.check_number, _WHERE)
  check("threshold", threshold, 0.0, 1.0)
  check("threshold_adaptation", threshold_adaptation, 0.0)
  check("score_ema", score_ema, 0.0, 1.0, low_open=True)
  check("initial_score", initial_score, 0.0, 1.0)
  check("steepness", steepness)
  check("restore", restore, 0.0, optional=True)
  _validation.check_choice(_WHERE, "gate", gate, str, optional=True)
  _validation.check_choice(_WHERE, "preserve_rms", preserve_rms,
                           (bool, np.bool_))
  numbers = _validation.is_python_number
  stability = _estimator_registry.get_estimator(estimator, granularity)
  granularity = stability.granularity
  has_force = stability.restoring_force is not None
  if gate is None:
    gate = "none" if has_force else "soft"
  gate_fn = _gates.get_gate(gate)
  gated = gate != "none"
  if gated:
    low, high = _gates.check_threshold_range(_WHERE, threshold,
                                             threshold_range)
  else:
    _gates.check_gate_only_args(_WHERE, gate, dict(
        threshold=threshold, threshold_adaptation=threshold_adaptation,
        score_ema=score_ema, initial_score=initial_score,
        threshold_range=threshold_range, steepness=steepness,
        preserve_rms=preserve_rms, state_dtype=state_dtype))
  if restore is not None and not has_force:
    raise ValueError(
        f"{_WHERE}: restore needs an estimator with a restoring force; "
        f"{estimator!r} has none.")
  limit, integral_gain, proportional_gain = _budget.check_config(
      budget, relative_budget, budget_gains, restore, estimator, has_force,
      stability.drift_estimate is not None)
  if restore is None and has_force:
    restore = DEFAULT_RESTORE
  if numbers(restore) and restore == 0:
    restore = None  # no pull: skip computing the force
  dtype = jnp.dtype(jnp.float32 if state_dtype is None else state_dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"sal_jax.protect: state_dtype must be a float dtype, got {dtype}.")

  def init_fn(params):
    def init_score(p):
      if granularity == "leaf":
        return jnp.full((), initial_score, dtype)
      # full_like keeps the param's sharding for per-element state.
      return jnp.full_like(p, initial_score, dtype=dtype)

    empty = optax.EmptyState()
    gate_state = (jnp.asarray(threshold, jnp.float32),
                  jax.tree.map(init_score, params),
                  jax.tree.map(lambda _: jnp.zeros((), dtype), params),
                  jnp.zeros((), jnp.float32)) if gated else (empty,) * 4
    return ProtectState(
        jnp.zeros((), jnp.int32), *gate_state,
        estimator_state=stability.init(params),
        budget_state=empty if limit is None else _budget.init())

  def update_fn(updates, state, params=None, drift=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(_tree_utils.MISSING_PARAMS_MESSAGE)
    if budget is not None:
      drift = _budget.as_drift(drift)
    _tree_utils.check_same_structure(updates, params)
    _tree_utils.check_state_tree(state.protection_rates if gated else getattr(
        state.estimator_state, "anchor", params), params, _WHERE)

    if axis_name is not None:
      # Per-device updates: work on their cross-device mean, so that every
      # replica computes the same statistics, state and output.
      updates = jax.lax.pmean(updates, axis_name)
      if budget is not None:
        drift = jax.lax.pmean(drift, axis_name)

    # Non-finite params or updates: the state stays, the updates pass.
    finite = _tree_utils.all_finite(params)
    if gated:
      # Threshold adaptation from the spread of update magnitudes; NaN or
      # Inf anywhere in the updates reaches these sums, which spares
      # another pass over the updates.
      norms = _tree_utils.leaf_norms(updates)
      norm_leaves = jax.tree.leaves(norms)
      m_sq_sum = sum(jnp.square(m) for m in norm_leaves)
      if granularity == "leaf":
        m_sum, m_count = sum(norm_leaves), len(norm_leaves)
      else:
        leaves = jax.tree.leaves(updates)
        m_sum = sum(jnp.sum(jnp.abs(_tree_utils.to_real(g))) for g in leaves)
        m_count = sum(g.size for g in leaves)
      finite &= (jnp.isfinite(jnp.asarray(m_sum))
                 & jnp.isfinite(jnp.asarray(m_sq_sum)))
      new_threshold = jnp.where(finite, _gates.adapt_threshold(
          m_sum, m_sq_sum, max(m_count, 1), threshold, threshold_adaptation,
          low, high, state.threshold), state.threshold)
    else:
      # The squared sums the estimators read too (XLA computes them once);
      # a squared norm past the float32 range counts as non-finite.
      finite &= jnp.isfinite(
          sum(jax.tree.leaves(_tree_utils.square_sums(updates))))

    def advance(scores, estimator_state, *finite_arg):
      # finite_arg: (finite,) for a guarded estimator, which keeps its own
      # state on a non-finite step (selects fused into its updates).
      kwargs = {"finite": finite_arg[0]} if finite_arg else {}
      raw, estimator_state = stability.update(
          updates, estimator_state, params, **kwargs)
      if gated:
        _estimators.check_score_shapes(raw, scores, granularity)
        scores = jax.tree.map(
            lambda r, s: jnp.where(finite, (
                score_ema * r + (1.0 - score_ema) * s.astype(jnp.float32)
            ).astype(dtype), s), raw, scores)
      return scores, estimator_state

    if stability.guarded:
      scores, estimator_state = advance(state.scores, state.estimator_state,
                                        finite)
    else:
      # A conditional rather than a select between new and old state: the
      # untaken branch moves no data (on GPU the predicate is read on the
      # host, as in optax.MultiSteps).
      scores, estimator_state = jax.lax.cond(
          finite, advance, lambda *old: old, state.scores,
          state.estimator_state)

    force = (stability.restoring_force(estimator_state, params)
             if restore is not None else None)
    budget_state = state.budget_state
    strength = restore
    if relative_budget is not None:
      # Replicated state and params: every device estimates the same.
      drift = stability.drift_estimate(estimator_state, params)
    if limit is not None:
      budget_state = _budget.step(budget_state, drift, limit, integral_gain,
                                  proportional_gain, finite)
      strength = restore * budget_state.multiplier

    def pull_leaf(g, r):
      return jnp.where(finite, (g + strength * r).astype(g.dtype), g)

    count = state.count + finite.astype(jnp.int32)
    if not gated:
      updates_out = (updates if force is None
                     else jax.tree.map(pull_leaf, updates, force))
      return updates_out, state._replace(
          count=count, estimator_state=estimator_state,
          budget_state=budget_state)

    # On a non-finite step the gated update is discarded.
    factors = jax.tree.map(
        lambda s: gate_fn(s.astype(jnp.float32), new_threshold, steepness),
        scores)

    def gate_leaf(g, f, r=None):
      h = _gates.apply_factor(g, f, state.count, preserve_rms)
      return jnp.where(finite, h, g) if r is None else pull_leaf(h, r)

    if force is None:
      updates_out = jax.tree.map(gate_leaf, updates, factors)
    else:
      updates_out = jax.tree.map(gate_leaf, updates, factors, force)

    rates, mean_rate = _gates.update_rates(
        gate_fn, granularity, updates, scores, norms, new_threshold,
        steepness, finite, state.protection_rates,
        state.mean_protection_rate, count)
    return updates_out, ProtectState(
        count=count, threshold=new_threshold.astype(jnp.float32),
        scores=scores, protection_rates=rates,
        mean_protection_rate=mean_rate.astype(jnp.float32),
        estimator_state=estimator_state, budget_state=budget_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
