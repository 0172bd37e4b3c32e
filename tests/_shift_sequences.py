"""A gradient sequence with two shifts, shared by the importance-unit tests."""

import jax
import jax.numpy as jnp
import numpy as np

# Two-layer regression: matrices and vectors, so every kind of unit appears.
SHAPES = {"w1": (6, 16), "b1": (16,), "w2": (16, 2), "b2": (2,)}


def params(seed=0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)
          for k, s in SHAPES.items()}


def run(estimator, steps=40, move=lambda p: p + 0.01):
  """The estimator over a sequence with two shifts (steps 15 and 30), the
  params moved by ``move`` each step; its state and params per step."""
  rng = np.random.default_rng(1)
  current = params()
  state = estimator.init(current)
  update = jax.jit(estimator.update)
  states = []
  for t in range(steps):
    scale = 1.0 if t < 15 else (4.0 if t < 18 else (1.0 if t < 30 else 6.0))
    grads = {k: jnp.asarray(rng.normal(size=s) * scale
                            * (1.0 + np.arange(s[-1])), jnp.float32)
             for k, s in SHAPES.items()}
    current = jax.tree.map(move, current)
    _, state = update(grads, state, current)
    states.append((state, current))
  return states
