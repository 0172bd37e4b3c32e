r"""The stability states: one rule for "protected", "neutral" and "volatile".

A stability score :math:`s` is

.. math::
  \text{protected if } s \ge \tau_p, \quad
  \text{volatile if } s \le \tau_v \text{ (and not protected)}, \quad
  \text{neutral otherwise,}

with :math:`\tau_p = 0.7` and :math:`\tau_v = 0.3` unless given. Every
count of states (``sal_jax.metrics``, ``sal_jax.analysis.classify``,
``spectrum`` and ``stability_summary``) uses this rule, so a score of
exactly 0.7 is protected wherever it is counted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PROTECTED_THRESHOLD = 0.7
VOLATILE_THRESHOLD = 0.3


def state_masks(
    scores: jax.Array,
    protected_threshold=PROTECTED_THRESHOLD,
    volatile_threshold=VOLATILE_THRESHOLD,
) -> tuple[jax.Array, jax.Array]:
  r"""Boolean masks ``(protected, volatile)`` of an array of scores.

  Args:
    scores: an array of stability scores.
    protected_threshold: :math:`\tau_p`.
    volatile_threshold: :math:`\tau_v`.

  Returns:
    Two boolean arrays shaped like ``scores``; an entry is in at most one.

  Examples:
    >>> import jax.numpy as jnp
    >>> prot, vol = state_masks(jnp.array([0.7, 0.5, 0.3]))
    >>> prot.tolist(), vol.tolist()
    ([True, False, False], [False, False, True])
  """
  scores = jnp.asarray(scores)
  protected = scores >= protected_threshold
  volatile = ~protected & (scores <= volatile_threshold)
  return protected, volatile
