"""benchmarks/defaults.py: its protocols, its summary, a --quick run."""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import defaults  # noqa: E402


def test_block_orders_move_whole_blocks():
  image = np.arange(64)
  for order in defaults._block_orders(4):
    assert sorted(order.tolist()) == list(range(64))  # a permutation
    out = image[order].reshape(8, 8)
    for i in range(0, 8, 2):
      for j in range(0, 8, 2):
        block = out[i:i + 2, j:j + 2]
        # A 2x2 block of the source, in its own orientation.
        r, c = divmod(int(block[0, 0]), 8)
        assert r % 2 == 0 and c % 2 == 0
        np.testing.assert_array_equal(block, [[block[0, 0], block[0, 0] + 1],
                                              [block[0, 0] + 8,
                                               block[0, 0] + 9]])
  assert np.array_equal(defaults._block_orders(2)[0], np.arange(64))
  assert not np.array_equal(defaults._block_orders(2)[1], np.arange(64))


def test_rotations_are_quarter_turns():
  x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
  np.testing.assert_array_equal(defaults._rotate(x, 0), x)
  image = x[0].reshape(8, 8)
  # A quarter turn counter-clockwise: the top row becomes the left column.
  np.testing.assert_array_equal(defaults._rotate(x, 1)[0].reshape(8, 8)[:, 0],
                                image[0, ::-1])
  np.testing.assert_array_equal(defaults._rotate(x, 2)[0].reshape(8, 8),
                                image[::-1, ::-1])


def _runs(*test, val=None):
  """Runs with these test matrices (val: the same unless given)."""
  val = test if val is None else val
  return [{"test": np.array(t), "val": np.array(v)} for t, v in zip(test,
                                                                     val)]


def test_summary_computes_the_gap_closed_by_hand():
  # Two seeds; R rows are "after task i", columns tasks.
  plain = _runs([[0.9, 0.1], [0.3, 0.9]], [[0.9, 0.1], [0.5, 0.9]])
  protect = _runs([[0.8, 0.1], [0.6, 0.8]], [[0.8, 0.1], [0.6, 0.8]])
  protect[0]["consolidations"] = np.array([0, 1])
  protect[1]["consolidations"] = np.array([1, 2])
  joint = _runs([[0.85, 0.85]], [[0.85, 0.85]])
  # Two tuned strengths: 10 is better on validation, worse on test.
  ten = _runs([[0.9, 0.0], [0.4, 0.8]], [[0.9, 0.0], [0.4, 0.8]],
              val=[[[0.9, 0.0], [0.9, 0.9]]] * 2)
  for r, c in zip(ten, ([0, 1], [1, 1])):
    r["consolidations"] = np.array(c)
  s = defaults.summarise({"p/adamw": {"plain": plain, "protect": protect,
                                      "joint": joint, 1.0: protect,
                                      10.0: ten}})["p/adamw"]
  # Final averages: plain (0.6 + 0.7) / 2 = 0.65, protect 0.7, joint 0.85.
  assert s["average_accuracy"]["plain"] == pytest.approx(0.65)
  assert s["average_accuracy"]["protect"] == pytest.approx(0.7)
  assert s["gap_closed"] == pytest.approx(0.05 / 0.2)
  assert s["plasticity"]["protect"] == pytest.approx(0.8)
  assert s["consolidations_per_task"] == pytest.approx([0.5, 1.5])
  # Chosen on validation, reported on test: 0.6 = 0.05 below plain.
  assert s["tuned"]["restore"] == 10.0 and s["tuned"]["at_grid_edge"]
  assert s["tuned"]["average_accuracy"] == pytest.approx(0.6)
  assert s["tuned"]["gap_closed"] == pytest.approx(-0.05 / 0.2)
  # The per-element form, summarised like protect().
  s = defaults.summarise({"p/adamw": {"plain": plain, "protect": protect,
                                      "element": ten, "joint": joint}},
                         element_restore=10.0)["p/adamw"]["element"]
  assert s["restore"] == 10.0
  assert s["average_accuracy"] == pytest.approx(0.6)
  assert s["gap_closed"] == pytest.approx(-0.05 / 0.2)
  assert s["plasticity"] == pytest.approx(0.85)
  # EWC with boundaries: chosen on validation (a diverged strength never),
  # reported on test.
  nan = _runs([[np.nan, np.nan], [np.nan, np.nan]])
  s = defaults.summarise({"p/adamw": {
      "plain": plain, "protect": protect, "joint": joint,
      ("ewc", 1.0): protect, ("ewc", 10.0): ten, ("ewc", 100.0): nan}})
  e = s["p/adamw"]["ewc_tuned"]
  assert e["strength"] == 10.0 and not e["at_grid_edge"]
  assert e["average_accuracy"] == pytest.approx(0.6)
  assert e["gap_closed"] == pytest.approx(-0.05 / 0.2)
  assert "tuned" not in s["p/adamw"]  # no protect(restore=...) strengths
  assert "EWC, boundaries and Fisher given" in defaults.table(s)
  # Joint no better than plain: no gap to close.
  s = defaults.summarise({"p/adamw": {"plain": plain, "protect": protect,
                                      "joint": _runs([[0.6, 0.6]])}})
  assert math.isnan(s["p/adamw"]["gap_closed"]) and "tuned" not in s[
      "p/adamw"]


def test_split_task_masks_hold_the_pair():
  tasks = defaults.build("split_mnist1d_task")
  assert len(tasks) == 5
  for pair, task in zip(((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)), tasks):
    assert np.flatnonzero(task["mask"]).tolist() == list(pair)
    for part in ("train", "val", "test"):
      assert set(np.unique(task[part][1])) == set(pair)


def test_permuted_tasks_differ_and_keep_the_labels():
  tasks = defaults.build("permuted_mnist1d")
  assert len(tasks) == 4
  first = tasks[0]["train"][0]
  for task in tasks[1:]:
    x, y = task["train"]
    np.testing.assert_array_equal(y, tasks[0]["train"][1])
    assert not np.array_equal(x, first)
    # The same columns, reordered.
    np.testing.assert_allclose(np.sort(x, axis=1), np.sort(first, axis=1))
  assert not np.array_equal(tasks[1]["train"][0], tasks[2]["train"][0])


@pytest.mark.slow
def test_quick_run_writes_the_table_and_json(tmp_path):
  subprocess.run([sys.executable, str(ROOT / "benchmarks" / "defaults.py"),
                  "--quick", "--out", str(tmp_path)], check=True, cwd=ROOT,
                 capture_output=True, timeout=600)
  report = json.loads((tmp_path / "defaults.json").read_text())
  assert report["quick"] and report["seeds"] == 1
  keys = {f"{p}/{o}" for p in defaults.PROTOCOLS for o in defaults.OPTIMIZERS}
  assert set(report["results"]) == keys
  for s in report["results"].values():
    for method in ("plain", "protect", "joint"):
      assert 0.0 <= s["average_accuracy"][method] <= 1.0
    # One entry per task of the protocol's quick run (2 tasks), counting up.
    shifts = s["consolidations_per_task"]
    assert len(shifts) == 2 and 0 <= shifts[0] <= shifts[1]
    assert 0.0 <= s["element"]["average_accuracy"] <= 1.0
    assert len(s["element"]["consolidations_per_task"]) == 2
    assert s["ewc_tuned"]["strength"] in report["ewc_strengths"]
  assert "gap closed" in (tmp_path / "defaults.md").read_text()
