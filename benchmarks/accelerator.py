"""The accelerator check: SAL's step and state next to AdamW's, float32 and
bfloat16, on a model large enough to be bandwidth-bound, and whether a
``lax.cond`` inside a step costs a round trip to the host.

One prepared run for a machine with a GPU (or TPU), measured the way
``benchmarks/overhead.py`` measures on CPU (interleaved rounds, medians,
params and state donated, batch 64), on:

* ``mlp_210m``: an MLP 8192-8192-8192-8192-1024 (210M parameters; at
  batch 64 its matmuls are matrix-vector-like, so the step is
  bandwidth-bound on an accelerator);
* ``mlp_17m`` and ``transformer_5m``: the CPU benchmark's models;

each with its params (and the MLP's inputs) in float32 and in bfloat16, for
AdamW, ``protect()``'s default and its per-element and per-leaf forms.

The conditional check: ``protect``'s step holds ``lax.cond``s whose
predicate is computed on the device (a detected shift, a finite step). If
the backend reads such a predicate on the host, every step waits for the
device, and a loop of small steps dispatched without blocking runs at the
round-trip's pace rather than at the device's. The check times such a
loop with a ``lax.cond`` and with the same computation as a ``jnp.where``
(both branches computed), in microseconds per step.

  python benchmarks/accelerator.py                # the full check
  python benchmarks/accelerator.py --quick        # tiny models: a smoke run
  python benchmarks/accelerator.py --models mlp_210m --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import overhead  # noqa: E402  pylint: disable=wrong-import-position

import sal_jax as sal  # noqa: E402  pylint: disable=wrong-import-position

METHODS = (overhead.DEFAULT, overhead.ELEMENT, overhead.LEAF)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_models(quick: bool, names=None) -> list:
  """The models, built only when wanted (the large one is 0.8 GB)."""
  builders = {
      "mlp_210m": lambda: overhead.mlp("mlp_210m",
                                       (8192, 8192, 8192, 8192, 1024)),
      "mlp_17m": lambda: overhead.mlp("mlp_17m", (1024, 4096, 3072, 10)),
      "transformer_5m": lambda: overhead.transformer(
          "transformer_5m", 1024, 256, 4, 1024, 6, 16),
  }
  if quick:
    builders = {
        "mlp_tiny": lambda: overhead.mlp("mlp_tiny", (32, 64, 10)),
        "transformer_tiny": lambda: overhead.transformer(
            "transformer_tiny", 64, 32, 2, 64, 1, 8)}
  names = list(builders) if names is None else names
  unknown = set(names) - set(builders)
  if unknown:
    raise SystemExit(f"unknown models {sorted(unknown)}; known: "
                     f"{list(builders)}")
  return [builders[n]() for n in names]


def in_dtype(model: overhead.Model, dtype) -> overhead.Model:
  """The model with its params, and its floating inputs, in ``dtype``."""
  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return dataclasses.replace(
      model, name=f"{model.name}:{jnp.dtype(dtype).name}",
      params=jax.tree.map(cast, model.params),
      batch=jax.tree.map(cast, model.batch))


def cond_round_trip(steps: int, size: int = 1024) -> dict:
  """Microseconds per step of a loop of small jitted steps dispatched
  without blocking: with a ``lax.cond`` on a device-computed predicate,
  and with both branches computed and selected (``jnp.where``)."""
  def branches(x):
    return x * 0.5 + 1.0, x * 0.25 - 1.0

  def with_cond(x):
    return jax.lax.cond(jnp.sum(x) > 0, lambda y: branches(y)[0],
                        lambda y: branches(y)[1], x)

  def with_select(x):
    a, b = branches(x)
    return jnp.where(jnp.sum(x) > 0, a, b)

  out = {}
  for name, fn in (("cond", with_cond), ("select", with_select)):
    step = jax.jit(fn, donate_argnums=0)
    x = jnp.ones((size,), jnp.float32)
    for _ in range(10):
      x = step(x)
    x.block_until_ready()
    samples = []
    for _ in range(5):
      start = time.perf_counter()
      for _ in range(steps):
        x = step(x)
      x.block_until_ready()
      samples.append(1e6 * (time.perf_counter() - start) / steps)
    out[f"{name}_us_per_step"] = float(np.median(samples))
  out["cond_over_select"] = out["cond_us_per_step"] / out[
      "select_us_per_step"]
  return out


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="tiny models and few steps (a smoke run)")
  parser.add_argument("--out", default="outputs/accelerator.json")
  parser.add_argument("--models", default=None,
                      help="comma-separated subset of mlp_210m, mlp_17m, "
                      "transformer_5m")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--rounds", type=int, default=None,
                      help="interleaved rounds (default 5; quick 2)")
  args = parser.parse_args(argv)
  args.dtypes = args.dtypes.split(",")
  unknown = set(args.dtypes) - set(DTYPES)
  if unknown:
    parser.error(f"unknown dtypes {sorted(unknown)}; known: {list(DTYPES)}")
  if args.rounds is None:
    args.rounds = 2 if args.quick else 5
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  device = jax.devices()[0]
  print(f"device: {device.platform}, {device.device_kind}")
  names = None if args.models is None else args.models.split(",")
  base = make_models(args.quick, names)
  models = [in_dtype(m, DTYPES[d]) for m in base for d in args.dtypes]
  methods = [m for m in overhead.make_methods(quick=False)
             if m[0] == "adamw" or m[0] in METHODS]
  settings = types.SimpleNamespace(
      rounds=args.rounds, steps=2 if args.quick else 4,
      warmup=1 if args.quick else 3, bandwidth_reps=3)
  bandwidth = overhead.Bandwidth(8 if args.quick else 256)
  bandwidth.warm_up()
  results = {}
  total = len(models) * len(methods) * settings.rounds * 2 * settings.steps
  with tqdm(total=total, desc="timed steps", unit="step") as progress:
    for model in models:
      progress.set_postfix_str(model.name)
      results[model.name] = overhead.measure_model(
          model, methods, settings, bandwidth, progress)
  bytes_per_second = bandwidth.bytes_per_second()
  overhead.add_bounds(results, bytes_per_second)
  conditional = cond_round_trip(100 if args.quick else 2000)
  text = (f"device: {device.platform}, {device.device_kind}\n"
          + overhead.table(results, bytes_per_second)
          + "\n\nlax.cond in a step (a loop of small steps, not blocked): "
          f"{conditional['cond_us_per_step']:.1f} us per step, "
          f"{conditional['select_us_per_step']:.1f} us with jnp.where "
          f"instead ({conditional['cond_over_select']:.2f}x)")
  print("\n" + text)
  payload = {
      "command": "python benchmarks/accelerator.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "device": {"platform": device.platform, "kind": device.device_kind,
                 "jax": jax.__version__, "optax": optax.__version__,
                 "sal_jax": sal.__version__},
      "batch": overhead.BATCH,
      "methods": {name: desc for name, desc, _, _ in methods},
      "bandwidth_bytes_per_second": bytes_per_second,
      "results": results,
      "conditional": conditional,
      "seconds": time.perf_counter() - start,
      "table": text,
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(payload, indent=1))
  print(f"wrote {out} in {payload['seconds']:.0f} s")
  return payload


if __name__ == "__main__":
  main()
