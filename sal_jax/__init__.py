"""sal_jax: Self-Alignment Learning for JAX and optax.

SAL measures how settled each parameter is and softly protects what has
emerged, as a pure functional ``optax.GradientTransformation``::

  tx = optax.chain(sal.protect(), optax.adamw(1e-3))
"""

from sal_jax._estimators import ESTIMATORS
from sal_jax._estimators import ReferenceEstimatorState
from sal_jax._estimators import StabilityEstimator
from sal_jax._estimators import get_estimator
from sal_jax._estimators import reference_estimator
from sal_jax._gates import GATES
from sal_jax._gates import get_gate
from sal_jax._gates import hard_gate
from sal_jax._gates import linear_gate
from sal_jax._gates import sigmoid_gate
from sal_jax._gates import soft_gate
from sal_jax._gates import stability_gate
from sal_jax._metrics import find_protect_states
from sal_jax._metrics import metrics
from sal_jax._protect import ProtectState
from sal_jax._protect import protect
from sal_jax._tree_utils import parameter_count
from sal_jax._tree_utils import tree_norm
# -- analyzer / spectrum / drift exports --
# -- end analyzer / spectrum / drift exports --
# -- filters / utilities exports --
# -- end filters / utilities exports --

__version__ = "0.1.0"

__all__ = (
    "ESTIMATORS",
    "GATES",
    "ProtectState",
    "ReferenceEstimatorState",
    "StabilityEstimator",
    "find_protect_states",
    "get_estimator",
    "get_gate",
    "hard_gate",
    "linear_gate",
    "metrics",
    "parameter_count",
    "protect",
    "reference_estimator",
    "sigmoid_gate",
    "soft_gate",
    "stability_gate",
    "tree_norm",
    # -- analyzer / spectrum / drift names --
    # -- end analyzer / spectrum / drift names --
    # -- filters / utilities names --
    # -- end filters / utilities names --
)
