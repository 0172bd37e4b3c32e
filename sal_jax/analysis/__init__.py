"""Analysis tools: how settled parameters are, and how far they moved.

The stability analyzer (per-parameter scores from a gradient history, their
classification into protected / neutral / volatile), the stability
spectrum, drift from a reference, gradient filters, similarity measures,
semantic seed files and an EMA tracker. They observe training; unlike
:func:`sal_jax.protect` they change no update.
"""

from sal_jax.analysis._adaptive_filter import AdaptiveFilterState
from sal_jax.analysis._adaptive_filter import adaptive_filter_adapt
from sal_jax.analysis._adaptive_filter import adaptive_filter_init
from sal_jax.analysis._adaptive_filter import adaptive_filter_masks
from sal_jax.analysis._adaptive_filter import adaptive_filter_update
from sal_jax.analysis._analyzer import NEUTRAL
from sal_jax.analysis._analyzer import PROTECTED
from sal_jax.analysis._analyzer import STATE_NAMES
from sal_jax.analysis._analyzer import StabilityAnalyzer
from sal_jax.analysis._analyzer import VOLATILE
from sal_jax.analysis._analyzer import analyzer_init
from sal_jax.analysis._analyzer import analyzer_scores
from sal_jax.analysis._analyzer import analyzer_update
from sal_jax.analysis._analyzer import classify
from sal_jax.analysis._analyzer import state_names
from sal_jax.analysis._drift import drift_estimator
from sal_jax.analysis._ema import EMAState
from sal_jax.analysis._ema import ema_init
from sal_jax.analysis._ema import ema_reset
from sal_jax.analysis._ema import ema_update
from sal_jax.analysis._ema import exponential_moving_average
from sal_jax.analysis._filters import frequency_filter
from sal_jax.analysis._filters import gradient_magnitude_filter
from sal_jax.analysis._filters import low_change_mask
from sal_jax.analysis._running_analyzer import RunningAnalyzerState
from sal_jax.analysis._seeds import create_seed
from sal_jax.analysis._seeds import load_seed
from sal_jax.analysis._seeds import save_seed
from sal_jax.analysis._similarity import cosine_similarity
from sal_jax.analysis._similarity import weight_distance
from sal_jax.analysis._spectrum import DIAGNOSES
from sal_jax.analysis._spectrum import StabilitySpectrum
from sal_jax.analysis._spectrum import protect_mask
from sal_jax.analysis._spectrum import spectrum
from sal_jax.analysis._spectrum import stability_summary
from sal_jax.analysis._stability_gate import stability_gate
from sal_jax.analysis._tree_sizes import parameter_count
from sal_jax.analysis._tree_sizes import tree_norm
from sal_jax.analysis._windowed_analyzer import WindowedAnalyzerState

__all__ = (
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
)
