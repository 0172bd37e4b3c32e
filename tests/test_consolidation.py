"""The consolidation estimator: formulas, anchors, and protection in a chain."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal

GAMMA, BETA = 0.9, 0.5  # short horizons keep the hand computation small


def _numpy_reference(grads, params, granularity):
  """Independent numpy replay of the documented recursions."""
  energy, count = 0.0, 0
  omega = {k: np.zeros_like(v) if granularity == "element" else 0.0
           for k, v in params[0].items()}
  anchor = {k: np.asarray(v, np.float64) for k, v in params[0].items()}
  out = []
  for g, p in zip(grads, params):
    count += 1
    n = sum(v.size for v in g.values())
    mean_sq = sum(np.sum(np.square(v)) for v in g.values()) / n
    energy = BETA * energy + (1 - BETA) * mean_sq
    e_hat = energy / (1 - BETA ** count)
    for k in g:
      unit = np.square(g[k]) if granularity == "element" else np.mean(
          np.square(g[k]))
      d = (1 - GAMMA) * unit / e_hat
      omega[k] = GAMMA * omega[k] + d
      anchor[k] = anchor[k] + d / omega[k] * (p[k] - anchor[k])
    corr = 1 - GAMMA ** count
    units = np.concatenate([np.ravel(omega[k] / corr) for k in g])
    mean = units.mean()
    raw = {k: (omega[k] / corr) / (omega[k] / corr + mean) for k in g}
    force = {k: omega[k] * np.sqrt(e_hat) * (p[k] - anchor[k]) for k in g}
    out.append((raw, {k: np.copy(a) for k, a in anchor.items()}, force))
  return out


@pytest.mark.parametrize("granularity", ["element", "leaf"])
def test_matches_numpy_replay(granularity):
  rng = np.random.default_rng(0)
  shapes = {"w": (3, 2), "b": (2,)}
  grads = [{k: rng.normal(size=s).astype(np.float32) * (1 + t)
            for k, s in shapes.items()} for t in range(6)]
  params = [{k: rng.normal(size=s).astype(np.float32)
             for k, s in shapes.items()} for t in range(6)]
  est = sal.consolidation_estimator(granularity, importance_decay=GAMMA,
                                    energy_decay=BETA)
  state = est.init(params[0])
  update = jax.jit(est.update)
  force_fn = jax.jit(est.restoring_force)
  expected = _numpy_reference(grads, params, granularity)
  for g, p, (raw_e, anchor_e, force_e) in zip(grads, params, expected):
    raw, state = update(g, state, p)
    force = force_fn(state, p)
    for k in g:
      np.testing.assert_allclose(raw[k], raw_e[k], rtol=1e-5)
      np.testing.assert_allclose(state.anchor[k], anchor_e[k], rtol=1e-5,
                                 atol=1e-6)
      np.testing.assert_allclose(force[k], force_e[k], rtol=1e-4, atol=1e-7)


def test_anchor_is_where_the_parameter_sat_while_it_mattered():
  est = sal.consolidation_estimator("element", importance_decay=0.999)
  state = est.init({"w": jnp.zeros(2)})
  # Entry 0 carries gradient at value 1.0, then moves to 5.0 with none.
  for _ in range(50):
    _, state = est.update({"w": jnp.array([1.0, 1.0])}, state,
                          {"w": jnp.array([1.0, 1.0])})
  for _ in range(50):
    _, state = est.update({"w": jnp.array([0.0, 1.0])}, state,
                          {"w": jnp.array([5.0, 5.0])})
  np.testing.assert_allclose(state.anchor["w"][0], 1.0, rtol=1e-6)
  assert 2.0 < float(state.anchor["w"][1]) < 4.0  # half its weight at 5.0
  force = est.restoring_force(state, {"w": jnp.array([5.0, 5.0])})
  assert float(force["w"][0]) > 0  # pulls entry 0 back down toward 1.0


def test_scores_rank_units_by_their_share_of_gradient_energy():
  est = sal.consolidation_estimator("element")
  state = est.init({"w": jnp.zeros(3)})
  raw, _ = est.update({"w": jnp.array([0.1, 1.0, 10.0])}, state,
                      {"w": jnp.zeros(3)})
  raw = np.asarray(raw["w"])
  assert np.all(np.diff(raw) > 0) and np.all((raw >= 0) & (raw < 1))


def test_first_step_has_no_pull():
  est = sal.consolidation_estimator("element")
  params = {"w": jnp.arange(3.0)}
  _, state = est.update({"w": jnp.ones(3)}, est.init(params), params)
  np.testing.assert_allclose(est.restoring_force(state, params)["w"], 0.0)


def _two_phase(tx, steps=400):
  """Phase A pulls w to +1, phase B pulls it to -1 with a weaker, noisy
  gradient on half the entries; returns w after A and after B."""
  params = {"w": jnp.zeros(8)}
  state = tx.init(params)

  def step(carry, inp):
    params, state = carry
    target, key = inp
    grad = params["w"] - target + 0.05 * jax.random.normal(key, (8,))
    updates, state = tx.update({"w": grad}, state, params)
    return (optax.apply_updates(params, updates), state), None

  keys = jax.random.split(jax.random.key(0), 2 * steps)
  target_a = jnp.ones((steps, 8))
  target_b = jnp.concatenate([-jnp.ones((steps, 4)), jnp.ones((steps, 4))], 1)
  run = jax.jit(lambda c, x: jax.lax.scan(step, c, x)[0])
  carry = run((params, state), (target_a, keys[:steps]))
  after_a = carry[0]["w"]
  carry = run(carry, (target_b, keys[steps:]))
  return after_a, carry[0]["w"]


def test_restore_keeps_consolidated_values_under_adamw():
  plain_a, plain_b = _two_phase(optax.adamw(3e-2))
  tx = optax.chain(
      sal.protect(estimator="consolidation", granularity="element",
                  restore=30.0, gate="none"),
      optax.adamw(3e-2))
  sal_a, sal_b = _two_phase(tx)
  np.testing.assert_allclose(plain_a, 1.0, atol=0.1)
  np.testing.assert_allclose(sal_a, 1.0, atol=0.1)  # phase A is learned
  plain_drift = float(jnp.abs(plain_b[:4] - plain_a[:4]).mean())
  sal_drift = float(jnp.abs(sal_b[:4] - sal_a[:4]).mean())
  assert plain_drift > 1.5  # plain adamw follows the new target
  assert sal_drift < 0.5 * plain_drift


@pytest.mark.parametrize("granularity", ["leaf", "element"])
def test_inside_protect_compiles_once_with_fixed_state(granularity):
  tx = optax.chain(sal.protect(estimator="consolidation",
                               granularity=granularity, restore=1.0),
                   optax.adamw(1e-3))
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  state0 = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = state0
  for i in range(4):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (i + 1)), params)
    params, state = step(params, state, grads)
  assert len(traces) == 1
  chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)


def test_bad_arguments():
  with pytest.raises(ValueError, match="importance_decay"):
    sal.consolidation_estimator(importance_decay=1.0)
  with pytest.raises(ValueError, match="relative_importance"):
    sal.consolidation_estimator(relative_importance=0.0)
  with pytest.raises(ValueError, match="contradicts the estimator"):
    sal.protect(estimator=sal.consolidation_estimator("element"),
                granularity="leaf")
