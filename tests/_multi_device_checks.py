"""Multi-device checks of `sal.protect`, run on 8 simulated CPU devices.

Run by ``tests/test_multi_device.py`` in a subprocess, because the device
count must be set (``XLA_FLAGS``) before jax is imported; the pytest process
itself keeps its single device. It can also be run by hand::

  python tests/_multi_device_checks.py                 # every check
  python tests/_multi_device_checks.py pmap_leaf ...   # some checks
  python tests/_multi_device_checks.py --json out.json

Every check raises ``AssertionError`` with a message on failure; the script
prints one ``PASS name`` / ``FAIL name: why`` line per check, writes
``{name: {"ok": bool, "detail": str, "seconds": float}}`` to ``--json`` and
exits with status 1 if any check failed.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sal_jax as sal  # noqa: E402

N_DEVICES = 8
AXIS = "batch"
STEPS = 4
# Dimensions chosen so that no activation (batch 32) or transposed activation
# has the shape of a parameter: an all-gather producing a parameter shape
# really is a gathered parameter.
D_IN, D_HIDDEN, D_OUT, BATCH = 24, 40, 12, 32
TOL = dict(rtol=2e-5, atol=2e-6)

CHECKS = {}


def check(fn):
  CHECKS[fn.__name__] = fn
  return fn


# --------------------------------------------------------------------------
# A small MLP classifier.


def init_params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
      "w1": jax.random.normal(k1, (D_IN, D_HIDDEN)) / np.sqrt(D_IN),
      "b1": 0.1 * jax.random.normal(k3, (D_HIDDEN,)),
      "w2": jax.random.normal(k2, (D_HIDDEN, D_OUT)) / np.sqrt(D_HIDDEN),
      "b2": jnp.zeros((D_OUT,)),
  }


def make_data(seed=1, batch=BATCH):
  kx, ky = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, (batch, D_IN)),
          jax.random.randint(ky, (batch,), 0, D_OUT))


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def batches(steps=STEPS):
  """A different batch at every step (same for every run)."""
  return [make_data(100 + i) for i in range(steps)]


def sal_state(opt_state) -> sal.ProtectState:
  states = sal.find_protect_states(opt_state)
  assert len(states) == 1, f"expected one ProtectState, found {len(states)}"
  return states[0]


def max_abs_diff(a, b) -> float:
  diffs = jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64)
                                       - np.asarray(y, np.float64)),
                                initial=0.0)), a, b))
  return max(diffs, default=0.0)


def assert_trees_close(actual, expected, what, **tol):
  tol = tol or TOL
  flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e), f"{what}: different trees"
  for (path, a), e in zip(flat_a, flat_e):
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(e, np.float64),
        err_msg=f"{what} at {jax.tree_util.keystr(path)}", **tol)


# --------------------------------------------------------------------------
# pmap.


def pmean_updates(axis_name):
  """Averages the updates across devices (an optax stage)."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (
          jax.lax.pmean(updates, axis_name), state))


def _key(protect_kwargs):
  # The checks exercise the gate: the reference estimator unless named.
  protect_kwargs = {"estimator": "reference", **protect_kwargs}
  return tuple(sorted(protect_kwargs.items()))


@functools.lru_cache(maxsize=None)
def _single_device_run(key):
  """The reference: one device, the whole batch (cached per config; shared
  by the pmap and the sharding checks)."""
  protect_kwargs = dict(key)
  data = batches()
  tx = optax.chain(sal.protect(**protect_kwargs), optax.adamw(1e-2))

  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = init_params()
  opt_state = tx.init(params)
  for x, y in data:
    params, opt_state = step(params, opt_state, x, y)
  return params, opt_state


def single_device_run(protect_kwargs):
  return _single_device_run(_key(protect_kwargs))


def replicate(tree):
  """A leading device axis (pmap splits it over the devices)."""
  return jax.tree.map(
      lambda a: jnp.broadcast_to(a, (N_DEVICES,) + jnp.shape(a)), tree)


