"""SAL on many devices: data-parallel ``pmap`` and sharded ``jit``.

Runs on 8 simulated CPU devices (the script sets
``--xla_force_host_platform_device_count=8`` before importing jax; on a
machine with 8 accelerators, drop that line). A small MLP classifier on
synthetic data is trained three ways, and each way is checked against a
plain single-device run:

1. ``jax.pmap``: every device gets 1/8 of the batch and computes its own
   gradients; ``sal.protect(axis_name="batch")`` takes its statistics
   (energies, norms, threshold) on the cross-device mean, so the SAL state
   stays the same on every replica, and the updates are averaged before
   AdamW.
2. ``jax.jit`` over a 2x4 ``Mesh``: the weight matrices are sharded with
   ``NamedSharding`` (the batch over ``data``); SAL's per-element state (the
   default estimator's anchor, and per element its importances and the
   scores) is sharded like the params, its per-leaf scalars are replicated,
   and no whole parameter is gathered.

Run:  python examples/multi_device.py [--steps 20]   (about 30 s on 2 cores)
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import sal_jax as sal  # noqa: E402

D_IN, D_HIDDEN, D_OUT = 32, 64, 10
BATCH = 128  # global batch: 16 per device


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {
      "w1": jax.random.normal(k1, (D_IN, D_HIDDEN)) / np.sqrt(D_IN),
      "b1": jnp.zeros((D_HIDDEN,)),
      "w2": jax.random.normal(k2, (D_HIDDEN, D_OUT)) / np.sqrt(D_HIDDEN),
      "b2": jnp.zeros((D_OUT,)),
  }


def loss_fn(params, x, y):
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_batches(steps, seed=0):
  """Inputs labelled by a random linear teacher, a new batch per step; the
  teacher and the input scale change halfway (a new task, for SAL to
  detect)."""
  key = jax.random.key(seed)
  teachers = jax.random.normal(key, (2, D_IN, D_OUT))
  out = []
  for i in range(steps):
    task = int(i >= steps // 2)
    x = (1.0 + 2.0 * task) * jax.random.normal(
        jax.random.fold_in(key, i), (BATCH, D_IN))
    out.append((x, jnp.argmax(x @ teachers[task], axis=1)))
  return out


def make_tx(axis_name=None, granularity=None):
  stages = [sal.protect(axis_name=axis_name, granularity=granularity)]
  if axis_name is not None:
    # Average the (per-device) gated updates before the optimizer.
    stages.append(optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (
            jax.lax.pmean(updates, axis_name), state)))
  stages.append(optax.adamw(3e-3))
  return optax.chain(*stages)


def train_single(batches, granularity=None):
  tx = make_tx(granularity=granularity)

  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = init_params(jax.random.key(1))
  opt_state = tx.init(params)
  for x, y in batches:
    params, opt_state = step(params, opt_state, x, y)
  return params, opt_state


def max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check(ok, what):
  print(f"  [{'ok' if ok else 'FAILED'}] {what}")
  if not ok:
    raise SystemExit(f"check failed: {what}")


# --------------------------------------------------------------------------


def demo_pmap(batches):
  n = jax.device_count()
  print(f"\n1. pmap: {n} replicas x {BATCH // n} examples, "
        "protect(axis_name='batch')")
  tx = make_tx(axis_name="batch")

  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)  # this device's gradients
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  pstep = jax.pmap(step, axis_name="batch")
  params = init_params(jax.random.key(1))
  # A leading device axis on everything: pmap splits it over the devices.
  replicate = lambda t: jax.tree.map(
      lambda a: jnp.broadcast_to(a, (n,) + jnp.shape(a)), t)
  p_params, p_state = replicate(params), replicate(tx.init(params))
  split = lambda a: a.reshape((n, -1) + a.shape[1:])
  for x, y in batches:
    p_params, p_state = pstep(p_params, p_state, split(x), split(y))

  identical = all(bool(jnp.all(leaf == leaf[0]))
                  for leaf in jax.tree.leaves((p_params, p_state)))
  check(identical, f"params and optimizer state bitwise identical on all {n}"
        f" replicas after {len(batches)} steps")
  ref_params, ref_state = train_single(batches)
  first = lambda t: jax.tree.map(lambda a: a[0], t)
  d_params = max_diff(first(p_params), ref_params)
  check(d_params < 1e-4, f"equals one device on the whole {BATCH}-example "
        f"batch: max |diff| params {d_params:.1e}")
  m = sal.metrics(first(p_state))
  print(f"     SAL: {int(m['step'])} steps, shifts detected: "
        f"{int(m['consolidations'])}")


def describe(sharding):
  if isinstance(sharding, NamedSharding):
    return f"P{tuple(sharding.spec)}"
  return "replicated" if sharding.is_fully_replicated else str(sharding)


def demo_sharding(batches, granularity):
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  specs = {"w1": P("data", "model"), "b1": P("model"),
           "w2": P("model", "data"), "b2": P()}
  print(f"\n{2 if granularity == 'leaf' else 3}. jit on a 2x4 Mesh "
        f"{dict(mesh.shape)}, "
        f"granularity={granularity!r}")
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  batch_sharding = NamedSharding(mesh, P("data"))
  tx = make_tx(granularity=granularity)

  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = jax.device_put(init_params(jax.random.key(1)), shardings)
  opt_state = tx.init(params)
  put = lambda x, y: (jax.device_put(x, batch_sharding),
                      jax.device_put(y, batch_sharding))
  compiled = jax.jit(step).lower(params, opt_state,
                                 *put(*batches[0])).compile()
  for x, y in batches:
    params, opt_state = compiled(params, opt_state, *put(x, y))

  sal_state = sal.find_protect_states(opt_state)[0]
  est = sal_state.estimator_state
  print(f"     {'param':<6}{'param sharding':<22}{'anchor':<22}"
        f"{'importance':<22}{'consolidated':<22}")
  for k in specs:
    print(f"     {k:<6}{describe(params[k].sharding):<22}"
          f"{describe(est.anchor[k].sharding):<22}"
          f"{describe(est.importance[k].sharding):<22}"
          f"{describe(est.consolidated[k].sharding):<22}")
  # Every state leaf shaped like its param (anchor; per element also the
  # importances) must be sharded like it.
  per_element = [
      (leaf, params[k]) for tree in (est.anchor, est.importance,
                                     est.consolidated)
      for k, leaf in tree.items() if leaf.shape == params[k].shape]
  like = all(leaf.sharding.is_equivalent_to(p.sharding, p.ndim)
             for leaf, p in per_element)
  check(like, f"{len(per_element)} per-element SAL state leaves sharded "
        "like their params")
  scalars = [x for x in jax.tree.leaves(sal_state) if x.ndim == 0]
  check(all(x.sharding.is_fully_replicated for x in scalars),
        f"{len(scalars)} scalar state leaves replicated")

  ref_params, _ = train_single(batches, granularity)
  d = max_diff(params, ref_params)
  check(d < 1e-4, f"equals the unsharded run: max |diff| params {d:.1e}")

  hlo = compiled.as_text()
  whole = {tuple(p.shape) for p in jax.tree.leaves(params)}
  gathered = [tuple(int(v) for v in m.group(1).split(",") if v)
              for m in re.finditer(r"= [a-z0-9]+\[([0-9,]*)\][^=]*? "
                                   r"all-gather(?:-start)?\(", hlo)]
  n_whole = sum(s in whole or s[::-1] in whole for s in gathered)
  check(n_whole == 0, f"compiled step gathers no whole parameter "
        f"({len(gathered)} partial all-gathers in the forward pass: "
        f"{sorted(set(gathered))})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  start = time.perf_counter()
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}")
  batches = make_batches(args.steps)
  demo_pmap(batches)
  demo_sharding(batches, "leaf")
  demo_sharding(batches, "element")
  print(f"\nall checks passed in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
