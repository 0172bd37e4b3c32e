"""Parity of the filters with the original (fixture section ``filters``)."""

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

FILTERS = load_fixture()["filters"]
LOW = FILTERS["low_change_mask"]
FREQ = FILTERS["frequency_filter"]
ADAPTIVE = FILTERS["adaptive_stability_filter"]
MAGNITUDE = FILTERS["gradient_magnitude_filter"]


# -- low_change_mask ---------------------------------------------------------

@pytest.mark.parametrize("case", LOW["cases"],
                         ids=lambda c: f"rel{c['relative']}-t{c['threshold']}")
def test_low_change_mask_cases(case):
  fn = jax.jit(functools.partial(analysis.low_change_mask,
                                 threshold=case["threshold"],
                                 relative=case["relative"]))
  out = fn(as_array(LOW["current"]), as_array(LOW["previous"]))
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, as_array(case["mask"]))


def test_low_change_mask_defaults():
  assert LOW["defaults"] == {"threshold": 0.1, "relative": True}
  out = analysis.low_change_mask(as_array(LOW["current"]),
                                 as_array(LOW["previous"]))
  np.testing.assert_array_equal(out, as_array(LOW["default_args_mask"]))


def test_low_change_mask_zero_previous_uses_clamp():
  # previous == 0 exactly: 0 -> 0 is stable, 0 -> 7.6e-5 is "changing".
  previous = as_array(LOW["previous"])
  assert previous[0, 0] == 0.0 and previous[2, 3] == 0.0
  out = analysis.low_change_mask(as_array(LOW["current"]), previous)
  assert out[0, 0] == 0.0 and out[2, 3] == 1.0


def test_low_change_mask_shape_mismatch():
  assert LOW["shape_mismatch"] == {"raises": "ValueError"}
  with pytest.raises(ValueError, match="same shape"):
    analysis.low_change_mask(jnp.ones((4, 5)), jnp.ones((5, 4)))


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(
    hnp.arrays(np.float32, (3, 4), elements=st.floats(-10, 10, width=32)),
    hnp.arrays(np.float32, (3, 4), elements=st.floats(-10, 10, width=32)),
    st.floats(0.0, 2.0), st.booleans())
def test_low_change_mask_is_binary(current, previous, threshold, relative):
  out = np.asarray(
      analysis.low_change_mask(current, previous, threshold, relative))
  assert set(np.unique(out)) <= {0.0, 1.0}


# -- frequency_filter --------------------------------------------------------

def _freq_id(case):
  return (f"{case['input']}-{case['low_cutoff']}-{case['high_cutoff']}-"
          f"dc{case['preserve_dc']}")


@pytest.mark.parametrize("case", FREQ["cases"], ids=_freq_id)
def test_frequency_filter_cases(case):
  x = as_array(FREQ["inputs"][case["input"]])
  n = x.shape[-1]
  # The float32 grid the reference compares the cut-offs against.
  grid = np.linspace(0.0, 1.0, n // 2 + 1).astype(np.float32)
  np.testing.assert_array_equal(grid, as_array(case["freq_grid_float32"]))
  fn = jax.jit(functools.partial(analysis.frequency_filter,
                                 preserve_dc=case["preserve_dc"]))
  out = fn(x, case["low_cutoff"], case["high_cutoff"])
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, as_array(case["output"]), **ARRAY_TOL)


def test_frequency_filter_defaults():
  assert FREQ["defaults"] == {"low_cutoff": 0.0, "high_cutoff": 0.5,
                              "preserve_dc": True}
  out = analysis.frequency_filter(as_array(FREQ["inputs"]["x2d_3x16"]))
  np.testing.assert_allclose(out, as_array(FREQ["default_args"]["output"]),
                             **ARRAY_TOL)


def test_frequency_filter_inclusive_float32_bounds():
  # n = 11: grid 0.6 is float32(0.6) > 0.6 in float64; compared in float32
  # it is inside [0.2, 0.6] (both bounds inclusive).
  x = np.zeros(11, np.float32)
  x[0] = 1.0  # an impulse: every bin has magnitude 1
  out = analysis.frequency_filter(x, 0.2, 0.6, preserve_dc=False)
  spectrum = np.abs(np.fft.rfft(np.asarray(out)))
  np.testing.assert_allclose(spectrum, [0, 1, 1, 1, 0, 0], atol=1e-6)


def test_frequency_filter_rejects_scalar():
  with pytest.raises(ValueError, match="last axis"):
    analysis.frequency_filter(jnp.float32(1.0))


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
    elements=st.floats(-10, 10, width=32)))
def test_frequency_filter_full_band_is_identity(x):
  out = analysis.frequency_filter(x, 0.0, 1.0, preserve_dc=True)
  np.testing.assert_allclose(out, x, rtol=1e-4, atol=1e-4)


# -- gradient_magnitude_filter -----------------------------------------------

@pytest.mark.parametrize("case", MAGNITUDE["cases"],
                         ids=lambda c: f"p{c['percentile']}")
def test_gradient_magnitude_filter_cases(case):
  grads = param_dict(MAGNITUDE["grads"])
  fn = jax.jit(functools.partial(analysis.gradient_magnitude_filter,
                                 percentile=case["percentile"]))
  masks = fn(grads)
  assert set(masks) == set(case["masks"])
  for name, expected in case["masks"].items():
    np.testing.assert_array_equal(masks[name], as_array(expected), err_msg=name)


def test_gradient_magnitude_filter_is_per_leaf():
  # A global percentile would pick different entries: the fixture is per leaf.
  grads = param_dict(MAGNITUDE["grads"])
  case = MAGNITUDE["cases"][0]
  flat = np.concatenate([np.abs(g).ravel() for g in grads.values()])
  cut = np.percentile(flat, case["percentile"])
  global_masks = {k: np.where(np.abs(g) > cut, 0.5, 1.0)
                  for k, g in grads.items()}
  assert any(not np.array_equal(global_masks[k], as_array(m))
             for k, m in case["masks"].items())


