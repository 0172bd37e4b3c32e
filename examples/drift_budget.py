"""A drift budget: learn a new task while the old one moves at most epsilon nats.

Pretrain an MLP (Flax NNX) on task A, then train it on task B with

  * AdamW alone, at the same learning rate (the reference for plasticity);
  * ``chain(sal.protect(budget=eps, granularity="element"), adamw)`` after
    ``sal.consolidate`` with the diagonal Fisher of task A's model on task
    B's inputs (labels sampled from the model: no old labels; per element,
    the Fisher's own unit), passing at every step the drift of the
    model's predictions on a probe of 256 unlabelled task-A inputs,
    ``sal.prediction_drift(anchor_logits, logits)``, as ``drift=``.

Task pairs (scikit-learn's 8x8 digits, all ten classes in both tasks):
``rotate`` (B = the digits rotated by 90 degrees), ``permute`` (B = a fixed
random permutation of the pixels). Reported per budget, as means over seeds:
the final drift on the probe and on task A's held-out test inputs, the rise
of task A's test loss, task A's and task B's test accuracy (B as a fraction
of AdamW's), and the controller's final multiplier; the probe's drift at
every step is plotted next to the JSON (``.png``).

  python examples/drift_budget.py [--seeds 3] [--steps 1000] [--probe 256]
      [--budgets 0.03 0.1 0.3] [--pairs rotate permute] [--out FILE]
"""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import sal_jax as sal



class MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, hidden: int = 128):
    self.hidden = nnx.Linear(64, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def load_pair(pair: str, seed: int):
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  if pair == "rotate":
    xb = np.rot90(x.reshape(-1, 8, 8), axes=(1, 2)).reshape(-1, 64)
  elif pair == "permute":
    xb = x[:, np.random.default_rng(1000 + seed).permutation(64)]
  else:
    raise ValueError(f"unknown pair {pair!r}")
  split = dict(test_size=0.3, random_state=seed, stratify=y)
  a_train, a_test, ya_train, ya_test = train_test_split(x, y, **split)
  b_train, b_test, yb_train, yb_test = train_test_split(xb, y, **split)
  return ((a_train, ya_train, a_test, ya_test),
          (b_train, yb_train, b_test, yb_test))


def nll(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y)


@nnx.jit
def train_step(model, optimizer, x, y):
  grads = nnx.grad(lambda m: nll(m, x, y).mean())(model)
  optimizer.update(model, grads)


@nnx.jit
def watched_step(model, optimizer, x, y, probe, anchor_logits):
  """AdamW's step; returns the probe's drift (for the plot only)."""
  grads = nnx.grad(lambda m: nll(m, x, y).mean())(model)
  drift = sal.prediction_drift(anchor_logits, model(probe))
  optimizer.update(model, grads)
  return drift


@nnx.jit
def budget_step(model, optimizer, x, y, probe, anchor_logits):
  grads = nnx.grad(lambda m: nll(m, x, y).mean())(model)
  drift = sal.prediction_drift(anchor_logits, model(probe))
  optimizer.update(model, grads, drift=drift)
  return drift


def train(model, optimizer, x, y, steps, seed, step_fn=train_step, *args):
  """Returns what ``step_fn`` returns at each step, as one array."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    idx = rng.integers(0, len(x), 64)
    out.append(step_fn(model, optimizer, x[idx], y[idx], *args))
  return np.asarray(out) if out[0] is not None else None


def evaluate(model, data, anchor_logits_test):
  x, y = data
  logits = model(x)
  return {
      "loss": float(nll(model, x, y).mean()),
      "accuracy": float(jnp.mean(jnp.argmax(logits, -1) == y)),
      "drift": float(sal.prediction_drift(anchor_logits_test, logits)),
  }


def run_pair(pair, seed, steps, budgets, lr, probe_size):
  (a_tr, ya_tr, a_te, ya_te), (b_tr, yb_tr, b_te, yb_te) = load_pair(
      pair, seed)
  pretrained = MLP(nnx.Rngs(seed))
  train(pretrained, nnx.Optimizer(pretrained, optax.adamw(lr), wrt=nnx.Param),
        a_tr, ya_tr, steps, seed)
  order = np.random.default_rng(seed).permutation(len(a_tr))
  probe = a_tr[order[:probe_size]]
  anchor_probe = pretrained(probe)
  anchor_test = pretrained(a_te)
  before = evaluate(pretrained, (a_te, ya_te), anchor_test)

  # The Fisher without old labels: the probe's inputs, labels sampled from
  # the pretrained model's own predictions.
  _, params = nnx.split(pretrained, nnx.Param)
  graphdef, _ = nnx.split(pretrained)

  def example_losses(p, batch):
    x, labels = batch
    model = nnx.merge(graphdef, p)
    return optax.softmax_cross_entropy_with_integer_labels(model(x), labels)

  draws = jnp.tile(probe, (16, 1))
  sampled = jax.random.categorical(jax.random.key(seed), pretrained(draws))
  fisher = sal.fisher_diagonal(example_losses, params, [(draws, sampled)])

  results = {}
  for name, budget in [("adamw", None)] + [(f"budget {b:g}", b)
                                           for b in budgets]:
    model = nnx.clone(pretrained)
    if budget is None:
      optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.Param)
      drifts = train(model, optimizer, b_tr, yb_tr, steps, seed + 1,
                     watched_step, probe, anchor_probe)
      multiplier = float("nan")
    else:
      # Per element: the unit of the diagonal Fisher it consolidates.
      tx = optax.chain(sal.protect(budget=budget, granularity="element"),
                       optax.adamw(lr))
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      sal.consolidate(optimizer, params, fisher)  # updates it in place
      drifts = train(model, optimizer, b_tr, yb_tr, steps, seed + 1,
                     budget_step, probe, anchor_probe)
      multiplier = float(sal.metrics(optimizer)["multiplier"])
    old = evaluate(model, (a_te, ya_te), anchor_test)
    new = evaluate(model, (b_te, yb_te), anchor_test)
    results[name] = {
        "budget": budget,
        "probe_drift": float(sal.prediction_drift(anchor_probe, model(probe))),
        "old_drift": old["drift"],
        "old_loss_rise": old["loss"] - before["loss"],
        "old_accuracy": old["accuracy"],
        "new_accuracy": new["accuracy"],
        "multiplier": multiplier,
        "probe_drift_per_step": drifts.tolist(),
    }
  return results


def plot(report, budgets, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(report), figsize=(5.5 * len(report), 4),
                           squeeze=False)
  for ax, (pair, result) in zip(axes[0], report.items()):
    for i, name in enumerate(result["seeds"][0]):
      curve = np.mean([r[name]["probe_drift_per_step"]
                       for r in result["seeds"]], axis=0)
      ax.plot(curve, color=f"C{i}", label=name)
      budget = result["seeds"][0][name]["budget"]
      if budget is not None:
        ax.axhline(budget, color=f"C{i}", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step on task B")
    ax.set_ylabel("drift on the probe (nats of KL), mean over seeds")
    ax.set_title(f"{pair}: dotted = budget")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--probe", type=int, default=256,
                      help="unlabelled task-A training inputs in the probe")
  parser.add_argument("--budgets", type=float, nargs="+",
                      default=[0.03, 0.1, 0.3])
  parser.add_argument("--pairs", nargs="+", default=["rotate", "permute"])
  parser.add_argument("--out", default="outputs/drift_budget.json")
  args = parser.parse_args()

  report = {}
  for pair in args.pairs:
    runs = [run_pair(pair, seed, args.steps, args.budgets, args.lr,
                     args.probe)
            for seed in range(args.seeds)]
    mean = {m: {k: float(np.mean([r[m][k] for r in runs]))
                for k in runs[0][m]
                if k not in ("budget", "probe_drift_per_step")}
            for m in runs[0]}
    report[pair] = {"seeds": runs, "mean": mean}
    plain = mean["adamw"]["new_accuracy"]
    print(f"\n{pair}: means over {args.seeds} seeds, {args.steps} steps per "
          "task")
    print("| method | probe drift | A drift | A loss rise | A acc | B acc "
          "| B / AdamW | multiplier |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in mean.items():
      print(f"| {name} | {m['probe_drift']:.3f} | {m['old_drift']:.3f} | "
            f"{m['old_loss_rise']:+.3f} | {m['old_accuracy']:.3f} | "
            f"{m['new_accuracy']:.3f} | {m['new_accuracy'] / plain:.3f} | "
            f"{m['multiplier']:.3g} |")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"args": vars(args), "pairs": report}))
  plot(report, args.budgets, out.with_suffix(".png"))
  print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
  main()
