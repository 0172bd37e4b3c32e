"""Training and measurement engine of the continual-learning benchmark.

:func:`run` trains a functional MLP on a :class:`~cl_protocols.Protocol`
with one method, for every seed and every configuration of the method's
grid, in one jitted program: ``vmap`` over seeds x configurations of a
``lax.scan`` over tasks, itself a scan over evaluation chunks of a scan over
steps. The program compiles once per (protocol, method) whatever the number
of tasks, and once per method for protocols of equal shapes;
:func:`precompile` compiles several methods concurrently. Hyperparameters
enter as traced scalars and the optimizer is built inside the vmapped
function.

Recorded per run: the test accuracy matrix ``R[i, j]`` (test accuracy on
task ``j`` after training task ``i``), the validation accuracy of every task
at the end (for model selection), the KL divergence of every task's test
predictions between the end of that task and the end of training, the
weight drift from the end of task 1, and at every chunk end the curves:
task-1 test accuracy, KL drift on task 1 and weight drift since the end of
task 1, the chunk's mean online accuracy (each batch scored before its
update) and mean update norm, and for methods containing ``sal.protect`` the
``sal.metrics`` (protection rate averaged over the chunk, spectrum
fractions at the chunk end). :func:`step_times` times single jitted
steps.

The summary metrics follow Avalanche's definitions (see the functions
below); with ``T`` tasks and ``R`` as above, ``j < T - 1`` the earlier tasks.
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
from sal_jax import contrib

import cl_methods
import cl_protocols

FISHER_CHUNK = 32  # per-example gradients taken at once for the Fisher
# sal.metrics read at every chunk end (the protection rate: at every step).
SAL_SPECTRUM = ("protected_fraction", "neutral_fraction", "volatile_fraction",
                "mean_score")


def init_mlp(seed: int, protocol: cl_protocols.Protocol
             ) -> list[dict[str, np.ndarray]]:
  """He-initialised MLP parameters: a list of ``{"w", "b"}`` layers.

  The weights of zero-padded input columns and of output units no task uses
  are zero (so padding changes nothing, see
  ``cl_protocols.pad_to_common``); the fan-in is the real input count.
  Drawn with numpy outside the jitted program: random-number generation
  inlined in a vmapped XLA program multiplies its compile time.
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
  """Log-softmax of the MLP's logits restricted to ``class_mask``."""
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  logits = x @ params[-1]["w"] + params[-1]["b"]
  return jax.nn.log_softmax(jnp.where(class_mask, logits, -1e9))


def loss_fn(params, x, y, class_mask):
  """Mean cross-entropy; returns ``(loss, log_probs)``."""
  logp = log_probs(params, x, class_mask)
  nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
  return jnp.mean(nll), logp


def _accuracy(logp, y, valid):
  correct = (jnp.argmax(logp, -1) == y) & valid
  return jnp.sum(correct) / jnp.maximum(jnp.sum(valid), 1)


