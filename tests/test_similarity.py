"""Parity of cosine similarity, weight distance, the tree norm and the
parameter count (fixture ``utils``)."""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sal_jax import analysis
from conftest import ARRAY_TOL, SCALAR_TOL, as_array, load_fixture, param_dict
from conftest import tiny_model_loss

UTILS = load_fixture()["utils"]
TINY = load_fixture()["communication"]
COS = UTILS["cosine_similarity"]
DIST = UTILS["weight_distance"]


@pytest.mark.parametrize("case", COS["cases"],
                         ids=lambda c: f"dim{c['dim']}-eps{c.get('eps')}")
def test_cosine_similarity_cases(case):
  eps = case.get("eps", COS["defaults"]["eps"])
  fn = jax.jit(functools.partial(analysis.cosine_similarity, axis=case["dim"],
                                 eps=eps))
  out = fn(as_array(COS["a"]), as_array(COS["b"]))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, as_array(case["value"]), **ARRAY_TOL)


def test_cosine_similarity_eps_pads_each_norm():
  # eps = 1e-3 changes row 0 by ~2e-4: it is added to each norm, not a clamp
  # of the product (a clamp would change nothing here).
  a, b = as_array(COS["a"]), as_array(COS["b"])
  clamp = (a * b).sum(-1) / np.maximum(
      np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-3)
  out = analysis.cosine_similarity(a, b, eps=1e-3)
  assert abs(float(out[0]) - float(clamp[0])) > 1e-4
  assert float(out[1]) == 0.0  # the zero row of b


def test_cosine_similarity_rejects_bad_shapes():
  with pytest.raises(ValueError, match="broadcast"):
    analysis.cosine_similarity(jnp.ones((3, 5)), jnp.ones((4, 5)))


@hypothesis.settings(deadline=None, max_examples=30)
@hypothesis.given(
    hnp.arrays(np.float32, (4, 6), elements=st.floats(-1e3, 1e3, width=32)),
    hnp.arrays(np.float32, (4, 6), elements=st.floats(-1e3, 1e3, width=32)))
def test_cosine_similarity_in_unit_interval(a, b):
  out = np.asarray(analysis.cosine_similarity(a, b))
  assert np.all(np.abs(out) <= 1.0 + 1e-6)


def _weights():
  return param_dict(DIST["weights1"]), param_dict(DIST["weights2"])


@pytest.mark.parametrize("case", DIST["cases"],
                         ids=lambda c: f"{c['metric']}-{c.get('note', '')}")
def test_weight_distance_cases(case):
  w1, w2 = _weights()
  if case.get("note") == "no shared names":
    w1, w2 = {"only1": w1["only1"]}, {"only2": w2["only2"]}
  if "raises" in case:
    assert case["raises"] == "ValueError"
    with pytest.raises(ValueError, match="metric"):
      analysis.weight_distance(w1, w2, case["metric"])
    return
  fn = jax.jit(functools.partial(analysis.weight_distance,
                                 metric=case["metric"]))
  out = fn(w1, w2)
  assert out.shape == () and out.dtype == jnp.float32
  np.testing.assert_allclose(float(out), case["value"], **SCALAR_TOL)


def test_weight_distance_skips_unmatched_leaves():
  w1, w2 = _weights()
  assert w1["z"].shape != w2["z"].shape
  shared = {k: w1[k] for k in ("x", "y")}
  for metric in ("l2", "l1", "cosine"):
    np.testing.assert_allclose(
        float(analysis.weight_distance(w1, w2, metric)),
        float(analysis.weight_distance(shared, {k: w2[k] for k in shared},
                                       metric)),
        **SCALAR_TOL)


def test_weight_distance_nested_trees():
  w1 = {"layer": {"w": jnp.array([3.0, 4.0])}}
  w2 = {"layer": {"w": jnp.zeros(2)}}
  assert float(analysis.weight_distance(w1, w2)) == pytest.approx(5.0)


def test_tree_norm_and_parameter_count_of_the_tiny_model():
  """The fixture's gradient norm at init and parameter count (its MLP,
  data and initial params are those of the ``communication`` run)."""
  params = param_dict(TINY["initial_params"])
  grads = jax.grad(tiny_model_loss)(params, as_array(TINY["data"]["X"]),
                                    np.asarray(TINY["data"]["y"]))
  norm = analysis.tree_norm(grads)
  assert norm.dtype == jnp.float32
  np.testing.assert_allclose(float(norm),
                             UTILS["gradient_norm_tiny_model_at_init"],
                             rtol=1e-6)
  assert analysis.parameter_count(params) == (
      UTILS["parameter_count_tiny_model"])


def test_tree_norm_accumulates_half_precision_in_float32():
  x = {"a": jnp.full((4096,), 0.01, jnp.bfloat16), "b": jnp.array([3.0 + 4j])}
  expected = np.sqrt(4096 * float(jnp.bfloat16(0.01)) ** 2 + 25.0)
  np.testing.assert_allclose(float(analysis.tree_norm(x)), expected,
                             rtol=1e-6)
  assert float(analysis.tree_norm({})) == 0.0
