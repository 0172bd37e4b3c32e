"""What does SAL cost? Step time and optimizer-state memory vs plain AdamW.

Side by side in one run, for ``optax.adamw`` alone and for
``optax.chain(sal.protect(...), optax.adamw(...))`` with every estimator in
``sal.ESTIMATORS`` in its default mode (the soft gate for ``reference``;
no gate and a restoring pull of strength 1 for the estimators that have one,
``protect``'s default), every granularity (``leaf``, ``element``, and
``factored`` where the estimator has it) and ``preserve_rms`` off and on,
on three models (batch 64):

* ``mlp_1m``: an MLP 784-1024-256-10 (1.07M parameters);
* ``mlp_17m``: an MLP 1024-4096-3072-10 (16.8M parameters);
* ``transformer_5m``: a Flax NNX decoder (6 layers, width 256, 4 heads,
  MLP 1024, vocabulary 1024, 16-token sequences; 5.27M parameters).

For each it measures, after a warm-up, the median time of

* the **full step**: one jitted forward + backward + optimizer update +
  ``apply_updates``, params and optimizer state donated;
* the **update alone**: the same without forward and backward (fixed
  gradients),

and counts the optimizer-state bytes. Methods are measured in interleaved
rounds (every round runs every method, in a rotating order), so background
load affects all of them alike; the machine's memory bandwidth is measured
in the same rounds with a jitted in-place ``x + 1`` on a 256 MB array.

The **bound** of the update is the time to move the bytes it must move at
least: read the params, the gradients and the whole optimizer state once
and write the params and the state once (``3 P + 2 S`` bytes), at the
measured bandwidth. ``update / bound`` says how far the measured update is
from it (1.0 = at the bound; below 1 the data fits in cache).

Prints a table of ratios to AdamW (and the issue's targets, met or not) and
writes everything to ``--out`` (JSON).

Run from the repository root::

  python benchmarks/overhead.py             # full run (12-20 min, 2 cores)
  python benchmarks/overhead.py --quick     # smoke run: 2 tiny models, few
                                            # methods, few steps
  python benchmarks/overhead.py --models mlp_17m --methods sal:reference:leaf

On CPU, XLA's default copy insertion copies every parameter that is read by
more than one kernel and then updated in place (SAL's estimators read the
params; AdamW alone reads them once), and each copy is a fresh buffer whose
pages the kernel faults in. ``XLA_FLAGS`` is recorded with the results;
compare with
``XLA_FLAGS=--xla_cpu_copy_insertion_use_region_analysis=true``, which
removes those copies. Temporaries above glibc's mmap threshold are mapped
afresh at every step too; ``MALLOC_MMAP_THRESHOLD_`` and the other glibc
malloc variables in the environment are recorded, and e.g.
``MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=4294967295``
keeps such buffers in the heap between steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import sal_jax as sal
from sal_jax._common import units as _units

LEARNING_RATE = 1e-3
BATCH = 64

# protect()'s default, and the same at leaf granularity and factored.
DEFAULT = "sal:shift_consolidation:kronecker"
ELEMENT = "sal:shift_consolidation:element"
LEAF = "sal:shift_consolidation:leaf"
FACTORED = "sal:shift_consolidation:factored"
RUNNING_FACTORED = "sal:shift_consolidation:element:factored_running"
BF16_IMPORTANCES = "sal:shift_consolidation:element:bf16_importances"
# The default with its pull off: what its statistics and shift detector cost
# alone (the rest of the default's overhead is the pull).
NO_PULL = f"{DEFAULT}:no_pull"

# The targets (CPU, batch 64): (what, model or None for every
# model, method, limit).
TARGETS = (
    ("full step ratio", "mlp_17m", DEFAULT, 1.15),
    ("full step ratio", "transformer_5m", DEFAULT, 1.05),
    ("full step ratio", "mlp_1m", LEAF, 1.05),
    ("update / bound", None, DEFAULT, 1.5),
    ("extra state / param bytes", None, DEFAULT, 2.0),
    ("extra state / param bytes", None, RUNNING_FACTORED, 2.0),
    ("extra state / param bytes", None, BF16_IMPORTANCES, 2.0),
    ("extra state / param bytes", None, FACTORED, 1.1),
)


# --------------------------------------------------------------------------
# Models.


@dataclasses.dataclass
class Model:
  name: str
  params: Any
  loss_fn: Callable[[Any, Any], jax.Array]
  batch: Any
  description: str


def mlp(name, sizes, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(sizes))
  params = {}
  for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"layer{i}"] = {
        "w": jax.random.normal(keys[i], (n_in, n_out)) / math.sqrt(n_in),
        "b": jnp.zeros((n_out,))}
  n_layers = len(sizes) - 1

  def loss_fn(params, batch):
    x, y = batch
    for i in range(n_layers):
      layer = params[f"layer{i}"]
      x = x @ layer["w"] + layer["b"]
      if i < n_layers - 1:
        x = jax.nn.relu(x)
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()

  kx, ky = jax.random.split(keys[-1])
  batch = (jax.random.normal(kx, (BATCH, sizes[0])),
           jax.random.randint(ky, (BATCH,), 0, sizes[-1]))
  return Model(name, params, loss_fn, batch,
               "MLP " + "-".join(str(s) for s in sizes))


class _Block(nnx.Module):

  def __init__(self, width, heads, hidden, rngs):
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads=heads, in_features=width, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, hidden, rngs=rngs)
    self.down = nnx.Linear(hidden, width, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attention(self.norm1(x), mask=mask)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class _Transformer(nnx.Module):
  """A small decoder-only transformer (pre-norm, learned positions)."""

  def __init__(self, vocab, width, heads, hidden, layers, length, rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.position = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (length, width)))
    self.blocks = nnx.List(
        [_Block(width, heads, hidden, rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position[: tokens.shape[1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x))


def transformer(name, vocab, width, heads, hidden, layers, length, seed=0):
  model = _Transformer(vocab, width, heads, hidden, layers, length,
                       nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, tokens):
    logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  tokens = jax.random.randint(jax.random.key(seed + 1), (BATCH, length + 1),
                              0, vocab)
  return Model(name, params, loss_fn, tokens,
               f"NNX transformer: {layers} layers, width {width}, {heads} "
               f"heads, MLP {hidden}, vocabulary {vocab}, {length} tokens")


def make_models(quick):
  if quick:
    return [mlp("mlp_tiny", (32, 64, 10)),
            transformer("transformer_tiny", 64, 32, 2, 64, 1, 8)]
  return [mlp("mlp_1m", (784, 1024, 256, 10)),
          mlp("mlp_17m", (1024, 4096, 3072, 10)),
          transformer("transformer_5m", 1024, 256, 4, 1024, 6, 16)]


# --------------------------------------------------------------------------
# Methods.


def make_methods(quick=False):
  """[(name, description, granularity or None, tx)], AdamW first.

  Every estimator x granularity, x preserve_rms for a gating estimator
  (one with a pull is ungated, where preserve_rms has nothing to act on);
  with ``quick`` a gating estimator with (leaf, plain) and (element,
  preserve_rms) only.
  """
  methods = [("adamw", "optax.adamw", None, optax.adamw(LEARNING_RATE))]
  for estimator in sorted(sal.ESTIMATORS):
    gated = sal.get_estimator(estimator).restoring_force is None
    for granularity in _units.UNITS:
      for preserve_rms in (False, True) if gated else (False,):
        if quick and gated and preserve_rms != (granularity == "element"):
          continue
        try:
          protect = sal.protect(estimator=estimator, granularity=granularity,
                                preserve_rms=preserve_rms)
        except (ValueError, TypeError):  # e.g. no factored form
          continue
        name = f"sal:{estimator}:{granularity}" + (
            ":rms" if preserve_rms else "")
        methods.append((
            name, f"chain(protect(estimator={estimator!r}, granularity="
            f"{granularity!r}, preserve_rms={preserve_rms}), adamw)",
            granularity, optax.chain(protect, optax.adamw(LEARNING_RATE))))
  methods.append((
      RUNNING_FACTORED, "chain(protect(estimator=shift_consolidation_"
      "estimator(granularity='element', running_unit='factored')), adamw)",
      "element",
      optax.chain(sal.protect(estimator=sal.shift_consolidation_estimator(
          granularity="element", running_unit="factored")),
                  optax.adamw(LEARNING_RATE))))
  methods.append((
      BF16_IMPORTANCES, "chain(protect(estimator=shift_consolidation_"
      "estimator(granularity='element', importance_dtype=jnp.bfloat16)), "
      "adamw)", "element",
      optax.chain(sal.protect(estimator=sal.shift_consolidation_estimator(
          granularity="element", importance_dtype=jnp.bfloat16)),
                  optax.adamw(LEARNING_RATE))))
  methods.append((
      NO_PULL, "chain(protect(restore=0), adamw)", "kronecker",
      optax.chain(sal.protect(restore=0), optax.adamw(LEARNING_RATE))))
  for rank in () if quick else (8, 16):
    methods.append((
        f"{DEFAULT}:rank{rank}", "chain(protect(estimator=shift_"
        f"consolidation_estimator(kronecker_rank={rank})), adamw)",
        "kronecker",
        optax.chain(sal.protect(estimator=sal.shift_consolidation_estimator(
            kronecker_rank=rank)), optax.adamw(LEARNING_RATE))))
  return methods


def _malloc_env():
  """glibc's malloc tunables in the environment: above its mmap threshold
  (32 MB at most by default) every large buffer a step allocates is mapped
  afresh and its pages faulted in, which can cost more than the step's
  arithmetic; recorded with the results."""
  return {k: v for k, v in sorted(os.environ.items())
          if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}


def tree_bytes(tree):
  return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape)
                 for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class Runner:
  """One method on one model: its jitted steps and its live state."""
  name: str
  granularity: str | None
  full: Callable
  update: Callable
  state: tuple
  state_bytes: int
  memory: dict


def compiled_memory(compiled):
  """What XLA reserves for a compiled step: its temporaries (buffers that
  are neither arguments nor outputs) and the arguments it aliases."""
  try:
    analysis = compiled.memory_analysis()
  except (NotImplementedError, AttributeError):  # a backend without it
    analysis = None
  if analysis is None:
    return {}
  return {"temp_bytes": int(analysis.temp_size_in_bytes),
          "argument_bytes": int(analysis.argument_size_in_bytes),
          "output_bytes": int(analysis.output_size_in_bytes),
          "alias_bytes": int(analysis.alias_size_in_bytes)}


def make_runner(model, name, granularity, tx):
  def full(params, opt_state, batch):
    loss, grads = jax.value_and_grad(model.loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree.map(jnp.array, model.params)  # own, donatable copy
  # Copied too: a state leaf that is the params' own buffer (an estimator
  # that keeps `params` as they are) cannot be donated next to them.
  opt_state = jax.tree.map(jnp.array, tx.init(params))
  full_step = jax.jit(full, donate_argnums=(0, 1)).lower(
      params, opt_state, model.batch).compile()
  return Runner(name, granularity, full_step,
                jax.jit(update, donate_argnums=(0, 1)),
                (params, opt_state), tree_bytes(opt_state),
                compiled_memory(full_step))


# --------------------------------------------------------------------------
# Timing.


def timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


class Bandwidth:
  """Memory bandwidth from a jitted in-place ``x + 1`` (read + write)."""

  def __init__(self, megabytes):
    n = int(megabytes * 2**20) // 4
    self.bytes_moved = 2 * 4 * n
    self.step = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    self.x = jnp.zeros((n,), jnp.float32)
    self.times = []

  def warm_up(self):
    for _ in range(3):
      self.x, _ = timed(self.step, self.x)

  def run(self, reps):
    for _ in range(reps):
      self.x, dt = timed(self.step, self.x)
      self.times.append(dt)

  def bytes_per_second(self):
    return self.bytes_moved / statistics.median(self.times)


def summarize(times):
  q = np.percentile(times, [25, 50, 75])
  return {"median_ms": 1e3 * float(q[1]), "p25_ms": 1e3 * float(q[0]),
          "p75_ms": 1e3 * float(q[2]), "n": len(times)}


def measure_model(model, methods, args, bandwidth, progress):
  grads = jax.grad(model.loss_fn)(model.params, model.batch)
  runners = [make_runner(model, *m[:1], m[2], m[3]) for m in methods]
  # Warm-up: compile and run a few steps of each.
  for r in runners:
    for _ in range(args.warmup):
      params, opt_state, _ = r.full(*r.state, model.batch)
      params, opt_state = r.update(params, opt_state, grads)
      r.state = (params, opt_state)
  times = {r.name: {"full": [], "update": []} for r in runners}
  for rnd in range(args.rounds):
    k = rnd % len(runners)
    for r in runners[k:] + runners[:k]:   # rotating order
      for _ in range(args.steps):
        (params, opt_state, _), dt = timed(r.full, *r.state, model.batch)
        r.state = (params, opt_state)
        times[r.name]["full"].append(dt)
      for _ in range(args.steps):
        r.state, dt = timed(r.update, *r.state, grads)
        times[r.name]["update"].append(dt)
      progress.update(2 * args.steps)
    bandwidth.run(args.bandwidth_reps)

  param_bytes = tree_bytes(model.params)
  n_params = sal.analysis.parameter_count(model.params)
  result = {"description": model.description, "parameters": n_params,
            "param_bytes": param_bytes, "leaves": len(
                jax.tree.leaves(model.params)), "methods": {}}
  base = None
  for r in runners:
    entry = {"granularity": r.granularity,
             "state_bytes": r.state_bytes,
             "full_step_memory": r.memory,
             "full_step": summarize(times[r.name]["full"]),
             "update": summarize(times[r.name]["update"]),
             # read params, grads, state; write params, state
             "min_update_bytes": 3 * param_bytes + 2 * r.state_bytes}
    if base is None:
      base = entry
    entry["full_ratio"] = (entry["full_step"]["median_ms"]
                           / base["full_step"]["median_ms"])
    entry["update_ratio"] = (entry["update"]["median_ms"]
                             / base["update"]["median_ms"])
    entry["extra_state_over_params"] = (
        (r.state_bytes - base["state_bytes"]) / param_bytes)
    result["methods"][r.name] = entry
  del runners
  # The backend's peak since the process started (GPU, TPU; None on CPU).
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    result["device_peak_bytes_so_far"] = int(stats["peak_bytes_in_use"])
  return result


def add_bounds(results, bytes_per_second):
  for model in results.values():
    for entry in model["methods"].values():
      bound_ms = 1e3 * entry["min_update_bytes"] / bytes_per_second
      entry["update_bound_ms"] = bound_ms
      entry["update_over_bound"] = entry["update"]["median_ms"] / bound_ms


def check_targets(results):
  out = []
  for what, model_name, wanted, limit in TARGETS:
    for name, model in results.items():
      if model_name is not None and name != model_name:
        continue
      for method, entry in model["methods"].items():
        if method != wanted:
          continue
        key = {"full step ratio": "full_ratio",
               "update / bound": "update_over_bound",
               "extra state / param bytes": "extra_state_over_params"}[what]
        value = entry[key]
        # At the table's precision: the state's few scalars (counts,
        # energies) must not fail a bound on copies of the params.
        out.append({"target": f"{what} <= {limit}", "model": name,
                    "method": method, "value": value,
                    "met": bool(round(value, 2) <= limit)})
  return out


# --------------------------------------------------------------------------
# Report.


def temp_mb(entry):
  """The full step's temporaries in MiB (NaN where XLA does not say)."""
  return entry["full_step_memory"].get("temp_bytes", math.nan) / 2**20


