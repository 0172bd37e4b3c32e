"""Reports of the continual-learning benchmark: JSON, markdown, plots.

``results.json``::

  {"settings": {...},
   "protocols": {"<name>": {
      "title", "task_free", "schedule", "segment_tasks", "num_tasks", "seeds",
      "single_task_accuracy": float,   # AdamW on each task alone, mean
      "plasticity_floor": float,       # validation plasticity a choice needs
      "adamw_plasticity": float,       # AdamW's chosen point, validation
      "methods": {"<method>": {
         "knob": "<axis swept for the front>", "description",
         "points": [{"config": {axis: value}, "valid_avg_acc",
                     "valid_plasticity", "avg_acc", "avg_acc_std",
                     "plasticity", "forgetting", "forgetting_std", "bwt",
                     "online_acc", "kl_mean"}],   # test metrics, seed means
         "chosen": int,                # index chosen on validation
         "matched": int | null,        # index at matched plasticity
         "front_forgetting": float | null,  # the front's, at AdamW's
                                       # chosen test plasticity
         "grid": {axis: [values]},     # after widening (cl_grid)
         "base_configs": int, "widening_rounds": int,
         "chosen_at_grid_edge": [axes],   # still at an edge after widening
         "chosen_at_natural_bound": [axes],  # of those, on a natural bound
         "per_seed": {...}, "curves": {...}}}}}}
"""

from __future__ import annotations

import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

import cl_calibration  # noqa: E402
import cl_methods  # noqa: E402
import cl_metrics  # noqa: E402


def _json_ready(x):
  """NaN and infinities become ``null`` (strict JSON)."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_ready(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_ready(v) for v in x]
  return x


def write_json(results: dict, path: pathlib.Path) -> None:
  path.write_text(json.dumps(_json_ready(results), indent=1))


def add_matched(results: dict) -> None:
  """Adds ``adamw_plasticity`` and each method's ``matched`` index."""
  for protocol in results["protocols"].values():
    methods = protocol["methods"]
    if "adamw" not in methods:
      continue
    adamw = methods["adamw"]
    target = adamw["points"][adamw["chosen"]]["valid_plasticity"]
    protocol["adamw_plasticity"] = target
    test_target = adamw["points"][adamw["chosen"]]["plasticity"]
    protocol["adamw_test_plasticity"] = test_target
    for entry in methods.values():
      entry["matched"] = cl_metrics.matched(entry["points"], target)
      entry["front_forgetting"] = cl_metrics.front_forgetting(
          entry["points"], test_target)


def method_label(protocol: dict, name: str) -> str:
  """The method's name; boundary methods on a task-free stream are marked."""
  if protocol["task_free"] and name in cl_methods.BOUNDARY_METHODS:
    return f"{name} (oracle boundaries)"
  if name in cl_methods.REFERENCE_METHODS:
    return f"{name} (stores data)"
  return name


def _config_text(config: dict) -> str:
  return ", ".join(f"{k}={v:g}" for k, v in config.items())


