"""Emergence field: parity with the original, jit / vmap / scan, edge cases."""

import math

import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sal_jax import emergence
from conftest import ARRAY_TOL, SCALAR_TOL, as_array, load_fixture

SECTION = load_fixture()["emergence"]
RUNS = SECTION["runs"]
SIGNALS = ("coherence", "novelty", "resonance", "intensity",
           "emergence_score")


def _run_patterns(run):
  return run.get("patterns") or SECTION["patterns"]


def _field_for(run):
  kw = run["constructor_kwargs"]
  return emergence.emergence_init(kw["dimensions"],
                                  kw.get("history_length", 100))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_observe_replays_the_original_run(name):
  run = RUNS[name]
  state = _field_for(run)
  for i, (pattern, ref) in enumerate(zip(_run_patterns(run), run["states"])):
    report, state = emergence.observe(state, as_array(pattern))
    report = jax.device_get(report)
    for key in SIGNALS:
      np.testing.assert_allclose(getattr(report, key), ref[key],
                                 **SCALAR_TOL, err_msg=f"{name}[{i}].{key}")
    assert bool(report.is_emergent) == ref["is_emergent"], (name, i)
    assert bool(report.valid)
    np.testing.assert_allclose(state.centroid, ref["field_centroid_after"],
                               **ARRAY_TOL)
    np.testing.assert_allclose(state.variance, ref["field_variance_after"],
                               **SCALAR_TOL)
    assert (int(emergence.emergence_history_size(state))
            == ref["history_size_after"])
  np.testing.assert_allclose(emergence.emergence_rate(state),
                             run["emergence_rate"], **SCALAR_TOL)
  if name == "structured_dims16":  # Observation 10 is the emergent one.
    assert [s["is_emergent"] for s in run["states"]].index(True) == 10


@pytest.mark.parametrize("name", sorted(RUNS))
def test_detect_emergence_cases(name):
  for case in RUNS[name]["detect_emergence"]:
    got = emergence.detect_emergence(case["coherence"], case["novelty"])
    assert bool(got) == case["value"], case


def test_detect_emergence_custom_thresholds_and_arrays():
  got = emergence.detect_emergence(jnp.array([0.5, 0.7]), jnp.array([0.5, 0.5]),
                                   coherence_threshold=0.7,
                                   novelty_threshold=0.5)
  assert got.tolist() == [False, True]


def test_emergence_state_cases():
  for case in SECTION["state_cases"]:
    s = emergence.emergence_state(case["coherence"], case["novelty"],
                                  case["resonance"], case["intensity"])
    assert bool(s.is_emergent) == case["is_emergent"], case
    np.testing.assert_allclose(float(s.emergence_score),
                               case["emergence_score"], **SCALAR_TOL)


