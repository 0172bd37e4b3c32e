"""The consolidation estimator: importance-weighted anchors, no task boundaries.

Each parameter remembers *where it sat while it mattered*. Its importance is
the share of the network's gradient energy it has carried, accumulated over a
long horizon; its anchor is the importance-weighted average of its past
values. A parameter that carried much of the signal and has since been left
alone is settled structure: its score is high and, with
``protect(restore=...)``, it is pulled back toward its anchor when new
gradients push it away. Both statistics move on the slow timescale of the
importance horizon (``1 / (1 - importance_decay)`` steps), so a new task's
gradients do not wash out what was consolidated before them.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from sal_jax._protect import estimators as _estimators
from sal_jax._common import anchored_pull
from sal_jax._common import tree_utils as _tree_utils
from sal_jax._common import units as _units
from sal_jax._common import validation as _validation

_TINY = _estimators.TINY


class ConsolidationState(NamedTuple):
  """State of :func:`consolidation_estimator`.

  The dtypes do not depend on ``jax_enable_x64``. What follows the params
  is the anchor, a position: it has the params' dtype, at least float32
  (float32 for bfloat16, float16 and float32 params; float64 and complex
  kept), so that the pull toward it is exact at the params' precision. The
  statistics are float32 whatever the params: they are weights and
  magnitudes (real even for complex params), whose float32 rounding moves a
  score or the strength of the pull by 1e-7, never where it pulls to.

  Attributes:
    count: steps taken, int32.
    gradient_energy: slow EMA (not bias-corrected) of the mean squared
      gradient entry over the whole tree, float32.
    importance: EMA (not bias-corrected) of each unit's relative gradient
      energy, float32; per element, or a scalar per leaf at leaf
      granularity.
    anchor: importance-weighted running average of the params, in the
      params' dtype promoted to at least float32.
  """
  count: jax.Array
  gradient_energy: jax.Array
  importance: chex.ArrayTree
  anchor: chex.ArrayTree


def consolidation_estimator(
    granularity: str = "leaf",
    importance_decay: float = 0.999,
    energy_decay: float = 0.99,
    relative_importance: float = 1.0,
) -> _estimators.StabilityEstimator:
  r"""Stability as consolidated importance, with an anchor to return to.

  With :math:`g` the update (gradient), :math:`\bar e_t` a slow EMA (decay
  ``energy_decay``, bias-corrected) of the mean of :math:`g^2` over all
  entries, and :math:`\gamma` = ``importance_decay``, every unit :math:`i`
  (an entry, or a leaf at leaf granularity, using the mean of :math:`g^2`
  over the leaf) keeps

  .. math::
    \delta_i = g_i^2 / \bar e_t, \qquad
    \Omega_i \leftarrow \gamma \Omega_i + (1 - \gamma) \delta_i, \qquad
    \bar\theta_i \leftarrow \bar\theta_i
      + \frac{(1 - \gamma)\delta_i}{\Omega_i} (\theta_i - \bar\theta_i),

  so :math:`\bar\theta` is the :math:`\delta`-weighted average of past
  params (discounted by :math:`\gamma`). With :math:`\hat\Omega` the
  bias-corrected importance (mean about 1 over the network), the raw score
  and the restoring force are

  .. math::
    r_i = \frac{\hat\Omega_i}{\hat\Omega_i + c \,
      \operatorname{mean}(\hat\Omega)}, \qquad
    F_i = \Omega_i \sqrt{\bar e_t} \, (\theta_i - \bar\theta_i),

  with :math:`c` = ``relative_importance``. The force uses the importance
  before bias correction, so it builds up over the importance horizon (a
  model learns freely before it consolidates), and it is in gradient units
  (:math:`\sqrt{\bar e}`), so one ``protect(restore=...)`` strength means
  about the same across models and losses of different scale. It is a
  streaming, boundary-free form of EWC's penalty gradient
  :math:`\lambda F (\theta - \theta^*)`, whose anchor is not a snapshot
  but where each parameter sat while it carried the gradient.

  Memory: the anchor (a float32 copy of the params; float64 or complex
  params keep their dtype, see :class:`ConsolidationState`) plus the
  importance (a float32 copy at element granularity, one scalar per leaf at
  leaf granularity).

  Args:
    granularity: ``"leaf"`` or ``"element"``.
    importance_decay: :math:`\gamma \in (0, 1)`; the horizon of the
      consolidated importance is about :math:`1 / (1 - \gamma)` steps.
    energy_decay: decay in ``(0, 1)`` of the gradient-energy normaliser.
    relative_importance: :math:`c > 0`, the relative importance at which a
      unit scores 0.5.

  Returns:
    A :class:`~sal_jax.StabilityEstimator` with a ``restoring_force``.

  Raises:
    TypeError: for an argument of the wrong type.
    ValueError: for hyperparameters outside their ranges.

  Examples:
    >>> import jax.numpy as jnp
    >>> import sal_jax as sal
    >>> est = sal.consolidation_estimator(granularity="element")
    >>> params = {"w": jnp.zeros(2)}
    >>> state = est.init(params)
    >>> raw, state = est.update({"w": jnp.array([3.0, 1.0])}, state, params)
    >>> raw["w"]  # the first entry carried 9/10 of the gradient energy
    Array([0.64285713, 0.16666667], dtype=float32)
    >>> force = est.restoring_force(state, {"w": jnp.array([1.0, 1.0])})

  References:
    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
    networks", PNAS 2017 (the quadratic pull);
    Schwarz et al., "Progress & Compress", ICML 2018 (online consolidation).
  """
  _estimators.validate_granularity(granularity)
  where = "sal_jax.consolidation_estimator"
  for name, value in (("importance_decay", importance_decay),
                      ("energy_decay", energy_decay)):
    _validation.check_number(where, name, value, 0.0, 1.0, low_open=True,
                             high_open=True)
  _validation.check_number(where, "relative_importance", relative_importance,
                           0.0, low_open=True)
  def init_fn(params):
    return ConsolidationState(
        count=jnp.zeros((), jnp.int32),
        gradient_energy=jnp.zeros((), jnp.float32),
        importance=jax.tree.map(
            lambda p: _units.zeros(p, granularity), params),
        # A copy, so that donating the params cannot alias the state.
        anchor=jax.tree.map(
            lambda p: jnp.array(p, _tree_utils.state_dtype(p)), params),
    )

  def corrected_energy(state):
    return state.gradient_energy / (
        1.0 - _tree_utils.decay_power(energy_decay, state.count))

  def corrected_importance(state):
    correction = 1.0 - _tree_utils.decay_power(importance_decay, state.count)
    return jax.tree.map(lambda o: o / correction, state.importance)

  def update_fn(updates, state, params):
    count = state.count + 1
    mean_sq = _tree_utils.mean_square(updates)
    energy = energy_decay * state.gradient_energy + (1 - energy_decay) * mean_sq
    energy_hat = energy / (1.0 - _tree_utils.decay_power(energy_decay, count))
    increments = jax.tree.map(
        lambda g: _units.energy(
            g, (1 - importance_decay) / (energy_hat + _TINY), granularity),
        updates)
    importance = jax.tree.map(lambda o, d: importance_decay * o + d,
                              state.importance, increments)
    anchor = jax.tree.map(
        lambda a, p, d, o: a + d / (o + _TINY) * (p.astype(a.dtype) - a),
        state.anchor, params, increments, importance)
    new_state = ConsolidationState(count, energy, importance, anchor)

    raw = _estimators.relative_scores(corrected_importance(new_state),
                                      relative_importance)
    return raw, new_state

  def restoring_force(state, params):
    # The importance is not bias-corrected here: the pull builds up over the
    # importance horizon, so a model is free to learn before it consolidates.
    scale = jnp.sqrt(corrected_energy(state))
    return anchored_pull.anchor_pull(params, state.anchor, state.importance,
                                     scale)

  return _estimators.StabilityEstimator(init_fn, update_fn, restoring_force,
                                        granularity)
