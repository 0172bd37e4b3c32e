"""Shared test helpers: the golden fixture of the original implementation."""

from __future__ import annotations

import functools
import json
import math
import pathlib

import numpy as np
import pytest

FIXTURE_PATH = pathlib.Path(__file__).parent / "fixtures" / "sal_reference_parity.json"

# The torch parameter names of the tiny fixture model, in iteration order.
PARAM_ORDER = ("0.weight", "0.bias", "2.weight", "2.bias")

ARRAY_TOL = dict(rtol=1e-5, atol=1e-6)
SCALAR_TOL = dict(rtol=1e-5, atol=1e-7)

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _decode(x):
  if isinstance(x, str) and x in _NON_FINITE:
    return _NON_FINITE[x]
  if isinstance(x, list):
    return [_decode(v) for v in x]
  if isinstance(x, dict):
    return {k: _decode(v) for k, v in x.items()}
  return x


@functools.lru_cache(maxsize=1)
def load_fixture() -> dict:
  """The whole fixture, with non-finite strings decoded to floats."""
  with open(FIXTURE_PATH) as f:
    return _decode(json.load(f))


@pytest.fixture(scope="session")
def fixture() -> dict:
  return load_fixture()


def enable_x64(enabled: bool = True):
  """x64 for a ``with`` block only.

  A thread-local config context, so nothing leaks into the tests that run
  after (``jax.config.update("jax_enable_x64", True)`` would, for the rest
  of the process).
  """
  import jax
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(enabled)
  from jax.experimental import enable_x64 as context  # jax < 0.7
  return context(enabled)


def as_array(x, dtype=np.float32) -> np.ndarray:
  return np.asarray(x, dtype=dtype)


def param_dict(d: dict, dtype=np.float32) -> dict:
  """A ``{torch name: array}`` dict from the fixture, as numpy arrays."""
  return {k: as_array(v, dtype) for k, v in d.items()}


def tiny_model_loss(params, x, y):
  """The fixture's MLP ``Linear(4,8) -> tanh -> Linear(8,3)`` (torch layout),
  mean cross-entropy of the logits."""
  import jax
  import jax.numpy as jnp
  hidden = jnp.tanh(x @ params["0.weight"].T + params["0.bias"])
  logits = hidden @ params["2.weight"].T + params["2.bias"]
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def two_linear_tasks():
  """Two regression tasks on overlapping features: ``(x_a, y_a, x_b, y_b)``.

  Task A uses features 0-5, task B features 2-7, so training on B moves
  weights that A needs: a small problem where forgetting is measurable.
  float32 numpy arrays.
  """
  rng = np.random.default_rng(0)
  n, d = 64, 8
  x_a = rng.normal(size=(n, d)) * (np.arange(d) < 6)
  x_b = rng.normal(size=(n, d)) * (np.arange(d) >= 2)
  y_a = x_a @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
  y_b = x_b @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
  return tuple(v.astype(np.float32) for v in (x_a, y_a, x_b, y_b))
