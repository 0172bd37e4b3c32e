"""protect inside optax's wrappers and flax.nnx, through a task switch.

Every run trains a linear model on task A, then on task B; nobody tells
protect where the switch is: its shift detector finds it and consolidates.
Each wrapper (``masked``, ``multi_transform``, ``MultiSteps``,
``apply_if_finite``, ``inject_hyperparams``, ``nnx.Optimizer``) must
reproduce the unwrapped run it stands for, step for step, and that run
forgets task A measurably less than the same optimizer without protect, so
an identity in place of protect, or a wrapper that drops its state, fails.

The strength is ``restore=30`` (the quickstart's): with the default
``restore=1`` this problem's pull is too weak to tell from no protection
(the forgetting of task A is 0.5 % below plain SGD's).
"""

import functools

import chex
import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np
import optax
import pytest

import sal_jax as sal
from conftest import two_linear_tasks

STEPS = 300  # per task
LR = 0.05
RESTORE = 30.0


X_A, Y_A, X_B, Y_B = (jnp.asarray(v) for v in two_linear_tasks())


def _loss(params, x, y):
  return 0.5 * jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def loss_a(params):
  return float(_loss(params, X_A, Y_A))


def _grads(params, step):
  """Task A's gradient for the first STEPS steps, task B's after."""
  return jax.lax.cond(step < STEPS,
                      lambda: jax.grad(_loss)(params, X_A, Y_A),
                      lambda: jax.grad(_loss)(params, X_B, Y_B))


def _init_params():
  return {"w": jnp.zeros(X_A.shape[1]), "b": jnp.zeros(())}


def _protected(restore=RESTORE):
  return optax.chain(sal.protect(restore=restore), optax.sgd(LR))


def train(tx, steps, params=None, state=None, start=0, task_step=None,
          skip=None, extra=None):
  """``steps`` steps of ``tx`` from step ``start``; the gradient of step
  ``i`` is that of task ``task_step(i)`` at the current params (default
  ``i``); ``skip(i)`` steps are left out; ``extra(params)`` gives the
  update's extra arguments. Returns the params, the state and task A's
  loss after each step."""
  params = _init_params() if params is None else params
  state = tx.init(params) if state is None else state
  task_step = task_step or (lambda i: i)

  def step(carry, i):
    params, state = carry

    def apply(params, state):
      grads = _grads(params, task_step(i))
      kwargs = extra(params) if extra else {}
      updates, state = tx.update(grads, state, params, **kwargs)
      return optax.apply_updates(params, updates), state

    if skip is None:
      params, state = apply(params, state)
    else:
      params, state = jax.lax.cond(skip(i), lambda p, s: (p, s), apply,
                                   params, state)
    return (params, state), _loss(params, X_A, Y_A)

  run = jax.jit(lambda c: jax.lax.scan(step, c, start + jnp.arange(steps)))
  (params, state), history = run((params, state))
  return params, state, history


@functools.cache
def reference():
  """The unwrapped run: ``chain(protect(restore=30), sgd)`` on A then B."""
  return train(_protected(), 2 * STEPS)


def _consolidations(state):
  return int(sal.metrics(state)["consolidations"])


def _assert_same_params(got, want, rtol=1e-5, atol=1e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol,
                               atol=atol)


def test_the_unwrapped_run_consolidates_at_the_switch_and_forgets_less():
  params, state, history = reference()
  plain, _, plain_history = train(optax.sgd(LR), 2 * STEPS)
  assert _consolidations(state) == 1
  before = float(history[STEPS - 1])  # task A's loss at the switch
  assert before == pytest.approx(float(plain_history[STEPS - 1]), rel=1e-6)
  forget = loss_a(params) - before
  forget_plain = loss_a(plain) - before
  assert forget_plain > 2.5  # task B really overwrites task A
  # Measured: 2.29 against SGD's 2.79 (0.82x).
  assert forget < 0.85 * forget_plain


def test_masked_and_multi_transform_protect_the_selected_leaves_alike():
  masked = optax.chain(
      optax.masked(sal.protect(restore=RESTORE), {"w": True, "b": False}),
      optax.sgd(LR))
  multi = optax.multi_transform(
      {"protected": _protected(), "plain": optax.sgd(LR)},
      {"w": "protected", "b": "plain"})
  p_masked, s_masked, _ = train(masked, 2 * STEPS)
  p_multi, s_multi, _ = train(multi, 2 * STEPS)
  _assert_same_params(p_masked, p_multi)
  assert _consolidations(s_masked) == _consolidations(s_multi) == 1
  plain, _, _ = train(optax.sgd(LR), 2 * STEPS)
  before = float(reference()[2][STEPS - 1])
  # Measured: 2.31 against SGD's 2.79 (0.83x; the bias is not protected).
  assert loss_a(p_masked) - before < 0.85 * (loss_a(plain) - before)