def _kl(logp_then, logp_now, valid):
  """Mean over valid rows of ``KL(p_then || p_now)``."""
  kl = jnp.sum(jnp.exp(logp_then) * (logp_then - logp_now), -1)
  return jnp.sum(jnp.where(valid, kl, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _distance(a, b):
  return optax.global_norm(jax.tree.map(jnp.subtract, a, b))


def _fisher(params, x, y, class_mask):
  """Empirical Fisher diagonal over ``x``, in chunks of per-example grads."""
  def example_loss(p, xy):
    return loss_fn(p, xy[0][None], xy[1][None], class_mask)[0]

  chunks = (x.reshape(-1, FISHER_CHUNK, x.shape[-1]),
            y.reshape(-1, FISHER_CHUNK))
  per_chunk = jax.lax.map(
      lambda c: contrib.empirical_fisher(example_loss, params, c), chunks)
  return jax.tree.map(lambda f: jnp.mean(f, 0), per_chunk)


def method_key(seed: int) -> np.ndarray:
  """The raw (uint32) PRNG key a method gets for ``seed`` (UPGD's noise)."""
  return np.asarray([0, seed], np.uint32)


def _train_program(method: cl_methods.Method) -> Callable:
  """The per-(seed, config) training function, to be vmapped and jitted."""

  def train(data, orders, fisher_rows, params, key, hp):
    tx = method.make(hp, key)
    opt_state = tx.init(params)
    with_sal = bool(sal.find_protect_states(opt_state))
    x_test, y_test, valid_test = data["test"]
    masks = data["class_masks"]

    def step(carry, rows, class_mask):
      params, opt_state = carry
      x, y = data["x_train"][rows], data["y_train"][rows]
      (_, logp), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, x, y, class_mask)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      stats = {"online_acc": jnp.mean(jnp.argmax(logp, -1) == y),
               "update_norm": optax.global_norm(updates)}
      if with_sal:
        stats["protection_rate"] = sal.metrics(opt_state)["protection_rate"]
      return (params, opt_state), stats

    def chunk(carry, rows, class_mask):
      params, opt_state, params_task1, logp_task1, logp_last = carry
      (params, opt_state), stats = jax.lax.scan(
          lambda c, r: step(c, r, class_mask), (params, opt_state), rows)
      curves = jax.tree.map(lambda s: jnp.mean(s, 0), stats)
      logp = log_probs(params, x_test[0], masks[0])
      curves["task1_acc"] = _accuracy(logp, y_test[0], valid_test[0])
      curves["kl_task1"] = _kl(logp_task1, logp, valid_test[0])
      curves["weight_drift"] = _distance(params, params_task1)
      if with_sal:
        m = sal.metrics(opt_state)
        curves.update({k: m[k] for k in SAL_SPECTRUM})
      return (params, opt_state, params_task1, logp_task1, logp_last), curves

    def task(carry, xs):
      t, rows, fisher_row, class_mask = xs
      carry, curves = jax.lax.scan(
          lambda c, r: chunk(c, r, class_mask), carry, rows)
      params, opt_state, params_task1, logp_task1, _ = carry
      if method.consolidate is not None:
        fisher = _fisher(params, data["x_train"][fisher_row],
                         data["y_train"][fisher_row], class_mask)
        opt_state = method.consolidate(opt_state, params, fisher, hp)
      logp = jax.vmap(lambda x, m: log_probs(params, x, m))(x_test, masks)
      acc_row = jax.vmap(_accuracy)(logp, y_test, valid_test)
      first = t == 0
      params_task1 = jax.tree.map(lambda a, b: jnp.where(first, a, b),
                                  params, params_task1)
      logp_task1 = jnp.where(first, logp[0], logp_task1)
      return ((params, opt_state, params_task1, logp_task1, logp),
              (curves, acc_row, logp[t]))

    # Until task 1 ends, its reference predictions and params are
    # placeholders (run() masks the curves that use them).
    logp_test = jnp.zeros(y_test.shape + (masks.shape[-1],))
    tasks = (jnp.arange(len(masks)), orders, fisher_rows, masks)
    carry, (curves, acc, logp_after) = jax.lax.scan(
        task, (params, opt_state, params, logp_test[0], logp_test), tasks)
    params, _, params_task1, _, logp_end = carry
    x_val, y_val, valid_val = data["val"]
    return {
        "acc_matrix": acc,
        "val_final_acc": jax.vmap(lambda x, y, v, m: _accuracy(
            log_probs(params, x, m), y, v))(x_val, y_val, valid_val, masks),
        "kl_per_task": jax.vmap(_kl)(logp_after, logp_end, valid_test),
        "weight_drift": _distance(params, params_task1),
        "online_acc": jnp.mean(curves["online_acc"]),
        "curves": jax.tree.map(lambda c: c.reshape(-1), curves),
    }

  return train


# One jitted program per (method, compile mode): protocols with equal array
# shapes (all of them under --quick) reuse its compilation.
_PROGRAMS: dict[tuple[str, bool], Callable] = {}
_STEPS: dict[tuple[str, bool], Callable] = {}
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
          "class_masks": protocol.class_masks, "val": protocol.val,
          "test": protocol.test}
  orders, fisher_rows = zip(*(cl_protocols.batch_orders(protocol, s)
                              for s in seeds))
  params = [init_mlp(s, protocol) for s in seeds]
  return (data, np.stack(orders), np.stack(fisher_rows),
          jax.tree.map(lambda *p: np.stack(p), *params),
          np.stack([method_key(s) for s in seeds]),
          {k: jnp.asarray(v, jnp.float32) for k, v in configs.items()})


def _step_arguments(protocol: cl_protocols.Protocol,
                    method: cl_methods.Method, config: dict[str, float]):
  """Params, optimizer state, class mask, hyperparameters and key."""
  params = jax.tree.map(jnp.asarray, init_mlp(0, protocol))
  hp = {k: jnp.float32(v) for k, v in config.items()}
  key = method_key(0)
  opt_state = method.make(hp, key).init(params)
  return params, opt_state, jnp.asarray(protocol.class_masks[0]), hp, key


