"""The original's stand-alone gate of a gradient by its stability score."""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp

from sal_jax._protect.gates import DEFAULT_STEEPNESS
from sal_jax._protect.gates import hard_gate
from sal_jax._protect.gates import linear_gate
from sal_jax._protect.gates import sigmoid_gate

# The names protect(gate=...) gives these gates.
_STABILITY_GATE_TYPES = {"sigmoid": sigmoid_gate, "hard": hard_gate,
                         "linear": linear_gate}


def stability_gate(
    gradient: chex.Array,
    stability_score: chex.Numeric,
    gate_type: str = "sigmoid",
    threshold: float = 0.5,
    steepness: float = DEFAULT_STEEPNESS,
) -> jax.Array:
  r"""Scales a gradient by a gate of its stability score.

  .. math::
    \text{sigmoid: } g / (1 + e^{k(s-\tau)}) \qquad
    \text{hard: } 0 \text{ if } s > \tau \qquad
    \text{linear: } g \max(1 - \tfrac{s-\tau}{1-\tau}, 0) \text{ if } s > \tau

  The gate types carry the names of the same gates in
  :func:`sal_jax.protect`. The original's stand-alone gate calls its
  sigmoid gate ``"soft"`` (its default), while ``protect(gate="soft")`` is
  the original's ``g (1 - s)``; ``gate_type="soft"`` still selects the
  sigmoid gate, with a ``DeprecationWarning``, for one release.

  Args:
    gradient: the gradient to gate.
    stability_score: a scalar score, or an array broadcastable to
      ``gradient``.
    gate_type: ``"sigmoid"``, ``"hard"`` or ``"linear"``.
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
    >>> stability_gate(jnp.array([2.0, 4.0]), 0.5)  # 1 / (1 + e^0)
    Array([1., 2.], dtype=float32)

  References:
    The original SAL library, ``sal.filters.StabilityGate``.
  """
  if gate_type == "soft":
    warnings.warn(
        "sal_jax.analysis.stability_gate: gate_type='soft' is the sigmoid "
        "gate here but 1 - s in sal_jax.protect(gate='soft'); pass "
        "gate_type='sigmoid'. 'soft' will be removed in the next release.",
        DeprecationWarning, stacklevel=2)
    gate_type = "sigmoid"
  if gate_type not in _STABILITY_GATE_TYPES:
    raise ValueError(
        f"sal_jax: unknown gate_type {gate_type!r}; expected one of "
        f"{sorted(_STABILITY_GATE_TYPES)}.")
  gradient = jnp.asarray(gradient)
  score = jnp.asarray(stability_score, jnp.float32)
  factor = _STABILITY_GATE_TYPES[gate_type](score, threshold, steepness)
  return (gradient * factor).astype(gradient.dtype)
