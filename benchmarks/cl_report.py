"""Reports of the continual-learning benchmark: JSON, markdown, plots.

The results are a dict ``{"settings": ..., "protocols": {name: protocol}}``
where each protocol holds its description, schedule and ``methods``, a dict
of the :func:`cl_engine.summarize` entries (plus ``description``,
``grid``, ``train_seconds`` and ``step_time_s``).
"""

from __future__ import annotations

import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

# (column title, metric key, format) of the markdown tables.
COLUMNS = (
    ("avg final acc", "avg_acc", "{:.3f}"),
    ("BWT", "bwt", "{:+.3f}"),
    ("forgetting", "forgetting", "{:.3f}"),
    ("plasticity", "plasticity", "{:.3f}"),
    ("task 1 final acc", "task1_final_acc", "{:.3f}"),
    ("KL drift task 1", "kl_task1", "{:.3f}"),
    ("KL drift mean", "kl_mean", "{:.3f}"),
    ("weight drift", "weight_drift", "{:.2f}"),
)
ONLINE_COLUMN = ("online acc", "online_acc", "{:.3f}")
BOUNDARY_METHODS = ("ewc", "online_ewc")
SPECTRUM = ("protected_fraction", "neutral_fraction", "volatile_fraction")


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


def method_label(protocol: dict, name: str) -> str:
  """The method's name; boundary methods on a task-free stream are marked."""
  if protocol["task_free"] and name in BOUNDARY_METHODS:
    return f"{name} (oracle boundaries)"
  return name


def _config_text(config: dict) -> str:
  return ", ".join(f"{k}={v:g}" for k, v in config.items())


