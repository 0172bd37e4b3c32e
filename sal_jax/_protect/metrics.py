"""Metrics read from an optimizer state that contains :func:`protect`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sal_jax._common import nnx_interop as _nnx_interop
from sal_jax._common import stability_states
from sal_jax._protect import budget as _budget
from sal_jax._protect import protect as _protect


def _is_protect_state(x: Any) -> bool:
  return isinstance(x, _protect.ProtectState)


def find_protect_states(opt_state: Any) -> list[_protect.ProtectState]:
  """Every :class:`ProtectState` inside an optimizer state, in tree order.

  Works through ``optax.chain``, ``optax.masked``, ``optax.multi_transform``,
  ``optax.inject_hyperparams``, ``optax.MultiSteps``,
  ``optax.apply_if_finite`` states (anything that is a pytree), and
  ``flax.nnx.Optimizer`` objects (their nnx variables are unwrapped).

  Args:
    opt_state: an optimizer state (any pytree) or an ``nnx.Optimizer``.

  Returns:
    The list of protect states found (possibly empty).

  Examples:
    >>> import jax.numpy as jnp, optax, sal_jax as sal
    >>> tx = optax.chain(sal.protect(), optax.adam(1e-3))
    >>> len(sal.find_protect_states(tx.init({"w": jnp.zeros(2)})))
    1
  """
  # A flax.nnx.Optimizer keeps its optax state in `.opt_state`, with every
  # array wrapped in an nnx Variable.
  opt_state = getattr(opt_state, "opt_state", opt_state)
  found = optax.tree_utils.tree_get_all_with_path(
      opt_state, _protect.ProtectState.__name__,
      filtering=lambda _, x: _is_protect_state(x))
  return [_nnx_interop.unwrap_variables(x) for _, x in found]


def _gate_metrics(state) -> dict[str, jax.Array]:
  scores = [s.astype(jnp.float32).ravel()
            for s in jax.tree.leaves(state.scores)]
  rates = [r.astype(jnp.float32) for r in
           jax.tree.leaves(state.protection_rates)]
  if scores:
    flat = jnp.concatenate(scores)
    protected, volatile = (jnp.mean(m) for m in
                           stability_states.state_masks(flat))
    mean_score = jnp.mean(flat)
    rate = jnp.mean(jnp.stack(rates))
  else:
    protected = volatile = mean_score = rate = jnp.zeros((), jnp.float32)
  return {
      "threshold": state.threshold,
      "protection_rate": rate.astype(jnp.float32),
      "mean_protection_rate": state.mean_protection_rate,
      "protected_fraction": protected.astype(jnp.float32),
      "neutral_fraction": (1.0 - protected - volatile).astype(jnp.float32),
      "volatile_fraction": volatile.astype(jnp.float32),
      "mean_score": mean_score.astype(jnp.float32),
  }


def metrics(opt_state: Any) -> dict[str, jax.Array]:
  r"""SAL metrics of an optimizer state, as a dict of jnp scalars.

  Usable inside ``jax.jit`` (nothing leaves the device). With :math:`s` the
  stability scores of all units (leaves, or elements at element
  granularity):

  * ``step``: the number of steps taken;
  * only with a gate (not ``gate="none"``, the default with a pulling
    estimator, which keeps no scores):
    ``threshold``: the adapted threshold of the last step;
    ``protection_rate``: mean over leaves of ``1 - ||g_out|| / ||g||`` at the
    last step; ``mean_protection_rate``: its running mean over steps;
  * ``protected_fraction`` :math:`= \operatorname{mean}(s \ge 0.7)`,
    ``volatile_fraction`` :math:`= \operatorname{mean}(s \le 0.3)`,
    ``neutral_fraction``: the rest (the rule of
    :func:`sal_jax.analysis.classify`);
  * ``mean_score``: the mean score over units;
  * ``consolidations`` (int32), only with an estimator that counts them
    (``"shift_consolidation"``): the shifts (and :func:`consolidate` calls)
    so far;
  * ``estimated_forgetting`` and ``multiplier``, only with
    ``protect(budget=...)`` (the last drift passed to ``update``) or
    ``protect(relative_budget=...)`` (the estimator's estimate at the last
    step), and the multiplier the controller applied to the pull then.

  Args:
    opt_state: an optimizer state holding exactly one
      :class:`~sal_jax.ProtectState` (or that state itself), or a
      ``flax.nnx.Optimizer``.

  Returns:
    A dict of float32 (``step``, ``consolidations``: int32) scalars.

  Raises:
    ValueError: if the state holds no protect state, or several (then pass
      the part of the state you want).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sal_jax as sal
    >>> params = {"w": jnp.ones(3)}
    >>> tx = optax.chain(sal.protect(estimator="reference"), optax.adam(1e-3))
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.ones(3)}, state, params)
    >>> m = jax.jit(sal.metrics)(state)
    >>> int(m["step"]), round(float(m["protection_rate"]), 2)
    (1, 0.65)

  References:
    The original SAL library, ``CommunicationLayer.get_state``.
  """
  found = find_protect_states(opt_state)
  if not found:
    raise ValueError(
        "sal_jax.metrics: no ProtectState found in the optimizer state; is "
        "sal_jax.protect() part of the optimizer?")
  if len(found) > 1:
    raise ValueError(
        f"sal_jax.metrics: found {len(found)} ProtectStates; pass the part "
        "of the optimizer state that holds the one you want (see "
        "sal_jax.find_protect_states).")
  state = found[0]
  out = {"step": state.count}
  if not isinstance(state.scores, optax.EmptyState):
    out.update(_gate_metrics(state))
  consolidations = getattr(state.estimator_state, "consolidations", None)
  if consolidations is not None:
    out["consolidations"] = consolidations
  if isinstance(state.budget_state, _budget.BudgetState):
    out["estimated_forgetting"] = state.budget_state.drift
    out["multiplier"] = state.budget_state.multiplier
  return out
