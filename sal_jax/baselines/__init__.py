"""Continual-learning baselines as optax transformations.

The methods SAL is compared with: EWC (offline, online and streaming), SI,
MAS, L2-init, UPGD, weight averaging and the momentum filter (MoFO). Each
is a ``GradientTransformation`` that takes ``params`` in ``update``, like
:func:`sal_jax.protect`.
"""

from sal_jax.baselines._ewc import EwcState
from sal_jax.baselines._ewc import StreamingEwcState
from sal_jax.baselines._ewc import empirical_fisher
from sal_jax.baselines._ewc import ewc
from sal_jax.baselines._ewc import ewc_consolidate
from sal_jax.baselines._ewc import streaming_ewc
from sal_jax.baselines._l2_init import L2InitState
from sal_jax.baselines._l2_init import l2_init
from sal_jax.baselines._mas import StreamingMasState
from sal_jax.baselines._mas import streaming_mas
from sal_jax.baselines._momentum_filter import MomentumFilterState
from sal_jax.baselines._momentum_filter import momentum_filter
from sal_jax.baselines._momentum_filter import scale_by_momentum_filter
from sal_jax.baselines._si import StreamingSiState
from sal_jax.baselines._si import streaming_si
from sal_jax.baselines._upgd import UpgdState
from sal_jax.baselines._upgd import upgd
from sal_jax.baselines._weight_average import WeightAverageState
from sal_jax.baselines._weight_average import averaged_params
from sal_jax.baselines._weight_average import weight_average

__all__ = (
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
)
