"""Hyperparameter types: one rule everywhere (``sal_jax._common.validation``).

A hyperparameter of the wrong type (a string, a bool, a list, ``None`` where
none is allowed) raises ``TypeError`` naming it, in ``protect``, in the
estimators, in the baselines, and in the analysis tools and the cascade
that take a rate or a bound. Python numbers are range-checked; scalar
arrays, tracers included, are accepted where a number is, unchecked (as
``optax.inject_hyperparams`` passes them).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal
from sal_jax import analysis
from sal_jax import baselines
from sal_jax import contrib
from sal_jax._common import validation as _validation

WRONG_TYPES = [
    # (factory, argument, value)
    (sal.protect, "restore", "1"),
    (sal.protect, "threshold", "0.5"),
    (sal.protect, "threshold_adaptation", [0.1]),
    (sal.protect, "score_ema", True),
    (sal.protect, "initial_score", "0.5"),
    (sal.protect, "steepness", None),
    (sal.protect, "gate", 1),
    (sal.protect, "granularity", 0),
    (sal.protect, "estimator", 3),
    (sal.protect, "preserve_rms", "no"),
    (sal.protect, "threshold_range", "0.1,0.9"),
    (sal.reference_estimator, "eps", "1e-8"),
    (sal.consolidation_estimator, "importance_decay", "0.999"),
    (sal.consolidation_estimator, "relative_importance", None),
    (sal.shift_consolidation_estimator, "fast_decay", "0.9"),
    (sal.shift_consolidation_estimator, "warmup_steps", 10.0),
    (sal.shift_consolidation_estimator, "noise_multiplier", "3"),
    (sal.shift_consolidation_estimator, "granularity", None),
    (baselines.ewc, "strength", "100"),
    (baselines.l2_init, "strength", None),
    (baselines.streaming_ewc, "importance_decay", "0.999"),
    (baselines.streaming_mas, "anchor_decay", [0.999]),
    (baselines.streaming_si, "damping", "0.1"),
    (baselines.upgd, "learning_rate", "0.1"),
    (baselines.upgd, "noise_std", True),
]

# What the factories need besides the argument under test.
_REQUIRED = {baselines.ewc: {"strength": 1.0},
             baselines.l2_init: {"strength": 1.0},
             baselines.streaming_ewc: {"strength": 1.0},
             baselines.streaming_mas: {"strength": 1.0},
             baselines.streaming_si: {"strength": 1.0},
             baselines.upgd: {"learning_rate": 0.1}}


@pytest.mark.parametrize(
    "factory, name, value", WRONG_TYPES,
    ids=[f"{f.__name__}-{n}-{type(v).__name__}" for f, n, v in WRONG_TYPES])
def test_wrong_type_raises_type_error_naming_the_argument(factory, name,
                                                          value):
  kwargs = dict(_REQUIRED.get(factory, {}), **{name: value})
  with pytest.raises(TypeError, match=name):
    factory(**kwargs)


def test_ewc_consolidate_checks_its_arguments():
  state = baselines.ewc(1.0).init({"w": jnp.zeros(2)})
  params = fisher = {"w": jnp.ones(2)}
  with pytest.raises(TypeError, match="decay"):
    baselines.ewc_consolidate(state, params, fisher, online=True, decay="0.9")
  with pytest.raises(TypeError, match="online"):
    baselines.ewc_consolidate(state, params, fisher, online="yes")


@pytest.mark.parametrize("value", [
    0.5, 1, np.float32(0.5), np.float64(0.5), np.array(0.5),
    jnp.asarray(0.5), jnp.asarray(0.5, jnp.bfloat16), jnp.asarray(1)])
def test_numbers_and_scalar_arrays_are_accepted(value):
  sal.protect(threshold=value, threshold_range=(0.1, 1.0),
              estimator="reference")
  sal.protect(restore=value)
  baselines.streaming_si(value, damping=value)
  baselines.upgd(value)


def test_tracers_are_accepted_and_not_range_checked():
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.full(3, 0.5)}

  @jax.jit
  def step(threshold, restore, strength):
    tx = optax.chain(
        sal.protect(gate="soft", threshold=threshold, restore=restore),
        baselines.streaming_ewc(strength))
    return tx.update(grads, tx.init(params), params)[0]

  # 2.0 would fail the range check as a Python number; a traced value is
  # not known when the transformation is built.
  out = step(jnp.asarray(2.0), jnp.asarray(1.0), jnp.asarray(0.5))
  assert np.all(np.isfinite(out["w"]))


def test_scalar_arrays_must_be_scalars_of_a_real_dtype():
  with pytest.raises(TypeError, match="threshold"):
    sal.protect(threshold=jnp.ones(2))
  with pytest.raises(TypeError, match="threshold"):
    sal.protect(threshold=jnp.asarray(True))
  with pytest.raises(TypeError, match="restore"):
    sal.protect(restore=jnp.asarray(1.0 + 0j))
  with pytest.raises(TypeError, match="warmup_steps"):
    sal.shift_consolidation_estimator(warmup_steps=jnp.asarray(1.5))


def test_python_numbers_are_range_checked_arrays_are_not():
  with pytest.raises(ValueError, match=r"score_ema must be in \(0"):
    sal.protect(score_ema=0.0)
  with pytest.raises(ValueError, match=r"restore must be in \[0"):
    sal.protect(restore=np.float32(-1.0))
  sal.protect(gate="soft", score_ema=jnp.asarray(0.0))  # not range-checked


def test_one_rule_in_one_helper():
  check = _validation.check_number
  check("f", "x", 0.5, 0.0, 1.0)
  check("f", "x", None, optional=True)
  check("f", "x", jnp.asarray(7), integer=True)
  for bad in ("1", True, None, [1.0], 1 + 0j, jnp.ones(2)):
    with pytest.raises(TypeError, match="f: x must be"):
      check("f", "x", bad)
  with pytest.raises(TypeError, match="integer"):
    check("f", "x", 1.0, integer=True)
  with pytest.raises(ValueError, match=r"f: x must be in \(0, 1\)"):
    check("f", "x", 1, 0, 1, low_open=True, high_open=True)
  with pytest.raises(ValueError, match="x must be in"):
    check("f", "x", float("nan"))


@pytest.mark.parametrize("call, name", [
    (lambda v: analysis.exponential_moving_average(1.0, 0.0, v), "alpha"),
    (lambda v: analysis.ema_update(analysis.ema_init(), 1.0, v), "alpha"),
    (lambda v: analysis.adaptive_filter_init({"w": jnp.ones(2)}, v),
     "initial_threshold"),
    (lambda v: analysis.gradient_magnitude_filter({"w": jnp.ones(2)}, v),
     "percentile"),
    (lambda v: contrib.cascade_step(contrib.cascade_init(jnp.ones(2)),
                                    jax.random.key(0), lambda e: e,
                                    noise_scale=v), "noise_scale"),
])
def test_analysis_and_cascade_follow_the_same_rule(call, name):
  with pytest.raises(TypeError, match=name):
    call("0.5")
  with pytest.raises(ValueError, match=name):
    call(-1.0)
  call(jnp.asarray(0.5))  # a scalar array is not range-checked