@functools.lru_cache(maxsize=None)
def _pmapped(key, axis_name):
  """(tx, pmapped train step): ``protect`` sees per-device gradients, its
  gated updates are then averaged across devices."""
  tx = optax.chain(sal.protect(axis_name=axis_name, **dict(key)),
                   pmean_updates(AXIS), optax.adamw(1e-2))

  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return tx, jax.pmap(step, axis_name=AXIS)


def pmap_run(protect_kwargs, data, axis_name=AXIS):
  """Per-device batches (the global batch split over the 8 devices)."""
  tx, pstep = _pmapped(_key(protect_kwargs), axis_name)
  params = init_params()
  p_params, p_state = replicate(params), replicate(tx.init(params))
  per_device = lambda a: a.reshape((N_DEVICES, -1) + a.shape[1:])
  for x, y in data:
    p_params, p_state = pstep(p_params, p_state, per_device(x),
                              per_device(y))
  return p_params, p_state


def assert_replicas_identical(tree, what):
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(leaf)
    for d in range(1, leaf.shape[0]):
      assert np.array_equal(leaf[d], leaf[0], equal_nan=True), (
          f"{what}{jax.tree_util.keystr(path)}: replica {d} differs from "
          f"replica 0 by {np.max(np.abs(leaf[d] - leaf[0]))}")


def _pmap_check(**protect_kwargs):
  params, opt_state = single_device_run(protect_kwargs)
  p_params, p_state = pmap_run(protect_kwargs, batches())
  assert_replicas_identical(p_params, "params")
  assert_replicas_identical(p_state, "opt_state")
  first = lambda t: jax.tree.map(lambda a: a[0], t)
  assert_trees_close(first(p_params), params, "params (pmap vs single)")
  assert_trees_close(first(sal_state(p_state)), sal_state(opt_state),
                     "ProtectState (pmap vs single)")
  state = sal_state(opt_state)
  # The run must have exercised the gate, or equality would prove little.
  assert float(state.mean_protection_rate) > 0.05, state.mean_protection_rate
  return (f"max |pmap - single|: params {max_abs_diff(first(p_params), params):.2e}"
          f", state {max_abs_diff(first(sal_state(p_state)), state):.2e}; "
          f"mean protection rate {float(state.mean_protection_rate):.3f}")


@check
def pmap_leaf():
  """protect(axis_name) under pmap == one device on the whole batch."""
  return _pmap_check(granularity="leaf", preserve_rms=False)


@check
def pmap_element():
  return _pmap_check(granularity="element", preserve_rms=False)


@check
def pmap_element_preserve_rms():
  return _pmap_check(granularity="element", preserve_rms=True)


@check
def pmap_without_axis_name_diverges():
  """Self-check: without axis_name the replicas' states drift apart, so the
  replica-equality assertion above can fail."""
  data = batches(2)
  _, p_state = pmap_run({}, data, axis_name=None)
  try:
    assert_replicas_identical(sal_state(p_state), "ProtectState")
  except AssertionError as e:
    return f"diverged as expected ({str(e)[:80]}...)"
  raise AssertionError("replicas stayed identical without axis_name; the "
                       "replica check cannot tell reduced from unreduced "
                       "statistics")


@check
def pmap_nonfinite_on_one_device():
  """A NaN in one device's batch: every replica keeps the same (old) state."""
  tx, pstep = _pmapped(
      _key({"granularity": "leaf", "preserve_rms": False}), AXIS)
  params = init_params()
  p_params, p_state = replicate(params), replicate(tx.init(params))
  x, y = make_data(7)
  x = x.reshape(N_DEVICES, -1, D_IN)
  y = y.reshape(N_DEVICES, -1)
  p_params, p_state = pstep(p_params, p_state, x, y)
  before = jax.tree.map(np.asarray, sal_state(p_state))
  x_bad = np.array(x)
  x_bad[3, 0, 0] = np.nan   # only device 3 sees a non-finite gradient
  _, p_state = pstep(p_params, p_state, jnp.asarray(x_bad), y)
  after = sal_state(p_state)
  assert_replicas_identical(after, "ProtectState after a NaN on device 3")
  for path, a in jax.tree_util.tree_flatten_with_path(after)[0]:
    assert np.all(np.isfinite(np.asarray(a))), (
        f"ProtectState{jax.tree_util.keystr(path)} poisoned by the NaN")
  assert_trees_close(after, before, "ProtectState (non-finite step skipped)",
                     rtol=0, atol=0)
  return "state unchanged and identical on all 8 replicas"


