"""Grokking: does the emergence field see a network suddenly generalise?

Trains a small Flax NNX network on modular addition, ``(a + b) mod p``:
learned token embeddings (shared by ``a`` and ``b``), concatenated, one ReLU
layer, logits over the ``p`` answers. Full-batch AdamW with strong weight
decay on a fraction of the ``p * p`` pairs: the network memorises its
training pairs within a few hundred steps and generalises to the held-out
pairs only much later (grokking; Power et al. 2022).

Inside the jitted train step, after the update, three fields observe the
same representation: the power spectrum of the embedding matrix along the
token axis (``|rfft(E, axis=0)|**2``, ``(p // 2 + 1) * embed`` entries), the
representation Nanda et al. (2023) show grokking reorganises into a few
key frequencies. One field is the reference rule (fixed thresholds); two
are calibrated: a z-score of each signal against its own running moments,
and a one-sided CUSUM (Page 1954) of coherence, upward, against its level
and spread frozen at the end of the warm-up, with one event per excursion
(the statistic must cross the threshold from below).

For each seed it records the step at which test accuracy crosses 0.5 (the
transition), the CUSUM's events (the example's detector: ``events``), which
of them come earlier than ``--window`` steps before the transition (false
alarms), and the same for the z-score and the reference rule; writes them
to ``<out>/grokking.json`` and plots the four signals, both calibrated
scores and train / test accuracy with the events to ``<out>/grokking.png``.
The CUSUM's settings (``--cusum-*``) were chosen on seeds 100 to 102 and
then fixed (README, "Grokking").

Run:  python examples/grokking.py [--seeds 0,1,2] [--quick] [--out outputs]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from sal_jax import emergence

SIGNALS = ("coherence", "novelty", "resonance", "intensity")


class Settings(NamedTuple):
  """The calibrated fields' settings (traced: they never recompile)."""
  decay: float
  warmup: int
  threshold: float
  cooldown: int
  cusum_warmup: int
  cusum_threshold: float
  cusum_allowance: float


# The CUSUM watches coherence only, upward; its reference (mean and spread
# of coherence) is frozen at the end of its warm-up; an event needs the
# statistic to cross the threshold from below (one event per excursion).
CUSUM_WATCH = (True, False, False, False)
CUSUM_DIRECTION = (1.0, 1.0, 1.0, 1.0)


class AdditionNet(nnx.Module):
  """Embed a and b, concatenate, one ReLU layer, logits over p answers."""

  def __init__(self, p: int, embed: int, hidden: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(p, embed, rngs=rngs)
    self.hidden = nnx.Linear(2 * embed, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, p, rngs=rngs)

  def __call__(self, pairs):
    e = self.embed(pairs).reshape(pairs.shape[0], -1)
    return self.out(nnx.relu(self.hidden(e)))

  def spectrum(self):
    """Power of the embedding along the token axis, per frequency and dim."""
    return jnp.abs(jnp.fft.rfft(self.embed.embedding[...], axis=0)) ** 2


def split_pairs(p: int, train_fraction: float, seed: int):
  a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
  pairs = np.stack([a.ravel(), b.ravel()], 1).astype(np.int32)
  labels = ((pairs[:, 0] + pairs[:, 1]) % p).astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(pairs))
  n = int(round(train_fraction * len(pairs)))
  train, test = order[:n], order[n:]
  return pairs[train], labels[train], pairs[test], labels[test]