def table(results, bytes_per_second):
  lines = [
      f"memory bandwidth (in-place x + 1): {bytes_per_second / 1e9:.1f} GB/s",
      "",
      "| model | method | step ms | step ratio | update ms | update ratio "
      "| update / bound | state MB | extra state / params | step temp MB |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for name, model in results.items():
    for method, e in model["methods"].items():
      lines.append(
          f"| {name} ({model['parameters'] / 1e6:.2f}M) | {method} "
          f"| {e['full_step']['median_ms']:.2f} | {e['full_ratio']:.3f} "
          f"| {e['update']['median_ms']:.2f} | {e['update_ratio']:.3f} "
          f"| {e['update_over_bound']:.2f} "
          f"| {e['state_bytes'] / 2**20:.1f} "
          f"| {e['extra_state_over_params']:.4f} "
          f"| {temp_mb(e):.1f} |")
  return "\n".join(lines)


def targets_text(targets):
  lines = ["", "targets (CPU, batch 64):"]
  for t in targets:
    lines.append(f"  [{'met' if t['met'] else 'NOT MET'}] {t['target']}: "
                 f"{t['model']} {t['method']} = {t['value']:.4f}")
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="tiny models and few steps (a smoke run)")
  parser.add_argument("--out", default="outputs/overhead.json")
  parser.add_argument("--models", default=None,
                      help="comma-separated subset of the model names")
  parser.add_argument("--methods", default=None,
                      help="comma-separated subset of the method names "
                      "(adamw is always measured)")
  parser.add_argument("--rounds", type=int, default=None,
                      help="interleaved rounds (default 10; quick 2)")
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps per method and round (default 4; "
                      "quick 2)")
  parser.add_argument("--warmup", type=int, default=None,
                      help="untimed steps per method (default 3; quick 1)")
  parser.add_argument("--bandwidth-mb", type=float, default=None,
                      help="array size of the bandwidth benchmark "
                      "(default 256; quick 8)")
  parser.add_argument("--bandwidth-reps", type=int, default=5,
                      help="bandwidth samples per round")
  args = parser.parse_args(argv)
  defaults = dict(rounds=(2, 10), steps=(2, 4), warmup=(1, 3),
                  bandwidth_mb=(8, 256))
  for key, (quick, full) in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, quick if args.quick else full)
  return args


