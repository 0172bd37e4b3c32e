"""Gates: how a stability score turns into a gradient multiplier.

Every gate maps a score ``s`` and a threshold ``tau`` to a factor ``f`` with
``0 <= f <= 1`` and the gated gradient is ``g * f``:

* ``"soft"``    (the original SAL rule): ``f = 1 - s`` if ``s > tau`` else 1.
* ``"hard"``:   ``f = 0`` if ``s > tau`` else 1.
* ``"linear"``: ``f = max(1 - (s - tau) / (1 - tau), 0)`` if ``s > tau``
  else 1.
* ``"sigmoid"``: ``f = 1 / (1 + exp(k (s - tau)))`` everywhere, with
  steepness ``k``.
* ``"none"``:   ``f = 1``: nothing is gated. For estimators whose
  protection is a restoring pull (``protect(restore=...)``), which the
  optimizer does not undo, and for watching scores without acting on them.

Comparisons are strict: a score exactly at the threshold passes unchanged,
as in the original.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sal_jax._common import tree_utils as _tree_utils
from sal_jax._common import validation as _validation

GateFn = Callable[[jax.Array, jax.Array, float], jax.Array]

DEFAULT_STEEPNESS = 10.0

# Below this gradient norm a leaf counts as "no gradient": rate 0, and the
# threshold is not adapted when the mean norm is below it.
NORM_EPS = 1e-8


def soft_gate(score, threshold, steepness=DEFAULT_STEEPNESS):
  """Original SAL factor: ``1 - s`` above the threshold, else 1."""
  del steepness
  return jnp.where(score > threshold, 1.0 - score, jnp.ones_like(score))


def hard_gate(score, threshold, steepness=DEFAULT_STEEPNESS):
  """Blocks the gradient entirely above the threshold."""
  del steepness
  return jnp.where(score > threshold, jnp.zeros_like(score),
                   jnp.ones_like(score))


def linear_gate(score, threshold, steepness=DEFAULT_STEEPNESS):
  """Ramps from 1 at the threshold down to 0 at a score of 1."""
  del steepness
  # Guard the division: the branch is unused when threshold == 1, but a
  # NaN there would still leak into gradients of the factor.
  span = jnp.maximum(1.0 - threshold, 1e-12)
  ramp = jnp.maximum(1.0 - (score - threshold) / span, 0.0)
  return jnp.where(score > threshold, ramp, jnp.ones_like(score))


def sigmoid_gate(score, threshold, steepness=DEFAULT_STEEPNESS):
  """Smooth step ``1 / (1 + exp(k (s - tau)))``, applied at every score."""
  return jax.nn.sigmoid(-steepness * (score - threshold))


def no_gate(score, threshold, steepness=DEFAULT_STEEPNESS):
  """Passes every gradient unchanged (factor 1)."""
  del threshold, steepness
  return jnp.ones_like(score)


GATES: dict[str, GateFn] = {
    "soft": soft_gate,
    "hard": hard_gate,
    "linear": linear_gate,
    "sigmoid": sigmoid_gate,
    "none": no_gate,
}


def get_gate(name: str) -> GateFn:
  """Looks a gate up by name: ``TypeError`` for a non-string, ``ValueError``
  for an unknown name."""
  if not isinstance(name, str):
    raise TypeError(
        f"sal_jax: gate must be a str, got {type(name).__name__} {name!r}.")
  try:
    return GATES[name]
  except KeyError:
    raise ValueError(
        f"sal_jax: unknown gate {name!r}; expected one of "
        f"{sorted(GATES)}.") from None


def apply_factor(
    update: jax.Array,
    factor: jax.Array,
    step: jax.Array,
    preserve_rms: bool = False,
) -> jax.Array:
  r"""Applies a gate factor to an update, optionally keeping its RMS.

  Plain gating returns :math:`f g`. Scale-invariant optimizers (Adam,
  RMSProp, Adafactor, ...) divide by a running RMS of their input, so a
  factor that changes slowly is undone once that RMS has adapted. With
  ``preserve_rms`` the gated signal is completed by a zero-mean dither of
  the missing energy,

  .. math::
    h = f g + \sqrt{1 - f^2} \, \epsilon_t |g|, \qquad
    \epsilon_t = \pm 1 \text{ alternating with the step and the entry,}

  so that :math:`E[h^2] = g^2` while :math:`E[h] = f\,E[g]`: the optimizer's
  normalizer stays that of the raw gradient and the step it takes shrinks by
  :math:`f`, for as long as the factor holds. With momentum the dither is
  averaged away (a bounded oscillation, no drift).

  Args:
    update: the update to gate.
    factor: gate factor in ``[0, 1]``, broadcastable to ``update``.
    step: the step count (int); sets the dither's sign.
    preserve_rms: whether to add the energy-preserving dither.

  Returns:
    The gated update, same shape and dtype as ``update``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax import apply_factor
    >>> g = jnp.array([2.0, 2.0])
    >>> apply_factor(g, 0.5, 0)
    Array([1., 1.], dtype=float32)
    >>> h0 = apply_factor(g, 0.6, 0, preserve_rms=True)
    >>> h1 = apply_factor(g, 0.6, 1, preserve_rms=True)
    >>> (h0 + h1) / 2, jnp.sqrt((h0**2 + h1**2) / 2)  # mean f*g, RMS |g|
    (Array([1.2, 1.2], dtype=float32), Array([2., 2.], dtype=float32))

  References:
    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015
    (the per-parameter normalization this gate is built to survive).
  """
  factor = jnp.asarray(factor, jnp.float32)
  # At least float32; float64 and complex updates keep their precision.
  g = update.astype(_tree_utils.state_dtype(update))
  out = factor * g
  if preserve_rms:
    # Neighbouring entries take opposite signs so that the dither does not
    # move whole tensors in phase.
    parity = jnp.zeros(jnp.shape(g), jnp.int32)
    if g.ndim:
      parity = jax.lax.broadcasted_iota(jnp.int32, g.shape, g.ndim - 1)
    sign = jnp.where((parity + step) % 2 == 0, 1.0, -1.0)
    residual = jnp.sqrt(jnp.clip(1.0 - jnp.square(factor), 0.0, 1.0))
    out = out + residual * sign * jnp.abs(g)
  return out.astype(update.dtype)


def adapt_threshold(magnitudes_sum, magnitudes_sq_sum, count, base,
                    adaptation, low, high, previous):
  """``clip(base + adaptation * std / (mean + eps), low, high)``."""
  mean = magnitudes_sum / count
  var = jnp.maximum(magnitudes_sq_sum / count - jnp.square(mean), 0.0)
  adapted = jnp.clip(base + adaptation * jnp.sqrt(var) / (mean + NORM_EPS),
                     low, high)
  return jnp.where(mean >= NORM_EPS, adapted, previous)


def protection_rate(gate_fn, granularity, g, s, norm_in, threshold,
                    steepness):
  """``1 - ||g f|| / ||g||`` of one leaf, ``f`` the gate's factor."""
  if gate_fn is no_gate:
    # Nothing is gated: the rate is 0 without another pass over g.
    return jnp.zeros((), jnp.float32)
  if granularity == "leaf":
    f = gate_fn(s.astype(jnp.float32), threshold, steepness)
    norm_out = jnp.abs(f) * norm_in  # f is one scalar for the leaf
  else:
    # The factor is recomputed from the scores behind a barrier: were
    # the factor array shared by this reduction and the gated update,
    # XLA would write it to a full-size temporary.
    s = jax.lax.optimization_barrier(s)
    f = gate_fn(s.astype(jnp.float32), threshold, steepness)
    norm_out = jnp.sqrt(jnp.sum(jnp.square(_tree_utils.to_real(g) * f)))
  safe = jnp.where(norm_in > NORM_EPS, norm_in, 1.0)
  return jnp.where(norm_in > NORM_EPS, 1.0 - norm_out / safe, 0.0)


