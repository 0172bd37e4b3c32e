"""Protection in front of Adam: `optax.chain(sal.protect(...), optax.adamw(...))`.

Adam divides by a running RMS of its input, so a slowly varying gate factor
``g * f`` is undone once that RMS has adapted (~1 / (1 - b2) steps). These
tests pin down both the trap and the way out (`preserve_rms=True`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal

STEPS = 3000
WINDOWS = ((0, 500), (1000, 1500), (2500, 3000))


def _constant_scores(scores):
  """An estimator that reports fixed raw scores (per leaf)."""
  return sal.StabilityEstimator(
      init=lambda params: (),
      update=lambda updates, state, params: (
          {k: jnp.asarray(v, jnp.float32) for k, v in scores.items()}, state))


def _run(tx):
  params = {"protected": jnp.zeros(512), "free": jnp.zeros(512)}
  state = tx.init(params)

  def step(carry, key):
    params, state = carry
    # Same gradient distribution on both leaves: a consistent pull plus noise.
    k1, k2 = jax.random.split(key)
    grads = {"protected": 0.1 + 0.5 * jax.random.normal(k1, (512,)),
             "free": 0.1 + 0.5 * jax.random.normal(k2, (512,))}
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), updates

  keys = jax.random.split(jax.random.key(0), STEPS)
  (params, _), updates = jax.jit(
      lambda c, k: jax.lax.scan(step, c, k))((params, state), keys)
  return params, updates


def _window_ratio(updates, lo, hi):
  """|net motion| of the protected leaf over that of the free leaf."""
  mean = lambda k: float(jnp.abs(updates[k][lo:hi].mean(0)).mean())
  return mean("protected") / mean("free")


def _protect(**kwargs):
  return sal.protect(
      estimator=_constant_scores({"protected": 0.9, "free": 0.0}),
      score_ema=1.0, threshold=0.5, threshold_adaptation=0.0, gate="soft",
      **kwargs)


def test_plain_gate_is_undone_by_adam():
  """Without compensation Adam undoes the 10x gate (its bias-corrected RMS
  adapts from the first step on)."""
  params, updates = _run(optax.chain(_protect(), optax.adamw(1e-3)))
  for lo, hi in WINDOWS:
    assert _window_ratio(updates, lo, hi) > 0.7
  drift = jnp.abs(params["protected"]).mean() / jnp.abs(params["free"]).mean()
  assert drift > 0.7


@pytest.mark.parametrize("inner", ["adamw", "adam", "rmsprop"])
def test_preserve_rms_gate_holds_for_thousands_of_steps(inner):
  optimizer = {"adamw": optax.adamw(1e-3), "adam": optax.adam(1e-3),
               "rmsprop": optax.rmsprop(1e-3)}[inner]
  params, updates = _run(
      optax.chain(_protect(preserve_rms=True), optimizer))
  for lo, hi in WINDOWS:
    ratio = _window_ratio(updates, lo, hi)
    assert ratio < 0.2, (lo, hi, ratio)  # the gate asks for 1 - 0.9 = 0.1
  drift = jnp.abs(params["protected"]).mean() / jnp.abs(params["free"]).mean()
  np.testing.assert_allclose(drift, 0.1, atol=0.05)


def test_preserve_rms_keeps_the_rms_and_scales_the_mean():
  g = jax.random.normal(jax.random.key(1), (1000,))
  h = jnp.stack([sal.apply_factor(g, 0.3, t, preserve_rms=True)
                 for t in range(2)])
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(h ** 2, 0)), jnp.abs(g),
                             rtol=1e-5)
  np.testing.assert_allclose(h.mean(0), 0.3 * g, rtol=1e-5, atol=1e-6)


def test_protection_rate_reports_the_gated_mean_signal():
  tx = _protect(preserve_rms=True)
  params = {"protected": jnp.zeros(4), "free": jnp.zeros(4)}
  _, state = tx.update({"protected": jnp.ones(4), "free": jnp.ones(4)},
                       tx.init(params), params)
  np.testing.assert_allclose(state.protection_rates["protected"], 0.9,
                             rtol=1e-6)
  np.testing.assert_allclose(state.protection_rates["free"], 0.0, atol=1e-7)


def test_restore_requires_an_estimator_with_a_force():
  with pytest.raises(ValueError, match="restoring force"):
    sal.protect(estimator="reference", restore=1.0)


def test_gate_after_scale_by_adam_scales_the_final_step():
  """Placed after `scale_by_adam`, a plain gate acts on the final step."""
  tx = optax.chain(optax.scale_by_adam(), _protect(),
                   optax.scale_by_learning_rate(1e-3))
  params, updates = _run(tx)
  for lo, hi in WINDOWS:
    assert _window_ratio(updates, lo, hi) < 0.2
  drift = jnp.abs(params["protected"]).mean() / jnp.abs(params["free"]).mean()
  np.testing.assert_allclose(drift, 0.1, atol=0.03)
