"""Checkpoint / resume with orbax: SAL's state survives a restart bit for bit.

A first process trains ``STEPS`` steps without interruption and saves the
params and the optimizer state (with ``sal.protect`` inside) with
orbax-checkpoint after ``SAVE_AT`` steps. A second, fresh process restores
that checkpoint and trains the remaining steps. On CPU both must end with
exactly the same bits in every param and every optimizer-state leaf. Two
setups: plain optax on a dict of params (``protect()`` + AdamW), and a Flax
NNX model with ``nnx.Optimizer`` (element granularity, ``preserve_rms``,
bf16 SAL state), and the shift-consolidation estimator (bool, int and
float state, with its restoring pull).

The same file is the script the test runs in its subprocesses::

  python tests/test_checkpoint.py train  --ckpt DIR --out FILE
  python tests/test_checkpoint.py resume --ckpt DIR --out FILE
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

STEPS = 8
SAVE_AT = 3
SETUPS = ("optax", "nnx", "optax_shift")
ROOT = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# The training runs (imported only in the subprocesses).


def _optax_setup(estimator=None):
  import jax
  import jax.numpy as jnp
  import optax

  import sal_jax as sal

  if estimator is None:
    tx = optax.chain(sal.protect(), optax.adamw(1e-2))
  else:
    tx = optax.chain(sal.protect(estimator=estimator(sal), gate="none",
                                 restore=1.0), optax.adamw(1e-2))

  def init():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (8, 16)) * 0.3,
              "b1": jnp.zeros(16),
              "w2": jax.random.normal(k2, (16, 4)) * 0.3}
    return {"params": params, "opt_state": tx.init(params)}

  @jax.jit
  def step(state, x, y):
    def loss_fn(p):
      logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean()
    grads = jax.grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"],
                                   state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}

  def fresh_sal(state):
    """The state with SAL's part re-initialised (for the self-check)."""
    fresh = tx.init(state["params"])
    return {"params": state["params"],
            "opt_state": (fresh[0],) + tuple(state["opt_state"][1:])}

  return init, step, fresh_sal


def _nnx_setup():
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import sal_jax as sal

  class MLP(nnx.Module):

    def __init__(self, rngs):
      self.l1 = nnx.Linear(8, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  tx = optax.chain(
      sal.protect(gate="soft", granularity="element", preserve_rms=True,
                  state_dtype=jnp.bfloat16),
      optax.adamw(1e-2))

  def build():
    model = MLP(nnx.Rngs(0))
    return {"model": model,
            "optimizer": nnx.Optimizer(model, tx, wrt=nnx.Param)}

  graphdef = nnx.graphdef(build())

  def init():
    return nnx.state(build())

  @jax.jit
  def step(state, x, y):
    objs = nnx.merge(graphdef, state)

    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(
          m(x), y).mean()
    grads = nnx.grad(loss_fn)(objs["model"])
    objs["optimizer"].update(objs["model"], grads)
    return nnx.state(objs)

  def fresh_sal(state):
    """The state with SAL's part re-initialised (for the self-check)."""
    fresh = init()
    out = jax.tree.map(lambda a: a, state)
    out["optimizer"]["opt_state"][0] = fresh["optimizer"]["opt_state"][0]
    return out

  return init, step, fresh_sal


def _setup(name):
  if name == "optax_shift":
    # A hair-trigger detector, so that the short run consolidates.
    return _optax_setup(lambda sal: sal.shift_consolidation_estimator(
        "element", shift_ratio=1.01, release_ratio=1.0, warmup_steps=0))
  return {"optax": _optax_setup, "nnx": _nnx_setup}[name]()


def _batch(i):
  import jax
  kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(42), i))
  return jax.random.normal(kx, (16, 8)), jax.random.randint(ky, (16,), 0, 4)


def _snapshot(state):
  """{path: (dtype, shape, raw bytes)} of every leaf."""
  import jax
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    a = np.asarray(leaf)
    out[jax.tree_util.keystr(path)] = (str(a.dtype), a.shape, a.tobytes())
  return out


def _run(mode, ckpt_dir, out_file):
  import jax
  import orbax.checkpoint as ocp

  ckpt_dir = pathlib.Path(ckpt_dir).resolve()
  checkpointer = ocp.StandardCheckpointer()
  results = {}
  for name in SETUPS:
    init, step, fresh_sal = _setup(name)
    path = ckpt_dir / name
    if mode == "train":
      state = init()
      for i in range(STEPS):
        if i == SAVE_AT:
          checkpointer.save(path, state)
          checkpointer.wait_until_finished()
          results[name + "@save"] = _snapshot(state)
        state = step(state, *_batch(i))
      results[name] = _snapshot(state)
    else:
      # Restore into the structure (and dtypes) of a freshly built state.
      abstract = jax.eval_shape(init)
      state = checkpointer.restore(path, abstract)
      results[name + "@save"] = _snapshot(state)
      fresh = fresh_sal(state)
      for i in range(SAVE_AT, STEPS):
        state = step(state, *_batch(i))
        fresh = step(fresh, *_batch(i))
      results[name] = _snapshot(state)
      results[name + "@fresh_sal"] = _snapshot(fresh)
  with open(out_file, "wb") as f:
    pickle.dump(results, f)


# --------------------------------------------------------------------------
# The test.


def _spawn(mode, ckpt_dir, out_file):
  proc = subprocess.run(
      [sys.executable, __file__, mode, "--ckpt", str(ckpt_dir), "--out",
       str(out_file)], capture_output=True, text=True, timeout=240,
      cwd=ROOT)
  assert proc.returncode == 0, (
      f"{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  with open(out_file, "rb") as f:
    return pickle.load(f)


def _differences(a, b):
  assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
  return [k for k in a if a[k] != b[k]]


@pytest.mark.slow  # two training runs in fresh processes
def test_resume_in_a_fresh_process_is_bit_exact(tmp_path):
  trained = _spawn("train", tmp_path / "ckpt", tmp_path / "train.pkl")
  resumed = _spawn("resume", tmp_path / "ckpt", tmp_path / "resume.pkl")
  for name in SETUPS:
    saved, restored = trained[name + "@save"], resumed[name + "@save"]
    # dtypes and shapes come back as they were (e.g. bf16 scores, int32
    # counts), and so do the values.
    assert not _differences(saved, restored), (
        f"{name}: restored checkpoint differs at "
        f"{_differences(saved, restored)}")
    assert any("ProtectState" in k or "scores" in k
               or "estimator_state" in k for k in saved), (
        f"{name}: no SAL state in the checkpoint: {list(saved)[:10]}")
    diff = _differences(trained[name], resumed[name])
    assert not diff, f"{name}: resumed run differs from the uninterrupted " \
        f"one at {diff}"
    # Self-check: the comparison sees SAL's state. Resuming with a fresh
    # SAL state (params and AdamW restored) ends elsewhere.
    assert _differences(trained[name], resumed[name + "@fresh_sal"]), (
        f"{name}: resuming without SAL's state gave the same bits")


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=("train", "resume"))
  parser.add_argument("--ckpt", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  _run(args.mode, args.ckpt, args.out)