# What protect's gate-only arguments default to; with no gate (gate="none")
# anything else is an error: it would act on nothing.
GATE_ONLY_DEFAULTS = {
    "threshold": 0.5, "threshold_adaptation": 0.1, "score_ema": 0.3,
    "initial_score": 0.5, "threshold_range": (0.1, 0.9),
    "steepness": DEFAULT_STEEPNESS, "preserve_rms": False,
    "state_dtype": None,
}


def _is_default(value, default) -> bool:
  if value is default:
    return True
  if default is None or isinstance(default, bool):
    return isinstance(value, (bool, np.bool_)) and bool(value) is default
  if isinstance(value, (jax.Array, np.ndarray)):
    # optax.inject_hyperparams passes every numeric default as an array:
    # only Python values are checked, as for the ranges.
    return True
  try:
    return bool(value == default)
  except (TypeError, ValueError):
    return False


def check_gate_only_args(where: str, gate: str, args: dict) -> None:
  """Raises ``ValueError`` for a gate-only argument set without a gate."""
  # A wrong type is a TypeError, with a gate or without.
  _validation.check_pair(where, "threshold_range", args["threshold_range"],
                         "(low, high)")
  for name, value in args.items():
    if not _is_default(value, GATE_ONLY_DEFAULTS[name]):
      raise ValueError(
          f"{where}: {name}={value!r} only acts through a gate, and this "
          f"protect has none (gate={gate!r}: protection by the restoring "
          "pull alone, the default with a pulling estimator); pass a gate "
          "(gate='soft', 'hard', 'linear' or 'sigmoid') or drop "
          f"{name}.")