def markdown_table(protocol: dict) -> str:
  """One row per method: chosen config, test metrics mean ± std, step time.

  The step time is the median of single jitted steps, with its ratio to
  AdamW's when AdamW is among the methods.
  """
  columns = COLUMNS + ((ONLINE_COLUMN,) if protocol["task_free"] else ())
  head = (["method", "chosen config"] + [c[0] for c in columns]
          + ["step time (ms)"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  methods = protocol["methods"]
  reference = methods.get("adamw", {}).get("step_time_s")
  for name, entry in methods.items():
    cells = [method_label(protocol, name), _config_text(entry["config"])]
    for _, key, fmt in columns:
      cells.append(f"{fmt.format(entry['mean'][key])} ± "
                   f"{fmt.format(entry['std'][key]).lstrip('+')}")
    step = f"{entry['step_time_s'] * 1e3:.2f}"
    if reference:
      step += f" ({entry['step_time_s'] / reference:.1f}x)"
    lines.append("| " + " | ".join(cells + [step]) + " |")
  return "\n".join(lines)


def write_markdown(results: dict, path: pathlib.Path) -> str:
  """All protocols' tables, with titles and the reading notes; returns it."""
  parts = []
  if results["settings"]["quick"]:
    parts.append("**--quick run: tiny settings, numbers and timings are not "
                 "representative.**\n")
  for name, protocol in results["protocols"].items():
    s = protocol["schedule"]
    parts.append(
        f"## {name}: {protocol['title']}\n\n"
        f"{s['num_tasks']} tasks x {s['steps_per_task']} steps of batch "
        f"{s['batch_size']}, {len(protocol['seeds'])} seeds (mean ± std), "
        "config chosen on validation, metrics on test.\n\n"
        + markdown_table(protocol) + "\n")
    rates = [f"{m} {protocol['methods'][m]['mean']['protection_rate']:.3f}"
             for m in _sal_methods(protocol)]
    if rates:
      parts.append("SAL protection rate 1 - ||g_out|| / ||g|| (mean over "
                   "the run): " + ", ".join(rates) + ".\n")
  parts.append(
      "BWT and forgetting follow Avalanche (forgetting = -BWT: accuracy on a "
      "task right after training it minus at the end, over the tasks before "
      "the last); plasticity = mean accuracy right after training each task;"
      " KL drift = KL(predictions after the task || at the end) on the "
      "task's test inputs; weight drift = ||theta_end - theta_after_task1||."
      "\n")
  text = "\n".join(parts)
  path.write_text(text)
  return text


def _x_steps(protocol: dict) -> np.ndarray:
  s = protocol["schedule"]
  per_chunk = s["steps_per_task"] // s["chunks_per_task"]
  return per_chunk * np.arange(1, s["num_tasks"] * s["chunks_per_task"] + 1)


def _boundaries(ax, protocol: dict) -> None:
  s = protocol["schedule"]
  for t in range(1, s["num_tasks"]):
    ax.axvline(t * s["steps_per_task"], color="0.85", lw=0.8, zorder=0)


def _curve(entry: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
  values = np.asarray(entry["curves"][key], float)
  return np.mean(values, 0), np.std(values, 0)


def _line_panel(ax, protocol: dict, key: str, names: list[str],
                title: str, log: bool = False) -> None:
  x = _x_steps(protocol)
  colors = plt.get_cmap("tab20").colors
  for i, name in enumerate(names):
    mean, std = _curve(protocol["methods"][name], key)
    color = colors[2 * i % 20 + (i >= 10)]  # the dark shades first
    ax.plot(x, mean, label=method_label(protocol, name), color=color, lw=1.2)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15,
                    lw=0)
  _boundaries(ax, protocol)
  if log:
    ax.set_yscale("log")
  ax.set_title(title, fontsize=10)
  ax.set_xlabel("step")


def _sal_methods(protocol: dict) -> list[str]:
  return [n for n, e in protocol["methods"].items()
          if "protection_rate" in e["curves"]]


def plot_protocol(name: str, protocol: dict, out: pathlib.Path
                  ) -> list[pathlib.Path]:
  """Writes the protocol's figures; returns their paths."""
  methods = list(protocol["methods"])
  written = []

  def save(fig, suffix):
    path = out / f"{name}_{suffix}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)

  cols = min(4, len(methods))
  rows = -(-len(methods) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows + 0.6),
                           squeeze=False, constrained_layout=True)
  for ax in axes.flat[len(methods):]:
    ax.axis("off")
  tasks = protocol["schedule"]["num_tasks"]
  for ax, m in zip(axes.flat, methods):
    matrix = np.mean(protocol["methods"][m]["per_seed"]["acc_matrix"], 0)
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    if tasks <= 6:
      for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="w" if v < 0.6 else "k")
    ax.set_xticks(range(tasks), range(1, tasks + 1), fontsize=7)
    ax.set_yticks(range(tasks), range(1, tasks + 1), fontsize=7)
    ax.set_title(method_label(protocol, m), fontsize=9)
    ax.set_xlabel("evaluated task", fontsize=8)
    ax.set_ylabel("after training task", fontsize=8)
  fig.colorbar(image, ax=axes, shrink=0.6, label="test accuracy")
  fig.suptitle(f"{name}: test accuracy matrix R[i, j] (mean over seeds)")
  save(fig, "acc_matrix")

  panels = 2 if protocol["task_free"] else 1
  fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4), squeeze=False)
  _line_panel(axes[0, 0], protocol, "task1_acc", methods,
              "task-1 test accuracy over the run")
  if protocol["task_free"]:
    _line_panel(axes[0, 1], protocol, "online_acc", methods,
                "online accuracy (each batch before its update)")
  axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
  save(fig, "task1")

  fig, axes = plt.subplots(1, 2, figsize=(14, 4))
  _line_panel(axes[0], protocol, "kl_task1", methods,
              "KL drift on task 1 since its end")
  _line_panel(axes[1], protocol, "weight_drift", methods,
              "||theta - theta_after_task1||")
  axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
  save(fig, "drift")

  sal_methods = _sal_methods(protocol)
  if sal_methods:
    fig, axes = plt.subplots(1, len(sal_methods),
                             figsize=(5 * len(sal_methods), 3.5),
                             squeeze=False)
    x = _x_steps(protocol)
    for ax, m in zip(axes.flat, sal_methods):
      fractions = [_curve(protocol["methods"][m], k)[0] for k in SPECTRUM]
      ax.stackplot(x, fractions, labels=[k.split("_")[0] for k in SPECTRUM],
                   colors=("tab:green", "tab:gray", "tab:red"), alpha=0.8)
      _boundaries(ax, protocol)
      ax.set_ylim(0, 1)
      ax.set_title(f"{m}: stability spectrum", fontsize=10)
      ax.set_xlabel("step")
    axes[0, -1].legend(fontsize=7, loc="center left",
                       bbox_to_anchor=(1, 0.5))
    save(fig, "sal_spectrum")

    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    _line_panel(axes[0], protocol, "protection_rate", sal_methods,
                "SAL protection rate 1 - ||g_out|| / ||g|| (chunk mean)")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    _line_panel(axes[1], protocol, "update_norm", methods,
                "final update norm ||delta theta|| per step", log=True)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    save(fig, "sal_suppression")
  return written
