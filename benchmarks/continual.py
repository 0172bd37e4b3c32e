"""Continual-learning benchmark: does SAL keep what a model learned?

Trains an MLP on four protocols (``cl_protocols``: permuted MNIST-1D, split
digits task- and domain-incremental, a task-free permuted MNIST-1D stream)
with every method of ``cl_methods`` (AdamW, SGD, the reference and the new
SAL, EWC, online EWC, streaming EWC / SI / MAS, L2-init, UPGD). Every method
gets the same tuning budget (6 configurations, the learning rate always
among the tuned hyperparameters), chosen on the validation split; the
chosen configuration is reported on the test split, mean ± std over seeds,
with Avalanche's metrics (``cl_engine``). Each (protocol, method) pair is
one jitted program over seeds x configurations.

Run from the repository root::

  python benchmarks/continual.py                 # everything, 3 seeds
  python benchmarks/continual.py --quick         # tiny smoke run (CI)
  python benchmarks/continual.py --protocols pmnist --methods adamw,sal

Writes to ``--out`` (default ``outputs/continual``): ``results.json``
(settings, every configuration's validation and test accuracy per seed, the
chosen configurations, every metric and curve per seed), ``results.md`` (one
table per protocol, also printed) and per protocol the figures
``<protocol>_acc_matrix.png``, ``_task1.png``, ``_drift.png``,
``_sal_spectrum.png`` and ``_sal_suppression.png``.

Durations, measured on 2 CPU cores shared with other jobs (load average
3 to 4): ``--quick`` about 55 s including compilation (every protocol and
method; 3 tasks x 30 steps, 2 seeds, 2 configurations, a 64-unit MLP; one
compilation per method serves all protocols, see
``cl_protocols.pad_to_common``); the full benchmark 15-22 min (11 methods x 6
configurations x 3 seeds on every protocol), of which ``pmnist`` (10 tasks
x 150 steps of 64) and ``stream`` (12 x 200 steps of 8) take about 7 min
each, the two digits protocols about 1.5 min each. These are the schedules
of ``cl_protocols.SCHEDULES``; no scaling down was needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402  (after the path setup)
from tqdm import tqdm  # noqa: E402

import cl_engine  # noqa: E402
import cl_methods  # noqa: E402
import cl_protocols  # noqa: E402
import cl_report  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  """The command line; ``--protocols`` and ``--methods`` become lists."""
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="tiny schedules, 2 seeds, 2 configs per method")
  parser.add_argument("--protocols", default=",".join(cl_protocols.PROTOCOLS),
                      help="comma-separated subset of "
                      f"{','.join(cl_protocols.PROTOCOLS)}")
  parser.add_argument("--methods", default=",".join(cl_methods.METHODS),
                      help="comma-separated subset of "
                      f"{','.join(cl_methods.METHODS)}")
  parser.add_argument("--seeds", type=int, default=None,
                      help="number of seeds (default 3, --quick 2)")
  parser.add_argument("--step-time-steps", type=int, default=None,
                      help="timed single steps per method (default 200, "
                      "--quick 20)")
  parser.add_argument("--out", default="outputs/continual",
                      help="output folder")
  args = parser.parse_args(argv)
  for flag, known in (("protocols", cl_protocols.PROTOCOLS),
                      ("methods", cl_methods.METHODS)):
    names = getattr(args, flag).split(",")
    unknown = sorted(set(names) - set(known))
    if unknown:
      parser.error(f"unknown {flag} {unknown}; expected some of "
                   f"{list(known)}")
    setattr(args, flag, names)
  args.seeds = args.seeds or (2 if args.quick else 3)
  args.step_time_steps = args.step_time_steps or (20 if args.quick else 200)
  return args


def run_protocol(protocol: cl_protocols.Protocol, methods: list[str],
                 args: argparse.Namespace, progress: tqdm) -> dict:
  """Runs, selects and times every method on one protocol."""
  seeds = list(range(args.seeds))
  progress.set_description(f"{protocol.name} / compiling")
  cl_engine.precompile(protocol, [cl_methods.METHODS[m] for m in methods],
                       seeds, args.quick)
  entries = {}
  for name in methods:
    progress.set_description(f"{protocol.name} / {name}")
    method = cl_methods.METHODS[name]
    configs = method.configs(args.quick)
    raw = cl_engine.run(protocol, method, seeds, configs,
                        fast_compile=args.quick)
    entry = cl_engine.summarize(raw, configs)
    entry.update(description=method.description,
                 grid={k: v.tolist() for k, v in configs.items()},
                 train_seconds=raw["seconds"])
    entries[name] = entry
    progress.update()
  progress.set_description(f"{protocol.name} / step times")
  chosen = [(cl_methods.METHODS[m], entries[m]["config"]) for m in methods]
  for name, seconds in zip(methods, cl_engine.step_times(
      protocol, chosen, args.step_time_steps, fast_compile=args.quick)):
    entries[name]["step_time_s"] = seconds
  return {"title": protocol.title, "task_free": protocol.task_free,
          "schedule": dataclasses.asdict(protocol.schedule),
          "seeds": seeds, "methods": entries}


def main(argv=None) -> dict:
  """Runs the benchmark, writes the reports, returns the results."""
  args = parse_args(argv)
  start = time.perf_counter()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  protocols = cl_protocols.build_all(args.protocols, args.quick)
  results = {"settings": {
      "command": " ".join(sys.argv), "quick": args.quick,
      "seeds": args.seeds, "step_time_steps": args.step_time_steps,
      "sal_new": {k: v if isinstance(v, (str, int, float)) else repr(v)
                  for k, v in cl_methods.SAL_NEW.items()}, "jax": jax.__version__,
      "machine": f"{platform.machine()}, {jax.devices()[0].platform}"},
      "protocols": {}}
  with tqdm(total=len(protocols) * len(args.methods)) as progress:
    for protocol in protocols:
      results["protocols"][protocol.name] = run_protocol(
          protocol, args.methods, args, progress)
  figures = [path for name, protocol in results["protocols"].items()
             for path in cl_report.plot_protocol(name, protocol, out)]
  results["settings"]["seconds"] = time.perf_counter() - start
  cl_report.write_json(results, out / "results.json")
  print(cl_report.write_markdown(results, out / "results.md"))
  print(f"wrote {out / 'results.json'}, {out / 'results.md'} and "
        f"{len(figures)} figures in {results['settings']['seconds']:.0f} s")
  return results


if __name__ == "__main__":
  main()
