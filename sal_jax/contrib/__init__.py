"""Experimental and comparison components of sal_jax.

Continual-learning baselines as optax transformations, and the
Pulse-Split-Cascade. APIs here may change between minor versions.
"""

# -- baselines exports --
# -- end baselines exports --
# -- psc exports --
# -- end psc exports --

__all__ = (
    # -- baselines names --
    # -- end baselines names --
    # -- psc names --
    # -- end psc names --
)
