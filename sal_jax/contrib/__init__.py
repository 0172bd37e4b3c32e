"""Experimental and comparison components of sal_jax.

Continual-learning baselines as optax transformations, and the
Pulse-Split-Cascade. APIs here may change between minor versions.
"""

# -- baselines exports --
from sal_jax.contrib._ewc import EwcState
from sal_jax.contrib._ewc import StreamingEwcState
from sal_jax.contrib._ewc import empirical_fisher
from sal_jax.contrib._ewc import ewc
from sal_jax.contrib._ewc import ewc_consolidate
from sal_jax.contrib._ewc import streaming_ewc
from sal_jax.contrib._l2_init import L2InitState
from sal_jax.contrib._l2_init import l2_init
from sal_jax.contrib._mas import StreamingMasState
from sal_jax.contrib._momentum_filter import MomentumFilterState
from sal_jax.contrib._momentum_filter import momentum_filter
from sal_jax.contrib._momentum_filter import scale_by_momentum_filter
from sal_jax.contrib._mas import streaming_mas
from sal_jax.contrib._si import StreamingSiState
from sal_jax.contrib._si import streaming_si
from sal_jax.contrib._upgd import UpgdState
from sal_jax.contrib._upgd import upgd
from sal_jax.contrib._weight_average import WeightAverageState
from sal_jax.contrib._weight_average import averaged_params
from sal_jax.contrib._weight_average import weight_average
# -- end baselines exports --
# -- psc exports --
from sal_jax.contrib._psc_pulses import CascadeState
from sal_jax.contrib._psc_lineage import LineageStats
from sal_jax.contrib._psc_pulses import PulseStatus
from sal_jax.contrib._psc_lineage import best_lineage
from sal_jax.contrib._psc import cascade_init
from sal_jax.contrib._psc import cascade_initiate
from sal_jax.contrib._psc_lineage import cascade_lineages
from sal_jax.contrib._psc_lineage import cascade_statistics
from sal_jax.contrib._psc import cascade_step
from sal_jax.contrib._psc_emerge import emerge
from sal_jax.contrib._psc_emerge import emergence_select
from sal_jax.contrib._psc_lineage import lineage_members
from sal_jax.contrib._psc_pulses import pulse_can_split
from sal_jax.contrib._psc_pulses import pulse_fitness
from sal_jax.contrib._psc_pulses import pulse_is_viable
from sal_jax.contrib._psc_pulses import viable_pulses
# -- end psc exports --

__all__ = (
    # -- baselines names --
    "EwcState",
    "L2InitState",
    "MomentumFilterState",
    "StreamingEwcState",
    "StreamingMasState",
    "StreamingSiState",
    "UpgdState",
    "WeightAverageState",
    "averaged_params",
    "empirical_fisher",
    "ewc",
    "ewc_consolidate",
    "l2_init",
    "momentum_filter",
    "scale_by_momentum_filter",
    "streaming_ewc",
    "streaming_mas",
    "streaming_si",
    "upgd",
    "weight_average",
    # -- end baselines names --
    # -- psc names --
    "CascadeState",
    "LineageStats",
    "PulseStatus",
    "best_lineage",
    "cascade_init",
    "cascade_initiate",
    "cascade_lineages",
    "cascade_statistics",
    "cascade_step",
    "emerge",
    "emergence_select",
    "lineage_members",
    "pulse_can_split",
    "pulse_fitness",
    "pulse_is_viable",
    "viable_pulses",
    # -- end psc names --
)
