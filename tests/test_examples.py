"""Smoke tests: the examples run end to end with tiny settings."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # each test runs an example or benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_example(script, *args, tmp_path):
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / script), *args,
       "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_quickstart_runs_and_writes_its_plot(tmp_path):
  out = _run_example("quickstart.py", "--epochs", "1", "--seeds", "1",
                     tmp_path=tmp_path)
  assert out.count("| adamw ") == 2  # one table per protocol
  for name in ("sal protect() + adamw", "sal protect(restore=10) + adamw",
               "sal element restore=30 + adamw", "sal reference + adamw"):
    assert f"| {name} " in out
  assert "permuted (digits" in out and "domain (digit pairs" in out
  assert (tmp_path / "quickstart.png").stat().st_size > 10_000


def test_quickstart_permuted_tasks_shuffle_the_same_digits():
  sys.path.insert(0, str(ROOT / "examples"))
  import quickstart  # pylint: disable=g-import-not-at-top

  tasks = quickstart.load_tasks(0, "permuted")
  assert len(tasks) == len(quickstart.TASKS)
  first = tasks[0]
  for task in tasks:
    assert task["mask"].all()  # one ten-way head
    assert (task["y_train"] == first["y_train"]).all()
    # The same images, each pixel moved by the task's own shuffle: every
    # image keeps its multiset of pixel values.
    assert (np.sort(task["x_test"], 1) == np.sort(first["x_test"], 1)).all()
  assert not any((t["x_train"] == first["x_train"]).all() for t in tasks[1:])
  assert quickstart.load_tasks(0, "domain")[0]["mask"].sum() == 2


def test_multi_device_example_runs_its_checks():
  # The script sets its own 8 simulated devices (a fresh process).
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "multi_device.py"),
       "--steps", "20"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  out = result.stdout
  assert "FAILED" not in out and "all checks passed" in out
  assert "shifts detected: 1" in out  # the pull acted in the compared runs


def test_fisher_no_labels_example_runs():
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "fisher_no_labels.py"),
       "--seeds", "1", "--steps", "20", "--pretrain-steps", "50",
       "--restore", "10"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("none (adamw)", "a ", "c ", "u "):
    assert name in result.stdout
  assert "Pearson / Spearman" in result.stdout


def test_drift_budget_example_runs(tmp_path):
  out = tmp_path / "drift_budget.json"
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "drift_budget.py"),
       "--seeds", "1", "--steps", "40", "--budgets", "0.1",
       "--pairs", "permute", "--out", str(out)],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| adamw |" in result.stdout and "| budget 0.1 |" in result.stdout
  report = json.loads(out.read_text())
  seed = report["pairs"]["permute"]["seeds"][0]
  assert len(seed["budget 0.1"]["probe_drift_per_step"]) == 40
  assert seed["budget 0.1"]["multiplier"] >= 1.0
  assert out.with_suffix(".png").exists()
