"""sal_jax: Self-Alignment Learning for JAX and optax.

SAL measures how settled each parameter is and softly protects what has
emerged, as a pure functional ``optax.GradientTransformation``::

  tx = optax.chain(sal.protect(), optax.adamw(1e-3))
"""

from sal_jax._budget import BudgetState
from sal_jax._consolidation import ConsolidationState
from sal_jax._consolidation import consolidation_estimator
from sal_jax._estimator_registry import ESTIMATORS
from sal_jax._estimator_registry import get_estimator
from sal_jax._estimators import ReferenceEstimatorState
from sal_jax._estimators import StabilityEstimator
from sal_jax._estimators import reference_estimator
from sal_jax._fisher import consolidate
from sal_jax._fisher import fisher_diagonal
from sal_jax._fisher import prediction_drift
from sal_jax._gates import GATES
from sal_jax._gates import apply_factor
from sal_jax._gates import get_gate
from sal_jax._gates import hard_gate
from sal_jax._gates import linear_gate
from sal_jax._gates import no_gate
from sal_jax._gates import sigmoid_gate
from sal_jax._gates import soft_gate
from sal_jax._gates import stability_gate
from sal_jax._metrics import find_protect_states
from sal_jax._metrics import metrics
from sal_jax._protect import ProtectState
from sal_jax._protect import protect
from sal_jax._shift_consolidation import ShiftConsolidationState
from sal_jax._shift_consolidation import shift_consolidation_estimator
from sal_jax._tree_utils import parameter_count
from sal_jax._tree_utils import tree_norm
# -- analyzer / spectrum / drift exports --
from sal_jax._analyzer import NEUTRAL
from sal_jax._analyzer import PROTECTED
from sal_jax._running_analyzer import RunningAnalyzerState
from sal_jax._analyzer import STATE_NAMES
from sal_jax._analyzer import StabilityAnalyzer
from sal_jax._analyzer import VOLATILE
from sal_jax._windowed_analyzer import WindowedAnalyzerState
from sal_jax._analyzer import analyzer_init
from sal_jax._analyzer import analyzer_scores
from sal_jax._analyzer import analyzer_update
from sal_jax._analyzer import classify
from sal_jax._analyzer import state_names
from sal_jax._drift import drift_estimator
from sal_jax._spectrum import DIAGNOSES
from sal_jax._spectrum import StabilitySpectrum
from sal_jax._spectrum import protect_mask
from sal_jax._spectrum import spectrum
from sal_jax._spectrum import stability_summary
# -- end analyzer / spectrum / drift exports --
# -- filters / utilities exports --
from sal_jax._ema import EMAState
from sal_jax._ema import ema_init
from sal_jax._ema import ema_reset
from sal_jax._ema import ema_update
from sal_jax._ema import exponential_moving_average
from sal_jax._adaptive_filter import AdaptiveFilterState
from sal_jax._adaptive_filter import adaptive_filter_adapt
from sal_jax._adaptive_filter import adaptive_filter_init
from sal_jax._adaptive_filter import adaptive_filter_masks
from sal_jax._adaptive_filter import adaptive_filter_update
from sal_jax._filters import frequency_filter
from sal_jax._filters import gradient_magnitude_filter
from sal_jax._filters import low_change_mask
from sal_jax._seeds import create_seed
from sal_jax._seeds import load_seed
from sal_jax._seeds import save_seed
from sal_jax._similarity import cosine_similarity
from sal_jax._similarity import weight_distance
# -- end filters / utilities exports --
# -- emergence exports --
from sal_jax._emergence import EmergenceFieldState
from sal_jax._emergence_scores import EmergenceState
from sal_jax._emergence_scores import coherence_score
from sal_jax._emergence_scores import detect_emergence
from sal_jax._emergence import emergence_history_size
from sal_jax._emergence import emergence_init
from sal_jax._emergence import emergence_rate
from sal_jax._emergence_scores import emergence_state
from sal_jax._emergence_scores import novelty_score
from sal_jax._emergence import observe
from sal_jax._emergence_scores import resonance_measure
# -- end emergence exports --

__version__ = "0.1.0"

__all__ = (
    "BudgetState",
    "ConsolidationState",
    "ESTIMATORS",
    "GATES",
    "apply_factor",
    "ProtectState",
    "ReferenceEstimatorState",
    "ShiftConsolidationState",
    "StabilityEstimator",
    "consolidate",
    "consolidation_estimator",
    "find_protect_states",
    "fisher_diagonal",
    "get_estimator",
    "get_gate",
    "hard_gate",
    "linear_gate",
    "metrics",
    "no_gate",
    "parameter_count",
    "prediction_drift",
    "protect",
    "reference_estimator",
    "shift_consolidation_estimator",
    "sigmoid_gate",
    "soft_gate",
    "stability_gate",
    "tree_norm",
    # -- analyzer / spectrum / drift names --
    "DIAGNOSES",
    "NEUTRAL",
    "PROTECTED",
    "RunningAnalyzerState",
    "STATE_NAMES",
    "StabilityAnalyzer",
    "StabilitySpectrum",
    "VOLATILE",
    "WindowedAnalyzerState",
    "analyzer_init",
    "analyzer_scores",
    "analyzer_update",
    "classify",
    "drift_estimator",
    "protect_mask",
    "spectrum",
    "stability_summary",
    "state_names",
    # -- end analyzer / spectrum / drift names --
    # -- filters / utilities names --
    "AdaptiveFilterState",
    "EMAState",
    "adaptive_filter_adapt",
    "adaptive_filter_init",
    "adaptive_filter_masks",
    "adaptive_filter_update",
    "cosine_similarity",
    "create_seed",
    "ema_init",
    "ema_reset",
    "ema_update",
    "exponential_moving_average",
    "frequency_filter",
    "gradient_magnitude_filter",
    "load_seed",
    "low_change_mask",
    "save_seed",
    "weight_distance",
    # -- end filters / utilities names --
    # -- emergence names --
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
    # -- end emergence names --
)
