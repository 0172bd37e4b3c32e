"""The drift budget: a controller that sets the restoring pull's strength.

A fixed strength ``restore`` has no stable scale: the value that protects
one sequence of tasks collapses plasticity on another. A budget states
instead how far the model's earlier behaviour may drift, in the units of a
drift the user measures (e.g. :func:`sal_jax.prediction_drift`, nats of KL
on a few earlier inputs), and a multiplier on the pull adapts, in log space,
until the measured drift sits at the budget: the adaptive KL controller of
RLHF (Ziegler et al. 2019) acting on a parameter-space pull instead of a
reward penalty. In log space the controller is scale-free: its gains mean
the same whatever the budget, the loss or the pull's natural scale.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from sal_jax._common import validation as _validation

_WHERE = "sal_jax.protect"

# The log-ratio error is clipped to +-ERROR_CLIP: a drift 100x over budget
# raises the strength no faster than one 7.4x over (anti-windup), and a
# drift of 0 (nothing moved yet) lowers it at a bounded rate.
ERROR_CLIP = 2.0

# The multiplier stays in [1, MAX_MULTIPLIER] times ``restore``: below the
# budget the pull rests at the fixed strength, never below it.
MAX_MULTIPLIER = 1e6

DEFAULT_INTEGRAL_GAIN = 0.05
DEFAULT_PROPORTIONAL_GAIN = 0.5

MISSING_DRIFT_MESSAGE = (
    "sal_jax.protect(budget=...) keeps a measured drift at or below the "
    "budget, but no drift was passed: call update(updates, state, params, "
    "drift=d) with d a float scalar measured at the current params, e.g. "
    "sal.prediction_drift(anchor_logits, logits) on a few earlier inputs "
    "(with flax.nnx: optimizer.update(model, grads, drift=d)).")


class BudgetState(NamedTuple):
  """State of the drift-budget controller (float32 scalars).

  Attributes:
    log_multiplier: :math:`\\ell`, the integral term: the log of the pull's
      multiplier over ``restore``, in ``[0, log(MAX_MULTIPLIER)]``.
    multiplier: the multiplier applied at the last step,
      :math:`\\exp(\\ell + k_p e)`.
    drift: the last finite drift passed to ``update`` (0 before any).
  """
  log_multiplier: jax.Array
  multiplier: jax.Array
  drift: jax.Array


def check_config(budget, relative_budget, gains, restore, estimator,
                 has_force: bool, can_estimate: bool):
  """Checks ``protect``'s budget arguments.

  Returns:
    ``(limit, integral_gain, proportional_gain)``: ``limit`` is the budget
    in force (``None`` for a fixed strength).
  """
  check = functools.partial(_validation.check_number, _WHERE)
  check("budget", budget, 0.0, optional=True, low_open=True)
  check("relative_budget", relative_budget, 0.0, optional=True,
        low_open=True)
  integral_gain, proportional_gain = _validation.check_pair(
      _WHERE, "budget_gains", gains, "(integral, proportional)")
  check("budget_gains[0]", integral_gain, 0.0, low_open=True)
  check("budget_gains[1]", proportional_gain, 0.0)
  if budget is not None and relative_budget is not None:
    raise ValueError(
        f"{_WHERE}: pass budget (a measured drift, passed to update) or "
        "relative_budget (a drift estimated from the params), not both.")
  limit = budget if relative_budget is None else relative_budget
  if limit is not None and not has_force:
    raise ValueError(
        f"{_WHERE}: a budget sets the strength of the restoring pull, and "
        f"{estimator!r} has none; use an estimator with a restoring force "
        "(the default, 'shift_consolidation').")
  if relative_budget is not None and not can_estimate:
    raise ValueError(
        f"{_WHERE}: relative_budget needs an estimator that estimates the "
        f"drift from its state ({estimator!r} does not); use the default "
        "'shift_consolidation', or budget= with a measured drift.")
  if limit is not None and _validation.is_python_number(restore) and (
      restore == 0):
    raise ValueError(
        f"{_WHERE}: restore=0 turns the pull off, so a budget would act "
        "on nothing; restore is the strength the budget's multiplier "
        "starts from (default 1).")
  return limit, integral_gain, proportional_gain


def init() -> BudgetState:
  zero = jnp.zeros((), jnp.float32)
  return BudgetState(log_multiplier=zero, multiplier=jnp.ones((), jnp.float32),
                     drift=zero)


def as_drift(drift) -> jax.Array:
  """``drift`` as a float32 scalar; a clear error for anything else."""
  if drift is None:
    raise ValueError(MISSING_DRIFT_MESSAGE)
  drift = jnp.asarray(drift)
  if drift.shape != () or not (jnp.issubdtype(drift.dtype, jnp.floating)
                               or jnp.issubdtype(drift.dtype, jnp.integer)):
    raise ValueError(
        f"{_WHERE}: drift must be a real scalar (the measured drift, e.g. "
        f"sal.prediction_drift(...)); got dtype {drift.dtype} and shape "
        f"{drift.shape}.")
  return drift.astype(jnp.float32)


def step(state: BudgetState, drift: jax.Array, budget: chex.Numeric,
         integral_gain: chex.Numeric, proportional_gain: chex.Numeric,
         active: jax.Array) -> BudgetState:
  r"""One controller step, in log space.

  .. math::
    e = \operatorname{clip}\big(\log(D / \varepsilon), -2, 2\big), \quad
    \ell \leftarrow \operatorname{clip}(\ell + k_i e, 0, \log 10^6), \quad
    m = \exp\big(\operatorname{clip}(\ell + k_p e, 0, \log 10^6)\big).

  ``active`` False (a non-finite step, or a non-finite drift) keeps the
  state.
  """
  active = active & jnp.isfinite(drift)
  budget = jnp.asarray(budget, jnp.float32)
  ratio = jnp.maximum(drift, 0.0) / budget
  # log(0) = -inf is clipped like any drift far below the budget.
  error = jnp.clip(jnp.log(jnp.maximum(ratio, 1e-30)), -ERROR_CLIP,
                   ERROR_CLIP)
  top = jnp.log(jnp.float32(MAX_MULTIPLIER))
  log_m = jnp.clip(state.log_multiplier + integral_gain * error, 0.0, top)
  multiplier = jnp.exp(jnp.clip(log_m + proportional_gain * error, 0.0, top))
  new = BudgetState(log_multiplier=log_m.astype(jnp.float32),
                    multiplier=multiplier.astype(jnp.float32),
                    drift=drift)
  return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)
