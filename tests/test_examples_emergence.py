"""Smoke tests: the emergence, grokking and pulse-cascade examples run."""

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each test runs an example or benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Tiny settings; the examples are started at once (they are independent).
RUNS = {
    "emergence_field": ("emergence_field.py", "--epochs", "1", "--history",
                        "8"),
    "pulse_cascade": ("pulse_cascade.py", "--epochs", "2", "--steps", "4",
                      "--max-pulses", "12"),
    "grokking": ("grokking.py", "--quick", "--steps", "300", "--warmup",
                 "100", "--cusum-warmup", "100"),
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
  procs = {}
  for name, (script, *args) in RUNS.items():
    out = tmp_path_factory.mktemp(name)
    procs[name] = (out, subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / script), *args,
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
  results = {}
  for name, (out, proc) in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    results[name] = (proc.returncode, stdout, stderr, out)
  return results


def test_emergence_field_runs_and_writes_its_plot(outputs):
  code, out, err, tmp_path = outputs["emergence_field"]
  assert code == 0, err[-3000:]
  assert "Test accuracy after 1 epochs" in out
  assert "| hidden 1 |" in out and "| hidden 2 |" in out
  path = tmp_path / "emergence_field.png"
  assert f"plot written to {path}" in out
  assert path.stat().st_size > 10_000


def test_pulse_cascade_runs_and_writes_its_plots(outputs):
  code, out, err, tmp_path = outputs["pulse_cascade"]
  assert code == 0, err[-3000:]
  assert "statistics: current_step=4," in out
  assert "| lineage (root) |" in out and "emergent pulse: slot" in out
  assert "splits / merges per third of the run: steps 1-2:" in out
  for name in ("pulse_cascade.png", "pulse_cascade_emergent.png"):
    path = tmp_path / name
    assert f"written to {path}" in out
    assert path.stat().st_size > 5_000


def test_grokking_runs_and_writes_its_json_and_plot(outputs):
  code, out, err, tmp_path = outputs["grokking"]
  assert code == 0, err[-3000:]
  assert "| seed | memorised | transition |" in out
  with open(tmp_path / "grokking.json") as f:
    result = json.load(f)
  (seed,) = result["seeds"]
  assert seed["seed"] == 0 and seed["memorised_step"] is not None
  for key in ("transition_step", "events", "first_event_step", "lead_steps",
              "false_alarms", "zscore_events", "zscore_false_alarms",
              "reference_events", "reference_false_alarms"):
    assert key in seed
  assert seed["detector"] == "cusum"
  for key in ("events", "zscore_events"):  # after the warm-ups
    assert all(100 < e <= 300 for e in seed[key]), (key, seed[key])
  assert "CUSUM: first event before the transition" in out
  assert (tmp_path / "grokking.png").stat().st_size > 10_000
