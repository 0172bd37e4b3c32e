"""Calibration of the relative budget's data-free drift estimate.

``protect(relative_budget=rho)`` holds an estimate
:math:`\\hat D = \\sum_i \\Omega^*_i (\\theta_i - \\theta^*_i)^2 / R` at
``rho``, where :math:`R` is the weighted distance the params travelled to
the anchor. Under a quadratic loss whose curvature is proportional to
:math:`\\Omega^*`, :math:`\\hat D` is the share of the last task's loss
decrease that has been given back. Here it is compared with that share,
measured on task 1 during segment 2 (after the first shift, when the
anchor is the end of task 1 and :math:`R` the path from initialisation):

.. math::
  D_{\\text{measured}}(t) = \\frac{L_1(t) - L_1(\\text{end of segment 1})}
    {L_1(\\text{init}) - L_1(\\text{end of segment 1})},

with :math:`L_1` task 1's test loss, for the chosen configuration of the
method with the estimate (``sal_budget``), per seed.
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

METHOD = "sal_budget"


def calibration(protocol: dict) -> dict | None:
  """Estimate vs measured share over segment 2; None without the curves."""
  entry = protocol["methods"].get(METHOD)
  if entry is None or "estimated_forgetting" not in entry["curves"]:
    return None
  per = protocol["schedule"]["chunks_per_segment"]
  loss = np.asarray(entry["curves"]["task1_loss"], float)
  estimate = np.asarray(entry["curves"]["estimated_forgetting"], float)
  start = np.asarray(entry["per_seed"]["task1_loss_init"], float)
  settled = loss[:, per - 1]
  measured = (loss[:, per:2 * per] - settled[:, None]) / (
      start - settled)[:, None]
  est = estimate[:, per:2 * per]
  ratio = est[:, -1] / measured[:, -1]
  return {
      "method": METHOD,
      "estimate_end": float(est[:, -1].mean()),
      "measured_end": float(measured[:, -1].mean()),
      "ratio_end": float(est[:, -1].mean() / measured[:, -1].mean()),
      "ratio_per_seed": ratio.tolist(),
      "estimate_curve": est.mean(0).tolist(),
      "measured_curve": measured.mean(0).tolist(),
  }


def add_calibration(results: dict) -> None:
  for protocol in results["protocols"].values():
    found = calibration(protocol)
    if found is not None:
      protocol["calibration"] = found


def markdown(results: dict) -> str:
  rows = [(name, p["calibration"]) for name, p in
          results["protocols"].items() if "calibration" in p]
  if not rows:
    return ""
  lines = ["| protocol | estimate | measured share | ratio | ratio per seed |",
           "|---|---|---|---|---|"]
  for name, c in rows:
    seeds = ", ".join(f"{r:.2g}" for r in c["ratio_per_seed"])
    lines.append(f"| {name} | {c['estimate_end']:.3g} | "
                 f"{c['measured_end']:.3g} | {c['ratio_end']:.2g} | "
                 f"{seeds} |")
  return ("Calibration of the relative budget's estimate at the end of "
          "segment 2 (task 1's share of its loss decrease given back; "
          "`sal_budget`'s chosen configuration, mean over seeds):\n\n"
          + "\n".join(lines) + "\n")


def plot(results: dict, path: pathlib.Path) -> pathlib.Path | None:
  rows = [(name, p) for name, p in results["protocols"].items()
          if "calibration" in p]
  if not rows:
    return None
  fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.2),
                           squeeze=False)
  for ax, (name, protocol) in zip(axes[0], rows):
    c = protocol["calibration"]
    s = protocol["schedule"]
    step = s["steps_per_segment"] // s["chunks_per_segment"]
    x = s["steps_per_segment"] + step * np.arange(
        1, len(c["estimate_curve"]) + 1)
    ax.plot(x, c["measured_curve"], "k-", lw=1.2, label="measured share")
    ax.plot(x, c["estimate_curve"], "C3--", lw=1.2, label="estimate")
    ax.set_title(f"{name}: ratio {c['ratio_end']:.2g}", fontsize=9)
    ax.set_xlabel("step (segment 2)", fontsize=8)
    ax.tick_params(labelsize=7)
  axes[0][0].set_ylabel("task 1's loss decrease given back", fontsize=8)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