def _batch(protocol: cl_protocols.Protocol, rng: np.random.Generator):
  rows = rng.integers(*protocol.train_ranges[0],
                      protocol.schedule.batch_size)
  return jax.device_put((protocol.x_train[rows], protocol.y_train[rows]))


def _step_program(method: cl_methods.Method, fast_compile: bool) -> Callable:
  """A jitted single training step; the optimizer is built inside."""
  key = (method.name, fast_compile)
  if key not in _STEPS:
    def train_step(params, opt_state, x, y, class_mask, hp, key):
      tx = method.make(hp, key)
      grads, _ = jax.grad(loss_fn, has_aux=True)(params, x, y, class_mask)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    _STEPS[key] = jax.jit(
        train_step, compiler_options=FAST_COMPILE if fast_compile else None)
  return _STEPS[key]


def precompile(protocol: cl_protocols.Protocol,
               methods: list[cl_methods.Method], seeds: list[int],
               quick: bool, workers: int = 2) -> None:
  """Compiles the run and step programs of ``methods`` concurrently.

  XLA compiles outside the GIL, so on a multi-core machine this shortens the
  compile phase; the later :func:`run` and :func:`step_times` calls find the
  programs compiled (jit's cache is shared with ahead-of-time compiles).
  The step programs are compiled for the first configuration; any other
  has the same shapes.
  ``quick`` selects the --quick configurations and :data:`FAST_COMPILE`.
  """
  rng = np.random.default_rng(0)

  def compile_method(method):
    configs = method.configs(quick)
    run_args = _run_arguments(protocol, seeds, configs)
    key = (method.name, quick, _signature(run_args))
    if key in _COMPILED:
      return
    _program(method, quick).lower(*run_args).compile()
    params, opt_state, mask, hp, rng_key = _step_arguments(
        protocol, method, {k: float(v[0]) for k, v in configs.items()})
    _step_program(method, quick).lower(
        params, opt_state, *_batch(protocol, rng), mask, hp,
        rng_key).compile()
    _COMPILED.add(key)

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    list(pool.map(compile_method, methods))


def run(protocol: cl_protocols.Protocol, method: cl_methods.Method,
        seeds: list[int], configs: dict[str, np.ndarray],
        fast_compile: bool = False) -> dict:
  """Trains every (seed, config) pair; returns numpy arrays ``[S, C, ...]``.

  ``fast_compile`` compiles with :data:`FAST_COMPILE` (for tiny runs).
  Keys: ``acc_matrix [S, C, T, T]``, ``val_final_acc [S, C, T]``,
  ``kl_per_task [S, C, T]``, ``weight_drift [S, C]``, ``online_acc [S, C]``
  and ``curves`` (each ``[S, C, T * chunks_per_task]``; ``kl_task1`` and
  ``weight_drift`` are NaN during task 1, before their reference exists),
  plus ``seconds`` (wall time, including compilation unless precompiled).
  """
  start = time.perf_counter()
  out = _program(method, fast_compile)(
      *_run_arguments(protocol, seeds, configs))
  out = jax.tree.map(np.array, out)
  during_task1 = slice(0, protocol.schedule.chunks_per_task)
  for name in ("kl_task1", "weight_drift"):
    out["curves"][name][..., during_task1] = np.nan
  out["seconds"] = time.perf_counter() - start
  return out