@nnx.jit
def train_step(model, optimizer, fields, settings, x, y, x_test, y_test):
  """One full-batch step; then the fields observe the embedding spectrum."""
  def loss_fn(model):
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, logits

  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  reference, calibrated, cusum = fields
  pattern = model.spectrum()
  ref_report, reference = emergence.observe(reference, pattern)
  cal_report, calibrated = emergence.calibrated_observe(
      calibrated, pattern, decay=settings.decay, warmup=settings.warmup,
      threshold=settings.threshold, cooldown=settings.cooldown)
  cusum_report, cusum = emergence.calibrated_observe(
      cusum, pattern, detector="cusum", decay=settings.decay,
      warmup=settings.cusum_warmup, threshold=settings.cusum_threshold,
      allowance=settings.cusum_allowance, watch=CUSUM_WATCH,
      direction=CUSUM_DIRECTION, freeze=True, reset=False)
  log = dict(
      loss=loss,
      train_acc=jnp.mean(jnp.argmax(logits, -1) == y),
      test_acc=jnp.mean(jnp.argmax(model(x_test), -1) == y_test),
      signals=jnp.stack(ref_report[:4]),
      reference_emergent=ref_report.is_emergent,
      z=cal_report.z,
      zscore_score=cal_report.score,
      zscore_emergent=cal_report.is_emergent,
      cusum=cusum_report.score,
      emergent=cusum_report.is_emergent)
  return log, (reference, calibrated, cusum)


def run_seed(args, seed: int, progress) -> dict:
  x, y, x_test, y_test = (jnp.asarray(a) for a in split_pairs(
      args.p, args.train_fraction, seed))
  model = AdditionNet(args.p, args.embed, args.hidden, nnx.Rngs(seed))
  tx = optax.adamw(args.lr, b1=0.9, b2=0.98, weight_decay=args.weight_decay)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  dims = int(np.prod(model.spectrum().shape))
  fields = (emergence.emergence_init(dims, args.history),
            emergence.calibrated_init(dims, args.history),
            emergence.calibrated_init(dims, args.history))
  settings = Settings(args.decay, args.warmup, args.threshold, args.cooldown,
                      args.cusum_warmup, args.cusum_h, args.cusum_k)
  logs = []
  t0 = time.perf_counter()
  for _ in range(args.steps):
    log, fields = train_step(model, optimizer, fields, settings, x, y,
                             x_test, y_test)
    logs.append(log)  # Stays on the device: no sync per step.
    progress.update(1)
  logs = jax.device_get(logs)
  wall = time.perf_counter() - t0
  log = {k: np.stack([l[k] for l in logs]) for k in logs[0]}
  return summarise(log, args, seed, wall, x.shape[0])


def summarise(log, args, seed, wall, n_train) -> dict:
  steps = np.arange(1, len(log["loss"]) + 1)  # step t: after t updates

  def first(mask):
    hit = np.flatnonzero(mask)
    return int(steps[hit[0]]) if hit.size else None

  transition = first(log["test_acc"] > 0.5)

  def rule(prefix, key):
    """Events of one rule, with false alarms and warnings."""
    evs = [int(s) for s in steps[log[key]]]
    before = [e for e in evs if transition is None or e < transition]
    false = [e for e in before
             if transition is None or e < transition - args.window]
    first_step = evs[0] if evs else None
    return {
        f"{prefix}events": evs,
        f"{prefix}first_event_step": first_step,
        f"{prefix}lead_steps": (transition - first_step if first_step
                                and transition else None),
        f"{prefix}false_alarms": false,
        f"{prefix}warnings": [e for e in before if e not in false],
        f"{prefix}first_event_precedes_transition": bool(
            first_step and transition and first_step < transition),
    }

  pre = slice(0, transition - 1) if transition and transition > 1 else None
  return dict(
      seed=seed, n_train=int(n_train),
      memorised_step=first(log["train_acc"] >= 0.99),
      climb_start_step=first(log["test_acc"] > 0.1),
      transition_step=transition,
      detector="cusum",
      **rule("", "emergent"),
      **rule("zscore_", "zscore_emergent"),
      **rule("reference_", "reference_emergent"),
      final_train_acc=float(log["train_acc"][-1]),
      final_test_acc=float(log["test_acc"][-1]),
      max_zscore_before_transition=(
          float(log["zscore_score"][pre].max()) if pre else None),
      wall_s=round(wall, 1),
      log={k: log[k].tolist() for k in ("train_acc", "test_acc", "signals",
                                         "zscore_score", "cusum")})


