"""Quickstart: does SAL keep what a model learned while it learns more?

Trains a small Flax NNX MLP on scikit-learn's handwritten digits as a
sequence of five tasks, on two protocols, with three seeds:

* ``permuted``: every task is all ten digits under its own fixed shuffle of
  the pixels (the first unshuffled), one ten-way head;
* ``domain``: the digit pairs 0/1, 2/3, ... 8/9 through one shared two-way
  head ("first or second digit of the pair"), so every task rewrites the
  same decision: the setting where protecting parameters helps least.

(``--protocols task`` adds the pairs with the head restricted to each
task's two classes.) Each run trains the same model with ``optax.adamw``
and with ``optax.chain(sal.protect(...), optax.adamw(...))``:
``protect()`` at its defaults (what a user writes), ``protect(restore=10)``
(the strength the continual benchmark's validation chose for the default
form on three of its protocols), the per-element importance at
``restore=30`` (chosen for that form on split digits), and the original
library's rule kept exactly (``estimator="reference"``). It prints, per
protocol, each task's accuracy after the last task, the average accuracy
and the forgetting (means over seeds), and plots every task's accuracy
over training and the reference rule's protection rate.

Run:  python examples/quickstart.py [--protocols permuted domain]
          [--seeds 3] [--epochs N]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import sal_jax as sal

TASKS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


class MLP(nnx.Module):
  """64 -> 128 -> 128 -> 10 with ReLU."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden1 = nnx.Linear(64, 128, rngs=rngs)
    self.hidden2 = nnx.Linear(128, 128, rngs=rngs)
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.hidden1(x))
    x = nnx.relu(self.hidden2(x))
    return self.out(x)


def load_tasks(seed: int, protocol: str):
  """Digits as five tasks, each with a test split."""
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
      x, y, test_size=0.3, random_state=seed, stratify=y)
  if protocol == "permuted":
    # Every task is all ten digits under its own fixed shuffle of the 64
    # pixels (the first task unshuffled); one ten-way head.
    rng = np.random.default_rng(1000 + seed)
    perms = [np.arange(64)] + [rng.permutation(64) for _ in TASKS[1:]]
    return [dict(name=f"perm {i}", mask=np.ones(10, bool),
                 x_train=x_tr[:, perm], y_train=y_tr, x_test=x_te[:, perm],
                 y_test=y_te) for i, perm in enumerate(perms)]
  tasks = []
  for classes in TASKS:
    tr = np.isin(y_tr, classes)
    te = np.isin(y_te, classes)
    mask = np.zeros(10, bool)
    if protocol == "task":
      mask[list(classes)] = True
      labels_tr, labels_te = y_tr[tr], y_te[te]
    else:  # domain: classes 0/1 of the shared head, "first or second"
      mask[:2] = True
      labels_tr = (y_tr[tr] == classes[1]).astype(np.int32)
      labels_te = (y_te[te] == classes[1]).astype(np.int32)
    tasks.append(dict(name=f"{classes[0]}/{classes[1]}", mask=mask,
                      x_train=x_tr[tr], y_train=labels_tr, x_test=x_te[te],
                      y_test=labels_te))
  return tasks


def masked_logits(model, x, mask):
  return jnp.where(mask, model(x), -1e9)


