"""The shift detector on task-free streams: schedules, gradual drift, returns.

``protect()`` (default: the shift-consolidation estimator) watches the ratio
of a fast to a slow average of the raw gradients' energy and consolidates
(importance -> consolidated importance, params -> anchor) when the ratio
jumps above ``shift_ratio``. These tests train a small MLP (64-64-10, ReLU)
on sklearn's 8x8 digits with ``optax.chain(sal.protect(), optax.adamw(...))``,
batches of 64, in one jitted ``lax.scan``; task B is the same digits with a
fixed permutation of the 64 pixels (a domain shift). They check that

* a learning-rate warmup or a decaying schedule (warmup + cosine, warmup +
  step decay, a long linear warmup) triggers no consolidation on a
  stationary stream (at most one stray one, from minibatch noise, in the
  converged last 100 steps), while a task switch under the same schedule
  is detected within a few steps, once, with the pre-switch params as
  anchor;
* a gradual drift (each example drawn from B with a probability that ramps
  from 0 to 1 over 300 steps) is consolidated early in the ramp, while the
  anchor still holds task A, without a storm of consolidations, and leaves
  an active pull;
* a return to an earlier task (A -> B -> A) is detected as a shift, B's
  params become the anchor, the state stays finite, and B is kept better
  than with plain AdamW.
* with the defaults, task A is forgotten measurably less across a switch
  to B than with plain AdamW, while B is learnt as well.

Every bound below comes from runs of this file's own setup over 40 seeds
(16 for the threshold sweep; numbers in the comments), each test checks a
few seeds, about 0.1 s a run once compiled. With the detector disabled
(``shift_consolidation_estimator(shift_ratio=1e9)``) every test fails; with
``shift_ratio=1.05`` the warmup tests fail (a consolidation inside the
warmup), without hysteresis (``release_ratio=1.2``) the drift test, and
with ``protect(restore=0)`` the return test.

Not asserted, because it does not hold with the defaults (measured on this
setup, stationary digits, 600 steps, 16 seeds): learning-rate *increases*
on a trained model fool the detector (warm restarts, ``sgdr_schedule``
with 20 warmup steps to 1e-2 every 200 steps: 22 consolidations in the 100
steps after a restart, in 13 of 16 runs, none in the first cycle; a x10
jump from 1e-3 to 1e-2 at step 300: 6 in the next 100 steps, none with
1e-3 throughout), and so does minibatch noise at a constant learning rate
(11 of 16 runs at 3e-3 had at least one). ``noise_multiplier=3`` removes
all of these but then detects the gradual drift below in only 5 of 12
runs. A gradual drift that begins before the first task has settled is
missed: after 100, 150, 200 steps of A (lr 1e-3; 300 in the test) the
300-step ramp set off a consolidation in 0, 1, 6 of 12 runs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal
from sal_jax._common import units

datasets = pytest.importorskip("sklearn.datasets")

BATCH = 64
NUM_TEST = 400
SWITCH_WINDOW = 3  # a switch counts as detected within this many steps


@functools.lru_cache(maxsize=1)
def _digits():
  """sklearn's 8x8 digits in [0, 1]: train x, train y, test x, test y."""
  data = datasets.load_digits()
  order = np.random.default_rng(0).permutation(len(data.target))
  x = (data.data[order] / 16.0).astype(np.float32)
  y = data.target[order].astype(np.int32)
  return x[NUM_TEST:], y[NUM_TEST:], x[:NUM_TEST], y[:NUM_TEST]


# Task 0 (A) is the digits, task 1 (B) the digits with permuted pixels.
_PIXELS = (np.arange(64), np.random.default_rng(1).permutation(64))


def _segments(*tasks_and_steps):
  """Task ids [T, BATCH] of abrupt segments, e.g. ``(0, 200), (1, 200)``."""
  return np.concatenate([np.full((steps, BATCH), task)
                         for task, steps in tasks_and_steps])


