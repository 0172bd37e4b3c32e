"""Smoke test: ``benchmarks/overhead.py --quick`` runs end to end and
writes a complete JSON report (the numbers of a smoke run mean nothing)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import sal_jax as sal

pytestmark = pytest.mark.slow  # each test runs an example or benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_overhead_quick_runs_and_reports(tmp_path):
  out = tmp_path / "overhead.json"
  env = dict(os.environ)
  # Faster compiles; a smoke run's timings are not looked at.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--quick",
       "--out", str(out)],
      capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "| model | method | step ms | step ratio |" in proc.stdout
  assert "GB/s" in proc.stdout and "targets" in proc.stdout

  report = json.loads(out.read_text())
  assert report["bandwidth"]["bytes_per_second"] > 0
  models = report["results"]
  assert set(models) == {"mlp_tiny", "transformer_tiny"}
  mlp = models["mlp_tiny"]["methods"]
  # Every registered estimator is measured, at both granularities.
  for estimator in sal.ESTIMATORS:
    gated = sal.get_estimator(estimator).restoring_force is None
    assert f"sal:{estimator}:leaf" in mlp
    assert f"sal:{estimator}:element" + (":rms" if gated else "") in mlp
  # The factored importance keeps about one copy of the params (the
  # anchor), the default (anchor, running and consolidated importance) 3.
  factored = mlp["sal:shift_consolidation:factored"]
  default = mlp["sal:shift_consolidation:element"]
  assert 1.0 <= factored["extra_state_over_params"] < 1.5
  assert 3.0 <= default["extra_state_over_params"] < 3.5
  assert len(models["transformer_tiny"]["methods"]) == 2
  for model in models.values():
    param_bytes = model["param_bytes"]
    assert param_bytes == 4 * model["parameters"]
    adamw = model["methods"]["adamw"]
    assert adamw["full_ratio"] == 1.0 and adamw["update_ratio"] == 1.0
    assert adamw["state_bytes"] >= 2 * param_bytes  # mu and nu
    for name, m in model["methods"].items():
      for kind in ("full_step", "update"):
        assert m[kind]["median_ms"] > 0 and m[kind]["n"] == 4, (name, kind)
      assert m["min_update_bytes"] == 3 * param_bytes + 2 * m["state_bytes"]
      assert m["update_bound_ms"] > 0 and m["update_over_bound"] > 0
      if name.startswith("sal:reference:"):
        # One copy of the params (+ scores with element granularity), plus
        # a few scalars per leaf.
        copies = 2 if ":element" in name else 1
        assert copies <= m["extra_state_over_params"] < copies + 0.05
  assert all({"target", "model", "method", "value", "met"} <= set(t)
             for t in report["targets"])


def test_accelerator_check_quick_runs_and_reports(tmp_path):
  out = tmp_path / "accelerator.json"
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "accelerator.py"),
       "--quick", "--models", "mlp_tiny", "--out", str(out)],
      capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(out.read_text())
  results = report["results"]
  assert set(results) == {"mlp_tiny:float32", "mlp_tiny:bfloat16"}
  f32, bf16 = results["mlp_tiny:float32"], results["mlp_tiny:bfloat16"]
  # The params really are in bfloat16: half the bytes.
  assert 2 * bf16["param_bytes"] == f32["param_bytes"]
  assert set(f32["methods"]) == {"adamw", "sal:shift_consolidation:leaf",
                                 "sal:shift_consolidation:element",
                                 "sal:shift_consolidation:kronecker"}
  for model in results.values():
    for entry in model["methods"].values():
      assert entry["full_step"]["median_ms"] > 0
  conditional = report["conditional"]
  assert conditional["cond_us_per_step"] > 0
  assert conditional["select_us_per_step"] > 0
  assert "lax.cond in a step" in proc.stdout


def test_step_profile_attributes_the_update_to_operations(tmp_path):
  out = tmp_path / "profile.json"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "step_profile.py"),
       "--shape", "96x64", "--steps", "2", "--out", str(out)],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "| operation | output | from | ms / step |" in proc.stdout
  results = json.loads(out.read_text())["results"]
  assert set(results) == {"adamw", "default", "no_pull", "element", "leaf"}
  for entry in results.values():
    assert entry["step_ms"] > 0 and entry["operations"]
    assert all(o["ms_per_step"] >= 0 for o in entry["operations"])
  # The Kronecker statistics are matrix products (the sketched G G^T);
  # AdamW and the per-element form have none.
  sources = {name: {o["jax_op"] for o in entry["operations"]}
             for name, entry in results.items()}
  assert "dot_general" in sources["default"]
  assert "dot_general" in sources["no_pull"]
  assert "dot_general" not in (
      sources["adamw"] | sources["element"] | sources["leaf"])


def test_step_profile_rejects_a_bad_shape():
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "step_profile.py"),
       "--shape", "4096"], capture_output=True, text=True, timeout=120,
      cwd=ROOT)
  assert proc.returncode == 2
  assert "--shape must be two positive sizes" in proc.stderr