def _coherence_numpy(x):
  """Independent float64 formula, with d = 0 for one-entry chunks."""
  x = np.asarray(x, np.float64).ravel()
  n = x.size
  if n < 2:
    return 1.0
  chunk = max(min(64, n // 4), 1)
  k = n // chunk
  chunks = x[:k * chunk].reshape(k, chunk)
  v = chunks.mean(1).var(ddof=1)
  d = np.abs(np.diff(chunks, axis=1)).mean() if chunk > 1 else 0.0
  return min(max(1.0 / (1.0 + 10 * v + 5 * d), 0.0), 1.0)


@pytest.mark.parametrize(
    "case", SECTION["coherence_score_cases"], ids=lambda c: c["name"])
def test_coherence_score_cases(case):
  got = float(emergence.coherence_score(as_array(case["input"])))
  if math.isnan(case["value"]):
    # The original's NaN for sizes 2..7 is fixed: d = 0, finite score.
    assert 2 <= np.size(case["input"]) <= 7
    assert math.isfinite(got)
    np.testing.assert_allclose(got, _coherence_numpy(case["input"]),
                               rtol=1e-6)
  else:
    np.testing.assert_allclose(got, case["value"], **SCALAR_TOL)


def test_coherence_score_small_sizes_fixed():
  x = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
  assert float(emergence.coherence_score(x)) \
      == pytest.approx(1.0 / 26.0, rel=1e-6)
  for n in range(2, 8):
    x = jnp.linspace(-1.0, 1.0, n)
    assert math.isfinite(float(emergence.coherence_score(x)))


@pytest.mark.parametrize(
    "case", SECTION["novelty_score_cases"], ids=lambda c: c["name"])
def test_novelty_score_cases(case):
  ref = None if case["reference"] is None else as_array(case["reference"])
  got = float(emergence.novelty_score(as_array(case["tensor"]), ref))
  if case["value"] < 0:  # Unclipped in the original; clipped here.
    assert got == 0.0
  else:
    np.testing.assert_allclose(got, case["value"], **SCALAR_TOL)


@pytest.mark.parametrize(
    "case", SECTION["resonance_measure_cases"], ids=lambda c: c["name"])
def test_resonance_measure_cases(case):
  field = [as_array(f) for f in case["field"]]
  got = float(emergence.resonance_measure(as_array(case["pattern"]), field))
  want = min(max(case["value"], 0.0), 1.0)  # Clipped here.
  np.testing.assert_allclose(got, want, **SCALAR_TOL)
  assert 0.0 <= got <= 1.0
  sizes = {np.size(f) for f in case["field"]}
  if len(sizes) == 1:  # A stacked array gives the same value.
    stacked = float(emergence.resonance_measure(as_array(case["pattern"]),
                                                np.stack(field)))
    np.testing.assert_allclose(stacked, got, rtol=1e-6, atol=1e-7)


def test_resonance_and_novelty_clipped_at_the_recorded_defects():
  x = jnp.array([1.0, -2.0, 3.0, 0.5])
  assert float(emergence.resonance_measure(x, [x])) == 1.0
  assert float(emergence.resonance_measure(x, [-x])) == 0.0
  assert float(emergence.novelty_score(x, 7 * x)) == 0.0


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(hnp.arrays(
    np.float32, hypothesis.strategies.integers(1, 9),
    elements=hypothesis.strategies.floats(-10, 10, width=32)))
def test_helper_scores_lie_in_unit_interval(x):
  for value in (emergence.coherence_score(x),
                emergence.novelty_score(x, x[::-1]),
                emergence.resonance_measure(x, [x, -x[::-1]])):
    v = float(value)
    assert 0.0 <= v <= 1.0, (x, v)


def _stack(states):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def test_scan_matches_step_by_step():
  run = RUNS["history3_dims16"]
  patterns = jnp.stack([as_array(p).reshape(-1)
                        for p in _run_patterns(run)])

  def body(state, p):
    report, state = emergence.observe(state, p)
    return state, report

  final, reports = jax.lax.scan(body, _field_for(run), patterns)
  np.testing.assert_allclose(reports.novelty,
                             [s["novelty"] for s in run["states"]],
                             **SCALAR_TOL)
  state = _field_for(run)
  for p in patterns:
    _, state = emergence.observe(state, p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7), final, state)


def test_vmap_over_independent_fields():
  runs = [RUNS["default_dims16"], RUNS["structured_dims16"]]
  seqs = [np.stack([as_array(p).reshape(-1) for p in _run_patterns(r)])
          for r in runs]
  batch = _stack([emergence.emergence_init(16) for _ in runs])
  step = jax.jit(jax.vmap(emergence.observe))
  for t in range(12):
    reports, batch = step(batch, jnp.stack([s[t] for s in seqs]))
    for b, run in enumerate(runs):
      np.testing.assert_allclose(float(reports.coherence[b]),
                                 run["states"][t]["coherence"], **SCALAR_TOL)
      np.testing.assert_allclose(float(reports.novelty[b]),
                                 run["states"][t]["novelty"], **SCALAR_TOL)
  rates = emergence.emergence_rate(batch)
  np.testing.assert_allclose(rates, [r["emergence_rate"] for r in runs],
                             **SCALAR_TOL)


def test_history_evicts_oldest_and_rate_counts_only_remembered():
  state = emergence.emergence_init(4, history_length=2)
  x = jnp.array([1.0, 0.0, 0.0, 0.0])
  y = jnp.array([0.0, 1.0, 0.0, 0.0])
  z = jnp.array([0.0, 0.0, 1.0, 0.0])
  for p in (x, y, z):
    _, state = emergence.observe(state, p)
  report, _ = emergence.observe(state, x)  # x was evicted: orthogonal to y, z.
  assert float(report.novelty) == 1.0
  report, _ = emergence.observe(state, y)
  assert float(report.novelty) == 0.0
  state = state._replace(emergent_history=jnp.array([True, False]))
  assert float(emergence.emergence_rate(state)) == 0.5


def test_zero_pattern_is_not_normalised_and_stays_finite():
  state = emergence.emergence_init(8)
  report, state = emergence.observe(state, jnp.zeros(8))
  report, state = emergence.observe(state, jnp.zeros(8))
  assert bool(report.valid)
  assert all(math.isfinite(float(v)) for v in report[:6])
  assert float(report.novelty) == 1.0  # |cos| with a zero vector is 0.


def test_invalid_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="dimensions"):
    emergence.emergence_init(0)
  with pytest.raises(ValueError, match="history_length"):
    emergence.emergence_init(8, history_length=0)
  with pytest.raises(ValueError, match="dimensions"):
    emergence.emergence_init(2.5)
  state = emergence.emergence_init(16)
  with pytest.raises(ValueError, match="15 entries.*16 dimensions"):
    emergence.observe(state, jnp.ones(15))
  with pytest.raises(ValueError, match="15 entries"):
    jax.jit(emergence.observe)(state, jnp.ones(15))
  with pytest.raises(ValueError, match="NaN or Inf"):
    emergence.observe(state, jnp.ones(16).at[3].set(jnp.nan))
  with pytest.raises(ValueError, match="NaN or Inf"):
    emergence.observe(state, np.full(16, np.inf, np.float32))


def test_non_finite_pattern_inside_jit_is_ignored_and_flagged():
  patterns = [as_array(p).reshape(-1) for p in SECTION["patterns"][:4]]
  step = jax.jit(emergence.observe)
  state = emergence.emergence_init(16)
  clean = emergence.emergence_init(16)
  for i, p in enumerate(patterns):
    if i == 2:
      bad = p.copy()
      bad[0] = np.nan
      report, state = step(state, bad)
      assert not bool(report.valid) and not bool(report.is_emergent)
      assert math.isnan(float(report.coherence))
      assert int(state.rejected) == 1
    report, state = step(state, p)
    clean_report, clean = step(clean, p)
    np.testing.assert_array_equal(report.novelty, clean_report.novelty)
  np.testing.assert_array_equal(state.history, clean.history)
  assert int(state.count) == int(clean.count) == 4


def test_no_recompilation_across_observations():
  traces = []

  @jax.jit
  def step(state, p):
    traces.append(None)
    return emergence.observe(state, p)

  state = emergence.emergence_init(16)
  for p in SECTION["patterns"]:
    _, state = step(state, as_array(p).reshape(-1))
  assert len(traces) == 1
