"""Continual-learning benchmark: what does each method keep, at what cost?

Trains an MLP on seven protocols (``cl_protocols``: permuted digits, split
MNIST-1D, split digits task- and domain-incremental, and three task-free
streams: abrupt switches, recurring tasks, gradual drift), every task
trained until it plateaus, with every method of ``cl_methods``. Every method
gets the same tuning budget (12 configurations, the learning rate always
among them) and the same rule when its choice sits at a grid edge: the grid
is widened past that edge and the new configurations trained, up to three
rounds (``cl_grid``). Each configuration is one point (plasticity,
forgetting, average final accuracy) of the method's trade-off front. The
configuration chosen on the validation split (best average final accuracy
among those that learn each task to 0.9x the single-task accuracy,
``cl_metrics``) is reported on the test split, mean ± std over seeds, and so
is each method at *matched plasticity* (the configuration whose validation
plasticity is within 1 point of AdamW's chosen one). Each (protocol, method)
pair is one jitted program over seeds x configurations (``cl_engine``),
reused by every widening round; metrics in ``cl_metrics``.

Run from the repository root::

  python benchmarks/continual.py                 # everything, 3 seeds
  python benchmarks/continual.py --quick         # tiny smoke run (CI)
  python benchmarks/continual.py --protocols stream --methods adamw,sal

Writes to ``--out`` (default ``outputs/continual``): ``results.json``
(schema in ``cl_report``), ``results.md`` (also printed) and per protocol
``<protocol>_fronts.png`` and ``<protocol>_task1.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402  (after the path setup)
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cl_calibration  # noqa: E402
import cl_engine  # noqa: E402
import cl_grid  # noqa: E402
import cl_methods  # noqa: E402
import cl_metrics  # noqa: E402
import cl_protocols  # noqa: E402
import cl_report  # noqa: E402

# The single-task reference trains this many times a segment's steps.
SINGLE_TASK_FACTOR = 2


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
  parser.add_argument("--rounds", type=int, default=None,
                      help="grid-widening rounds at most while a choice "
                      f"sits at a grid edge (default {cl_grid.MAX_ROUNDS}, "
                      "--quick 0)")
  parser.add_argument("--workers", type=int, default=2,
                      help="methods compiled at a time (default 2)")
  parser.add_argument("--out", default="outputs/continual",
                      help="output folder")
  parser.add_argument("--merge", action="store_true",
                      help="rerun only --methods and merge them into the "
                      "results.json already in --out (same protocols, "
                      "seeds and quick setting), keeping the other methods")
  parser.add_argument("--report-only", action="store_true",
                      help="recompute the derived metrics (matched "
                      "points, fronts, calibration) and rewrite "
                      "results.json, results.md and the figures from the "
                      "results.json in --out, training nothing")
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
  if args.rounds is None:
    args.rounds = 0 if args.quick else cl_grid.MAX_ROUNDS
  return args


def single_task_accuracy(protocol: cl_protocols.Protocol, seeds: list[int],
                         quick: bool) -> dict:
  """AdamW on each task alone, its grid chosen on validation per task.

  The permuted protocols' tasks are one task under fixed input
  permutations, which an MLP with i.i.d. initialisation cannot tell apart:
  their first task stands for all.
  """
  adamw = cl_methods.METHODS["adamw"]
  configs = adamw.configs(protocol.name, quick)
  steps = SINGLE_TASK_FACTOR * protocol.schedule.steps_per_segment
  tasks = ([0] if protocol.name in cl_protocols.PERMUTATION_SEEDS
           else list(range(protocol.num_tasks)))
  val, test, chosen = [], [], []
  for task in tasks:
    alone = cl_protocols.single_task(protocol, task, steps)
    raw = cl_engine.run(alone, adamw, seeds, configs, fast_compile=quick)
    c = int(np.argmax(raw["acc_val"][..., -1, 0].mean(0)))
    val.append(float(raw["acc_val"][:, c, -1, 0].mean()))
    test.append(float(raw["acc_test"][:, c, -1, 0].mean()))
    chosen.append({k: float(v[c]) for k, v in configs.items()})
  return {"accuracy": float(np.mean(test)),
          "valid_accuracy": float(np.mean(val)), "per_task": test,
          "tasks": tasks, "steps": steps, "config": chosen}


def run_protocol(protocol: cl_protocols.Protocol, methods: list[str],
                 args: argparse.Namespace, progress: tqdm) -> dict:
  """Runs and summarizes every method on one protocol."""
  seeds = list(range(args.seeds))
  jobs = [(cl_methods.METHODS[m],
           cl_methods.METHODS[m].configs(protocol.name, args.quick))
          for m in methods]
  progress.set_description(f"{protocol.name} / compiling")
  cl_engine.precompile(protocol, jobs, seeds, args.quick, args.workers)
  progress.set_description(f"{protocol.name} / single task")
  single = single_task_accuracy(protocol, seeds, args.quick)
  floor = cl_metrics.PLASTICITY_FLOOR * single["valid_accuracy"]

  def run_method(job):
    method, configs = job

    def run(batch):
      return cl_engine.run(protocol, method, seeds, batch,
                           fast_compile=args.quick)

    def choose(raw, configs):
      entries = cl_metrics.points(raw, configs, protocol.segment_tasks)
      return entries[cl_metrics.select(entries, floor)]["config"]

    raw, configs, tuning = cl_grid.tune(run, choose, configs, method.knob,
                                        args.rounds)
    entry = cl_metrics.summarize(raw, configs, protocol.segment_tasks,
                                 floor)
    grid, chosen = tuning["grid"], entry["points"][entry["chosen"]]["config"]
    progress.set_description(f"{protocol.name} / {method.name}")
    progress.update()
    return {"description": method.description, "knob": method.knob,
            "grid": grid, "train_seconds": raw["seconds"],
            "widening_rounds": tuning["rounds"],
            "base_configs": tuning["base_size"], **entry,
            "chosen_at_grid_edge": cl_grid.at_edge(grid, chosen, method.knob),
            "chosen_at_natural_bound": cl_grid.at_bound(grid, chosen,
                                                        method.knob)}

  entries = {m.name: run_method((m, c)) for m, c in jobs}
  return {"title": protocol.title, "task_free": protocol.task_free,
          "schedule": dataclasses.asdict(protocol.schedule),
          "segment_tasks": list(protocol.segment_tasks),
          "num_tasks": protocol.num_tasks, "seeds": seeds,
          "single_task_accuracy": single["accuracy"],
          "single_task": single, "plasticity_floor": floor,
          "methods": entries}


def _merge(old: dict, new: dict, args: argparse.Namespace) -> dict:
  """``old`` with the methods of ``new`` replaced (or added)."""
  before = (old["settings"]["quick"], old["settings"]["seeds"],
            old["settings"].get("widening_rounds", 0))
  if before != (args.quick, args.seeds, args.rounds):
    raise SystemExit("--merge: the results in --out were run with quick="
                     f"{before[0]}, seeds={before[1]}, rounds={before[2]}; "
                     "run with the same.")
  for name, protocol in new["protocols"].items():
    if name not in old["protocols"]:
      raise SystemExit(f"--merge: protocol {name!r} is not in --out.")
    if (protocol["single_task_accuracy"]
        != old["protocols"][name]["single_task_accuracy"]):
      raise SystemExit(f"--merge: protocol {name!r} no longer reproduces "
                       "its single-task accuracy; rerun everything.")
    old["protocols"][name]["methods"].update(protocol["methods"])
  old["settings"].setdefault("merged", []).append(
      {"command": new["settings"]["command"], "methods": args.methods,
       "protocols": args.protocols, "jax": new["settings"]["jax"]})
  return old


def main(argv=None) -> dict:
  """Runs the benchmark, writes the reports, returns the results."""
  args = parse_args(argv)
  start = time.perf_counter()
  out = pathlib.Path(args.out)
  if args.report_only:
    results = json.loads((out / "results.json").read_text())
    cl_report.add_matched(results)
    for name, protocol in results["protocols"].items():
      cl_report.plot_protocol(name, protocol, out)
    cl_calibration.add_calibration(results)
    cl_calibration.plot(results, out / "calibration.png")
    cl_report.write_json(results, out / "results.json")
    print(cl_report.write_markdown(results, out / "results.md"))
    return results
  out.mkdir(parents=True, exist_ok=True)
  protocols = cl_protocols.build_all(args.protocols, args.quick)
  results = {"settings": {
      "command": " ".join(["python", "benchmarks/continual.py",
                           *(argv if argv is not None else sys.argv[1:])]),
      "quick": args.quick, "seeds": args.seeds,
      "budget": 2 if args.quick else cl_methods.BUDGET,
      "widening_rounds": args.rounds,
      "jax": jax.__version__,
      "machine": f"{platform.machine()}, {jax.devices()[0].platform}"},
      "protocols": {}}
  with tqdm(total=len(protocols) * len(args.methods)) as progress:
    for protocol in protocols:
      results["protocols"][protocol.name] = run_protocol(
          protocol, args.methods, args, progress)
  if args.merge:
    results = _merge(json.loads((out / "results.json").read_text()),
                     results, args)
  cl_report.add_matched(results)
  cl_calibration.add_calibration(results)
  figures = [path for name, protocol in results["protocols"].items()
             for path in cl_report.plot_protocol(name, protocol, out)]
  if args.merge:
    results["settings"]["merged"][-1]["seconds"] = (
        time.perf_counter() - start)
  else:
    results["settings"]["seconds"] = time.perf_counter() - start
  if cl_calibration.plot(results, out / "calibration.png"):
    figures.append(out / "calibration.png")
  cl_report.write_json(results, out / "results.json")
  print(cl_report.write_markdown(results, out / "results.md"))
  print(f"wrote {out / 'results.json'}, {out / 'results.md'} and "
        f"{len(figures)} figures in {time.perf_counter() - start:.0f} s")
  return results


if __name__ == "__main__":
  main()
