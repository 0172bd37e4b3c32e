"""Where a protected update's time goes: per-operation times from a trace.

``benchmarks/overhead.py`` measures how much a step costs; this says on
what. It jits the update of one weight matrix (``tx.update`` then
``optax.apply_updates``, params and state donated, as in a train step) for
AdamW alone and for ``chain(protect(...), adamw)``, records a few steps
with ``jax.profiler`` (a Perfetto trace, read back here), and sums the
time of every compiled operation (XLA's fusions, dots, copies) over them.
Each operation is named by XLA and labelled with its output shape and the
JAX operation it came from, so the table reads against the compiled HLO.

On CPU, XLA runs independent operations on its thread pool at once, so
the per-operation times can overlap and add up to more than the step.

  python benchmarks/step_profile.py [--shape 4096x3072] [--steps 5]
      [--top 12] [--out outputs/step_profile.json]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sal_jax as sal

LEARNING_RATE = 1e-3


def methods():
  """[(name, description, tx)], AdamW first."""
  adamw = optax.adamw(LEARNING_RATE)
  return [
      ("adamw", "optax.adamw", adamw),
      ("default", "chain(protect(), adamw)",
       optax.chain(sal.protect(), adamw)),
      ("no_pull", "chain(protect(restore=0), adamw): statistics only",
       optax.chain(sal.protect(restore=0), adamw)),
      ("element", "chain(protect(granularity='element'), adamw)",
       optax.chain(sal.protect(granularity="element"), adamw)),
      ("leaf", "chain(protect(granularity='leaf'), adamw)",
       optax.chain(sal.protect(granularity="leaf"), adamw)),
  ]


def compiled_update(tx, shape, seed=0):
  """(compiled step, params, state, grads, HLO text) for one matrix."""
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.standard_normal(shape, np.float32))}
  grads = {"w": jnp.asarray(rng.standard_normal(shape, np.float32))}
  # Own copies: a state leaf that is the params' buffer cannot be donated.
  state = jax.tree.map(jnp.array, tx.init(params))

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, grads).compile()
  return compiled, params, state, grads, compiled.as_text()


def hlo_labels(hlo_text):
  """{instruction name: (output shape, JAX op name)} of the entry
  computation (the operations the trace times)."""
  entry = hlo_text[hlo_text.index("ENTRY"):]
  labels = {}
  head = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\(?\w+\[[^\]]*\])")
  source = re.compile(r'op_name="([^"]*)"')
  for line in entry.splitlines()[1:]:
    match = head.match(line)
    if match:
      op_name = source.search(line)
      shape = match.group(2)
      labels[match.group(1)] = (
          "tuple" if shape.startswith("(") else shape,
          op_name.group(1).split("/")[-1] if op_name else "")
  return labels


def trace_events(directory):
  files = sorted(pathlib.Path(directory).rglob("*.trace.json.gz"))
  if not files:
    raise RuntimeError(f"jax.profiler wrote no Perfetto trace under "
                       f"{directory}")
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def profile(tx, shape, steps, warmup=3):
  """Per-operation milliseconds per step, and the step's median wall time."""
  compiled, params, state, grads, hlo = compiled_update(tx, shape)
  for _ in range(warmup):
    params, state = jax.block_until_ready(compiled(params, state, grads))
  walls = []
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      for _ in range(steps):
        start = time.perf_counter()
        params, state = jax.block_until_ready(compiled(params, state, grads))
        walls.append(time.perf_counter() - start)
    events = trace_events(directory)
  labels = hlo_labels(hlo)
  totals = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event.get("name") in labels:
      totals[event["name"]] += event.get("dur", 0)
  operations = [
      {"op": name, "shape": labels[name][0], "jax_op": labels[name][1],
       "ms_per_step": micros / steps / 1e3}
      for name, micros in totals.most_common()]
  return {"step_ms": 1e3 * float(np.median(walls)),
          "ops_ms": sum(o["ms_per_step"] for o in operations),
          "operations": operations}


def table(results, top):
  lines = []
  for name, result in results.items():
    lines += [f"\n{name}: {result['description']}; step "
              f"{result['step_ms']:.2f} ms (median, under the profiler), "
              f"operations {result['ops_ms']:.2f} ms in all",
              "| operation | output | from | ms / step |",
              "|---|---|---|---|"]
    lines += [f"| {o['op']} | {o['shape']} | {o['jax_op']} | "
              f"{o['ms_per_step']:.2f} |" for o in result["operations"][:top]]
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="4096x3072",
                      help="the weight matrix, e.g. 4096x3072 (the 17M "
                      "MLP's largest)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--top", type=int, default=12,
                      help="operations per method in the printed table")
  parser.add_argument("--methods", default=None,
                      help="comma-separated subset of "
                      + ",".join(n for n, _, _ in methods()))
  parser.add_argument("--out", default="outputs/step_profile.json")
  args = parser.parse_args(argv)
  try:
    args.shape = tuple(int(s) for s in args.shape.split("x"))
  except ValueError:
    parser.error(f"--shape must look like 4096x3072, got {args.shape!r}")
  if len(args.shape) != 2 or min(args.shape) < 1:
    parser.error(f"--shape must be two positive sizes, got {args.shape}")
  if args.steps < 1:
    parser.error("--steps must be at least 1")
  known = [n for n, _, _ in methods()]
  if args.methods is not None:
    args.methods = args.methods.split(",")
    unknown = sorted(set(args.methods) - set(known))
    if unknown:
      parser.error(f"unknown methods {unknown}; known: {known}")
  else:
    args.methods = known
  return args


def main(argv=None):
  args = parse_args(argv)
  started = time.perf_counter()
  results = {}
  for name, description, tx in methods():
    if name in args.methods:
      results[name] = {"description": description,
                       **profile(tx, args.shape, args.steps)}
  text = table(results, args.top)
  print(f"one {args.shape[0]}x{args.shape[1]} float32 matrix, "
        f"{args.steps} profiled steps; device: {jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}")
  print(text)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      "command": "python " + " ".join(sys.argv),
      "shape": list(args.shape), "steps": args.steps,
      "backend": jax.default_backend(), "results": results,
      "seconds": time.perf_counter() - started}, indent=1))
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
