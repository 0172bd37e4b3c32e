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
  views = defaults._rotations(x)
  np.testing.assert_array_equal(views[0], x)
  image = x[0].reshape(8, 8)
  # A quarter turn counter-clockwise: the top row becomes the left column.
  np.testing.assert_array_equal(views[1][0].reshape(8, 8)[:, 0],
                                image[0, ::-1])
  np.testing.assert_array_equal(views[2][0].reshape(8, 8), image[::-1, ::-1])


def test_summary_computes_the_gap_closed_by_hand():
  # Two seeds; R rows are "after task i", columns tasks.
  plain = [np.array([[0.9, 0.1], [0.3, 0.9]]), np.array([[0.9, 0.1],
                                                         [0.5, 0.9]])]
  protect = [np.array([[0.8, 0.1], [0.6, 0.8]])] * 2
  joint = [np.array([[0.85, 0.85]])] * 2
  s = defaults.summarise({"p/adamw": {"plain": plain, "protect": protect,
                                      "joint": joint}})["p/adamw"]
  # Final averages: plain (0.6 + 0.7) / 2 = 0.65, protect 0.7, joint 0.85.
  assert s["average_accuracy"]["plain"] == pytest.approx(0.65)
  assert s["average_accuracy"]["protect"] == pytest.approx(0.7)
  assert s["gap_closed"] == pytest.approx(0.05 / 0.2)
  assert s["plasticity"]["protect"] == pytest.approx(0.8)
  # Joint no better than plain: no gap to close.
  s = defaults.summarise({"p/adamw": {"plain": plain, "protect": protect,
                                      "joint": [np.array([[0.6, 0.6]])]}})
  assert math.isnan(s["p/adamw"]["gap_closed"])


def test_split_task_masks_hold_the_pair():
  tasks = defaults.build("split_mnist1d_task")["tasks"]
  assert len(tasks) == 5
  for pair, task in zip(((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)), tasks):
    assert np.flatnonzero(task["mask"]).tolist() == list(pair)
    assert set(np.unique(task["train"][1])) == set(pair)
    assert set(np.unique(task["test"][1])) == set(pair)


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
  assert "gap closed" in (tmp_path / "defaults.md").read_text()