@pytest.mark.parametrize("case", MAGNITUDE["cases"],
                         ids=lambda c: f"p{c['percentile']}")
def test_gradient_magnitude_filter_traced_percentile(case):
  grads = param_dict(MAGNITUDE["grads"])
  masks = jax.jit(analysis.gradient_magnitude_filter)(grads, case["percentile"])
  for name, expected in case["masks"].items():
    np.testing.assert_array_equal(masks[name], as_array(expected), err_msg=name)


def test_gradient_magnitude_filter_rejects_bad_percentile():
  with pytest.raises(ValueError, match="percentile"):
    analysis.gradient_magnitude_filter({"w": jnp.ones(3)}, 101.0)


# -- adaptive stability filter -----------------------------------------------

def _replay(constructor_kwargs):
  """Replays the fixture procedure; yields (state, masks, unseen) per step."""
  kwargs = dict(ADAPTIVE["defaults"], **constructor_kwargs)
  seq = {k: [as_array(x) for x in v] for k, v in ADAPTIVE["sequence"].items()}
  names = ("w", "b", "z")
  params = {k: seq[k][0] for k in names}
  update = jax.jit(functools.partial(analysis.adaptive_filter_update,
                                     decay=kwargs["decay"]))
  adapt = jax.jit(functools.partial(analysis.adaptive_filter_adapt,
                                    adaptation_rate=kwargs["adaptation_rate"]))
  masks_fn = jax.jit(analysis.adaptive_filter_masks)
  state = analysis.adaptive_filter_init(params, kwargs["initial_threshold"])
  for t in range(len(seq["w"]) - 1):
    state = update(state, {k: seq[k][t + 1] for k in names},
                   {k: seq[k][t] for k in names})
    masks = masks_fn(state, params)
    # An unseen name: a fresh leaf under the same threshold.
    unseen = analysis.adaptive_filter_init({"u": jnp.ones(3)})._replace(
        threshold=state.threshold)
    unseen_mask = masks_fn(unseen, {"u": jnp.ones(3)})["u"]
    threshold_before = state.threshold
    state = adapt(state)
    yield threshold_before, state, masks, unseen_mask


@pytest.mark.parametrize("run", ADAPTIVE["runs"],
                         ids=lambda r: str(r["constructor_kwargs"] or "default"))
def test_adaptive_filter_runs(run):
  history = {k: [] for k in run["change_history"]}
  steps = list(_replay(run["constructor_kwargs"]))
  assert len(steps) == len(run["steps"])
  for (before, state, masks, unseen), rec in zip(steps, run["steps"]):
    t = rec["t"]
    for name in ("w", "b", "z"):
      ema = float(state.stability_ema[name])
      np.testing.assert_allclose(ema, rec["stability_returned"][name],
                                 err_msg=f"t={t} {name}", **SCALAR_TOL)
      np.testing.assert_allclose(ema, rec["stability_ema"][name],
                                 err_msg=f"t={t} {name}", **SCALAR_TOL)
      mask = rec["masks"][name]
      assert list(masks[name].shape) == mask["shape"]
      np.testing.assert_allclose(
          masks[name], np.full(mask["shape"], mask["value"], np.float32),
          err_msg=f"t={t} {name}", **ARRAY_TOL)
      history[name].append(float(state.relative_change[name]))
    np.testing.assert_allclose(float(before), rec["threshold_before_adapt"],
                               **SCALAR_TOL)
    np.testing.assert_allclose(unseen, np.full(3, rec["mask_unseen_name"]),
                               **ARRAY_TOL)
    np.testing.assert_allclose(float(state.threshold),
                               rec["threshold_after_adapt"], **SCALAR_TOL)
  for name, expected in run["change_history"].items():
    np.testing.assert_allclose(history[name], expected, err_msg=name,
                               **SCALAR_TOL)


def test_adaptive_filter_eps_path():
  # z starts at exact zeros: 0 -> 0 is change 0, 0 -> v is |v| / 1e-8.
  z = ADAPTIVE["runs"][0]["change_history"]["z"]
  assert z[:4] == [0.0] * 4 and z[4] > 1e7


def test_adaptive_filter_state_dtypes_and_unseen_adapt():
  state = analysis.adaptive_filter_init({"a": jnp.ones(2), "b": jnp.ones(3)},
                                        0.9)
  assert state.threshold.dtype == jnp.float32
  assert state.seen["a"].dtype == jnp.bool_
  # Nothing seen: adapt leaves the threshold alone (not even clipped).
  assert float(analysis.adaptive_filter_adapt(state, 0.5).threshold) == \
      pytest.approx(0.9)
  # Clipped to [0.2, 0.8] once something was seen.
  state = analysis.adaptive_filter_update(
      state, {"a": jnp.ones(2), "b": jnp.ones(3)},
      {"a": jnp.ones(2), "b": jnp.ones(3)})
  assert float(analysis.adaptive_filter_adapt(state, 1.0).threshold) == \
      pytest.approx(0.8)


def test_adaptive_filter_rejects_bad_hyperparameters():
  with pytest.raises(ValueError, match="initial_threshold"):
    analysis.adaptive_filter_init({"a": jnp.ones(2)}, 1.5)
  state = analysis.adaptive_filter_init({"a": jnp.ones(2)})
  with pytest.raises(ValueError, match="decay"):
    analysis.adaptive_filter_update(state, {"a": jnp.ones(2)},
                                    {"a": jnp.ones(2)}, decay=-0.1)