def plot(results, args, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = 3 + len(SIGNALS)
  fig, axes = plt.subplots(rows, len(results), sharex=True, squeeze=False,
                           figsize=(4.6 * len(results), 1.6 * rows))
  for col, res in enumerate(results):
    log = {k: np.asarray(v) for k, v in res["log"].items()}
    steps = np.arange(1, len(log["train_acc"]) + 1)
    ax = axes[0, col]
    ax.plot(steps, log["train_acc"], label="train accuracy")
    ax.plot(steps, log["test_acc"], label="test accuracy")
    lead = res["lead_steps"]
    ax.set_title(f"seed {res['seed']}: transition at "
                 f"{res['transition_step']}, first CUSUM event "
                 f"{res['first_event_step']}"
                 + (f" ({lead} before)" if lead and lead > 0 else ""),
                 fontsize=8)
    for row, name in enumerate(SIGNALS):
      ax = axes[row + 1, col]
      ax.plot(steps, log["signals"][:, row], lw=0.7, color="0.25")
      if name in ("novelty", "intensity"):
        ax.set_yscale("symlog", linthresh=1e-7)
      if col == 0:
        ax.set_ylabel(name)
    ax = axes[-2, col]
    ax.plot(steps, log["zscore_score"], lw=0.7, color="tab:orange")
    ax.axhline(args.threshold, color="tab:orange", ls=":", lw=0.8)
    ax = axes[-1, col]
    ax.plot(steps, log["cusum"], lw=0.9, color="tab:red")
    ax.axhline(args.cusum_h, color="tab:red", ls=":", lw=0.8)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("training step")
    if col == 0:
      axes[0, 0].set_ylabel("accuracy")
      axes[-2, 0].set_ylabel("z-score\nmax |z|")
      ax.set_ylabel("CUSUM g\n(coherence)")
    for ax in axes[:, col]:
      if res["transition_step"]:
        ax.axvline(res["transition_step"], color="k", ls="--", lw=0.8)
        ax.axvspan(res["transition_step"] - args.window,
                   res["transition_step"], color="tab:blue", alpha=0.08,
                   lw=0)
      ax.axvspan(0, args.cusum_warmup, color="0.9", lw=0)
      for e in res["events"]:
        ax.axvline(e, color="tab:red", lw=1.0)
      for e in res["zscore_events"]:
        ax.axvline(e, color="tab:orange", lw=0.8, ls="--")
      for e in res["reference_events"]:
        ax.axvline(e, color="tab:green", lw=0.8, ls="-.")
  handles = [
      plt.Line2D([], [], color="C0", label="train accuracy"),
      plt.Line2D([], [], color="C1", label="test accuracy"),
      plt.Line2D([], [], color="k", ls="--", label="transition (test > 0.5)"),
      plt.Rectangle((0, 0), 1, 1, color="tab:blue", alpha=0.15,
                    label=f"window ({args.window} steps before it)"),
      plt.Rectangle((0, 0), 1, 1, color="0.9", label="warm-up"),
      plt.Line2D([], [], color="tab:red", label="CUSUM event"),
      plt.Line2D([], [], color="tab:orange", ls="--",
                 label="z-score event"),
      plt.Line2D([], [], color="tab:green", ls="-.",
                 label="reference-rule event"),
      plt.Line2D([], [], color="0.3", ls=":", label="thresholds")]
  fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8,
             frameon=False)
  fig.suptitle(f"(a + b) mod {args.p}, train fraction "
               f"{args.train_fraction}: signals of the embedding spectrum",
               fontsize=10)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--p", type=int, default=59)
  parser.add_argument("--train-fraction", type=float, default=0.5)
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps per seed (2500; 1200 with --quick)")
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--weight-decay", type=float, default=1.0)
  parser.add_argument("--embed", type=int, default=64)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--history", type=int, default=100)
  parser.add_argument("--decay", type=float, default=0.99,
                      help="calibrated fields: memory ~ 1 / (1 - decay) "
                      "(for the CUSUM: of its warm-up reference)")
  parser.add_argument("--warmup", type=int, default=300,
                      help="z-score field: warm-up")
  parser.add_argument("--threshold", type=float, default=4.0,
                      help="z-score field: threshold in running std")
  parser.add_argument("--cooldown", type=int, default=100,
                      help="z-score field: cool-down")
  parser.add_argument("--cusum-warmup", type=int, default=300,
                      help="CUSUM: observations before its reference "
                      "freezes")
  parser.add_argument("--cusum-k", type=float, default=5.0,
                      help="CUSUM: allowance k, in warm-up std")
  parser.add_argument("--cusum-h", type=float, default=20.0,
                      help="CUSUM: threshold h")
  parser.add_argument("--window", type=int, default=300,
                      help="an event more than this many steps before the "
                      "transition is a false alarm")
  parser.add_argument("--quick", action="store_true",
                      help="the first seed only, 1200 steps (a smoke run)")
  parser.add_argument("--out", default="outputs")
  args = parser.parse_args()
  if args.quick:
    args.seeds = args.seeds.split(",")[0]
  if args.steps is None:
    args.steps = 1200 if args.quick else 2500

  seeds = [int(s) for s in args.seeds.split(",")]
  t0 = time.perf_counter()
  results = []
  with tqdm(total=args.steps * len(seeds), desc="grokking",
            unit="step") as progress:
    for seed in seeds:
      results.append(run_seed(args, seed, progress))
      progress.set_postfix(seed=seed,
                           test_acc=f"{results[-1]['final_test_acc']:.3f}")
  elapsed = time.perf_counter() - t0

  print(f"\n(a + b) mod {args.p}, {results[0]['n_train']} training pairs, "
        f"{args.steps} steps, seeds {seeds}: {elapsed:.1f} s")
  print("| seed | memorised | transition | CUSUM events | first | lead | "
        f"false alarms (> {args.window} before) | z-score events "
        "(false alarms) | reference events | final test acc |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r['seed']} | {r['memorised_step']} | {r['transition_step']} "
          f"| {r['events']} | {r['first_event_step']} | {r['lead_steps']} | "
          f"{len(r['false_alarms'])} | {r['zscore_events']} "
          f"({len(r['zscore_false_alarms'])}) | "
          f"{len(r['reference_events'])} | {r['final_test_acc']:.3f} |")
  met = sum(r["first_event_precedes_transition"]
            and len(r["false_alarms"]) <= 1 for r in results)
  print(f"CUSUM: first event before the transition with at most one false "
        f"alarm on {met} of {len(results)} seeds")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  summary = {k: v for k, v in vars(args).items() if k != "out"}
  path = out / "grokking.json"
  with open(path, "w") as f:
    json.dump({"settings": summary,
               "representation": "power spectrum of the embedding matrix "
                                 "along the token axis, |rfft(E, axis=0)|^2",
               "detectors": {
                   "events (cusum)": "one-sided CUSUM of coherence, upward, "
                                     "against its mean and spread frozen at "
                                     "the end of the warm-up; an event when "
                                     "the statistic crosses h from below",
                   "zscore_events": "max |z| of the four signals against "
                                    "running moments above the threshold",
                   "reference_events": "the original's fixed thresholds"},
               "seeds": [{k: v for k, v in r.items() if k != "log"}
                         for r in results],
               "wall_s": round(elapsed, 1)}, f, indent=1)
  print(f"results written to {path}")
  plot_path = out / "grokking.png"
  plot(results, args, plot_path)
  print(f"plot written to {plot_path}")


if __name__ == "__main__":
  main()
