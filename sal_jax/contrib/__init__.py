"""Experimental components of sal_jax: the Pulse-Split-Cascade.

APIs here may change between minor versions.
"""

from sal_jax import baselines as _baselines
from sal_jax._common import deprecation as _deprecation
from sal_jax.contrib._psc_init import cascade_init
from sal_jax.contrib._psc_init import cascade_initiate
from sal_jax.contrib._psc import cascade_step
from sal_jax.contrib._psc_emerge import emerge
from sal_jax.contrib._psc_emerge import emergence_select
from sal_jax.contrib._psc_lineage import LineageStats
from sal_jax.contrib._psc_lineage import best_lineage
from sal_jax.contrib._psc_lineage import cascade_lineages
from sal_jax.contrib._psc_lineage import cascade_statistics
from sal_jax.contrib._psc_lineage import lineage_members
from sal_jax.contrib._psc_pulses import CascadeState
from sal_jax.contrib._psc_pulses import PulseStatus
from sal_jax.contrib._psc_pulses import pulse_can_split
from sal_jax.contrib._psc_pulses import pulse_fitness
from sal_jax.contrib._psc_pulses import pulse_is_viable
from sal_jax.contrib._psc_pulses import viable_pulses

__all__ = (
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
)

# The baselines also resolve here, with a DeprecationWarning naming
# sal_jax.baselines, until the next release.
__getattr__ = _deprecation.moved_names(
    "sal_jax.contrib", dict.fromkeys(_baselines.__all__, "sal_jax.baselines"))
