"""The shift-consolidation estimator: consolidate what settled when a shift hits.

When the data (or the task) shifts, the minibatch gradient energy jumps
above its slow average while the parameters still hold what the previous
regime built. At the onset of each such surprise the importance gathered so
far is consolidated and the params become the anchor, which
``protect(restore=...)`` pulls back toward: online EWC with the task
boundaries detected from the gradients rather than given.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sal_jax._protect import estimators as _estimators
from sal_jax._common import anchored_pull
from sal_jax._common import tree_utils as _tree_utils
from sal_jax._common import units as _units
from sal_jax._common import validation as _validation

_TINY = _estimators.TINY

# kappa, the decay of online EWC; sal_jax.consolidate uses it too.
DEFAULT_CONSOLIDATION_DECAY = 0.9


class ShiftConsolidationState(NamedTuple):
  """State of :func:`shift_consolidation_estimator`.

  The anchor is an exact copy of the params in their dtype; the
  importances (real even for complex params) are in ``importance_dtype``
  (bfloat16 rounding moves the pull's strength by < 0.4 %); the rest is
  float32 / int32 / bool whatever ``jax_enable_x64``.

  Attributes:
    count: steps taken, int32.
    fast_energy: fast EMA (not bias-corrected) of the mean squared gradient
      entry, float32.
    slow_energy: slow EMA (not bias-corrected) of the same, float32.
    log_energy: slow EMAs (not bias-corrected) of the log of the mean
      squared gradient entry and of its square, ``[2]``: its noise.
    shifted: whether the last step was inside a detected shift, bool.
    consolidations: number of shifts detected so far, int32.
    importance: EMA (not bias-corrected) of each unit's relative gradient
      energy; per element, factored, Kronecker, or per leaf.
    consolidated: the consolidated importance, in the granularity's unit.
    anchor: the params at the last consolidation, in the params' dtype.
    reference: :math:`R`, the importance-weighted squared distance the
      params travelled between consolidations (decayed like the
      consolidated importance), float32; the scale of the estimated drift.
  """
  count: jax.Array
  fast_energy: jax.Array
  slow_energy: jax.Array
  log_energy: jax.Array
  shifted: jax.Array
  consolidations: jax.Array
  importance: chex.ArrayTree
  consolidated: chex.ArrayTree
  anchor: chex.ArrayTree
  reference: jax.Array


_WHERE = "sal_jax.shift_consolidation_estimator"


def shift_consolidation_estimator(
    granularity: str = "kronecker",
    importance_decay: float = 0.99,
    fast_decay: float = 0.9,
    slow_decay: float = 0.99,
    shift_ratio: float = 1.2,
    release_ratio: float = 1.0,
    warmup_steps: int = 10,
    consolidation_decay: float = DEFAULT_CONSOLIDATION_DECAY,
    relative_importance: float = 1.0,
    noise_multiplier: float = 0.0,
    running_unit: str | None = None,
    importance_dtype: jnp.dtype = jnp.float32,
    kronecker_rank: int | None = 32,
) -> _estimators.StabilityEstimator:
  r"""Stability as importance consolidated at detected distribution shifts.

  With :math:`g` the update (gradient) and :math:`m_t` the mean of
  :math:`g^2` over all entries, two EMAs of the gradient energy (decays
  :math:`\beta_f` = ``fast_decay``, :math:`\beta_s` = ``slow_decay``,
  bias-corrected :math:`\hat e_f, \hat e_s`) give the surprise ratio
  :math:`\rho_t = \hat e_f / \hat e_s`. A shift starts when :math:`\rho_t`
  rises above :math:`\max(\text{shift\_ratio}, e^{z \sigma_f})` and lasts
  while it stays above ``release_ratio`` (hysteresis; no shift in the first
  ``warmup_steps``). Here :math:`\sigma_f = \sigma \sqrt{(1 - \beta_f) /
  (1 + \beta_f)}` is the noise of the fast average, from the standard
  deviation :math:`\sigma` of :math:`\log m_t` (a slow EMA), and :math:`z`
  = ``noise_multiplier``: with small, noisy batches a shift must stand out
  of the noise, not only exceed the fixed ratio.
  Every unit :math:`i` keeps an importance (:math:`\gamma` =
  ``importance_decay``; per leaf, the mean of :math:`g^2` over the leaf)

  .. math::
    \Omega_i \leftarrow \gamma \Omega_i + (1 - \gamma) g_i^2 / \hat e_s,

  and at the first step of each shift consolidates

  .. math::
    \Omega^*_i \leftarrow \kappa \Omega^*_i + \hat\Omega_i, \qquad
    \theta^*_i \leftarrow \theta_i,

  with :math:`\hat\Omega` bias-corrected and :math:`\kappa` =
  ``consolidation_decay``. The raw score and the restoring force are

  .. math::
    r_i = \frac{\Omega^*_i}{\Omega^*_i + c \operatorname{mean}(\Omega^*)},
    \qquad F_i = \Omega^*_i \sqrt{\hat e_s} \, (\theta_i - \theta^*_i),

  (:math:`c` = ``relative_importance``), so nothing is protected before the
  first shift, and afterwards what the earlier regimes made important is
  pulled back to where it stood when the shift came: the online EWC penalty
  gradient :math:`\lambda F (\theta - \theta^*)` with the task boundaries
  detected, in gradient units (:math:`\sqrt{\hat e_s}`).

  The data-free drift estimate (``protect(relative_budget=...)``) measures
  the distance from the anchor against the distance that built it: with
  :math:`\theta^*_{\text{old}}` the previous anchor (the params at
  ``init`` before the first),

  .. math::
    R \leftarrow \kappa R + \sum_i \Omega^*_i
      (\theta_i - \theta^*_{\text{old}, i})^2 \text{ at each
      consolidation}, \qquad
    \hat D = \frac{\sum_i \Omega^*_i (\theta_i - \theta^*_i)^2}{R}

  (0 while :math:`R = 0`). Were the earlier loss quadratic with curvature
  :math:`\propto \Omega^*`, :math:`\hat D` would be the share of its
  decrease since the previous anchor that has been given back.

  Units (see :mod:`sal_jax._common.units`): ``"element"``; ``"factored"``,
  row and column means per matrix (as Adafactor's second moment; the pull
  weighs entry :math:`ij` by :math:`r_i c_j / \operatorname{mean}(r)`);
  ``"kronecker"``, per kernel (as an :math:`a \times b` matrix, :math:`a`
  the smaller of its inputs and outputs) the second moment of the
  gradient over that side :math:`L = G G^\top` and its energy along the
  other :math:`c`, pulling by :math:`L (\theta - \theta^*)
  \operatorname{diag}(c) / \operatorname{tr} L` (it protects the
  directions a task used, not only entries); ``"leaf"``, one scalar per
  leaf. Where :math:`a` exceeds :math:`r` = ``kronecker_rank``, the
  running :math:`L` is sketched from :math:`r` columns of :math:`G` drawn
  by their energy, and the consolidated one keeps its top :math:`r`
  directions (the others as their mean): about :math:`r a (a + 2 b)`
  multiply-adds per kernel and step, not :math:`2 a^2 b`. ``running_unit="factored"`` at element granularity factors
  only :math:`\Omega` (each consolidation adds its rank-one
  reconstruction to a per-element :math:`\Omega^*`).

  Memory beyond the optimizer, in copies of float32 params: the anchor
  (exact, in the params' dtype) and :math:`\Omega, \Omega^*` in
  ``importance_dtype``: 3x in float32 (the default), 2x in bfloat16;
  ``running_unit="factored"`` 2x (1.5x), ``"factored"``, ``"leaf"`` 1x,
  ``"kronecker"`` about 2x for square kernels, less for oblong ones (what
  each costs in protection: README, "Estimators").

  Args:
    granularity: the unit of the importances: ``"kronecker"`` (a second
      moment per kernel, the default), ``"element"``, ``"factored"`` (row
      and column means per matrix) or ``"leaf"``.
    importance_decay: :math:`\gamma \in (0, 1)`; the importance averages
      about :math:`1 / (1 - \gamma)` steps.
    fast_decay: :math:`\beta_f \in (0, 1)`, the fast energy average.
    slow_decay: :math:`\beta_s \in (0, 1)`, the slow energy average (and the
      gradient-energy normaliser); must exceed ``fast_decay``.
    shift_ratio: :math:`\rho` above which a shift starts (> 1).
    release_ratio: :math:`\rho` below which it ends (<= ``shift_ratio``).
    warmup_steps: no shift is detected before this many steps.
    consolidation_decay: :math:`\kappa \in [0, 1]`, how much of the
      earlier shifts' importance each consolidation keeps (the decay of
      online EWC); 1 keeps all of it. Below 1, a shift detected inside a
      task (small, noisy batches) weighs less for ever after.
    relative_importance: :math:`c > 0` of the raw score.
    noise_multiplier: :math:`z \ge 0`; 0 (the default) uses
      ``shift_ratio`` alone. Raising it removes detections inside noisy
      tasks, and with them those of short, small-data tasks.
    running_unit: the unit of the running importance :math:`\Omega`;
      ``None`` (the default): the granularity's.
    importance_dtype: the floating dtype that stores :math:`\Omega` and
      :math:`\Omega^*` (computed in float32); ``jnp.bfloat16`` halves them.
    kronecker_rank: :math:`r \ge 2`, at ``"kronecker"`` granularity the
      rank kept of a larger :math:`L`; ``None``: full :math:`L` everywhere.

  Returns:
    A :class:`~sal_jax.StabilityEstimator` with a ``restoring_force`` and
    a ``drift_estimate``.

  Raises:
    TypeError: for an argument of the wrong type.
    ValueError: for hyperparameters outside their ranges.

  Examples:
    >>> import jax.numpy as jnp, sal_jax as sal
    >>> est = sal.shift_consolidation_estimator(granularity="element")
    >>> params = {"w": jnp.zeros(2)}
    >>> state = est.init(params)
    >>> for scale in [1.0] * 20 + [5.0]:  # the last step is a shift
    ...   raw, state = est.update({"w": scale * jnp.ones(2)}, state, params)
    >>> int(state.consolidations), bool(state.shifted)
    (1, True)
    >>> raw["w"]  # both entries carried the same share of the energy
    Array([0.5, 0.5], dtype=float32)

  References:
    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
    networks", PNAS 2017;
    Schwarz et al., "Progress & Compress", ICML 2018 (online EWC);
    Aljundi, Kelchtermans & Tuytelaars, "Task-Free Continual Learning",
    CVPR 2019 (consolidating when the training signal shifts).
  """
  _estimators.validate_granularity(granularity, _units.UNITS)
  if running_unit is None:
    running_unit = granularity
  _estimators.validate_granularity(running_unit, _units.UNITS)
  if (running_unit != granularity
      and (granularity, running_unit) != ("element", "factored")):
    raise ValueError(
        f"{_WHERE}: running_unit={running_unit!r} with "
        f"granularity={granularity!r}; a running importance coarser than "
        "the consolidated one is only 'factored' under 'element'.")
  check = functools.partial(_validation.check_number, _WHERE)
  for name, value in (("importance_decay", importance_decay),
                      ("fast_decay", fast_decay), ("slow_decay", slow_decay)):
    check(name, value, 0.0, 1.0, low_open=True, high_open=True)
  check("shift_ratio", shift_ratio, 1.0, low_open=True)
  check("release_ratio", release_ratio, 0.0, low_open=True)
  check("warmup_steps", warmup_steps, 0, integer=True)
  check("consolidation_decay", consolidation_decay, 0.0, 1.0)
  check("relative_importance", relative_importance, 0.0, low_open=True)
  check("noise_multiplier", noise_multiplier, 0.0)
  numbers = _validation.is_python_number
  if numbers(fast_decay) and numbers(slow_decay) and not (
      fast_decay < slow_decay):
    raise ValueError(
        f"{_WHERE}: fast_decay must be smaller than slow_decay, got "
        f"{fast_decay!r} and {slow_decay!r}.")
  if numbers(release_ratio) and numbers(shift_ratio) and not (
      release_ratio <= shift_ratio):
    raise ValueError(
        f"{_WHERE}: release_ratio must be in (0, shift_ratio], got "
        f"{release_ratio!r}.")
  check("kronecker_rank", kronecker_rank, 2, integer=True, optional=True)
  if not jnp.issubdtype(importance_dtype, jnp.floating):
    raise TypeError(f"{_WHERE}: importance_dtype must be a floating dtype, "
                    f"got {importance_dtype!r}.")
  fast_noise = ((1.0 - fast_decay) / (1.0 + fast_decay)) ** 0.5

  def stored(x):
    return x.astype(importance_dtype)

  def init_fn(params):
    return ShiftConsolidationState(
        count=jnp.zeros((), jnp.int32),
        fast_energy=jnp.zeros((), jnp.float32),
        slow_energy=jnp.zeros((), jnp.float32),
        log_energy=jnp.zeros((2,), jnp.float32),
        shifted=jnp.zeros((), jnp.bool_),
        consolidations=jnp.zeros((), jnp.int32),
        importance=jax.tree.map(lambda p: stored(
            _units.zeros(p, running_unit)), params),
        consolidated=jax.tree.map(lambda p: stored(
            _units.zeros(p, granularity, kronecker_rank)), params),
        # A copy (exact: the params' own dtype), so that donating the
        # params cannot alias the state.
        anchor=jax.tree.map(lambda p: jnp.array(p, copy=True), params),
        reference=jnp.zeros((), jnp.float32),
    )

  def slow_hat(slow_energy, count):
    return slow_energy / (
        1.0 - _tree_utils.decay_power(slow_decay, jnp.maximum(count, 1)))

  def update_fn(updates, state, params, finite=None):
    # Where not finite, every field keeps its value: selects that fuse into
    # the computations that read the old values anyway (protect calls this
    # without a conditional around it; the estimator is `guarded`).
    finite = jnp.ones((), jnp.bool_) if finite is None else finite

    keep_if_not_finite = functools.partial(jnp.where, finite)

    count = state.count + finite.astype(jnp.int32)
    # Each leaf's sum of squares, read once for the energy and (per leaf)
    # for the importance.
    square_sums = _tree_utils.square_sums(updates)
    mean_sq = sum(jax.tree.leaves(square_sums)) / max(
        optax.tree_utils.tree_size(updates), 1)
    fast = fast_decay * state.fast_energy + (1 - fast_decay) * mean_sq
    slow = slow_decay * state.slow_energy + (1 - slow_decay) * mean_sq
    fast_hat = fast / (1.0 - _tree_utils.decay_power(fast_decay, count))
    energy_hat = slow_hat(slow, count)
    ratio = fast_hat / (energy_hat + _TINY)
    log_m = jnp.log(mean_sq + _TINY)
    log_energy = slow_decay * state.log_energy + (1 - slow_decay) * jnp.stack(
        [log_m, jnp.square(log_m)])
    # The noise is that of the steps before this one: a shift must not
    # raise its own bar.
    log_mean, log_sq = state.log_energy / (
        1.0 - _tree_utils.decay_power(slow_decay, jnp.maximum(state.count, 1)))
    sigma = jnp.sqrt(jnp.maximum(log_sq - jnp.square(log_mean), 0.0))
    onset_ratio = jnp.maximum(
        shift_ratio, jnp.exp(noise_multiplier * fast_noise * sigma))
    shifted = jnp.where(state.shifted, ratio > release_ratio,
                        ratio > onset_ratio) & (count > warmup_steps)
    shifted = keep_if_not_finite(shifted, state.shifted)
    onset = shifted & ~state.shifted

    # Consolidate what was gathered before this step's gradient.
    correction = 1.0 - _tree_utils.decay_power(importance_decay,
                                               jnp.maximum(state.count, 1))
    increment_scale = (1 - importance_decay) / (energy_hat + _TINY)
    sketch = None if kronecker_rank is None else (
        jax.random.fold_in(jax.random.key(0), state.count), kronecker_rank)

    def increment(g, q):
      if running_unit == "leaf":  # the leaf's sum of squares, read once
        return q / max(g.size, 1) * increment_scale
      return _units.energy(g, increment_scale, running_unit, sketch)

    increments = jax.tree.map(increment, updates, square_sums)
    importance = jax.tree.map(
        lambda _, o, e: keep_if_not_finite(
            stored(importance_decay * o.astype(jnp.float32) + e), o),
        params, state.importance, increments)

    def consolidate(consolidated, reference):
      def leaf(p, c, o, g, q):
        # The importance before this step's gradient, from the updated one
        # (reading the old one here would make XLA copy it every step to
        # update it in place), the increment recomputed from the gradient
        # (sharing it with the update outside would make XLA write it to a
        # full-size temporary every step).
        # (clipped at 0 where it is a weight, not a second moment's
        # off-diagonal: where it is ~0, the difference rounds either way).
        o = (o.astype(jnp.float32) - increment(g, q)) / importance_decay
        if not _units.is_kronecker_unit(o, p):
          o = jnp.maximum(o, 0.0)
        if _units.is_factored_unit(o, p) and not _units.is_factored_unit(
            c, p):
          o = _units.dense(o, p) * jnp.ones(jnp.shape(p), jnp.float32)
        return stored(_units.accumulate(c, o / correction,
                                        consolidation_decay, p))
      consolidated = jax.tree.map(leaf, params, consolidated, importance,
                                  updates, square_sums)
      travelled = _estimators.weighted_distance(consolidated, params,
                                                state.anchor)
      reference = consolidation_decay * reference + travelled
      return consolidated, reference, jnp.ones((), jnp.bool_)

    # Shifts are rare: a conditional spares the other steps a pass over the
    # consolidated importance. The anchor is a select after it (inside, XLA
    # would copy it out of both branches every step); the select reads the
    # conditional's own flag, so that it runs after the conditional has
    # read the old anchor and can overwrite it in place.
    consolidated, reference, moved = jax.lax.cond(
        onset, consolidate,
        lambda c, r: (c, r, jnp.zeros((), jnp.bool_)),
        state.consolidated, state.reference)
    anchor = jax.tree.map(lambda a, p: jnp.where(moved, p.astype(a.dtype), a),
                          state.anchor, params)
    new_state = ShiftConsolidationState(
        count=count, fast_energy=keep_if_not_finite(fast, state.fast_energy),
        slow_energy=keep_if_not_finite(slow, state.slow_energy),
        log_energy=keep_if_not_finite(log_energy, state.log_energy),
        shifted=shifted,
        consolidations=state.consolidations + onset.astype(jnp.int32),
        importance=importance, consolidated=consolidated, anchor=anchor,
        reference=reference.astype(jnp.float32))

    if granularity in ("factored", "kronecker"):
      raw = _estimators.relative_unit_scores(consolidated, params,
                                             relative_importance)
    else:
      raw = _estimators.relative_scores(consolidated, relative_importance)
    return raw, new_state

  def restoring_force(state, params):
    scale = jnp.sqrt(slow_hat(state.slow_energy, state.count))
    return anchored_pull.anchor_pull(params, state.anchor, state.consolidated,
                                     scale)

  def drift_estimate(state, params):
    distance = _estimators.weighted_distance(state.consolidated, params,
                                             state.anchor)
    moved = state.reference > 0
    return jnp.where(moved, distance / jnp.where(moved, state.reference, 1.0),
                     0.0)

  return _estimators.StabilityEstimator(init_fn, update_fn, restoring_force,
                                        granularity, drift_estimate,
                                        guarded=True)
