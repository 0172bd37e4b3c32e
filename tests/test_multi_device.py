"""pmap and sharded training with `sal.protect` on 8 simulated CPU devices.

The checks live in ``tests/_multi_device_checks.py`` and run in one
subprocess, because ``--xla_force_host_platform_device_count=8`` must be set
before jax is imported (this process keeps its single device). Each check
below reports that subprocess's verdict and reason:

* pmap with ``protect(axis_name="batch")`` on per-device batches equals a
  single device on the concatenated batch (to 2e-5), and all 8 replicas'
  params and optimizer states are bitwise equal after the run (leaf,
  element, element + preserve_rms); a NaN on one device leaves every
  replica's state unchanged and equal; without ``axis_name`` the replicas do
  drift apart (so the equality checks can fail);
* a 2x4 ``Mesh`` with ``NamedSharding`` weight matrices: every SAL state
  leaf is sharded like its param (scalars replicated) at init and after
  jitted ``chain(protect(), adamw)`` steps, the result equals the
  unsharded run, the compiled train step gathers no whole parameter and
  the update alone communicates scalars only (the HLO gather detector is
  itself checked on a program that does gather).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "_multi_device_checks.py"

pytestmark = pytest.mark.slow  # the checks run in a subprocess

CHECKS = (
    "pmap_leaf",
    "pmap_element",
    "pmap_element_preserve_rms",
    "pmap_without_axis_name_diverges",
    "pmap_nonfinite_on_one_device",
    "sharding_leaf",
    "sharding_element_preserve_rms",
    "sharding_shift_consolidation_element",
    "sharding_shift_consolidation_kronecker",
    "sharding_shift_consolidation_kronecker_low_rank",
    "init_sharding_leaf",
    "init_sharding_element",
    "init_sharding_importance_estimators",
    "gather_detector_self_check",
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("multi_device") / "results.json"
  env = dict(os.environ)
  # The checks are about values, shardings and collectives, none of which
  # depends on LLVM's optimization level; level 0 halves compile time.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  env.pop("JAX_PLATFORMS", None)
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--json", str(out)],
      capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
  if not out.exists():
    pytest.fail(f"the checks did not run (exit {proc.returncode}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  return json.loads(out.read_text()), proc


def test_every_check_ran(results):
  found, _ = results
  assert set(found) == set(CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_multi_device(results, name):
  found, proc = results
  if name not in found:
    pytest.fail(f"check {name} did not run:\n{proc.stderr[-3000:]}")
  result = found[name]
  assert result["ok"], result["detail"]