def _pm(point: dict, key: str) -> str:
  std = point.get(f"{key}_std")
  return f"{point[key]:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def markdown_table(protocol: dict) -> str:
  """One row per method: the validation choice and the matched point."""
  head = ["method", "chosen config (validation)", "avg final acc",
          "plasticity", "forgetting", "KL drift",
          "online acc" if protocol["task_free"] else None,
          "at matched plasticity: avg acc / forgetting (config)"]
  head = [h for h in head if h]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, entry in protocol["methods"].items():
    p = entry["points"][entry["chosen"]]
    config = _config_text(p["config"])
    bound = entry.get("chosen_at_natural_bound", [])
    edge = [a for a in entry["chosen_at_grid_edge"] if a not in bound]
    if edge:
      config += f" (edge: {', '.join(edge)})"
    if bound:
      config += f" (bound: {', '.join(bound)})"
    if entry.get("widening_rounds"):
      config += (f" [{len(entry['points'])} configs, "
                 f"{entry['widening_rounds']} widening]")
    cells = [method_label(protocol, name), config, _pm(p, "avg_acc"),
             f"{p['plasticity']:.3f}", _pm(p, "forgetting"),
             f"{p['kl_mean']:.3f}"]
    if protocol["task_free"]:
      cells.append(f"{p['online_acc']:.3f}")
    m = entry.get("matched")
    if m is None:
      cells.append("none within 1 point")
    else:
      q = entry["points"][m]
      cells.append(f"{q['avg_acc']:.3f} / {q['forgetting']:.3f} "
                   f"({_config_text(q['config'])})")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def matched_summary(results: dict) -> str:
  """Forgetting at matched plasticity, one row per method, one column each
  protocol (avg final accuracy in brackets); "-" where none matched."""
  names = list(results["protocols"])
  methods = list(next(iter(results["protocols"].values()))["methods"])
  head = ["method"] + names
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for method in methods:
    cells = [method]
    for name in names:
      entry = results["protocols"][name]["methods"].get(method)
      m = None if entry is None else entry.get("matched")
      if m is None:
        cells.append("-")
      else:
        q = entry["points"][m]
        cells.append(f"{q['forgetting']:.3f} ({q['avg_acc']:.3f})")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def front_summary(results: dict) -> str:
  """Forgetting of each method's front at AdamW's chosen plasticity, and
  its ratio to AdamW's forgetting there; "-" outside the front's range."""
  names = list(results["protocols"])
  methods = list(next(iter(results["protocols"].values()))["methods"])
  lines = ["| " + " | ".join(["method"] + names) + " |",
           "|" + "---|" * (len(names) + 1)]
  for method in methods:
    cells = [method]
    for name in names:
      protocol = results["protocols"][name]
      entry = protocol["methods"].get(method)
      value = None if entry is None else entry.get("front_forgetting")
      adamw = protocol["methods"]["adamw"]
      base = adamw["points"][adamw["chosen"]]["forgetting"]
      if value is None:
        cells.append("-")
      else:
        cells.append(f"{value:.3f} ({value / base:.2f}x)" if base > 0
                     else f"{value:.3f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_markdown(results: dict, path: pathlib.Path) -> str:
  """All protocols' tables, with titles and the reading notes; returns it."""
  parts = []
  if results["settings"]["quick"]:
    parts.append("**--quick run: tiny settings, numbers are not "
                 "representative.**\n")
  parts.append(
      "## Forgetting at matched plasticity (average final accuracy)\n\n"
      "Each method's configuration whose validation plasticity is within 1 "
      "point of AdamW's chosen one (best validation accuracy among those); "
      "test metrics, mean over seeds.\n\n" + matched_summary(results) + "\n")
  if all("front_forgetting" in entry for protocol in
         results["protocols"].values() for entry in
         protocol["methods"].values()):
    parts.append(
        "## Forgetting on each front at AdamW's plasticity\n\n"
        "Each method's test front (its configurations not beaten on both "
        "plasticity and forgetting), linearly interpolated at AdamW's "
        "chosen test plasticity; in brackets, over AdamW's forgetting. A "
        "reading of the measured fronts where the 1-point window above "
        "finds no configuration, not a configuration itself.\n\n"
        + front_summary(results) + "\n")
  for name, protocol in results["protocols"].items():
    s = protocol["schedule"]
    ratio = ""
    if "adamw" in protocol["methods"]:
      adamw = protocol["methods"]["adamw"]
      plast = adamw["points"][adamw["chosen"]]["plasticity"]
      ratio = (f" AdamW's chosen plasticity {plast:.3f} = "
               f"{plast / protocol['single_task_accuracy']:.2f}x.")
    parts.append(
        f"## {name}: {protocol['title']}\n\n"
        f"{s['num_segments']} segments x {s['steps_per_segment']} steps of "
        f"batch {s['batch_size']}, {len(protocol['seeds'])} seeds (mean ± "
        "std), config chosen on validation, metrics on test. Single-task "
        "accuracy (AdamW on each task alone, "
        f"{protocol['single_task']['steps']} steps, learning rate chosen on "
        f"validation): {protocol['single_task_accuracy']:.3f}.{ratio}\n\n"
        + markdown_table(protocol) + "\n")
  calibration = cl_calibration.markdown(results)
  if calibration:
    parts.append("## Calibration of the data-free estimate\n\n" + calibration)
  parts.append(
      "Forgetting: a task's accuracy right after its last training minus at "
      "the end, over the tasks other than the last segment's (BWT = "
      "-forgetting); plasticity: accuracy on a task right after training it;"
      " KL drift: KL(predictions after the task's last training || at the "
      "end) on its test inputs, mean over tasks. Chosen config: the best "
      "validation average accuracy among the configurations whose validation "
      "plasticity is at least 0.9x the single-task validation accuracy. "
      "Every method starts from the same 12 configurations; while its "
      "choice sits at the edge of the learning-rate or knob grid, that grid "
      "gains the next value past the edge (up to 3 rounds; [n configs, k "
      "widening] says how many were trained). (edge: axis) marks a choice "
      "still at an edge, (bound: axis) one on its axis's natural bound, "
      "where the method becomes plain AdamW (WiSE-FT's coefficient 1, the "
      "momentum filter's fraction 1, the average's decay 0).\n")
  text = "\n".join(parts)
  path.write_text(text)
  return text


def _colors(n: int):
  cmap = plt.get_cmap("tab20").colors
  return [cmap[2 * i % 20 + (2 * i >= 20)] for i in range(n)]


def plot_protocol(name: str, protocol: dict, out: pathlib.Path
                  ) -> list[pathlib.Path]:
  """Writes the fronts and the task-1 curves; returns their paths."""
  methods = list(protocol["methods"])
  colors = _colors(len(methods))
  written = []

  def save(fig, suffix):
    path = out / f"{name}_{suffix}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)

  fig, axes = plt.subplots(1, 2, figsize=(14, 5))
  for (ax, key, maximize, label) in (
      (axes[0], "forgetting", False, "forgetting (lower is better)"),
      (axes[1], "avg_acc", True, "average final accuracy")):
    for color, m in zip(colors, methods):
      entry = protocol["methods"][m]
      x = np.array([p["plasticity"] for p in entry["points"]])
      y = np.array([p[key] for p in entry["points"]])
      ax.scatter(x, y, s=8, color=color, alpha=0.3)
      front = cl_metrics.pareto_front(x, y, maximize)
      style = "--" if m in cl_methods.REFERENCE_METHODS else "-"
      ax.plot(x[front], y[front], style, marker="o", ms=3, lw=1.2,
              color=color, label=method_label(protocol, m))
      c = entry["chosen"]
      ax.scatter(x[c], y[c], s=60, marker="*", color=color,
                 edgecolor="k", lw=0.5, zorder=5)
    if "adamw_plasticity" in protocol:
      ax.axvspan(protocol["adamw_plasticity"] - 0.01,
                 protocol["adamw_plasticity"] + 0.01, color="0.9", zorder=0)
    single = protocol["single_task_accuracy"]
    ax.axvline(single, color="0.5", ls=":", lw=1)
    # Configurations that learn a task to less than 60 % of the single-task
    # accuracy are off the range users would consider.
    ax.set_xlim(0.6 * single, min(1.0, single + 0.03))
    ax.set_xlabel("plasticity (accuracy right after training a task)")
    ax.set_ylabel(label)
  axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
  fig.suptitle(f"{name}: trade-off fronts (test, mean over seeds)\n"
               "points: all configurations; lines: each method's Pareto "
               "front; stars: chosen on validation;\ngrey band: AdamW's "
               "chosen plasticity ± 1 point; dotted: single-task accuracy",
               fontsize=9)
  save(fig, "fronts")

  s = protocol["schedule"]
  per_chunk = s["steps_per_segment"] // s["chunks_per_segment"]
  fig, axes = plt.subplots(1, 2, figsize=(14, 4))
  for (ax, key, title) in (
      (axes[0], "task1_acc", "task-1 test accuracy (chosen configs)"),
      (axes[1], "online_acc", "online accuracy (each batch before its "
       "update)")):
    for color, m in zip(colors, methods):
      values = np.asarray(protocol["methods"][m]["curves"][key], float)
      x = per_chunk * np.arange(1, values.shape[-1] + 1)
      ax.plot(x, values.mean(0), color=color, lw=1.1,
              label=method_label(protocol, m))
    for t in range(1, s["num_segments"]):
      ax.axvline(t * s["steps_per_segment"], color="0.85", lw=0.8, zorder=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
  axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
  save(fig, "task1")
  return written
