"""Windowed and running stability analyzers against the original's fixture.

The fixture's `stability_analyzer` section records one plain-SGD run watched
by three analyzers (`default`, `short_history` with H = 4 so that the ring
buffer wraps, `tight_thresholds`); every step's recorded params and grads
are replayed here under `jax.jit`.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sal_jax import analysis
from conftest import PARAM_ORDER, SCALAR_TOL, load_fixture, param_dict

_SA = load_fixture()["stability_analyzer"]
_DEFAULTS = _SA["analyzer_defaults"]
KEYS = sorted(_SA["final"])


def _config(key, running=False):
  kw = dict(_DEFAULTS, **_SA["final"][key]["constructor_kwargs"])
  return analysis.StabilityAnalyzer(running=running, **kw)


def _replay(key, running=False):
  """Yields (step record, scores, state codes, state) for every step."""
  an = _config(key, running)
  update = jax.jit(an.update)
  scores_and_states = jax.jit(lambda s: (an.scores(s), an.states(s)))
  state = an.init(param_dict(_SA["initial_params"]))
  for step in _SA["steps"]:
    state = update(state, param_dict(step["params"]), param_dict(step["grads"]))
    scores, codes = scores_and_states(state)
    yield step, scores, codes, state


@pytest.mark.parametrize("key", KEYS)
def test_windowed_replay_scores_and_states(key):
  n = 0
  for step, scores, codes, _ in _replay(key):
    rec = step["analyzers"][key]
    assert set(scores) == set(rec["scores"]) == set(PARAM_ORDER)
    for name in PARAM_ORDER:
      np.testing.assert_allclose(scores[name], rec["scores"][name],
                                 **SCALAR_TOL,
                                 err_msg=f"{key} step {step['step']} {name}")
    assert analysis.state_names(codes) == rec["states"], (key, step["step"])
    n += 1
  assert n == 12


@pytest.mark.parametrize("key", KEYS)
def test_windowed_final_records(key):
  *_, (_, scores, codes, state) = _replay(key)
  final = _SA["final"][key]
  names = analysis.state_names(codes)  # jax returns dicts with sorted keys
  assert [k for k in PARAM_ORDER if names[k] == "protected"] == (
      final["protected_params"])
  assert [k for k in PARAM_ORDER if names[k] == "volatile"] == (
      final["volatile_params"])
  lengths = _config(key).history_lengths(state)
  assert {k: int(v) for k, v in lengths.items()} == final["history_lengths"]
  assert set(np.asarray(scores[n]).dtype for n in PARAM_ORDER) == {
      np.dtype(np.float32)}


def test_short_history_really_wraps():
  # Guard that the H = 4 run exercises eviction: from step 4 on its scores
  # differ from the H = 50 run recorded beside it.
  for step in _SA["steps"]:
    a = step["analyzers"]["short_history"]["scores"]["0.weight"]
    b = step["analyzers"]["default"]["scores"]["0.weight"]
    assert (abs(a - b) > 1e-4) == (step["step"] >= 4)


# -- running variant ---------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_running_equals_windowed_until_the_window_wraps(key):
  h = _config(key).history_length
  for step, scores, codes, _ in _replay(key, running=True):
    rec = step["analyzers"][key]
    assert analysis.state_names(codes) == rec["states"]
    if step["step"] + 1 <= h:  # at most H updates so far: exact
      for name in PARAM_ORDER:
        np.testing.assert_allclose(scores[name], rec["scores"][name],
                                   **SCALAR_TOL)
    else:  # wrapped (H = 4 only): approximate, measured max 0.0061
      for name in PARAM_ORDER:
        np.testing.assert_allclose(scores[name], rec["scores"][name],
                                   atol=0.01)


def test_running_memory_does_not_depend_on_history_length():
  params = param_dict(_SA["initial_params"])
  shapes = lambda s: [(x.shape, x.dtype) for x in jax.tree.leaves(s)]
  small = analysis.analyzer_init(params, 2, running=True)
  large = analysis.analyzer_init(params, 100_000, running=True)
  assert shapes(small) == shapes(large)
  size = sum(x.size for x in jax.tree.leaves(large))
  assert size <= 4 * sum(p.size for p in params.values()) + 50
  # The windowed one does grow with H.
  windowed = analysis.analyzer_init(params, 7)
  assert windowed.weights["0.weight"].shape == (7, 8, 4)


def test_running_anchor_and_variance_match_a_window_on_linear_drift():
  h, b = 5, np.array([0.01, -0.02, 0.03], np.float32)
  w0 = np.array([1.0, 2.0, -1.0], np.float32)
  ws = [w0 + b * t for t in range(200)]
  update = jax.jit(analysis.analyzer_update)
  run = analysis.analyzer_init({"w": w0}, h, running=True)
  for t, w in enumerate(ws):
    run = update(run, {"w": w}, {"w": jnp.ones(3)})
    if t + 1 > h:  # anchor = first weight of the window, exactly
      np.testing.assert_allclose(run.anchor["w"], ws[t - h + 1], rtol=1e-5,
                                 atol=1e-5)
  # Steady state: the window's unbiased variance b^2 H (H + 1) / 12.
  np.testing.assert_allclose(run.var["w"], b**2 * h * (h + 1) / 12, rtol=1e-3)
  window = np.var(np.stack(ws[-h:]), axis=0, ddof=1)
  np.testing.assert_allclose(run.var["w"], window, rtol=1e-3)


# -- an independent list-based port of the original's algorithm -------------


def _reference_scores(history, h):
  """The original `_compute_stability`, on Python lists, in float64."""
  weights, grads = [], []
  for w, g in history:
    weights = (weights + [np.asarray(w, np.float64)])[-h:]
    if g is not None:
      grads = (grads + [np.asarray(g, np.float64)])[-h:]
  parts = []
  if len(weights) >= 2:
    parts.append(1 / (1 + 100 * np.stack(weights).var(0, ddof=1).mean()))
  cons = []
  for a, b in zip(grads, grads[1:]):
    a, b = a.ravel(), b.ravel()
    if np.linalg.norm(a) > 1e-8 and np.linalg.norm(b) > 1e-8:
      cons.append((a @ b / np.linalg.norm(a) / np.linalg.norm(b) + 1) / 2)
  if len(grads) >= 2 and cons:
    parts.append(sum(cons) / len(cons))
  if len(weights) >= 2:
    parts.append(1 / (1 + np.linalg.norm(weights[-1] - weights[0])))
  return sum(parts) / len(parts) if parts else 0.5


@functools.cache
def _jitted(with_grads):
  if with_grads:
    return jax.jit(analysis.analyzer_update), jax.jit(analysis.analyzer_scores)
  return (jax.jit(lambda s, p: analysis.analyzer_update(s, p)),
          jax.jit(analysis.analyzer_scores))


_vec = st.lists(st.sampled_from([0.0, 0.5, -1.0, 2.0, 1e-3]), min_size=3,
                max_size=3)
_step = st.tuples(_vec, st.one_of(st.none(), st.just([0.0, 0.0, 0.0]), _vec))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(h=st.sampled_from([1, 2, 3, 5]),
                  steps=st.lists(_step, min_size=1, max_size=9))
def test_windowed_matches_list_reference(h, steps):
  """Ring buffers, eviction, zero gradients, and steps without gradients."""
  states = [analysis.analyzer_init({"w": jnp.zeros(3)}, h),
            analysis.analyzer_init({"w": jnp.zeros(3)}, h, running=True)]
  for t, (w, g) in enumerate(steps, 1):
    w = np.asarray(w, np.float32)
    update, scores = _jitted(g is not None)
    args = ({"w": w},) if g is None else ({"w": w}, {"w": np.float32(g)})
    states = [update(s, *args) for s in states]
    expected = _reference_scores(
        [(np.float32(a), None if b is None else np.float32(b))
         for a, b in steps[:t]], h)
    got = [float(scores(s)["w"]) for s in states]
    assert 0.0 <= got[0] <= 1.0 and 0.0 <= got[1] <= 1.0
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-6)
    if t <= h:
      np.testing.assert_allclose(got[1], expected, rtol=1e-5, atol=1e-6)


# -- jit behaviour, validation, API -------------------------------------------


@pytest.mark.parametrize("running", [False, True])
def test_no_recompilation_between_steps(running):
  traces = []
  def step(state, params, grads):
    traces.append(1)
    state = analysis.analyzer_update(state, params, grads)
    return state, analysis.analyzer_scores(state)
  step = jax.jit(step)
  state = analysis.analyzer_init(param_dict(_SA["initial_params"]), 4, running)
  dtypes = [x.dtype for x in jax.tree.leaves(state)]
  for rec in _SA["steps"][:8]:
    state, _ = step(state, param_dict(rec["params"]), param_dict(rec["grads"]))
  assert len(traces) == 1
  assert [x.dtype for x in jax.tree.leaves(state)] == dtypes


def test_weights_only_updates():
  w = lambda x: {"w": jnp.full(2, x, jnp.float32)}
  for running in (False, True):
    s = analysis.analyzer_init(w(0.0), 3, running)
    s = analysis.analyzer_update(s, w(1.0))
    s = analysis.analyzer_update(s, w(1.0))
    assert (int(s.count), int(s.grad_count)) == (2, 0)
    # variance 0 and change 0 only: score 1
    assert float(analysis.analyzer_scores(s)["w"]) == 1.0


def test_classify_boundaries_and_jit():
  scores = {"p": 0.7, "v": 0.3, "n": 0.5, "arr": jnp.array([0.1, 0.9, 0.69])}
  codes = jax.jit(analysis.classify)(scores)
  assert int(codes["p"]) == analysis.PROTECTED
  assert int(codes["v"]) == analysis.VOLATILE
  assert int(codes["n"]) == analysis.NEUTRAL
  assert list(analysis.state_names(codes)["arr"]) == [
      "volatile", "protected", "neutral"]
  assert analysis.STATE_NAMES[analysis.PROTECTED] == "protected"


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None, "50"])
def test_bad_history_length(bad):
  with pytest.raises(ValueError, match="history_length"):
    analysis.analyzer_init({"w": jnp.zeros(2)}, bad)
  with pytest.raises(ValueError, match="history_length"):
    analysis.StabilityAnalyzer(history_length=bad)


@pytest.mark.parametrize("p, v", [(0.3, 0.7), (float("nan"), 0.3),
                                  (0.7, float("-inf"))])
def test_bad_thresholds(p, v):
  with pytest.raises(ValueError, match="threshold"):
    analysis.classify({"a": 0.5}, p, v)
  with pytest.raises(ValueError, match="threshold"):
    analysis.StabilityAnalyzer(protected_threshold=p, volatile_threshold=v)


@pytest.mark.parametrize("running", [False, True])
def test_mismatched_trees(running):
  s = analysis.analyzer_init({"a": jnp.zeros(2), "b": jnp.zeros(3)}, 4, running)
  with pytest.raises(ValueError, match="structure"):
    analysis.analyzer_update(s, {"a": jnp.zeros(2)})
  with pytest.raises(ValueError, match="shape"):
    analysis.analyzer_update(s, {"a": jnp.zeros(2), "b": jnp.zeros(4)})
  with pytest.raises(ValueError, match="grads"):
    analysis.analyzer_update(s, {"a": jnp.zeros(2), "b": jnp.zeros(3)},
                             {"a": jnp.zeros(2)})
  with pytest.raises(ValueError, match="analyzer state"):
    analysis.analyzer_scores({"a": 1.0})
