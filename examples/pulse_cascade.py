"""Pulse-Split-Cascade in the latent space of a digits autoencoder.

Trains a small Flax NNX autoencoder on scikit-learn's handwritten digits
(64 pixels -> 8 latent dimensions -> 64 pixels). Then runs the
Pulse-Split-Cascade from the latent codes of test digits (one lineage per
prompt): a pulse evolves by a decoder-encoder round trip
(``z <- (z + enc(dec(z))) / 2``, a pull toward what the autoencoder can
draw), and is measured by an emergence field on its decoded image
(coherence of the image, novelty against the images the cascade already let
emerge, resonance with their centroid). After a cascade step the
emergent pulse's image is observed by the field, so novelty rewards what
has not emerged yet. The whole run (cascade + field) is one ``lax.scan``.

What keeps the cascade exploring (with the original's settings,
``--remember every --history 16 --max-pulses 48 --max-generations 10``,
it stops splitting after about ten steps): the field remembers a pulse
only when it newly emerges and only the last two (``--remember new
--history 2``), so a pulse's novelty recovers once others have emerged;
slots are never reused and every split adds a generation, so the capacity
and the generation cap are raised (``--max-pulses 256 --max-generations
1000``). The cascade's rules themselves are the original's.

Prints the cascade's statistics and lineages, and saves the emergent pulse
decoded next to its prompt, plus a lineage / flow plot of the run.

Run:  python examples/pulse_cascade.py [--epochs 40] [--steps 30] [--seed 0]
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
from sal_jax import contrib

STATUS_NAMES = [s.name.lower() for s in contrib.PulseStatus]


class AutoEncoder(nnx.Module):
  """64 -> 64 -> latent -> 64 -> 64 (sigmoid pixels)."""

  def __init__(self, latent: int, rngs: nnx.Rngs):
    self.enc1 = nnx.Linear(64, 64, rngs=rngs)
    self.enc2 = nnx.Linear(64, latent, rngs=rngs)
    self.dec1 = nnx.Linear(latent, 64, rngs=rngs)
    self.dec2 = nnx.Linear(64, 64, rngs=rngs)

  def encode(self, x):
    return self.enc2(nnx.relu(self.enc1(x)))

  def decode(self, z):
    return nnx.sigmoid(self.dec2(nnx.relu(self.dec1(z))))

  def __call__(self, x):
    return self.decode(self.encode(x))


@nnx.jit
def train_step(model, optimizer, x):
  def loss_fn(model):
    return jnp.mean(jnp.square(model(x) - x))

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def train_autoencoder(args, x_tr, progress):
  model = AutoEncoder(args.latent, nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
  rng = np.random.default_rng(args.seed)
  steps = len(x_tr) // args.batch_size
  for _ in range(args.epochs):
    order = rng.permutation(len(x_tr))
    for b in range(steps):
      loss = train_step(model, optimizer,
                        x_tr[order[b * args.batch_size:
                                   (b + 1) * args.batch_size]])
      progress.update(1)
    progress.set_postfix(mse=f"{float(loss):.4f}")
  return model


def make_cascade(model, args):
  """The jitted cascade run: (state, field, keys) -> finals and history."""
  graphdef, params = nnx.split(model)

  def encode(z):
    return nnx.merge(graphdef, params).encode(z)

  def decode(z):
    return nnx.merge(graphdef, params).decode(z)

  def evolve(z):
    return 0.5 * z + 0.5 * encode(decode(z))

  def one_step(carry, key):
    state, field, last = carry

    def measure(z):
      report, _ = sal.emergence.observe(field, decode(z))  # a look, no update
      return report.coherence, report.novelty, report.resonance

    state = contrib.cascade_step(
        state, key, evolve, measure, max_generations=args.max_generations,
        merge_threshold=args.merge_threshold, noise_scale=args.noise)
    slot, state = contrib.emerge(state)
    _, seen = sal.emergence.observe(field, decode(state.embeddings[slot]))
    # "new": the field remembers a pulse only when it first emerges, so a
    # pulse that stays emergent does not shrink the field's spread to zero.
    remember = (slot != last) if args.remember == "new" else True
    field = jax.tree.map(lambda a, b: jnp.where(remember, a, b), seen, field)
    record = dict(status=state.status, viable=contrib.viable_pulses(state),
                  fitness=contrib.pulse_fitness(state.coherence,
                                                state.novelty,
                                                state.resonance),
                  emergent=slot, spread=field.variance,
                  splits=state.total_created, merges=state.total_merges)
    return (state, field, slot), record

  @jax.jit
  def run(state, field, keys):
    (state, field, _), history = jax.lax.scan(
        one_step, (state, field, jnp.int32(-1)), keys)
    return (state, field), history

  return run, jax.jit(encode), jax.jit(decode)


def plot(history, final, prompts, images, lineages, emergent, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  status = np.asarray(history["status"])  # (steps, P)
  steps = status.shape[0]
  birth = np.asarray(final.birth_step)
  parent = np.asarray(final.parent)
  root = np.asarray(final.root)
  merged_into = np.asarray(final.merged_into)
  used = np.flatnonzero(np.asarray(final.status) != 0)
  roots = [int(r) for r in np.unique(root[used])]
  colors = plt.cm.tab10(np.arange(10))
  lineage_color = {r: colors[i % 10] for i, r in enumerate(roots)}

  fig = plt.figure(figsize=(15, 8.5))
  grid = fig.add_gridspec(3, 4 + len(prompts), height_ratios=[1, 2.2, 1.1])
  panels = [(f"prompt {i + 1} (lineage {r})", prompts[i])
            for i, r in enumerate(roots)]
  panels.append((f"emergent: pulse {emergent}\n(lineage {root[emergent]}, "
                 f"gen {int(final.generation[emergent])})",
                 images["emergent"]))
  for r in roots:
    b = int(lineages.best_index[r])
    panels.append((f"best of lineage {r}: pulse {b}", images[f"best{r}"]))
  for k, (title, img) in enumerate(panels[:grid.ncols]):
    ax = fig.add_subplot(grid[0, k])
    ax.imshow(np.asarray(img).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")

  ax = fig.add_subplot(grid[1, :])
  # A pulse's row is its slot; its bar runs from its birth to the step that
  # ended its active life (split, merged or expired), or to the end.
  step_no = np.arange(1, steps + 1)
  viable_hist = np.asarray(history["viable"])
  for i in used:
    ended = np.flatnonzero((status[:, i] != 1) & (step_no >= birth[i]))
    end = step_no[ended[0]] if ended.size else steps
    color = lineage_color[int(root[i])]
    viable = np.flatnonzero(viable_hist[:, i])
    last_viable = step_no[viable[-1]] if viable.size else birth[i]
    ax.plot([birth[i], last_viable], [i, i], lw=2.5, color=color,
            solid_capstyle="butt")
    if end > last_viable:  # Active but not viable: frozen, drawn thin.
      ax.plot([last_viable, end], [i, i], lw=0.8, color=color)
    ax.plot(birth[i], i, "o", ms=3, color=color)
    if parent[i] >= 0:
      ax.plot([birth[i], birth[i]], [parent[i], i], lw=0.6, color="0.6")
    if merged_into[i] >= 0:
      when = np.flatnonzero(status[:, i] == 3)[0] + 1
      ax.annotate("", xy=(when, merged_into[i]), xytext=(when, i),
                  arrowprops=dict(arrowstyle="->", color="crimson", lw=0.8))
    expired = np.flatnonzero(status[:, i] == 5)
    if expired.size:
      ax.plot(expired[0] + 1, i, "kx", ms=6)
  emergent_trace = np.asarray(history["emergent"])
  ax.plot(np.arange(1, steps + 1), emergent_trace, "*", color="gold",
          mec="k", mew=0.4, ms=8, label="emergent pulse at each step")
  ax.plot([], [], color="0.6", lw=0.6, label="split (parent -> child)")
  ax.plot([], [], color="crimson", lw=0.8, label="merge (into the arrow's "
          "head)")
  ax.plot([], [], "kx", label="expired")
  for r in roots:
    ax.plot([], [], color=lineage_color[r], lw=2.5,
            label=f"lineage {r}")
  ax.set(xlabel="cascade step", ylabel="pulse slot",
         title="lineage flow: a bar is the active life of a pulse (dot = birth; "
         "thick while viable, thin while active but not viable)",
         xlim=(-0.5, steps + 0.5))
  ax.legend(fontsize=7, loc="upper left", ncol=2)

  ax = fig.add_subplot(grid[2, :])
  x = np.arange(1, steps + 1)
  ax.plot(x, np.asarray(history["viable"]).sum(1), label="viable")
  for code in (1, 2, 3, 5):
    ax.plot(x, (status == code).sum(1), label=STATUS_NAMES[code])
  ax.set(xlabel="cascade step", ylabel="pulses", xlim=(0.5, steps + 0.5))
  ax.legend(fontsize=7, ncol=5, loc="upper left")
  # Free slots on their own axis: the capacity can dwarf the population.
  free_ax = ax.twinx()
  free_ax.plot(x, (status == 0).sum(1), "--", color="0.5")
  free_ax.set_ylabel("free slots (dashed)", color="0.5")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def save_pair(prompt, emergent_img, slot, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(4.4, 2.4))
  for ax, img, title in zip(axes, (prompt, emergent_img),
                            ("prompt", f"emergent pulse {slot}")):
    ax.imshow(np.asarray(img).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _last(counts):
  hit = np.flatnonzero(counts)
  return int(hit[-1]) + 1 if hit.size else None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--latent", type=int, default=8)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--prompts", default="3,7",
                      help="digit classes of the prompts (one lineage each)")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--max-pulses", type=int, default=256)
  parser.add_argument("--max-generations", type=int, default=1000)
  parser.add_argument("--merge-threshold", type=float, default=0.8)
  parser.add_argument("--noise", type=float, default=1.0,
                      help="children's latent noise scale (latent std ~1.7)")
  parser.add_argument("--history", type=int, default=2)
  parser.add_argument("--remember", choices=("every", "new"), default="new",
                      help="the field observes the emergent pulse every step "
                      "or only when a new pulse emerges")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="outputs")
  args = parser.parse_args()

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_tr, x_te, _, y_te = train_test_split(
      x, y, test_size=0.3, random_state=args.seed, stratify=y)
  classes = [int(c) for c in args.prompts.split(",")]
  prompts = np.stack([x_te[np.flatnonzero(y_te == c)[0]] for c in classes])

  t0 = time.perf_counter()
  train_steps = (len(x_tr) // args.batch_size) * args.epochs
  with tqdm(total=train_steps + args.steps, desc="autoencoder + cascade",
            unit="step") as progress:
    model = train_autoencoder(args, x_tr, progress)
    run, encode, decode = make_cascade(model, args)
    state = contrib.cascade_init(encode(jnp.asarray(prompts)),
                                 args.max_pulses)
    field = sal.emergence.emergence_init(64, args.history)
    keys = jax.random.split(jax.random.key(args.seed), args.steps)
    progress.set_postfix_str("cascade (one compiled scan)")
    (final, field), history = run(state, field, keys)
    jax.block_until_ready(final)
    progress.update(args.steps)
  elapsed = time.perf_counter() - t0
  test_mse = float(jnp.mean(jnp.square(model(x_te) - x_te)))

  slot, final = contrib.emerge(final)
  slot = int(slot)
  stats = {k: int(v) for k, v in contrib.cascade_statistics(final).items()}
  lineages = contrib.cascade_lineages(final)
  best = int(contrib.best_lineage(final))
  print(f"\nAutoencoder test MSE {test_mse:.4f}; cascade of {args.steps} "
        f"steps from prompts {classes}; wall time {elapsed:.1f} s")
  print("statistics: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
  splits = np.diff(np.asarray(history["splits"]), prepend=len(classes)) // 2
  merges = np.diff(np.asarray(history["merges"]), prepend=0)
  thirds = np.array_split(np.arange(args.steps), 3)
  print("splits / merges per third of the run: " + ", ".join(
      f"steps {t[0] + 1}-{t[-1] + 1}: {int(splits[t].sum())} / "
      f"{int(merges[t].sum())}" for t in thirds if t.size))
  print(f"last step with a split: {_last(splits)}, with a merge: "
        f"{_last(merges)}; field spread at the end "
        f"{float(history['spread'][-1]):.2e}")
  print("| lineage (root) | prompt | members | active | generations | "
        "best pulse | best fitness | overall fitness |")
  print("|---|---|---|---|---|---|---|---|")
  roots = np.flatnonzero(np.asarray(lineages.is_lineage))
  for k, r in enumerate(roots):
    mark = " (best)" if r == best else ""
    print(f"| {r}{mark} | {classes[k]} | {int(lineages.num_members[r])} | "
          f"{int(lineages.num_active[r])} | "
          f"{int(lineages.total_generations[r])} | "
          f"{int(lineages.best_index[r])} | "
          f"{float(lineages.best_fitness[r]):.3f} | "
          f"{float(lineages.overall_fitness[r]):.3f} |")
  c, n, r = (float(a[slot]) for a in (final.coherence, final.novelty,
                                      final.resonance))
  root = int(final.root[slot])
  print(f"emergent pulse: slot {slot}, lineage {root}, generation "
        f"{int(final.generation[slot])}, status "
        f"{STATUS_NAMES[int(final.status[slot])]}, c={c:.3f} n={n:.3f} "
        f"r={r:.3f}, fitness {c * (n + r) / 2:.3f}")

  images = {"emergent": decode(final.embeddings[slot])}
  for rt in roots:
    images[f"best{rt}"] = decode(final.embeddings[int(
        lineages.best_index[rt])])
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  pair_path = out / "pulse_cascade_emergent.png"
  prompt_of_root = {int(rt): prompts[k] for k, rt in enumerate(roots)}
  save_pair(prompt_of_root[root], images["emergent"], slot, pair_path)
  print(f"emergent pulse image written to {os.fspath(pair_path)}")
  path = out / "pulse_cascade.png"
  plot(history, final, prompts, images, lineages, slot, path)
  print(f"plot written to {os.fspath(path)}")


if __name__ == "__main__":
  main()
