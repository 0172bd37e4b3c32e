"""drift_estimator against the fixture's `stability_analyzer.drift_cases`."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sal_jax import analysis
from conftest import SCALAR_TOL, load_fixture, param_dict

_SA = load_fixture()["stability_analyzer"]
_INPUTS = {k: param_dict(v) for k, v in _SA["drift_inputs"].items()}


@pytest.mark.parametrize("case", _SA["drift_cases"],
                         ids=lambda c: f"{c['current']}-{c['normalize']}")
def test_drift_cases(case):
  current = _INPUTS["current_" + case["current"]]
  drift = jax.jit(analysis.drift_estimator, static_argnums=2)(
      _INPUTS["reference"], current, case["normalize"])
  assert drift.shape == () and drift.dtype == jnp.float32
  np.testing.assert_allclose(float(drift), case["value"], **SCALAR_TOL)


def test_small_case_skips_unshared_names():
  ref, cur = _INPUTS["reference"], _INPUTS["current_small"]
  assert "c" not in cur and "d" not in ref  # what the fixture relies on
  raw = float(analysis.drift_estimator(ref, cur, normalize=False))
  manual = sum(np.linalg.norm(cur[k] - ref[k]) for k in ("a", "b"))
  np.testing.assert_allclose(raw, manual, rtol=1e-6)
  norm = float(analysis.drift_estimator(ref, cur))
  np.testing.assert_allclose(norm, raw / np.sqrt(12 + 5), rtol=1e-6)


def test_no_shared_leaves_and_general_trees():
  assert float(analysis.drift_estimator({"a": jnp.ones(2)},
                                        {"b": jnp.ones(2)})) == 0
  ref = (jnp.zeros(3), [jnp.zeros((2, 2))])
  cur = (jnp.full(3, 2.0), [jnp.zeros((2, 2))])
  np.testing.assert_allclose(
      float(analysis.drift_estimator(ref, cur, normalize=False)),
      2 * np.sqrt(3), rtol=1e-6)
  nested_ref = {"enc": {"w": jnp.zeros(4), "x": jnp.zeros(1)}}
  nested_cur = {"enc": {"w": jnp.ones(4)}, "dec": {"w": jnp.ones(9)}}
  np.testing.assert_allclose(
      float(analysis.drift_estimator(nested_ref, nested_cur)), 1.0,
      rtol=1e-6)  # 2 / sqrt(4)


def test_bad_inputs():
  with pytest.raises(ValueError, match="shape"):
    analysis.drift_estimator({"a": jnp.zeros(3)}, {"a": jnp.zeros(4)})
  with pytest.raises(ValueError, match="structure"):
    analysis.drift_estimator((jnp.zeros(3),), (jnp.zeros(3), jnp.zeros(1)))
  with pytest.raises(ValueError, match="normalize"):
    analysis.drift_estimator({"a": jnp.zeros(3)}, {"a": jnp.zeros(3)}, 1)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(st.lists(st.floats(-10, 10, width=32), min_size=6,
                           max_size=6),
                  st.lists(st.floats(-10, 10, width=32), min_size=6,
                           max_size=6))
def test_drift_properties(a, b):
  ref = {"w": np.float32(a[:4]), "b": np.float32(a[4:])}
  cur = {"w": np.float32(b[:4]), "b": np.float32(b[4:])}
  d = float(analysis.drift_estimator(ref, cur))
  raw = float(analysis.drift_estimator(ref, cur, normalize=False))
  assert 0.0 <= d <= 1.0 and raw >= 0.0
  np.testing.assert_allclose(d, min(raw / np.sqrt(6), 1.0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(
      float(analysis.drift_estimator(cur, ref, normalize=False)), raw,
      rtol=1e-6)