def test_multi_steps_accumulates_then_protects_as_one_step():
  """Two micro-steps at the same params give the same full-batch gradient,
  so MultiSteps(k=2) over 2n steps is the unwrapped run over n."""
  tx = optax.MultiSteps(_protected(), every_k_schedule=2)
  params, state, _ = train(tx, 4 * STEPS, task_step=lambda i: i // 2)
  ref_params, ref_state, _ = reference()
  _assert_same_params(params, ref_params)
  assert int(sal.metrics(state)["step"]) == 2 * STEPS
  assert _consolidations(state) == 1


def test_apply_if_finite_skips_bad_steps_and_protect_state_survives():
  """Non-finite gradients every 7th step: the run is the unwrapped one
  without those steps, protect's state included."""
  bad = lambda i: i % 7 == 3  # noqa: E731
  tx = optax.apply_if_finite(_protected(), max_consecutive_errors=2)
  params = _init_params()
  state = tx.init(params)

  def step(carry, i):
    params, state = carry
    grads = jax.tree.map(lambda g: jnp.where(bad(i), jnp.nan, g),
                         _grads(params, i))
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.jit(lambda c: jax.lax.scan(
      step, c, jnp.arange(2 * STEPS)))((params, state))
  ref_params, ref_state, _ = train(_protected(), 2 * STEPS, skip=bad)
  _assert_same_params(params, ref_params)
  assert int(state.total_notfinite) == sum(bad(i) for i in range(2 * STEPS))
  chex.assert_trees_all_close(sal.find_protect_states(state)[0],
                              sal.find_protect_states(ref_state)[0],
                              rtol=1e-5, atol=1e-6)
  assert _consolidations(state) == 1


def test_inject_hyperparams_restore_is_the_pull_strength():
  """The injected strength acts as the constructor's, and changing it at
  the switch acts as switching to a protect built with the new one."""
  tx = optax.chain(optax.inject_hyperparams(sal.protect)(restore=RESTORE),
                   optax.sgd(LR))
  params, state, _ = train(tx, STEPS)
  state[0].hyperparams["restore"] = jnp.asarray(3 * RESTORE)
  params, state, _ = train(tx, STEPS, params, state, start=STEPS)

  ref_params, ref_state, _ = train(_protected(), STEPS)
  ref_params, ref_state, _ = train(_protected(3 * RESTORE), STEPS,
                                   ref_params, ref_state, start=STEPS)
  _assert_same_params(params, ref_params)
  assert _consolidations(state) == 1
  # The stronger pull keeps more of task A: measured 1.02 against the
  # reference's 2.44.
  assert loss_a(params) < 0.5 * loss_a(reference()[0])


def test_inject_hyperparams_budget_is_the_drift_limit():
  """Fine-tuning on B from A's solution, with task A's loss rise as the
  drift and a budget injected at 0.1, then lowered to 0.02 halfway: the
  run is that of protect(budget=0.1) then protect(budget=0.02), and the
  rise ends at the budget. (Adam: under plain SGD a multiplier in the
  hundreds makes the pull's explicit step diverge.)"""
  inner = optax.adam(3e-2)
  start, _, _ = train(optax.sgd(LR), STEPS)
  floor = float(_loss(start, X_A, Y_A))

  def drift(params):
    return {"drift": jnp.maximum(_loss(params, X_A, Y_A) - floor, 0.0)}

  def consolidated(tx):
    return sal.consolidate(tx.init(start), start,
                           jax.tree.map(jnp.ones_like, start))

  half = STEPS // 2
  tx = optax.chain(optax.inject_hyperparams(sal.protect)(budget=0.1), inner)
  params, state, _ = train(tx, half, start, consolidated(tx), start=STEPS,
                           extra=drift)
  state[0].hyperparams["budget"] = jnp.asarray(0.02)
  params, state, _ = train(tx, half, params, state, start=STEPS + half,
                           extra=drift)

  loose = optax.chain(sal.protect(budget=0.1), inner)
  tight = optax.chain(sal.protect(budget=0.02), inner)
  ref_params, ref_state, _ = train(loose, half, start, consolidated(loose),
                                   start=STEPS, extra=drift)
  ref_params, _, _ = train(tight, half, ref_params, ref_state,
                           start=STEPS + half, extra=drift)
  _assert_same_params(params, ref_params)
  # Measured: 0.0200; without protect the rise is 2.80.
  assert loss_a(params) - floor == pytest.approx(0.02, abs=0.002)
  plain, _, _ = train(inner, STEPS, start, start=STEPS)
  assert loss_a(plain) - floor > 2.5


def test_nnx_optimizer_reproduces_the_unwrapped_run():

  class Linear(nnx.Module):

    def __init__(self):
      self.w = nnx.Param(jnp.zeros(X_A.shape[1]))
      self.b = nnx.Param(jnp.zeros(()))

  model = Linear()
  optimizer = nnx.Optimizer(model, _protected(), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, i):
    def loss(model):
      params = {"w": model.w[...], "b": model.b[...]}
      return jax.lax.cond(i < STEPS, lambda: _loss(params, X_A, Y_A),
                          lambda: _loss(params, X_B, Y_B))
    optimizer.update(model, nnx.grad(loss)(model))

  for i in range(2 * STEPS):
    step(model, optimizer, jnp.asarray(i))
  ref_params, _, _ = reference()
  _assert_same_params({"w": model.w[...], "b": model.b[...]}, ref_params)
  assert _consolidations(optimizer) == 1