def _drift(before, ramp, after, seed):
  """A for ``before`` steps, then each example drawn from B with a
  probability rising linearly over ``ramp`` steps (as in the benchmark's
  gradual protocol), then B for ``after`` steps."""
  share = (np.arange(ramp) + 1) / (ramp + 1)
  mixed = np.random.default_rng(seed + 1000).random((ramp, BATCH)) < share[
      :, None]
  return np.concatenate([np.zeros((before, BATCH), int), mixed.astype(int),
                         np.ones((after, BATCH), int)])


def _stream(tasks, seed):
  """Minibatches whose example (t, i) is a training digit of task
  ``tasks[t, i]``."""
  x, y, _, _ = _digits()
  rows = np.random.default_rng(seed).integers(0, len(y), tasks.shape)
  xs = x[rows]
  hit = tasks == 1
  xs[hit] = xs[hit][:, _PIXELS[1]]
  return jnp.asarray(xs), jnp.asarray(y[rows])


def _init(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return [
      {"w": jax.random.normal(k1, (64, 64)) * np.sqrt(2 / 64),
       "b": jnp.zeros(64)},
      {"w": jax.random.normal(k2, (64, 10)) * np.sqrt(2 / 64),
       "b": jnp.zeros(10)},
  ]


def _logits(params, x):
  hidden = jax.nn.relu(x @ params[0]["w"] + params[0]["b"])
  return hidden @ params[1]["w"] + params[1]["b"]


def _loss(params, x, y):
  logp = jax.nn.log_softmax(_logits(params, x))
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def _accuracy(params, task):
  """Accuracy on the 400 held-out digits of ``task``."""
  _, _, x, y = _digits()
  return float(jnp.mean(
      jnp.argmax(_logits(params, x[:, _PIXELS[task]]), -1) == y))


@functools.partial(jax.jit, static_argnums=0)
def _run(tx, params, xs, ys):
  def body(carry, batch):
    params, state = carry
    grads = jax.grad(_loss)(params, *batch)
    updates, state = tx.update(grads, state, params)
    found = sal.find_protect_states(state)
    count = (found[0].estimator_state.consolidations if found
             else jnp.zeros((), jnp.int32))
    return (optax.apply_updates(params, updates), state), (count, params)
  (params, state), (counts, history) = jax.lax.scan(
      body, (params, tx.init(params)), (xs, ys))
  return params, state, counts, history


def _train(tx, tasks, seed):
  """Trains from a fresh MLP on the stream ``tasks``.

  Returns the final params and state, the steps at which a consolidation
  happened (the step whose gradient set it off) and the params *before*
  every step (what a consolidation at that step anchors).
  """
  params, state, counts, history = _run(tx, _init(seed), *_stream(tasks,
                                                                  seed))
  onsets = np.flatnonzero(np.diff(np.asarray(counts), prepend=0))
  return params, state, onsets, history


def _at(history, step):
  return jax.tree.map(lambda h: h[step], history)


def _protected(learning_rate):
  return optax.chain(sal.protect(), optax.adamw(learning_rate))


# --------------------------------------------------------------------------
# Learning-rate warmup and schedules.

STEPS = 400
SWITCH = 200

SCHEDULES = {
    "warmup_cosine": optax.warmup_cosine_decay_schedule(
        0.0, 3e-3, warmup_steps=100, decay_steps=STEPS, end_value=3e-5),
    # Warmup to 1e-2 over 50 steps, then x0.1 at steps 150 and 300 (the
    # switch falls between the two decays).
    "warmup_step_decay": optax.join_schedules(
        [optax.linear_schedule(0.0, 1e-2, 50),
         optax.piecewise_constant_schedule(1e-2, {100: 0.1, 250: 0.1})],
        [50]),
    # Still warming up when the switch comes.
    "linear_warmup": optax.linear_schedule(0.0, 3e-3, SWITCH),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedules_do_not_trigger_but_a_task_switch_does(name):
  # Stationary, measured over 40 seeds for each schedule: none in 400 steps
  # with the cosine and the linear warmup; with the step decay, 3 seeds have
  # one, at steps 375-399, where the loss is lowest and minibatch noise
  # largest: the same steps to within one whether or not the LR decays at
  # 300, so noise, not the schedule. Over 16 seeds, shift_ratio=1.15 still
  # gives none in 400 steps (1.1 some on the step decay, 1.05 some inside
  # the warmups: the energy's rise while the LR warms up stays below a ratio
  # of ~1.1, the default threshold is 1.2). The switch was detected within
  # SWITCH_WINDOW steps, and only there, for all 40 seeds (at step 200
  # itself in all 16 of the sweep).
  tx = _protected(SCHEDULES[name])
  for seed in range(4):
    _, state, onsets, _ = _train(tx, _segments((0, STEPS)), seed)
    # None during the warmups, the peak and the first decay (the first 300
    # steps); at most one stray one in the converged last 100.
    assert onsets.size <= 1 and not np.any(onsets < 300), (seed, onsets)
    assert int(sal.metrics(state)["consolidations"]) == onsets.size

    _, state, onsets, history = _train(
        tx, _segments((0, SWITCH), (1, STEPS - SWITCH)), seed)
    # One consolidation, at the switch; the decay (or the constant rate)
    # that follows it does not set off another.
    assert onsets.size == 1, (seed, onsets)
    assert SWITCH <= onsets[0] <= SWITCH + SWITCH_WINDOW, (seed, onsets)
    assert int(sal.metrics(state)["consolidations"]) == 1
    anchor = state[0].estimator_state.anchor
    for a, p in zip(jax.tree.leaves(anchor),
                    jax.tree.leaves(_at(history, onsets[0]))):
      np.testing.assert_array_equal(a, p)
    # The anchor is task A's solution (measured 0.877-0.977 over 40 seeds;
    # chance is 0.1) and knows nothing of B yet (B at most 0.16 of A).
    accuracy = _accuracy(anchor, 0)
    assert accuracy >= 0.8, (seed, accuracy)
    assert _accuracy(anchor, 1) < 0.5 * accuracy


# --------------------------------------------------------------------------
# Gradual drift.

BEFORE, RAMP, AFTER = 300, 300, 200


def test_gradual_drift_is_consolidated_early_without_a_storm():
  # Measured over 40 seeds (lr 1e-3): none before the ramp; the first
  # consolidation 27-97 steps into the ramp (B's share 0.09-0.32); 1-4 in
  # all (20 seeds 1, 12 seeds 2, 7 seeds 3, 1 seed 4); the first anchor's
  # accuracy on A within 0.02 of the params' when the drift began. (Task A's
  # final accuracy is not asserted: protect minus AdamW was +0.005 on
  # average, from -0.015 to +0.025, this drift forgets little of A.)
  tx = _protected(1e-3)
  for seed in range(4):
    params, state, onsets, history = _train(
        tx, _drift(BEFORE, RAMP, AFTER, seed), seed)
    assert onsets.size, seed  # protection engaged
    # Not set off by the stationary first task, and early in the ramp:
    # within its first half, while most examples still come from A.
    assert BEFORE <= onsets[0] < BEFORE + RAMP // 2, (seed, onsets)
    # No storm: hysteresis allows one shift each time the energy ratio
    # falls back under 1; without it (release_ratio=1.2) seed 0 has 9.
    assert onsets.size <= 6, (seed, onsets)
    # The first anchor holds task A as the params did when the drift began.
    first = _at(history, onsets[0])
    assert _accuracy(first, 0) >= _accuracy(_at(history, BEFORE), 0) - 0.03
    # At the end a pull toward the consolidated params is active and finite.
    est = state[0].estimator_state
    force = sal.shift_consolidation_estimator().restoring_force(est, params)
    norm = float(sal.analysis.tree_norm(force))
    assert np.isfinite(norm) and norm > 0.0, norm


# --------------------------------------------------------------------------
# A return to an earlier task.

SEGMENT = 200


def test_return_to_an_earlier_task_consolidates_the_later_one():
  # Measured over 40 seeds (lr 3e-3): consolidations at 200 and at 400-401
  # in all, and one stray one at step 183 (seed 2, inside task A:
  # stationary noise at a constant learning rate); the last anchor held B
  # at 0.927-0.965; B's final accuracy minus AdamW's: mean +0.055, from
  # +0.030 to +0.108 (3-seed means 0.037 or more); A's: mean -0.001, -0.012
  # at worst.
  learning_rate = 3e-3
  # Per element, the form these figures were measured with. (With the
  # Kronecker default, seed 2's return to A raised no shift.)
  tx = optax.chain(sal.protect(granularity="element"),
                   optax.adamw(learning_rate))
  plain = optax.adamw(learning_rate)
  tasks = _segments((0, SEGMENT), (1, SEGMENT), (0, SEGMENT))
  gains = []
  for seed in range(3):
    params, state, onsets, history = _train(tx, tasks, seed)
    stray = np.ones(onsets.shape, bool)
    for switch in (SEGMENT, 2 * SEGMENT):
      near = (onsets >= switch) & (onsets <= switch + SWITCH_WINDOW)
      assert near.sum() == 1, (seed, switch, onsets)
      stray &= ~near
    # Nothing while B is learnt, nothing after the return; at most one stray
    # consolidation inside the first task.
    assert stray.sum() <= 1 and np.all(onsets[stray] < SEGMENT), (seed, onsets)
    est = state[0].estimator_state
    # B's params, as they stood at the return, are now the anchor.
    for a, p in zip(jax.tree.leaves(est.anchor),
                    jax.tree.leaves(_at(history, onsets[-1]))):
      np.testing.assert_array_equal(a, p)
    assert _accuracy(est.anchor, 1) >= 0.9
    for leaf in jax.tree.leaves((est.anchor, est.consolidated)):
      assert bool(jnp.all(jnp.isfinite(leaf)))
    # The weights the importance stands for (a Kronecker unit's diagonal)
    # are non-negative, up to rounding.
    for leaf, p in zip(jax.tree.leaves(est.consolidated),
                       jax.tree.leaves(params)):
      weights = units.dense(leaf, p)
      assert bool(jnp.all(weights >= -1e-6 * jnp.max(weights)))

    plain_params, _, _, _ = _train(plain, tasks, seed)
    gain = _accuracy(params, 1) - _accuracy(plain_params, 1)
    assert gain > 0.0, (seed, gain)
    gains.append(gain)
    # Keeping B does not stop task A from being relearnt.
    assert _accuracy(params, 0) >= _accuracy(plain_params, 0) - 0.03
  assert np.mean(gains) >= 0.02, gains


# --------------------------------------------------------------------------
# Forgetting across one switch.


def test_the_default_forgets_the_first_task_less_than_adamw():
  # Measured over 20 seeds (A for 200 steps, then B for 200, lr 3e-3): the
  # drop of A's accuracy is 0.56x to 0.77x AdamW's (3-seed means 0.61x to
  # 0.68x; AdamW's drop 0.26 to 0.50), one consolidation at the switch (two
  # in one seed), B's final accuracy within 0.008 of AdamW's.
  learning_rate = 3e-3
  tx, plain = _protected(learning_rate), optax.adamw(learning_rate)
  tasks = _segments((0, SEGMENT), (1, SEGMENT))
  drops, plain_drops = [], []
  for seed in range(3):
    params, _, onsets, history = _train(tx, tasks, seed)
    plain_params, _, _, plain_history = _train(plain, tasks, seed)
    assert np.any((onsets >= SEGMENT) & (onsets <= SEGMENT + SWITCH_WINDOW))
    drop = _accuracy(_at(history, SEGMENT), 0) - _accuracy(params, 0)
    plain_drop = (_accuracy(_at(plain_history, SEGMENT), 0)
                  - _accuracy(plain_params, 0))
    assert plain_drop > 0.25, (seed, plain_drop)  # B overwrites A
    assert drop < 0.8 * plain_drop, (seed, drop, plain_drop)
    assert abs(_accuracy(params, 1) - _accuracy(plain_params, 1)) <= 0.015
    drops.append(drop)
    plain_drops.append(plain_drop)
  assert sum(drops) < 0.72 * sum(plain_drops), (drops, plain_drops)
