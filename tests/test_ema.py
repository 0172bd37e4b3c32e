"""Parity of the EMA helpers (fixture ``utils``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sal_jax import analysis
from conftest import ARRAY_TOL, SCALAR_TOL, as_array, load_fixture

UTILS = load_fixture()["utils"]
EMA = UTILS["exponential_moving_average"]


@pytest.mark.parametrize("case", EMA["cases"], ids=lambda c: f"a{c['alpha']}")
def test_exponential_moving_average_cases(case):
  fn = jax.jit(functools.partial(analysis.exponential_moving_average,
                                 alpha=case["alpha"]))
  out = fn(as_array(EMA["current"]), as_array(EMA["previous"]))
  np.testing.assert_allclose(out, as_array(case["value"]), **ARRAY_TOL)


def test_exponential_moving_average_tree_and_bad_alpha():
  out = analysis.exponential_moving_average({"a": jnp.ones(2)},
                                            {"a": jnp.zeros(2)}, 0.25)
  np.testing.assert_allclose(out["a"], [0.25, 0.25])
  with pytest.raises(ValueError, match="alpha"):
    analysis.exponential_moving_average(jnp.ones(2), jnp.zeros(2), 1.5)


@pytest.mark.parametrize("case", UTILS["ema_sequences"],
                         ids=lambda c: f"a{c['alpha']}-init{c['initial']}")
def test_ema_sequences(case):
  state = analysis.ema_init(case["initial"])
  assert bool(state.initialized) == (case["initial"] is not None)
  update = jax.jit(functools.partial(analysis.ema_update, alpha=case["alpha"]))
  outputs = []
  for x in case["inputs"]:
    state = update(state, jnp.float32(x))
    outputs.append(float(state.value))
  np.testing.assert_allclose(outputs, case["outputs"], **SCALAR_TOL)
  assert int(state.count) == case["count"]
  assert state.value.dtype == jnp.float32
  assert state.count.dtype == jnp.int32
  state = analysis.ema_reset(state)
  assert case["after_reset"] == {"value": None, "count": 0}
  assert int(state.count) == 0 and not bool(state.initialized)
  # After a reset the first input becomes the value again.
  state = update(state, jnp.float32(7.0))
  assert float(state.value) == 7.0


def test_ema_tracker_pytree():
  like = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(3)}
  state = analysis.ema_init(like=like)
  step = jax.jit(analysis.ema_update, static_argnums=2)
  state = step(state, jax.tree.map(jnp.ones_like, like), 0.5)
  state = step(state, like, 0.5)
  np.testing.assert_allclose(state.value["w"], np.full((2, 2), 0.5))
  np.testing.assert_allclose(state.value["b"], np.full(3, 0.5))