# --------------------------------------------------------------------------
# Sharding over a 2x4 mesh.


def make_mesh():
  return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


PARAM_SPECS = {"w1": P("data", "model"), "b1": P("model"),
               "w2": P("model", "data"), "b2": P()}


def leaf_paths(tree):
  return [(jax.tree_util.keystr(p), x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_state_sharded_like_params(opt_state, params, when):
  """Every per-element SAL state leaf is sharded like its param, every
  scalar is replicated. A state leaf belongs to the param whose path ends
  its own path (e.g. ``...previous_params['w1']`` to ``['w1']``)."""
  param_paths = leaf_paths(params)
  checked = 0
  for path, leaf in leaf_paths(sal_state(opt_state)):
    where = f"{when}: ProtectState{path}"
    if leaf.ndim == 0:
      assert leaf.sharding.is_fully_replicated, (
          f"{where} is a scalar but not replicated: {leaf.sharding}")
      continue
    if leaf.ndim == 1 and any(path.endswith(p_path) and p.ndim >= 2
                              for p_path, p in param_paths):
      continue  # a factored importance (flat, O(m + n)), placed by XLA
    owners = [p for p_path, p in param_paths
              if path.endswith(p_path) and p.shape == leaf.shape]
    if not owners and not any(path.endswith(p_path)
                              for p_path, _ in param_paths):
      # A small global statistic (e.g. an estimator's [2] energy moments).
      assert leaf.sharding.is_fully_replicated, (
          f"{where} is global but not replicated: {leaf.sharding}")
      continue
    assert len(owners) == 1, f"{where}: no param owns this state leaf"
    param = owners[0]
    assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), (
        f"{where} is sharded {leaf.sharding}, its param "
        f"{param.sharding}")
    checked += 1
  return checked


_SHAPE = r"[a-z]+[0-9]*\[([0-9,]*)\]"


def full_param_all_gathers(hlo_text, params):
  """All-gather ops in compiled HLO whose result is a whole parameter
  (its global shape, or the transpose)."""
  shapes = set()
  for p in jax.tree.leaves(params):
    if p.ndim >= 1:
      shapes.add(tuple(p.shape))
      shapes.add(tuple(reversed(p.shape)))
  found = []
  for line in hlo_text.splitlines():
    m = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
    if not m:
      continue
    for dims in re.findall(_SHAPE, m.group(1)):
      shape = tuple(int(d) for d in dims.split(",") if d)
      if shape in shapes:
        found.append(line.strip()[:160])
  return found


def collective_result_shapes(hlo_text):
  """(op, shape) of every collective's result in compiled HLO."""
  out = []
  ops = r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
  for line in hlo_text.splitlines():
    m = re.search(r"=\s*(.*?)\s+" + ops + r"(?:-start)?\(", line)
    if not m:
      continue
    for dims in re.findall(_SHAPE, m.group(1)):
      out.append((m.group(2), tuple(int(d) for d in dims.split(",") if d)))
  return out


def _sharded_setup(**protect_kwargs):
  mesh = make_mesh()
  shardings = {k: NamedSharding(mesh, s) for k, s in PARAM_SPECS.items()}
  batch_sharding = NamedSharding(mesh, P("data"))
  protect_kwargs = dict(_key(protect_kwargs))
  tx = optax.chain(sal.protect(**protect_kwargs), optax.adamw(1e-2))

  def train_step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def update_only(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return mesh, shardings, batch_sharding, tx, train_step, update_only


def _sharding_check(**protect_kwargs):
  _, shardings, batch_sharding, tx, train_step, update_only = (
      _sharded_setup(**protect_kwargs))
  data = batches()
  params = jax.device_put(init_params(), shardings)
  opt_state = tx.init(params)
  put_batch = lambda x, y: (jax.device_put(x, batch_sharding),
                            jax.device_put(y, batch_sharding))
  # Compiled once, run for every step and inspected below.
  step = jax.jit(train_step).lower(
      params, opt_state, *put_batch(*data[0])).compile()
  for x, y in data:
    params, opt_state = step(params, opt_state, *put_batch(x, y))
    n_state = assert_state_sharded_like_params(opt_state, params,
                                               "after a step")
  for k, p in params.items():
    assert p.sharding.is_equivalent_to(shardings[k], p.ndim), (
        f"param {k} lost its sharding: {p.sharding}")

  # Same steps, unsharded.
  ref_params, ref_state = single_device_run(protect_kwargs)
  assert_trees_close(params, ref_params, "params (sharded vs unsharded)")
  assert_trees_close(sal_state(opt_state), sal_state(ref_state),
                     "ProtectState (sharded vs unsharded)")

  # No whole parameter is gathered, in the train step or the update alone;
  # the update alone communicates scalars only (norms, finiteness).
  hlo_step = step.as_text()
  gathers = full_param_all_gathers(hlo_step, params)
  assert not gathers, f"train step gathers whole parameters: {gathers}"
  hlo_update = jax.jit(update_only).lower(
      params, opt_state, params).compile().as_text()
  big = [(op, s) for op, s in collective_result_shapes(hlo_update) if s]
  assert not big, f"the update moves non-scalar data between devices: {big}"
  n_coll = len(collective_result_shapes(hlo_update))
  return (f"{n_state} per-element state leaves sharded like their params; "
          f"max |sharded - unsharded| {max_abs_diff(params, ref_params):.1e};"
          f" 0 whole-param all-gathers; update collectives: {n_coll}, all "
          f"scalar")


@check
def sharding_leaf():
  """2x4 mesh: state sharded like params, equal to unsharded, no gathers."""
  return _sharding_check(granularity="leaf")


@check
def sharding_element_preserve_rms():
  return _sharding_check(granularity="element", preserve_rms=True)


@check
def sharding_shift_consolidation_element():
  """The importance estimators' per-element state (importance, anchor) is
  sharded like the params too, and the restoring pull gathers nothing."""
  return _sharding_check(estimator="shift_consolidation",
                         granularity="element", restore=1.0)


@check
def sharding_shift_consolidation_kronecker():
  """The Kronecker form on a 2x4 mesh: the same steps as unsharded, and no
  whole matrix gathered (its factors need reductions over the sharded
  axes, which XLA places)."""
  _, shardings, batch_sharding, tx, train_step, _ = _sharded_setup(
      estimator="shift_consolidation", granularity="kronecker", restore=1.0)
  params = jax.device_put(init_params(), shardings)
  opt_state = tx.init(params)
  put_batch = lambda x, y: (jax.device_put(x, batch_sharding),
                            jax.device_put(y, batch_sharding))
  data = batches()
  step = jax.jit(train_step).lower(
      params, opt_state, *put_batch(*data[0])).compile()
  for x, y in data:
    params, opt_state = step(params, opt_state, *put_batch(x, y))
  ref_params, ref_state = single_device_run(dict(
      estimator="shift_consolidation", granularity="kronecker", restore=1.0))
  assert_trees_close(params, ref_params, "params (sharded vs unsharded)")
  assert_trees_close(sal_state(opt_state), sal_state(ref_state),
                     "ProtectState (sharded vs unsharded)")
  kron = sal_state(opt_state).estimator_state.consolidated["w1"]
  assert kron.shape == (D_IN * D_IN + D_HIDDEN,), kron.shape
  # Its output energies c (a vector of n_out) are gathered; no matrix is.
  matrices = {k: p for k, p in params.items() if p.ndim >= 2}
  gathers = full_param_all_gathers(step.as_text(), matrices)
  assert not gathers, f"train step gathers whole matrices: {gathers}"
  return (f"max |sharded - unsharded| {max_abs_diff(params, ref_params):.1e}"
          "; 0 whole-matrix all-gathers")


# Rank 8 < D_IN, D_OUT: both kernels keep a low-rank consolidated L and a
# sketched running one. One instance, so that the runs share its cache key.
_LOW_RANK = sal.shift_consolidation_estimator(kronecker_rank=8)


@check
def sharding_shift_consolidation_kronecker_low_rank():
  """The low-rank Kronecker form (the default's, above its rank) on a 2x4
  mesh, consolidated at the start (so that its pull acts): the sketch draws
  columns of sharded kernels and the pull applies factors to them; the
  same steps as unsharded, no whole matrix gathered."""
  _, shardings, batch_sharding, tx, train_step, _ = _sharded_setup(
      estimator=_LOW_RANK, restore=1.0)

  def run(params, put):
    ones = jax.tree.map(jnp.ones_like, params)
    opt_state = sal.consolidate(tx.init(params), params, ones)
    step = jax.jit(train_step)
    for x, y in batches():
      params, opt_state = step(params, opt_state, *put(x, y))
    return params, opt_state, step.lower(params, opt_state,
                                         *put(*batches()[0])).compile()

  put_batch = lambda x, y: (jax.device_put(x, batch_sharding),
                            jax.device_put(y, batch_sharding))
  params, opt_state, step = run(jax.device_put(init_params(), shardings),
                                put_batch)
  ref_params, ref_state, _ = run(init_params(), lambda x, y: (x, y))
  assert_trees_close(params, ref_params, "params (sharded vs unsharded)")
  assert_trees_close(sal_state(opt_state), sal_state(ref_state),
                     "ProtectState (sharded vs unsharded)")
  est = sal_state(opt_state).estimator_state
  assert est.consolidated["w1"].shape == (D_IN * 8 + D_HIDDEN,)
  assert float(sal.metrics(opt_state)["consolidations"]) >= 1
  matrices = {k: p for k, p in params.items() if p.ndim >= 2}
  gathers = full_param_all_gathers(step.as_text(), matrices)
  assert not gathers, f"train step gathers whole matrices: {gathers}"
  return (f"max |sharded - unsharded| {max_abs_diff(params, ref_params):.1e}"
          "; 0 whole-matrix all-gathers")


def _init_sharding_check(granularity, estimator="reference"):
  mesh = make_mesh()
  params = jax.device_put(
      init_params(), {k: NamedSharding(mesh, s)
                      for k, s in PARAM_SPECS.items()})
  tx = optax.chain(sal.protect(granularity=granularity, estimator=estimator),
                   optax.adamw(1e-2))
  n = assert_state_sharded_like_params(tx.init(params), params, "after init")
  return f"{n} per-element state leaves sharded like their params at init"


@check
def init_sharding_leaf():
  """tx.init on sharded params: SAL state sharded like the params from the
  start (not a whole copy on one device)."""
  return _init_sharding_check("leaf")


@check
def init_sharding_element():
  return _init_sharding_check("element")


@check
def init_sharding_importance_estimators():
  return "; ".join(
      f"{name}: " + _init_sharding_check("element", name)
      for name in ("consolidation", "shift_consolidation"))


@check
def gather_detector_self_check():
  """Self-check: the HLO inspection does see a gathered parameter."""
  mesh = make_mesh()
  params = jax.device_put(
      init_params(), {k: NamedSharding(mesh, s)
                      for k, s in PARAM_SPECS.items()})
  replicated = NamedSharding(mesh, P())

  def gathers_w1(p):
    return jax.lax.with_sharding_constraint(p["w1"], replicated) * 2.0

  hlo = jax.jit(gathers_w1).lower(params).compile().as_text()
  found = full_param_all_gathers(hlo, params)
  assert found, "the detector missed an explicit all-gather of w1"
  assert [s for _, s in collective_result_shapes(hlo) if s]
  return f"detected: {found[0][:60]}..."


# --------------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("checks", nargs="*", help=f"any of {list(CHECKS)}")
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args(argv)
  assert jax.device_count() == N_DEVICES, jax.devices()
  names = args.checks or list(CHECKS)
  results = {}
  for name in names:
    start = time.perf_counter()
    try:
      detail = CHECKS[name]() or ""
      ok = True
      print(f"PASS {name}: {detail}", flush=True)
    except Exception as e:  # noqa: BLE001  (reported, then exit 1)
      ok = False
      detail = f"{type(e).__name__}: {' '.join(str(e).split())}"[:1500]
      print(f"FAIL {name}: {detail}", flush=True)
      traceback.print_exc()
    results[name] = {"ok": ok, "detail": detail,
                     "seconds": round(time.perf_counter() - start, 2)}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
