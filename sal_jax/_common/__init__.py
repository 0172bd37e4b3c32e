"""Shared internals: tree checks, hyperparameter validation, nnx interop."""
