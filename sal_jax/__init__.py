"""sal_jax: Self-Alignment Learning for JAX and optax.

SAL measures how settled each parameter is and softly protects what has
emerged, as a pure functional ``optax.GradientTransformation``::

  tx = optax.chain(sal.protect(), optax.adamw(1e-3))

The top level holds what a user of :func:`protect` needs: the
transformation, its state and metrics, its estimators and gates, and the
consolidation from a pretrained model. The other tools live in namespaces:
:mod:`sal_jax.analysis` (stability analyzer, spectrum, drift, filters,
similarity, seeds, EMA), :mod:`sal_jax.emergence` (the emergence field),
:mod:`sal_jax.baselines` (continual-learning baselines as optax
transformations) and :mod:`sal_jax.contrib` (experimental: the
Pulse-Split-Cascade).
"""

from sal_jax import analysis
from sal_jax import baselines
from sal_jax import emergence
from sal_jax._common import deprecation as _deprecation
from sal_jax._protect.budget import BudgetState
from sal_jax._protect.consolidate import consolidate
from sal_jax._protect.consolidation import ConsolidationState
from sal_jax._protect.consolidation import consolidation_estimator
from sal_jax._protect.estimator_registry import ESTIMATORS
from sal_jax._protect.estimator_registry import get_estimator
from sal_jax._protect.estimators import ReferenceEstimatorState
from sal_jax._protect.estimators import StabilityEstimator
from sal_jax._protect.estimators import reference_estimator
from sal_jax._protect.fisher import combine_fishers
from sal_jax._protect.fisher import fisher_diagonal
from sal_jax._protect.fisher import fisher_kronecker
from sal_jax._protect.gates import GATES
from sal_jax._protect.gates import apply_factor
from sal_jax._protect.gates import get_gate
from sal_jax._protect.gates import hard_gate
from sal_jax._protect.gates import linear_gate
from sal_jax._protect.gates import no_gate
from sal_jax._protect.gates import sigmoid_gate
from sal_jax._protect.gates import soft_gate
from sal_jax._protect.metrics import find_protect_states
from sal_jax._protect.metrics import metrics
from sal_jax._protect.prediction_drift import prediction_drift
from sal_jax._protect.protect import ProtectState
from sal_jax._protect.protect import protect
from sal_jax._protect.shift_consolidation import ShiftConsolidationState
from sal_jax._protect.shift_consolidation import shift_consolidation_estimator

__version__ = "0.1.0"

__all__ = (
    "BudgetState",
    "ConsolidationState",
    "ESTIMATORS",
    "GATES",
    "ProtectState",
    "ReferenceEstimatorState",
    "ShiftConsolidationState",
    "StabilityEstimator",
    "apply_factor",
    "combine_fishers",
    "consolidate",
    "consolidation_estimator",
    "find_protect_states",
    "fisher_diagonal",
    "fisher_kronecker",
    "get_estimator",
    "get_gate",
    "hard_gate",
    "linear_gate",
    "metrics",
    "no_gate",
    "prediction_drift",
    "protect",
    "reference_estimator",
    "shift_consolidation_estimator",
    "sigmoid_gate",
    "soft_gate",
)

# Old top-level paths of the analysis and emergence names: they resolve, with
# a DeprecationWarning naming the namespace, until the next release.
__getattr__ = _deprecation.moved_names("sal_jax", {
    **{name: "sal_jax.analysis" for name in (
        "AdaptiveFilterState",
        "DIAGNOSES",
        "EMAState",
        "NEUTRAL",
        "PROTECTED",
        "RunningAnalyzerState",
        "STATE_NAMES",
        "StabilityAnalyzer",
        "StabilitySpectrum",
        "VOLATILE",
        "WindowedAnalyzerState",
        "adaptive_filter_adapt",
        "adaptive_filter_init",
        "adaptive_filter_masks",
        "adaptive_filter_update",
        "analyzer_init",
        "analyzer_scores",
        "analyzer_update",
        "classify",
        "cosine_similarity",
        "create_seed",
        "drift_estimator",
        "ema_init",
        "ema_reset",
        "ema_update",
        "exponential_moving_average",
        "frequency_filter",
        "gradient_magnitude_filter",
        "load_seed",
        "low_change_mask",
        "parameter_count",
        "protect_mask",
        "save_seed",
        "spectrum",
        "stability_gate",
        "stability_summary",
        "state_names",
        "tree_norm",
        "weight_distance",
    )},
    **{name: "sal_jax.emergence" for name in (
        "EmergenceFieldState",
        "EmergenceState",
        "coherence_score",
        "detect_emergence",
        "emergence_history_size",
        "emergence_init",
        "emergence_rate",
        "emergence_state",
        "novelty_score",
        "observe",
        "resonance_measure",
    )},
})