def step_times(protocol: cl_protocols.Protocol,
               chosen: list[tuple[cl_methods.Method, dict[str, float]]],
               steps: int, rounds: int = 10, warmup: int = 5,
               fast_compile: bool = False) -> list[float]:
  """Median seconds of one jitted training step, per (method, config).

  Forward, backward, optimizer update and apply, on batches of the
  protocol's size from its first task; each call is timed to completion.
  The methods are timed in turns (``rounds`` blocks of ``steps / rounds``
  steps each, after ``warmup`` calls), so that a change in the machine's
  load affects them alike. The hyperparameters are jit arguments (as in the
  vmapped run), which costs the same as constants. With ``fast_compile``
  the timings are not representative.
  """
  rng = np.random.default_rng(0)
  states, times = [], [[] for _ in chosen]
  for method, config in chosen:
    params, opt_state, mask, hp, key = _step_arguments(protocol, method,
                                                      config)
    states.append([_step_program(method, fast_compile), params, opt_state,
                   mask, hp, key])
  blocks = [warmup] + [max(steps // rounds, 1)] * rounds
  for b, block in enumerate(blocks):
    for i, state in enumerate(states):
      train_step, params, opt_state, mask, hp, key = state
      for _ in range(block):
        x, y = jax.block_until_ready(_batch(protocol, rng))
        start = time.perf_counter()
        params, opt_state = jax.block_until_ready(
            train_step(params, opt_state, x, y, mask, hp, key))
        if b > 0:
          times[i].append(time.perf_counter() - start)
      state[1:3] = params, opt_state
  return [float(np.median(t)) for t in times]


# -- Metrics of an accuracy matrix (Avalanche's definitions) ----------------


def average_accuracy(acc_matrix: np.ndarray) -> np.ndarray:
  """Mean over all tasks of the final accuracy, ``mean_j R[T-1, j]``."""
  return np.mean(acc_matrix[..., -1, :], -1)


def forgetting(acc_matrix: np.ndarray) -> np.ndarray:
  """Avalanche's stream forgetting: ``mean_{j<T-1} (R[j, j] - R[T-1, j])``.

  The accuracy on a task right after training it minus its final accuracy,
  averaged over the tasks before the last (Avalanche's
  ``StreamForgetting`` at the end of the stream).
  """
  diag = np.diagonal(acc_matrix, axis1=-2, axis2=-1)[..., :-1]
  return np.mean(diag - acc_matrix[..., -1, :-1], -1)


def bwt(acc_matrix: np.ndarray) -> np.ndarray:
  """Backward transfer, ``mean_{j<T-1} (R[T-1, j] - R[j, j])``.

  Avalanche's ``StreamBWT``, which it defines as minus the forgetting.
  """
  return -forgetting(acc_matrix)


def plasticity(acc_matrix: np.ndarray) -> np.ndarray:
  """Accuracy on each task right after training it, ``mean_j R[j, j]``."""
  return np.mean(np.diagonal(acc_matrix, axis1=-2, axis2=-1), -1)


def select_config(val_final_acc: np.ndarray) -> int:
  """Index of the configuration with the best mean validation accuracy.

  ``val_final_acc`` is ``[S, C, T]`` (validation accuracy of every task at
  the end); the score is its mean over tasks and seeds.
  """
  return int(np.argmax(val_final_acc.mean(axis=(0, 2))))


def summarize(raw: dict, configs: dict[str, np.ndarray]) -> dict:
  """Selects a configuration on validation and measures it on test.

  Args:
    raw: the output of :func:`run`.
    configs: the configurations it ran.

  Returns:
    A JSON-ready dict: ``chosen`` (index) and ``config``; ``val_avg_acc``
    and ``test_avg_acc`` of every configuration per seed (``[S][C]``);
    ``per_seed``: every metric of the chosen configuration per seed
    (``acc_matrix``, ``kl_per_task`` and the scalars); ``mean`` and ``std``
    of the scalar metrics over seeds; ``curves`` of the chosen
    configuration per seed. ``kl_mean`` averages the KL drift over the
    earlier tasks (``j < T - 1``), ``task1_final_acc`` is ``R[T-1, 0]``,
    ``update_norm`` (and for SAL methods ``protection_rate``) the mean
    over the run.
  """
  c = select_config(raw["val_final_acc"])
  acc = raw["acc_matrix"][:, c]
  kl = raw["kl_per_task"][:, c]
  scalars = {
      "avg_acc": average_accuracy(acc),
      "bwt": bwt(acc),
      "forgetting": forgetting(acc),
      "plasticity": plasticity(acc),
      "task1_final_acc": acc[:, -1, 0],
      "kl_task1": kl[:, 0],
      "kl_mean": kl[:, :-1].mean(-1),
      "weight_drift": raw["weight_drift"][:, c],
      "online_acc": raw["online_acc"][:, c],
  }
  for name in ("update_norm", "protection_rate"):
    if name in raw["curves"]:
      scalars[name] = raw["curves"][name][:, c].mean(-1)
  return {
      "chosen": c,
      "config": {k: float(v[c]) for k, v in configs.items()},
      "val_avg_acc": raw["val_final_acc"].mean(-1).tolist(),
      "test_avg_acc": average_accuracy(raw["acc_matrix"]).tolist(),
      "per_seed": {**{k: v.tolist() for k, v in scalars.items()},
                   "acc_matrix": acc.tolist(), "kl_per_task": kl.tolist()},
      "mean": {k: float(np.mean(v)) for k, v in scalars.items()},
      "std": {k: float(np.std(v)) for k, v in scalars.items()},
      "curves": {k: v[:, c].tolist() for k, v in raw["curves"].items()},
  }
