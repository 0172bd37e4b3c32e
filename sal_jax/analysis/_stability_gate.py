"""The original's stand-alone gate of a gradient by its stability score."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from sal_jax._protect.gates import DEFAULT_STEEPNESS
from sal_jax._protect.gates import hard_gate
from sal_jax._protect.gates import linear_gate
from sal_jax._protect.gates import sigmoid_gate

# The original's ``StabilityGate`` names its sigmoid gate "soft".
_STABILITY_GATE_TYPES = {"soft": sigmoid_gate, "hard": hard_gate,
                         "linear": linear_gate}


def stability_gate(
    gradient: chex.Array,
    stability_score: chex.Numeric,
    gate_type: str = "soft",
    threshold: float = 0.5,
    steepness: float = DEFAULT_STEEPNESS,
) -> jax.Array:
  r"""Scales a gradient by a gate of its stability score.

  This is the original's stand-alone gate; its ``"soft"`` type is the sigmoid
  gate :math:`g / (1 + e^{k (s - \tau)})` (in :func:`protect` that gate is
  called ``"sigmoid"``, and ``"soft"`` is the original's ``g (1 - s)``).

  .. math::
    \text{soft: } g / (1 + e^{k(s-\tau)}) \qquad
    \text{hard: } 0 \text{ if } s > \tau \qquad
    \text{linear: } g \max(1 - \tfrac{s-\tau}{1-\tau}, 0) \text{ if } s > \tau

  Args:
    gradient: the gradient to gate.
    stability_score: a scalar score, or an array broadcastable to
      ``gradient``.
    gate_type: ``"soft"`` (sigmoid), ``"hard"`` or ``"linear"``.
    threshold: the threshold :math:`\tau`.
    steepness: the sigmoid steepness :math:`k`.

  Returns:
    The gated gradient, same shape and dtype as ``gradient``.

  Raises:
    ValueError: for an unknown ``gate_type``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sal_jax.analysis import stability_gate
    >>> stability_gate(jnp.array([2.0, 4.0]), 0.9, "hard")
    Array([0., 0.], dtype=float32)
    >>> stability_gate(jnp.array([2.0, 4.0]), 0.5, "soft")  # 1 / (1 + e^0)
    Array([1., 2.], dtype=float32)

  References:
    The original SAL library, ``sal.filters.StabilityGate``.
  """
  if gate_type not in _STABILITY_GATE_TYPES:
    raise ValueError(
        f"sal_jax: unknown gate_type {gate_type!r}; expected one of "
        f"{sorted(_STABILITY_GATE_TYPES)}.")
  gradient = jnp.asarray(gradient)
  score = jnp.asarray(stability_score, jnp.float32)
  factor = _STABILITY_GATE_TYPES[gate_type](score, threshold, steepness)
  return (gradient * factor).astype(gradient.dtype)


