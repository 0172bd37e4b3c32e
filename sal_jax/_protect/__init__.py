"""The ``protect`` transformation and its parts; public names live in
``sal_jax``."""
