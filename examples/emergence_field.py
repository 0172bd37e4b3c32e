"""Emergence field: watch a network's hidden representations while it learns.

Trains a small Flax NNX MLP on scikit-learn's handwritten digits. Inside the
jitted train step, two emergence fields (one per hidden layer, ``vmap``-ed
over the pair) observe the layer's activations on the current batch: how
coherent, how novel against the last ``--history`` steps, and how resonant
with the field's running centroid each representation is. Prints the test
accuracy and each layer's emergence statistics, and saves the emergence map
(coherence vs novelty, coloured by intensity) and the four signals over
training, from that run.

Run:  python examples/emergence_field.py [--epochs 12] [--seed 0]
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

LAYERS = ("hidden 1", "hidden 2")
SIGNALS = ("coherence", "novelty", "resonance", "intensity")


class MLP(nnx.Module):
  """64 -> width -> width -> 10 with ReLU; also returns the hidden layers."""

  def __init__(self, width: int, rngs: nnx.Rngs):
    self.hidden1 = nnx.Linear(64, width, rngs=rngs)
    self.hidden2 = nnx.Linear(width, width, rngs=rngs)
    self.out = nnx.Linear(width, 10, rngs=rngs)

  def __call__(self, x):
    h1 = nnx.relu(self.hidden1(x))
    h2 = nnx.relu(self.hidden2(h1))
    return self.out(h2), (h1, h2)


def load_data(seed: int):
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  return train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)


@nnx.jit
def train_step(model, optimizer, fields, x, y):
  """One optimizer step; the fields observe this batch's hidden layers."""
  def loss_fn(model):
    logits, hidden = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, hidden

  (loss, hidden), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  # One pattern per layer, (2, batch * width): a batch of independent fields.
  patterns = jnp.stack([h.reshape(-1) for h in hidden])
  reports, fields = jax.vmap(sal.emergence.observe)(fields, patterns)
  return loss, reports, fields


@nnx.jit
def accuracy(model, x, y):
  return jnp.mean(jnp.argmax(model(x)[0], -1) == y)


def run(args):
  x_tr, x_te, y_tr, y_te = load_data(args.seed)
  model = MLP(args.width, nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
  one = sal.emergence.emergence_init(args.batch_size * args.width, args.history)
  fields = jax.tree.map(lambda a: jnp.stack([a] * len(LAYERS)), one)
  rng = np.random.default_rng(args.seed)
  steps_per_epoch = len(x_tr) // args.batch_size
  log = {k: [] for k in SIGNALS + ("is_emergent", "emergence_score")}
  losses, acc_steps, accs = [], [], []
  with tqdm(total=steps_per_epoch * args.epochs, desc="training",
            unit="step") as progress:
    for _ in range(args.epochs):
      order = rng.permutation(len(x_tr))
      for b in range(steps_per_epoch):
        idx = order[b * args.batch_size:(b + 1) * args.batch_size]
        loss, reports, fields = train_step(model, optimizer, fields,
                                           x_tr[idx], y_tr[idx])
        for k in log:
          log[k].append(np.asarray(getattr(reports, k)))
        losses.append(float(loss))
        progress.update(1)
      acc_steps.append(len(losses))
      accs.append(float(accuracy(model, x_te, y_te)))
      progress.set_postfix(test_acc=f"{accs[-1]:.3f}")
  log = {k: np.stack(v) for k, v in log.items()}  # (steps, layers)
  return dict(log=log, losses=np.array(losses), acc_steps=acc_steps,
              accs=accs, rates=np.asarray(sal.emergence.emergence_rate(fields)),
              rejected=np.asarray(fields.rejected))


def plot(result, args, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  log = result["log"]
  steps = np.arange(1, len(result["losses"]) + 1)
  fig = plt.figure(figsize=(15, 7.5))
  grid = fig.add_gridspec(len(SIGNALS), 3)
  ax_map = fig.add_subplot(grid[:, 0])
  markers = ("o", "^")
  for layer, name in enumerate(LAYERS):
    sc = ax_map.scatter(log["coherence"][:, layer], log["novelty"][:, layer],
                        c=log["intensity"][:, layer], cmap="viridis",
                        vmin=0.0, vmax=max(log["intensity"].max(), 1e-3),
                        s=10, marker=markers[layer], alpha=0.8, label=name)
  emergent = log["is_emergent"]
  if emergent.any():
    s, l = np.nonzero(emergent)
    ax_map.scatter(log["coherence"][s, l], log["novelty"][s, l], s=60,
                   facecolors="none", edgecolors="red")
  ax_map.axvline(0.6, color="0.6", ls="--", lw=0.8)
  ax_map.axhline(0.4, color="0.6", ls="--", lw=0.8)
  ax_map.set(title="emergence map (dashed: detect_emergence thresholds)",
             xlabel="coherence", ylabel="novelty")
  from matplotlib.lines import Line2D
  handles = [Line2D([], [], ls="", marker=m, color="0.4", label=name)
             for m, name in zip(markers, LAYERS)]
  handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="red",
                        label=f"emergent ({int(emergent.sum())})"))
  ax_map.legend(handles=handles, fontsize=8, loc="upper right")
  fig.colorbar(sc, ax=ax_map, label="intensity", shrink=0.8)
  for row, key in enumerate(SIGNALS):
    ax = fig.add_subplot(grid[row, 1:])
    for layer, name in enumerate(LAYERS):
      ax.plot(steps, log[key][:, layer], lw=0.8, label=name)
    ax.set_ylabel(key)
    if row == 0:
      ax.set_title(f"signals per step (history {args.history}); test "
                   f"accuracy {result['accs'][-1]:.3f} after "
                   f"{args.epochs} epochs")
      ax.legend(fontsize=8, loc="upper right")
    if row == len(SIGNALS) - 1:
      ax.set_xlabel("training step")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=12)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--history", type=int, default=100)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="outputs")
  args = parser.parse_args()

  t0 = time.perf_counter()
  result = run(args)
  elapsed = time.perf_counter() - t0
  log = result["log"]
  print(f"\nTest accuracy after {args.epochs} epochs: "
        f"{result['accs'][-1]:.3f}  ({len(result['losses'])} steps, "
        f"{elapsed:.1f} s)")
  print("| layer    | coherence | novelty | resonance | intensity | "
        "emergent steps | rate (last history) |")
  print("|---|---|---|---|---|---|---|")
  for layer, name in enumerate(LAYERS):
    means = " | ".join(f"{log[k][:, layer].mean():.3f}" for k in SIGNALS)
    print(f"| {name} | {means} | {int(log['is_emergent'][:, layer].sum())}"
          f" | {result['rates'][layer]:.3f} |")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "emergence_field.png"
  plot(result, args, path)
  print(f"plot written to {os.fspath(path)}")


if __name__ == "__main__":
  main()
