"""Training and measurement engine of the continual-learning benchmark.

:func:`run` trains a functional MLP on a :class:`~cl_protocols.Protocol`
with one method, for every seed and every configuration of the method's
grid, in one jitted program: ``vmap`` over seeds x configurations of a
``lax.scan`` over segments, itself a scan over evaluation chunks of a scan
over steps. Hyperparameters enter as traced scalars and the optimizer is
built inside the vmapped function, so the program compiles once per
(protocol, method); :func:`precompile` compiles several concurrently.

A method may hook into the run (``cl_methods.Method``): ``boundary`` at
every segment end (EWC's consolidation with the empirical Fisher of the
segment, WiSE-FT's interpolation), ``eval_params`` for the weights that are
evaluated (a weight average), ``replay`` for a reservoir buffer of earlier
examples mixed into every batch.

Recorded per run: the test and validation accuracy of every task after
every segment (``acc_test`` / ``acc_val`` ``[segments, tasks]``), the KL
divergence of every task's test predictions between the end of the segment
that last trained it and the end of training, and at every chunk end the
curves: task-1 test accuracy and KL drift since the end of segment 1, the
chunk's mean online accuracy (each batch scored before its update), mean
update norm, and for methods containing ``sal.protect`` its protection rate.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sal_jax as sal
from sal_jax import baselines

import cl_methods
import cl_protocols

FISHER_CHUNK = 32  # per-example gradients taken at once for the Fisher
REPLAY_BUFFER = 256  # examples kept by experience replay


def init_mlp(seed: int, protocol: cl_protocols.Protocol
             ) -> list[dict[str, np.ndarray]]:
  """He-initialised MLP parameters: a list of ``{"w", "b"}`` layers.

  The weights of zero-padded input columns and of output units no task uses
  are zero (so padding changes nothing, see
  ``cl_protocols.pad_to_common``); the fan-in is the real input count.
  Drawn with numpy outside the jitted program.
  """
  rng = np.random.default_rng(seed)
  sizes = protocol.layer_sizes
  fan_ins = (protocol.num_inputs, *sizes[1:-1])
  params = [{"w": (rng.standard_normal((rows, cols)) * np.sqrt(2.0 / fan_in)
                   ).astype(np.float32),
             "b": np.zeros(cols, np.float32)}
            for rows, cols, fan_in in zip(sizes[:-1], sizes[1:], fan_ins)]
  params[0]["w"][protocol.num_inputs:] = 0.0
  params[-1]["w"][:, ~protocol.class_masks.any(0)] = 0.0
  return params


def log_probs(params, x, class_mask):
  """Log-softmax of the MLP's logits restricted to ``class_mask``.

  ``class_mask`` is ``[K]`` or per example ``[..., K]``.
  """
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  logits = x @ params[-1]["w"] + params[-1]["b"]
  return jax.nn.log_softmax(jnp.where(class_mask, logits, -1e9))


def nll(params, x, y, class_mask):
  """Per-example cross-entropy and the log-probabilities."""
  logp = log_probs(params, x, class_mask)
  return -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0], logp


def _accuracy(logp, y, valid):
  correct = (jnp.argmax(logp, -1) == y) & valid
  return jnp.sum(correct) / jnp.maximum(jnp.sum(valid), 1)


def _mean_nll(params, x, y, class_mask, valid):
  losses = nll(params, x, y, class_mask)[0]
  return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid),
                                                              1)


def _kl(logp_then, logp_now, valid):
  """Mean over valid rows of ``KL(p_then || p_now)``."""
  kl = jnp.sum(jnp.exp(logp_then) * (logp_then - logp_now), -1)
  return jnp.sum(jnp.where(valid, kl, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _fisher(params, x, y, masks):
  """Empirical Fisher diagonal over ``x``, in chunks of per-example grads."""
  def example_loss(p, xym):
    return nll(p, xym[0][None], xym[1][None], xym[2][None])[0][0]

  chunks = (x.reshape(-1, FISHER_CHUNK, x.shape[-1]),
            y.reshape(-1, FISHER_CHUNK),
            masks.reshape(-1, FISHER_CHUNK, masks.shape[-1]))
  per_chunk = jax.lax.map(
      lambda c: baselines.empirical_fisher(example_loss, params, c), chunks)
  return jax.tree.map(lambda f: jnp.mean(f, 0), per_chunk)


def method_key(seed: int) -> np.ndarray:
  """The raw (uint32) PRNG key a method gets for ``seed``."""
  return np.asarray([0, seed], np.uint32)


def _reservoir(buffer, seen, rows, key):
  """Reservoir sampling of ``rows`` into ``buffer`` (Vitter's algorithm R).

  Rows of one batch that draw the same slot overwrite each other; the
  buffer stays a uniform sample of the stream up to that.
  """
  n = seen + jnp.arange(rows.shape[0])
  draw = jnp.floor(jax.random.uniform(key, rows.shape) * (n + 1))
  slot = jnp.where(n < buffer.shape[0], n, draw.astype(jnp.int32))
  slot = jnp.where(slot < buffer.shape[0], slot, buffer.shape[0])
  return buffer.at[slot].set(rows, mode="drop"), seen + rows.shape[0]


def _train_program(method: cl_methods.Method) -> Callable:
  """The per-(seed, config) training function, to be vmapped and jitted."""

  def train(data, orders, fisher_rows, params, key, hp):
    tx = method.make(hp, key)
    opt_state = tx.init(params)
    params_init = params
    with_sal = bool(sal.find_protect_states(opt_state))
    x_test, y_test, valid_test = data["test"]
    x_val, y_val, valid_val = data["val"]
    masks, row_task = data["class_masks"], data["row_task"]

    def evaluated(opt_state, params):
      if method.eval_params is None:
        return params
      return method.eval_params(opt_state, params)

    def batch(rows):
      return (data["x_train"][rows], data["y_train"][rows],
              masks[row_task[rows]])

    def step(carry, rows):
      params, opt_state, buffer, seen, step_key = carry
      x, y, m = batch(rows)
      step_key, draw_key, keep_key = jax.random.split(step_key, 3)
      if method.replay:
        filled = jnp.minimum(seen, buffer.shape[0])
        picks = jax.random.randint(draw_key, rows.shape, 0,
                                   jnp.maximum(filled, 1))
        replay_weight = jnp.where(seen > 0, hp["replay"], 0.0)

      def loss(p):
        losses, logp = nll(p, x, y, m)
        total = jnp.mean(losses)
        if method.replay:
          xr, yr, mr = batch(buffer[picks])
          total = total + replay_weight * jnp.mean(nll(p, xr, yr, mr)[0])
        return total, logp

      (_, logp), grads = jax.value_and_grad(loss, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      if method.replay:
        buffer, seen = _reservoir(buffer, seen, rows, keep_key)
      stats = {"online_acc": jnp.mean(jnp.argmax(logp, -1) == y),
               "update_norm": optax.global_norm(updates)}
      if with_sal:
        # Only a gate shrinks the gradient; the pull alone rates 0.
        stats["protection_rate"] = sal.metrics(opt_state).get(
            "protection_rate", jnp.zeros((), jnp.float32))
      return (params, opt_state, buffer, seen, step_key), stats

    def chunk(carry, rows):
      train_carry, logp_task1 = carry
      train_carry, stats = jax.lax.scan(step, train_carry, rows)
      curves = jax.tree.map(lambda s: jnp.mean(s, 0), stats)
      params, opt_state = train_carry[:2]
      logp = log_probs(evaluated(opt_state, params), x_test[0], masks[0])
      curves["task1_acc"] = _accuracy(logp, y_test[0], valid_test[0])
      curves["kl_task1"] = _kl(logp_task1, logp, valid_test[0])
      curves["task1_loss"] = _mean_nll(evaluated(opt_state, params),
                                       x_test[0], y_test[0], masks[0],
                                       valid_test[0])
      estimate = sal.metrics(opt_state).get("estimated_forgetting") if (
          with_sal) else None
      if estimate is not None:
        # The relative budget's data-free estimate (its calibration).
        curves["estimated_forgetting"] = estimate
      return (train_carry, logp_task1), curves

    def segment(carry, xs):
      index, task, rows, fisher_row = xs
      train_carry, logp_task1, logp_saved, params_before = carry
      (train_carry, _), curves = jax.lax.scan(
          chunk, (train_carry, logp_task1), rows)
      params, opt_state = train_carry[:2]
      if method.boundary is not None:
        def fisher():
          return _fisher(params, *batch(fisher_row))
        opt_state, params = method.boundary(opt_state, params, params_before,
                                            fisher, hp)
      train_carry = (params, opt_state, *train_carry[2:])
      p_eval = evaluated(opt_state, params)
      logp = jax.vmap(lambda x, m: log_probs(p_eval, x, m))(x_test, masks)
      acc_test = jax.vmap(_accuracy)(logp, y_test, valid_test)
      acc_val = jax.vmap(lambda x, y, v, m: _accuracy(
          log_probs(p_eval, x, m), y, v))(x_val, y_val, valid_val, masks)
      logp_saved = logp_saved.at[task].set(logp[task])
      logp_task1 = jnp.where(index == 0, logp[0], logp_task1)
      return ((train_carry, logp_task1, logp_saved, params),
              (curves, acc_test, acc_val))

    # Until segment 1 ends, task 1's reference predictions are
    # placeholders (run() masks the curves that use them).
    logp_test = jnp.zeros(y_test.shape + (masks.shape[-1],))
    buffer = jnp.zeros(REPLAY_BUFFER if method.replay else 1, jnp.int32)
    train_carry = (params, opt_state, buffer, jnp.zeros([], jnp.int32),
                   jax.random.wrap_key_data(key))
    segments = (jnp.arange(len(orders)), data["segment_tasks"], orders,
                fisher_rows)
    carry, (curves, acc_test, acc_val) = jax.lax.scan(
        segment, (train_carry, logp_test[0], logp_test, params), segments)
    (params, opt_state, *_), _, logp_saved, _ = carry
    p_eval = evaluated(opt_state, params)
    logp_end = jax.vmap(lambda x, m: log_probs(p_eval, x, m))(x_test, masks)
    return {
        "acc_test": acc_test,
        "acc_val": acc_val,
        "kl_per_task": jax.vmap(_kl)(logp_saved, logp_end, valid_test),
        "online_acc": jnp.mean(curves["online_acc"]),
        "task1_loss_init": _mean_nll(params_init, x_test[0], y_test[0],
                                     masks[0], valid_test[0]),
        "curves": jax.tree.map(lambda c: c.reshape(-1), curves),
    }

  return train


# One jitted program per method.
_PROGRAMS: dict[tuple[str, bool], Callable] = {}
_COMPILED: set[tuple] = set()  # (method, fast_compile, argument shapes)
# XLA options of ``fast_compile``: no LLVM optimisation. It halves compile
# time, which dominates tiny runs, and slows elementwise code.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _program(method: cl_methods.Method, fast_compile: bool) -> Callable:
  key = (method.name, fast_compile)
  if key not in _PROGRAMS:
    over_configs = jax.vmap(_train_program(method),
                            in_axes=(None, None, None, None, None, 0))
    _PROGRAMS[key] = jax.jit(
        jax.vmap(over_configs, in_axes=(None, 0, 0, 0, 0, None)),
        compiler_options=FAST_COMPILE if fast_compile else None)
  return _PROGRAMS[key]


def _signature(args) -> tuple:
  return tuple((np.shape(a), str(np.result_type(a)))
               for a in jax.tree.leaves(args))


def _run_arguments(protocol: cl_protocols.Protocol, seeds: list[int],
                   configs: dict[str, np.ndarray]) -> tuple:
  data = {"x_train": protocol.x_train, "y_train": protocol.y_train,
          "row_task": protocol.row_task,
          "segment_tasks": np.asarray(protocol.segment_tasks, np.int32),
          "class_masks": protocol.class_masks, "val": protocol.val,
          "test": protocol.test}
  orders, fisher_rows = zip(*(cl_protocols.batch_orders(protocol, s)
                              for s in seeds))
  params = [init_mlp(s, protocol) for s in seeds]
  return (data, np.stack(orders), np.stack(fisher_rows),
          jax.tree.map(lambda *p: np.stack(p), *params),
          np.stack([method_key(s) for s in seeds]),
          {k: jnp.asarray(v, jnp.float32) for k, v in configs.items()})


def precompile(protocol: cl_protocols.Protocol,
               jobs: list[tuple[cl_methods.Method, dict[str, np.ndarray]]],
               seeds: list[int], fast_compile: bool,
               workers: int = 2) -> None:
  """Compiles the run programs of ``jobs`` (method, configs) concurrently.

  XLA compiles outside the GIL, so on a multi-core machine this shortens the
  compile phase; the later :func:`run` calls find the programs compiled
  (jit's cache is shared with ahead-of-time compiles).
  """
  def compile_job(job):
    method, configs = job
    run_args = _run_arguments(protocol, seeds, configs)
    key = (method.name, fast_compile, _signature(run_args))
    if key not in _COMPILED:
      _program(method, fast_compile).lower(*run_args).compile()
      _COMPILED.add(key)

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    list(pool.map(compile_job, jobs))


def run(protocol: cl_protocols.Protocol, method: cl_methods.Method,
        seeds: list[int], configs: dict[str, np.ndarray],
        fast_compile: bool = False) -> dict:
  """Trains every (seed, config) pair; returns numpy arrays ``[S, C, ...]``.

  Keys: ``acc_test`` and ``acc_val`` ``[S, C, segments, T]`` (``T`` the
  protocol's real tasks; padded tasks are dropped), ``kl_per_task [S, C,
  T]``, ``online_acc [S, C]`` and ``curves`` (each ``[S, C, segments *
  chunks]``; ``kl_task1`` is NaN during segment 1, before its reference
  exists), plus ``seconds`` (wall time, including compilation unless
  precompiled).
  """
  start = time.perf_counter()
  out = _program(method, fast_compile)(
      *_run_arguments(protocol, seeds, configs))
  out = jax.tree.map(np.array, out)
  t = protocol.num_tasks
  out["acc_test"] = out["acc_test"][..., :t]
  out["acc_val"] = out["acc_val"][..., :t]
  out["kl_per_task"] = out["kl_per_task"][..., :t]
  out["curves"]["kl_task1"][
      ..., :protocol.schedule.chunks_per_segment] = np.nan
  out["seconds"] = time.perf_counter() - start
  return out
