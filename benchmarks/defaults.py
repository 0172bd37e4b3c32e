"""``protect()`` at its defaults, on protocols it was never tuned on.

What a new user does: ``optax.chain(sal.protect(), optimizer)`` and nothing
else, in plain JAX. This script measures what that buys against the
optimizer alone (*plain*) and against training on all tasks at once
(*joint*, the usual upper reference), on protocols that are not among
``continual.py``'s (whose validation runs chose the defaults):

* ``rotated_digits``: scikit-learn's digits rotated by 0, 90, 180 and 270
  degrees, 4 tasks, one shared 10-way head (domain-incremental);
* ``block_digits``: the digits with their sixteen 2x2 pixel blocks in a
  fixed random order per task (local structure kept), 4 tasks, shared head;
* ``permuted_mnist1d``: MNIST-1D's 40 inputs under a fixed permutation per
  task, 4 tasks, shared 10-way head;
* ``split_mnist1d_task``: MNIST-1D's class pairs 0/1, ..., 8/9,
  task-incremental (the logits masked to the task's two classes).

Each task is trained for a fixed number of steps (batch 32, an MLP with two
hidden layers of 64), by ``adamw(1e-3)`` and by ``sgd(1e-2, momentum=0.9)``
at optax's defaults otherwise; joint training runs as many steps on batches
drawn from every task. Reported on the test splits, mean over seeds:
average final accuracy, plasticity (each task's accuracy right after it was
trained), and the share of the plain-to-joint gap that ``protect()``
closes, ``(A_protect - A_plain) / (A_joint - A_plain)``.

  python benchmarks/defaults.py [--quick] [--seeds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import sal_jax as sal

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import cl_protocols  # pylint: disable=g-import-not-at-top,wrong-import-position

PROTOCOLS = ("rotated_digits", "block_digits", "permuted_mnist1d",
             "split_mnist1d_task")
OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-3),
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
}
STEPS_PER_TASK = {"rotated_digits": 400, "block_digits": 400,
                  "permuted_mnist1d": 3000, "split_mnist1d_task": 400}
BATCH = 32
HIDDEN = (64, 64)
PERMUTATION_SEED = 17  # not one of continual.py's


def _rotations(x):
  images = x.reshape(-1, 8, 8)
  return [np.rot90(images, k, axes=(1, 2)).reshape(-1, 64) for k in range(4)]


def _block_orders(num_tasks):
  rng = np.random.default_rng(PERMUTATION_SEED)
  # Pixel indices of each 2x2 block, blocks in row-major order.
  blocks = np.arange(64).reshape(4, 2, 4, 2).transpose(0, 2, 1, 3).reshape(
      16, 4)
  orders = [np.arange(16)] + [rng.permutation(16)
                              for _ in range(num_tasks - 1)]
  # The pixel that lands at each output position.
  return [blocks[order].reshape(4, 4, 2, 2).transpose(0, 2, 1, 3).reshape(64)
          for order in orders]


def build(name: str) -> dict:
  """Tasks of ``name``: per task train / test ``(x, y)`` and a class mask."""
  all_classes = np.ones(10, bool)
  if name in ("rotated_digits", "block_digits"):
    x_tr, y_tr, _, _, x_te, y_te = cl_protocols._digits()  # pylint: disable=protected-access
    if name == "rotated_digits":
      views = list(zip(_rotations(x_tr), _rotations(x_te)))
    else:
      views = [(x_tr[:, p], x_te[:, p]) for p in _block_orders(4)]
    return {"tasks": [dict(train=(a, y_tr), test=(b, y_te), mask=all_classes)
                      for a, b in views]}
  x_tr, y_tr, _, _, x_te, y_te = cl_protocols._mnist1d()  # pylint: disable=protected-access
  if name == "permuted_mnist1d":
    rng = np.random.default_rng(PERMUTATION_SEED)
    perms = [np.arange(40)] + [rng.permutation(40) for _ in range(3)]
    return {"tasks": [dict(train=(x_tr[:, p], y_tr), test=(x_te[:, p], y_te),
                           mask=all_classes) for p in perms]}
  tasks = []
  for pair in cl_protocols.DIGIT_PAIRS:
    mask = np.isin(np.arange(10), pair)
    tr, te = np.isin(y_tr, pair), np.isin(y_te, pair)
    tasks.append(dict(train=(x_tr[tr], y_tr[tr]), test=(x_te[te], y_te[te]),
                      mask=mask))
  return {"tasks": tasks}


def _init(key, sizes):
  params = []
  for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1),
                              zip(sizes[:-1], sizes[1:])):
    params.append({"w": jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(
        2.0 / n_in), "b": jnp.zeros(n_out)})
  return params


def _log_probs(params, x, mask):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  logits = x @ params[-1]["w"] + params[-1]["b"]
  return jax.nn.log_softmax(jnp.where(mask, logits, -1e9))


def _loss(params, x, y, mask):
  logp = _log_probs(params, x, mask)
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def _trainer(tx):
  """A jitted run of ``tx`` over batches ``[S, B, ...]`` (one compile)."""

  @jax.jit
  def train(params, state, xs, ys, masks):
    def step(carry, batch):
      params, state = carry
      grads = jax.grad(_loss)(params, *batch)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    (params, state), _ = jax.lax.scan(step, (params, state), (xs, ys, masks))
    return params, state

  return train


@jax.jit
def _accuracy(params, x, y, mask):
  return jnp.mean(jnp.argmax(_log_probs(params, x, mask), -1) == y)


def _batches(rng, tasks, which, steps):
  """``steps`` batches drawn from the tasks listed in ``which`` (per row)."""
  picks = rng.choice(which, size=(steps, BATCH))
  xs = np.empty((steps, BATCH, tasks[0]["train"][0].shape[1]), np.float32)
  ys = np.empty((steps, BATCH), np.int32)
  masks = np.empty((steps, BATCH, 10), bool)
  for t in set(np.ravel(picks).tolist()):
    x, y = tasks[t]["train"]
    hit = picks == t
    rows = rng.integers(0, len(y), hit.sum())
    xs[hit], ys[hit], masks[hit] = x[rows], y[rows], tasks[t]["mask"]
  return xs, ys, masks


@functools.lru_cache(maxsize=None)
def _method(optimizer, method):
  """The transformation and its jitted trainer, built once per method."""
  tx = OPTIMIZERS[optimizer]()
  if method == "protect":
    tx = optax.chain(sal.protect(), tx)
  return tx, _trainer(tx)


def run(name, optimizer, method, seed, steps, tasks):
  """Accuracy matrix ``R[i, j]``: task ``j`` after training task ``i``
  (joint: one row, after training on all)."""
  tx, train = _method(optimizer, method)
  sizes = (tasks[0]["train"][0].shape[1], *HIDDEN, 10)
  params = _init(jax.random.key(seed), sizes)
  state = tx.init(params)
  rng = np.random.default_rng(1000 * seed + PROTOCOLS.index(name))

  def accuracies(params):
    return [float(_accuracy(params, *t["test"], t["mask"])) for t in tasks]

  if method == "joint":
    batches = _batches(rng, tasks, list(range(len(tasks))),
                       steps * len(tasks))
    params, _ = train(params, state, *batches)
    return np.array([accuracies(params)])
  rows = []
  for t in range(len(tasks)):
    params, state = train(params, state, *_batches(rng, tasks, [t], steps))
    rows.append(accuracies(params))
  return np.array(rows)


def summarise(results: dict) -> dict:
  """Per protocol and optimizer: means over seeds and the gap closed."""
  out = {}
  for key, per_method in results.items():
    final = {m: float(np.mean([r[-1].mean() for r in runs]))
             for m, runs in per_method.items()}
    plasticity = {m: float(np.mean([np.diag(r).mean() for r in runs]))
                  for m, runs in per_method.items() if m != "joint"}
    gap = final["joint"] - final["plain"]
    out[key] = {
        "average_accuracy": final, "plasticity": plasticity,
        "gap_closed": (final["protect"] - final["plain"]) / gap
                      if gap > 0 else float("nan"),
        "average_accuracy_seeds": {m: [float(r[-1].mean()) for r in runs]
                                   for m, runs in per_method.items()}}
  return out


def _percent(x) -> str:
  return f"{x:+.0%}" if np.isfinite(x) else "n/a (joint <= plain)"


def table(summary: dict) -> str:
  lines = ["| protocol | optimizer | plain | protect() | joint | gap closed "
           "| plasticity plain / protect() |", "|---|---|---|---|---|---|---|"]
  for key, s in summary.items():
    name, optimizer = key.split("/")
    a, p = s["average_accuracy"], s["plasticity"]
    lines.append(
        f"| {name} | {optimizer} | {a['plain']:.3f} | {a['protect']:.3f} | "
        f"{a['joint']:.3f} | {_percent(s['gap_closed'])} | "
        f"{p['plain']:.3f} / {p['protect']:.3f} |")
  closed = [s["gap_closed"] for s in summary.values()
            if np.isfinite(s["gap_closed"])]
  lines.append(f"\nmean gap closed: {_percent(np.mean(closed) if closed else np.nan)}"
               " (protocols where joint beats plain)")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="2 tasks, 30 steps each, 1 seed (smoke test)")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--protocols", default=",".join(PROTOCOLS))
  parser.add_argument("--out", default="outputs/defaults")
  args = parser.parse_args(argv)
  names = args.protocols.split(",")
  for name in names:
    if name not in PROTOCOLS:
      parser.error(f"unknown protocol {name!r}; choose from {PROTOCOLS}")
  seeds = 1 if args.quick else args.seeds
  t0 = time.time()
  results, jobs = {}, []
  for name in names:
    tasks = build(name)["tasks"][:2 if args.quick else None]
    steps = 30 if args.quick else STEPS_PER_TASK[name]
    for optimizer in OPTIMIZERS:
      for method in ("plain", "protect", "joint"):
        for seed in range(seeds):
          jobs.append((name, optimizer, method, seed, steps, tasks))
  for name, optimizer, method, seed, steps, tasks in tqdm(jobs, desc="runs"):
    results.setdefault(f"{name}/{optimizer}", {}).setdefault(
        method, []).append(run(name, optimizer, method, seed, steps, tasks))
  summary = summarise(results)
  text = table(summary)
  print(text)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "defaults.md").write_text(text + "\n")
  report = {"command": " ".join(["python benchmarks/defaults.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "seeds": seeds, "steps_per_task": {n: STEPS_PER_TASK[n]
                                               for n in names},
            "quick": args.quick, "seconds": time.time() - t0,
            "results": summary,
            "accuracy_matrices": {k: {m: [r.tolist() for r in runs]
                                      for m, runs in v.items()}
                                  for k, v in results.items()}}
  (out / "defaults.json").write_text(json.dumps(report, indent=1))
  return report


if __name__ == "__main__":
  main()
