"""The continual-learning benchmark: its metrics; a --quick run end to end."""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cl_engine  # noqa: E402
import cl_methods  # noqa: E402
import cl_protocols  # noqa: E402

# R[i, j]: accuracy on task j after training task i.
R = np.array([[0.9, 0.1, 0.2],
              [0.6, 0.8, 0.3],
              [0.5, 0.7, 0.95]])


def test_metrics_match_avalanche_by_hand():
  # Final row: (0.5 + 0.7 + 0.95) / 3.
  assert cl_engine.average_accuracy(R) == pytest.approx(2.15 / 3)
  # Tasks 0 and 1: (R[0,0] - R[2,0] + R[1,1] - R[2,1]) / 2 = (0.4 + 0.1) / 2;
  # the last task is not counted.
  assert cl_engine.forgetting(R) == pytest.approx(0.25)
  assert cl_engine.bwt(R) == pytest.approx(-0.25)
  # Diagonal: (0.9 + 0.8 + 0.95) / 3.
  assert cl_engine.plasticity(R) == pytest.approx(2.65 / 3)


def test_metrics_broadcast_over_leading_axes():
  stacked = np.stack([R, np.eye(3)])  # the identity forgets everything
  np.testing.assert_allclose(cl_engine.forgetting(stacked), [0.25, 1.0])
  np.testing.assert_allclose(cl_engine.average_accuracy(stacked),
                             [2.15 / 3, 1 / 3])


def test_kl_drift_by_hand_ignores_padding():
  then = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
  now = np.log(np.array([[0.25, 0.75], [0.1, 0.9]]))
  valid = np.array([True, False])
  expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
  assert float(cl_engine._kl(then, now, valid)) == pytest.approx(
      expected, rel=1e-5)


def _raw(val, test):
  """A fake ``cl_engine.run`` output, S=2 seeds, C=2 configs, T=2 tasks."""
  s, c, t = 2, 2, 2
  acc = np.zeros((s, c, t, t))
  acc[:, :, -1, :] = np.asarray(test)[None, :, None]
  acc[:, :, 0, 0] = 1.0
  return {"acc_matrix": acc,
          "val_final_acc": np.broadcast_to(
              np.asarray(val)[None, :, None], (s, c, t)),
          "kl_per_task": np.full((s, c, t), 0.5),
          "weight_drift": np.ones((s, c)), "online_acc": np.ones((s, c)),
          "curves": {"task1_acc": np.zeros((s, c, 4))}}


def test_summarize_selects_on_validation_not_test():
  configs = {"lr": np.array([1e-3, 1e-4], np.float32)}
  summary = cl_engine.summarize(_raw(val=[0.4, 0.6], test=[0.9, 0.5]),
                                configs)
  assert summary["chosen"] == 1
  assert summary["config"]["lr"] == pytest.approx(1e-4)
  assert summary["mean"]["avg_acc"] == pytest.approx(0.5)
  assert summary["mean"]["forgetting"] == pytest.approx(0.5)
  assert np.shape(summary["per_seed"]["acc_matrix"]) == (2, 2, 2)


def test_every_method_has_the_same_budget_with_the_learning_rate():
  for method in cl_methods.METHODS.values():
    for quick, size in ((False, 6), (True, 2)):
      configs = method.configs(quick)
      assert "lr" in configs
      assert {len(v) for v in configs.values()} == {size}, method.name
      assert len(set(configs["lr"].tolist())) > 1, method.name


@pytest.mark.parametrize("name", ["stream", "digits_domain"])
def test_padding_to_common_shapes_keeps_the_function(name):
  # stream: 40 inputs padded to 64; digits_domain: 2 outputs padded to 10.
  plain = cl_protocols.build(name, quick=True)
  others = [cl_protocols.build(n, quick=True) for n in ("digits_task",)]
  padded = cl_protocols.pad_to_common([plain] + others)[0]
  assert padded.x_train.shape[1] == 64 and padded.num_outputs == 10
  params = cl_engine.init_mlp(0, padded)
  np.testing.assert_array_equal(params[0]["w"][plain.num_inputs:], 0.0)
  np.testing.assert_array_equal(params[-1]["w"][:, plain.num_outputs:], 0.0)
  sliced = [dict(layer) for layer in params]
  sliced[0] = {"w": params[0]["w"][:plain.num_inputs], "b": params[0]["b"]}
  sliced[-1] = {"w": params[-1]["w"][:, :plain.num_outputs],
                "b": params[-1]["b"][:plain.num_outputs]}
  x = plain.test[0][0]
  out_plain = cl_engine.log_probs(sliced, x, plain.class_masks[0])
  out_padded = cl_engine.log_probs(params, padded.test[0][0],
                                   padded.class_masks[0])
  np.testing.assert_allclose(out_padded[:len(x), :plain.num_outputs],
                             out_plain, atol=1e-5)


def test_quick_run_writes_complete_reports(tmp_path):
  result = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "continual.py"), "--quick",
       "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  markdown = (tmp_path / "results.md").read_text()
  assert set(results["protocols"]) == set(cl_protocols.PROTOCOLS)
  for name, protocol in results["protocols"].items():
    tasks = protocol["schedule"]["num_tasks"]
    points = tasks * protocol["schedule"]["chunks_per_task"]
    assert set(protocol["methods"]) == set(cl_methods.METHODS)
    assert f"## {name}:" in markdown
    for method, entry in protocol["methods"].items():
      assert f"| {method}" in markdown
      assert np.shape(entry["per_seed"]["acc_matrix"]) == (2, tasks, tasks)
      acc = np.asarray(entry["per_seed"]["acc_matrix"])
      assert ((acc >= 0) & (acc <= 1)).all()
      for key in ("avg_acc", "plasticity", "task1_final_acc", "online_acc"):
        assert 0 <= entry["mean"][key] <= 1, (name, method, key)
      assert -1 <= entry["mean"]["bwt"] <= 1
      assert entry["mean"]["kl_task1"] >= 0
      assert entry["mean"]["weight_drift"] >= 0
      assert entry["step_time_s"] > 0
      assert entry["config"]["lr"] in entry["grid"]["lr"]
      assert np.shape(entry["curves"]["task1_acc"]) == (2, points)
      if method.startswith("sal"):
        rates = np.asarray(entry["curves"]["protection_rate"])
        assert ((rates >= -1e-6) & (rates <= 1 + 1e-6)).all()
    for figure in ("acc_matrix", "task1", "drift", "sal_spectrum",
                   "sal_suppression"):
      assert (tmp_path / f"{name}_{figure}.png").stat().st_size > 10_000
