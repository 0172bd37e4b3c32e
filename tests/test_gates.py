"""Parity of the gates (fixture ``filters.stability_gate`` and
``communication.loss_guard_cases``)."""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sal_jax as sal
from conftest import ARRAY_TOL, SCALAR_TOL, as_array, load_fixture

FIXTURE = load_fixture()
GATE = FIXTURE["filters"]["stability_gate"]
GUARD = FIXTURE["communication"]["loss_guard_cases"]


def _gate_id(case):
  return (f"{case['gate_type']}-t{case['threshold']}-k{case['steepness']}-"
          f"s{case['stability_score']}")


# The original calls its sigmoid gate "soft"; here it has protect's name.
_RENAMED = {"soft": "sigmoid"}


@pytest.mark.parametrize("case", GATE["cases"], ids=_gate_id)
def test_stability_gate_cases(case):
  gate_type = _RENAMED.get(case["gate_type"], case["gate_type"])
  fn = jax.jit(functools.partial(
      sal.analysis.stability_gate, gate_type=gate_type,
      threshold=case["threshold"], steepness=case["steepness"]))
  out = fn(as_array(GATE["gradient"]), case["stability_score"])
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, as_array(case["output"]), **ARRAY_TOL)


def test_stability_gate_defaults():
  assert GATE["defaults"] == {"gate_type": "soft", "threshold": 0.5,
                              "steepness": 10.0}
  case = next(c for c in GATE["cases"]
              if (c["gate_type"], c["threshold"], c["steepness"]) ==
              ("soft", 0.5, 10.0) and c["stability_score"] == 0.7)
  out = sal.analysis.stability_gate(as_array(GATE["gradient"]), 0.7)
  np.testing.assert_allclose(out, as_array(case["output"]), **ARRAY_TOL)


def test_stability_gate_soft_is_the_deprecated_name_of_sigmoid():
  g = as_array(GATE["gradient"])
  with pytest.warns(DeprecationWarning, match="gate_type='sigmoid'"):
    soft = sal.analysis.stability_gate(g, 0.7, "soft")
  np.testing.assert_array_equal(
      soft, sal.analysis.stability_gate(g, 0.7, "sigmoid"))


@pytest.mark.parametrize("gate_type", ["hard", "linear"])
def test_stability_gate_score_on_threshold_passes(gate_type):
  g = as_array(GATE["gradient"])
  np.testing.assert_array_equal(
      sal.analysis.stability_gate(g, 0.5, gate_type, 0.5), g)


def test_stability_gate_unknown_type():
  assert GATE["unknown_gate_type"] == {"raises": "ValueError"}
  with pytest.raises(ValueError, match="gate_type"):
    sal.analysis.stability_gate(jnp.ones(3), 0.5, "bogus")


@pytest.mark.parametrize("case", GUARD,
                         ids=lambda c: f"soft{c['soft_protection']}")
def test_loss_guard_cases(case):
  gate = sal.soft_gate if case["soft_protection"] else sal.hard_gate
  g = as_array(case["gradient"])

  @jax.jit
  def guard(score):
    factor = gate(score, jnp.float32(case["threshold"]))
    # 1 - factor: the soft reduction, 1.0 when hard-gated, 0.0 when passed.
    return g * factor, 1.0 - factor

  history = []
  for entry in case["sequence"]:
    out, last = guard(jnp.float32(entry["stability_score"]))
    np.testing.assert_allclose(out, as_array(entry["output"]), **ARRAY_TOL)
    np.testing.assert_allclose(float(last), entry["history_last"],
                               **SCALAR_TOL)
    history.append(float(last))
  np.testing.assert_allclose(np.mean(history), case["final_protection_rate"],
                             **SCALAR_TOL)


@hypothesis.settings(deadline=None, max_examples=50)
@hypothesis.given(st.floats(0.0, 1.0), st.floats(0.0, 0.99),
                  st.sampled_from(["sigmoid", "hard", "linear"]))
def test_stability_gate_factor_in_unit_interval(score, threshold, gate_type):
  g = jnp.array([1.0, -2.0, 0.5])
  factor = np.asarray(
      sal.analysis.stability_gate(g, score, gate_type, threshold)) / g
  assert np.all(factor >= 0.0) and np.all(factor <= 1.0 + 1e-6)
  if gate_type == "hard":
    assert set(np.unique(factor)) <= {0.0, 1.0}