@nnx.jit
def train_step(model, optimizer, x, y, mask):
  def loss_fn(model):
    logits = masked_logits(model, x, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def accuracy(model, x, y, mask):
  return jnp.mean(jnp.argmax(masked_logits(model, x, mask), -1) == y)


@nnx.jit
def protection_rate(optimizer):
  return sal.metrics(optimizer)["protection_rate"]


def run(name, tx, tasks, epochs, batch_size, seed, progress):
  """Trains on the tasks in order; returns accuracy curves and rates."""
  model = MLP(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  acc_matrix = np.zeros((len(tasks), len(tasks)))  # [after task i, on task j]
  curve_steps, curve_acc, rates, task_ends = [], [], [], []
  step = 0
  for i, task in enumerate(tasks):
    n = len(task["x_train"])
    for _ in range(epochs):
      order = rng.permutation(n)
      for start in range(0, n - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        train_step(model, optimizer, task["x_train"][idx],
                   task["y_train"][idx], task["mask"])
        step += 1
        if name == REFERENCE:  # the gated run
          rates.append(float(protection_rate(optimizer)))
        progress.update(1)
      curve_steps.append(step)
      curve_acc.append([float(accuracy(model, t["x_test"], t["y_test"],
                                       t["mask"])) for t in tasks])
    task_ends.append(step)
    for j, t in enumerate(tasks):
      acc_matrix[i, j] = float(accuracy(model, t["x_test"], t["y_test"],
                                        t["mask"]))
  return dict(acc_matrix=acc_matrix, curve_steps=np.array(curve_steps),
              curve_acc=np.array(curve_acc), rates=np.array(rates),
              task_ends=task_ends)


def forgetting(acc_matrix):
  """Mean over earlier tasks of (best accuracy before the end - final)."""
  k = len(acc_matrix)
  drops = [acc_matrix[:k - 1, j].max() - acc_matrix[k - 1, j]
           for j in range(k - 1)]
  return float(np.mean(drops))


def plot(results, path):
  """One row per protocol (its first seed): each method's task accuracies
  over training, and the reference rule's protection rate."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = len(results)
  cols = len(METHODS) + 1
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows),
                           squeeze=False)
  for row, (protocol, (tasks, runs)) in zip(axes, results.items()):
    for ax, name in zip(row[:-1], METHODS):
      r = runs[name][0]
      for boundary in r["task_ends"][:-1]:
        ax.axvline(boundary, color="0.8", lw=0.8, zorder=0)
      for j, t in enumerate(tasks):
        ax.plot(r["curve_steps"], r["curve_acc"][:, j],
                label=f"task {j + 1} ({t['name']})")
      ax.set(title=f"{protocol}: {name}", xlabel="step",
             ylabel="test accuracy", ylim=(0, 1.02))
      ax.title.set_fontsize(9)
    row[0].legend(fontsize=7, loc="lower left")
    row[-1].plot(runs[REFERENCE][0]["rates"], lw=0.8)
    row[-1].set(title=f"{protocol}: reference rule, 1 - |g_out|/|g|",
                xlabel="step", ylabel="protection rate", ylim=(0, 1.02))
    row[-1].title.set_fontsize(9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def table(protocol, tasks, runs, seeds):
  """Markdown table: each task's final accuracy, the average and the
  forgetting, means over seeds (± their standard deviation)."""
  header = " | ".join(f"task {j + 1}" for j in range(len(tasks)))
  width = max(map(len, runs))
  lines = [f"\n{protocol} ({PROTOCOLS[protocol]}): accuracy on each task "
           f"after training on all {len(tasks)}, mean of {seeds} seeds\n",
           f"| {'method':<{width}} | {header} | average | forgetting |",
           "|" + "---|" * (len(tasks) + 3)]
  for name, per_seed in runs.items():
    final = np.array([r["acc_matrix"][-1] for r in per_seed])
    average = final.mean(axis=1)
    forgot = np.array([forgetting(r["acc_matrix"]) for r in per_seed])
    cells = " | ".join(f"{a:.3f}" for a in final.mean(axis=0))
    lines.append(f"| {name:<{width}} | {cells} | {average.mean():.3f} ± "
                 f"{average.std():.3f} | {forgot.mean():.3f} ± "
                 f"{forgot.std():.3f} |")
  return "\n".join(lines)


PROTOCOLS = {
    "permuted": "digits, each task under its own pixel shuffle, ten-way head",
    "domain": "digit pairs 0/1 ... 8/9, one shared two-way head",
    "task": "digit pairs, the head restricted to the task's two classes",
}
REFERENCE = "sal reference + adamw"


def make_methods(lr):
  return {
      "adamw": optax.adamw(lr),
      # What a user writes: protect() at its defaults.
      "sal protect() + adamw": optax.chain(sal.protect(), optax.adamw(lr)),
      # Ten times the default strength: what the continual benchmark's
      # validation chose for the default form on permuted digits, the
      # abrupt stream and gradual drift.
      "sal protect(restore=10) + adamw": optax.chain(
          sal.protect(restore=10.0), optax.adamw(lr)),
      # The per-element importance at restore=30, what the benchmark's
      # validation chose for that form on split digits.
      "sal element restore=30 + adamw": optax.chain(
          sal.protect(granularity="element", restore=30.0),
          optax.adamw(lr)),
      # The original's rule, kept as the faithful reference mode.
      REFERENCE: optax.chain(sal.protect(estimator="reference"),
                             optax.adamw(lr)),
  }


METHODS = tuple(make_methods(1e-3))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--protocols", nargs="+", choices=tuple(PROTOCOLS),
                      default=["permuted", "domain"])
  parser.add_argument("--epochs", type=int, default=None,
                      help="epochs per task (default 8 for the digit "
                      "pairs, 3 for permuted, whose tasks hold five times "
                      "the examples)")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--out", default="outputs")
  args = parser.parse_args()
  if args.seeds < 1 or (args.epochs is not None and args.epochs < 1):
    parser.error("--seeds and --epochs must be at least 1")

  plan = {}
  for protocol in args.protocols:
    epochs = args.epochs or (3 if protocol == "permuted" else 8)
    tasks = [load_tasks(seed, protocol) for seed in range(args.seeds)]
    steps = sum(len(t["x_train"]) // args.batch_size
                for t in tasks[0]) * epochs
    plan[protocol] = (epochs, tasks, steps)
  total = sum(steps for _, _, steps in plan.values()) * args.seeds * len(
      METHODS)
  results = {}
  t0 = time.perf_counter()
  with tqdm(total=total, desc="training", unit="step") as progress:
    for protocol, (epochs, tasks, _) in plan.items():
      runs = {name: [] for name in METHODS}
      for seed in range(args.seeds):
        for name, tx in make_methods(args.lr).items():
          progress.set_postfix_str(f"{protocol}, seed {seed}, {name}")
          runs[name].append(run(name, tx, tasks[seed], epochs,
                                args.batch_size, seed, progress))
      results[protocol] = (tasks[0], runs)
  elapsed = time.perf_counter() - t0

  for protocol, (tasks, runs) in results.items():
    print(table(protocol, tasks, runs, args.seeds))
    rates = np.concatenate([r["rates"] for r in runs[REFERENCE]])
    print(f"\nreference rule: mean protection rate {rates.mean():.3f}")
  print(f"\nwall time {elapsed:.1f} s")

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "quickstart.png"
  plot(results, path)
  print(f"plot written to {os.fspath(path)}")


if __name__ == "__main__":
  main()