def main(argv=None):
  args = parse_args(argv)
  start = time.perf_counter()
  models = make_models(args.quick)
  if args.models:
    wanted = args.models.split(",")
    unknown = set(wanted) - {m.name for m in models}
    if unknown:
      raise SystemExit(f"unknown models {sorted(unknown)}")
    models = [m for m in models if m.name in wanted]
  methods = make_methods(args.quick)
  if args.methods:
    wanted = ["adamw"] + [m for m in args.methods.split(",") if m != "adamw"]
    unknown = set(wanted) - {m[0] for m in methods}
    if unknown:
      raise SystemExit(f"unknown methods {sorted(unknown)}; known: "
                       f"{[m[0] for m in methods]}")
    methods = [m for m in methods if m[0] in wanted]
  print(f"{len(models)} models x {len(methods)} methods; {args.rounds} "
        f"rounds x {args.steps} steps per method (full step and update "
        f"alone), medians; device: {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
        f"; glibc malloc settings {_malloc_env()}")
  for m in models:
    print(f"  {m.name}: {m.description}, "
          f"{sal.analysis.parameter_count(m.params):,} parameters")

  bandwidth = Bandwidth(args.bandwidth_mb)
  bandwidth.warm_up()
  results = {}
  total = len(models) * len(methods) * args.rounds * 2 * args.steps
  with tqdm(total=total, desc="timed steps", unit="step") as progress:
    for i, model in enumerate(models):
      progress.set_postfix_str(model.name)
      model_methods = methods
      if args.quick and i > 0:  # the smoke run: AdamW and one SAL only
        model_methods = methods[:2]
        progress.total -= (len(methods) - 2) * args.rounds * 2 * args.steps
      results[model.name] = measure_model(model, model_methods, args,
                                          bandwidth, progress)
  bytes_per_second = bandwidth.bytes_per_second()
  add_bounds(results, bytes_per_second)
  targets = check_targets(results)

  text = table(results, bytes_per_second) + "\n" + targets_text(targets)
  print()
  print(text)
  elapsed = time.perf_counter() - start
  print(f"\n{elapsed:.0f} s in all")

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  payload = {
      "command": "python benchmarks/overhead.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "settings": {k: v for k, v in vars(args).items()},
      "batch": BATCH,
      "learning_rate": LEARNING_RATE,
      "machine": {"platform": platform.platform(),
                  "processor": platform.processor(),
                  "cpus": os.cpu_count(),
                  "device": str(jax.devices()[0].device_kind),
                  "jax": jax.__version__, "optax": optax.__version__,
                  "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "malloc_env": _malloc_env()},
      "methods": {name: desc for name, desc, _, _ in methods},
      "bandwidth": {"bytes_per_second": bytes_per_second,
                    "array_bytes": bandwidth.bytes_moved // 2,
                    "samples_ms": [1e3 * t for t in bandwidth.times]},
      "results": results,
      "targets": targets,
      "seconds": elapsed,
      "table": text,
  }
  out.write_text(json.dumps(payload, indent=1))
  print(f"wrote {out}")
  return payload


if __name__ == "__main__":
  main()