def update_rates(gate_fn, granularity, updates, scores, norms, threshold,
                 steepness, finite, rates, mean_rate, count):
  """The per-leaf protection rates and their running mean over steps.

  The rate measures the gated mean signal ``f g`` (what the optimizer's
  step shrinks by), not the dither or a restoring pull. A non-finite step
  keeps both.
  """
  rates = jax.tree.map(
      lambda g, s, n, old: jnp.where(finite, protection_rate(
          gate_fn, granularity, g, s, n, threshold, steepness),
                                     old).astype(old.dtype),
      updates, scores, norms, rates)
  rate_leaves = jax.tree.leaves(rates)
  step_rate = (sum(r.astype(jnp.float32) for r in rate_leaves)
               / len(rate_leaves) if rate_leaves
               else jnp.zeros((), jnp.float32))
  mean_rate = jnp.where(
      finite, mean_rate + (step_rate - mean_rate)
      / jnp.maximum(count, 1).astype(jnp.float32), mean_rate)
  return rates, mean_rate.astype(jnp.float32)


def check_threshold_range(where: str, threshold, threshold_range) -> tuple:
  """Validates ``threshold_range`` (and ``threshold`` inside it).

  Returns:
    ``(low, high)``.
  """
  low, high = _validation.check_pair(where, "threshold_range",
                                     threshold_range, "(low, high)")
  _validation.check_number(where, "threshold_range[0]", low, 0.0, 1.0)
  _validation.check_number(where, "threshold_range[1]", high, 0.0, 1.0)
  numbers = _validation.is_python_number
  if numbers(low) and numbers(high) and not low <= high:
    raise ValueError(
        f"{where}: threshold_range must satisfy 0 <= low <= high <= 1, got "
        f"{threshold_range!r}.")
  if numbers(threshold) and numbers(low) and numbers(high) and not (
      low <= threshold <= high):
    # The adapted threshold is clipped into threshold_range: a base outside
    # it would silently act as the nearest bound.
    raise ValueError(
        f"{where}: threshold {threshold!r} lies outside threshold_range "
        f"{threshold_range!r}, into which the adapted threshold is clipped; "
        "widen threshold_range.")
  return low, high
