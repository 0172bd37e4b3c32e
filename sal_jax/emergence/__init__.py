"""The emergence field: coherence, novelty and resonance of a pattern stream.

:func:`emergence_init` and :func:`observe` watch a stream of patterns (a
hidden layer, an embedding) with a fixed-size memory, jittable, ``vmap``-able
and ``scan``-able; the scores are also available one by one.
:func:`calibrated_init` and :func:`calibrated_observe` add a rule relative
to the run's own history: a signal far from its running mean (z-score), or
a sustained drift from a reference level (one-sided CUSUM).
"""

from sal_jax.emergence._calibrated import CalibratedEmergence
from sal_jax.emergence._calibrated import CalibratedFieldState
from sal_jax.emergence._calibrated import calibrated_init
from sal_jax.emergence._calibrated import calibrated_observe
from sal_jax.emergence._field import EmergenceFieldState
from sal_jax.emergence._field import emergence_history_size
from sal_jax.emergence._field import emergence_init
from sal_jax.emergence._field import emergence_rate
from sal_jax.emergence._field import observe
from sal_jax.emergence._scores import EmergenceState
from sal_jax.emergence._scores import coherence_score
from sal_jax.emergence._scores import detect_emergence
from sal_jax.emergence._scores import emergence_state
from sal_jax.emergence._scores import novelty_score
from sal_jax.emergence._scores import resonance_measure

__all__ = (
    "CalibratedEmergence",
    "CalibratedFieldState",
    "EmergenceFieldState",
    "EmergenceState",
    "calibrated_init",
    "calibrated_observe",
    "coherence_score",
    "detect_emergence",
    "emergence_history_size",
    "emergence_init",
    "emergence_rate",
    "emergence_state",
    "novelty_score",
    "observe",
    "resonance_measure",
)
