"""The continual-learning benchmark: metrics, protocols, a --quick run."""

import itertools
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cl_calibration  # noqa: E402
import cl_engine  # noqa: E402
import cl_grid  # noqa: E402
import cl_methods  # noqa: E402
import cl_metrics  # noqa: E402
import cl_protocols  # noqa: E402

# R[i, j]: accuracy on task j after training segment i (one task each).
R = np.array([[0.9, 0.1, 0.2],
              [0.6, 0.8, 0.3],
              [0.5, 0.7, 0.95]])


def test_metrics_match_avalanche_by_hand():
  tasks = (0, 1, 2)
  # Final row: (0.5 + 0.7 + 0.95) / 3.
  assert cl_metrics.average_accuracy(R) == pytest.approx(2.15 / 3)
  # Tasks 0 and 1: (R[0,0] - R[2,0] + R[1,1] - R[2,1]) / 2 = (0.4 + 0.1) / 2;
  # the last task is not counted.
  assert cl_metrics.forgetting(R, tasks) == pytest.approx(0.25)
  assert cl_metrics.bwt(R, tasks) == pytest.approx(-0.25)
  # Diagonal: (0.9 + 0.8 + 0.95) / 3.
  assert cl_metrics.plasticity(R, tasks) == pytest.approx(2.65 / 3)


def test_metrics_with_a_recurring_task_by_hand():
  # Segments train tasks A, B, A; columns are tasks A, B.
  acc = np.array([[0.9, 0.1],
                  [0.4, 0.8],
                  [0.95, 0.6]])
  tasks = (0, 1, 0)
  # Plasticity: R[0, A], R[1, B], R[2, A].
  assert cl_metrics.plasticity(acc, tasks) == pytest.approx(2.65 / 3)
  # Only B counts (A is the last segment's task): R[1, B] - R[2, B].
  assert cl_metrics.forgetting(acc, tasks) == pytest.approx(0.2)
  assert cl_metrics.average_accuracy(acc) == pytest.approx(0.775)


def test_metrics_broadcast_over_leading_axes():
  stacked = np.stack([R, np.eye(3)])  # the identity forgets everything
  np.testing.assert_allclose(cl_metrics.forgetting(stacked, (0, 1, 2)),
                             [0.25, 1.0])
  np.testing.assert_allclose(cl_metrics.average_accuracy(stacked),
                             [2.15 / 3, 1 / 3])


def test_kl_drift_by_hand_ignores_padding():
  then = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
  now = np.log(np.array([[0.25, 0.75], [0.1, 0.9]]))
  valid = np.array([True, False])
  expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
  assert float(cl_engine._kl(then, now, valid)) == pytest.approx(
      expected, rel=1e-5)


def _raw(val, test, s=2, t=2):
  """A fake ``cl_engine.run`` output: C configs, final rows as given."""
  c = len(val)

  def matrix(final):
    acc = np.zeros((s, c, t, t))
    acc[:, :, -1, :] = np.asarray(final)[None, :, None]
    acc[:, :, 0, 0] = 1.0
    return acc

  return {"acc_test": matrix(test), "acc_val": matrix(val),
          "kl_per_task": np.full((s, c, t), 0.5),
          "online_acc": np.ones((s, c)),
          "task1_loss_init": np.full((s, c), 2.3),
          "curves": {"task1_acc": np.zeros((s, c, 4))}}


def test_calibration_by_hand():
  # 2 chunks per segment; task 1's loss: 2.0 at init, 1.0 after segment 1,
  # then 1.25 and 1.5 (a quarter, then half of its decrease given back).
  protocol = {
      "schedule": {"chunks_per_segment": 2, "steps_per_segment": 10},
      "methods": {"sal_budget": {
          "per_seed": {"task1_loss_init": [2.0, 2.0]},
          "curves": {
              "task1_loss": [[1.5, 1.0, 1.25, 1.5, 1.6, 1.7]] * 2,
              "estimated_forgetting": [[0.0, 0.0, 0.1, 0.25, 0.3, 0.3],
                                       [0.0, 0.0, 0.1, 1.0, 0.3, 0.3]]}}}}
  c = cl_calibration.calibration(protocol)
  np.testing.assert_allclose(c["measured_curve"], [0.25, 0.5])
  np.testing.assert_allclose(c["estimate_curve"], [0.1, 0.625])
  assert c["measured_end"] == pytest.approx(0.5)
  assert c["estimate_end"] == pytest.approx(0.625)
  assert c["ratio_end"] == pytest.approx(1.25)
  np.testing.assert_allclose(c["ratio_per_seed"], [0.5, 2.0])
  del protocol["methods"]["sal_budget"]["curves"]["estimated_forgetting"]
  assert cl_calibration.calibration(protocol) is None


def test_summarize_selects_on_validation_not_test():
  configs = {"lr": np.array([1e-3, 1e-4])}
  summary = cl_metrics.summarize(_raw(val=[0.4, 0.6], test=[0.9, 0.5]),
                                 configs, (0, 1))
  assert summary["chosen"] == 1
  point = summary["points"][1]
  assert point["config"]["lr"] == pytest.approx(1e-4)
  assert point["avg_acc"] == pytest.approx(0.5)
  assert point["forgetting"] == pytest.approx(0.5)
  assert point["valid_avg_acc"] == pytest.approx(0.6)
  assert np.shape(summary["per_seed"]["acc_matrix"]) == (2, 2, 2)


def test_selection_needs_the_plasticity_floor():
  entries = [{"valid_plasticity": 0.6, "valid_avg_acc": 0.9},   # learns little
             {"valid_plasticity": 0.95, "valid_avg_acc": 0.7},
             {"valid_plasticity": 0.92, "valid_avg_acc": 0.8}]
  assert cl_metrics.select(entries) == 0
  assert cl_metrics.select(entries, floor=0.9) == 2
  # Nothing above the floor: the most plastic configuration.
  assert cl_metrics.select(entries, floor=0.99) == 1


def test_pareto_front_and_matching_by_hand():
  x = np.array([0.5, 0.6, 0.55, 0.7, 0.65])
  forgetting = np.array([0.1, 0.2, 0.3, 0.4, 0.1])
  # (0.55, 0.3) is beaten by (0.65, 0.1); (0.6, 0.2) too; (0.5, 0.1) too.
  np.testing.assert_array_equal(
      cl_metrics.pareto_front(x, forgetting, maximize_y=False), [4, 3])
  accuracy = np.array([0.1, 0.5, 0.2, 0.3, 0.4])
  np.testing.assert_array_equal(
      cl_metrics.pareto_front(x, accuracy, maximize_y=True), [1, 4, 3])
  entries = [{"valid_plasticity": p, "valid_avg_acc": a}
             for p, a in [(0.80, 0.9), (0.905, 0.5), (0.895, 0.6),
                          (0.95, 0.99)]]
  assert cl_metrics.matched(entries, 0.9) == 2
  assert cl_metrics.matched(entries, 0.7) is None


def test_front_forgetting_interpolates_between_the_bracketing_front_points():
  points = [{"plasticity": p, "forgetting": f}
            for p, f in [(0.95, 0.40), (0.90, 0.10), (0.80, 0.05),
                         (0.85, 0.30)]]  # the last is beaten by (0.90, 0.10)
  # Between (0.90, 0.10) and (0.95, 0.40): a fifth of the way.
  assert cl_metrics.front_forgetting(points, 0.91) == pytest.approx(0.16)
  assert cl_metrics.front_forgetting(points, 0.80) == pytest.approx(0.05)
  assert cl_metrics.front_forgetting(points, 0.85) == pytest.approx(0.075)
  assert cl_metrics.front_forgetting(points, 0.97) is None
  # Every configuration is more plastic: the least plastic front point.
  assert cl_metrics.front_forgetting(points, 0.70) == pytest.approx(0.05)


def test_every_method_has_the_same_budget_with_the_learning_rate():
  for method in cl_methods.METHODS.values():
    for quick, size in ((False, cl_methods.BUDGET), (True, 2)):
      configs = method.configs("permuted_digits", quick)
      assert "lr" in configs
      assert {len(v) for v in configs.values()} == {size}, method.name
      knob = "lr" if method.knob == "lr" else method.knob
      assert len(set(configs[knob].tolist())) > 1, method.name
      if not quick:  # a grid that can bracket: 3 or more values each
        assert len(set(configs["lr"].tolist())) >= 3, method.name
        assert len(set(configs[knob].tolist())) >= 3, method.name


def test_gradual_protocol_ramps_in_the_new_task():
  protocol = cl_protocols.build("gradual")
  orders, fisher = cl_protocols.batch_orders(protocol, seed=0)
  s = protocol.schedule
  rows = orders.reshape(s.num_segments, s.steps_per_segment, -1)
  tasks = protocol.row_task[rows]
  new_share = (tasks == np.arange(s.num_segments)[:, None, None]).mean(-1)
  ramp = protocol.ramp_steps
  assert ramp > 0
  # Segment 0 has no predecessor; later ones rise from ~0 to 1.
  assert new_share[0].min() == 1.0
  for segment in range(1, s.num_segments):
    assert new_share[segment, :ramp // 10].mean() < 0.15
    assert 0.35 < new_share[segment, ramp // 2 - 10:ramp // 2 + 10].mean() \
        < 0.65
    assert new_share[segment, ramp:].min() == 1.0
  assert fisher.shape == (s.num_segments, s.fisher_examples)


def test_recurring_protocol_returns_to_its_first_task():
  protocol = cl_protocols.build("recurring")
  assert protocol.segment_tasks == (0, 1, 0, 2, 0)
  assert protocol.num_tasks == 3 and protocol.task_free
  orders, _ = cl_protocols.batch_orders(protocol, seed=1)
  for segment, task in enumerate(protocol.segment_tasks):
    assert (protocol.row_task[orders[segment]] == task).all()


@pytest.mark.parametrize("name", ["stream", "digits_domain", "recurring"])
def test_padding_to_common_shapes_keeps_the_function(name):
  # stream: 40 inputs padded to 64; digits_domain: 2 outputs padded to 10;
  # recurring: 2 tasks padded to 3.
  plain = cl_protocols.build(name, quick=True)
  others = [cl_protocols.build(n, quick=True) for n in ("digits_task",)]
  padded = cl_protocols.pad_to_common([plain] + others)[0]
  assert padded.x_train.shape[1] == 64 and padded.num_outputs == 10
  assert padded.class_masks.shape[0] == 3
  assert padded.num_tasks == plain.num_tasks
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


def test_reservoir_fills_then_samples_uniformly():
  import jax
  import jax.numpy as jnp
  reservoir = jax.jit(cl_engine._reservoir)
  buffer, seen = jnp.zeros(8, jnp.int32), jnp.int32(0)
  rows = np.arange(1, 5, dtype=np.int32)
  buffer, seen = reservoir(buffer, seen, rows, jax.random.key(0))
  np.testing.assert_array_equal(buffer[:4], rows)  # below capacity: appended
  assert seen == 4
  # Over many batches each stream position ends up kept about equally.
  kept = np.zeros(400)
  for trial in range(200):
    buffer, seen = jnp.zeros(8, jnp.int32), jnp.int32(0)
    key = jax.random.key(trial)
    for start in range(0, 40, 4):
      key, sub = jax.random.split(key)
      buffer, seen = reservoir(
          buffer, seen, np.arange(start, start + 4, dtype=np.int32), sub)
    kept[np.asarray(buffer)] += 1
  first, last = kept[:20].mean(), kept[20:40].mean()
  assert abs(first - last) / (first + last) < 0.15  # 200 * 8 / 40 = 40 each


@pytest.mark.slow
def test_quick_run_writes_complete_reports(tmp_path):
  result = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "continual.py"), "--quick",
       "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  markdown = (tmp_path / "results.md").read_text()
  assert set(results["protocols"]) == set(cl_protocols.PROTOCOLS)
  assert "Forgetting at matched plasticity" in markdown
  for name, protocol in results["protocols"].items():
    segments = protocol["schedule"]["num_segments"]
    tasks = protocol["num_tasks"]
    points = segments * protocol["schedule"]["chunks_per_segment"]
    assert set(protocol["methods"]) == set(cl_methods.METHODS)
    assert 0 < protocol["single_task_accuracy"] <= 1
    assert protocol["plasticity_floor"] == pytest.approx(
        0.9 * protocol["single_task"]["valid_accuracy"])
    assert f"## {name}:" in markdown
    for method, entry in protocol["methods"].items():
      assert f"| {method}" in markdown
      assert len(entry["points"]) == 2
      assert 0 <= entry["chosen"] < 2
      assert entry["matched"] is None or 0 <= entry["matched"] < 2
      assert entry["knob"] in entry["grid"]
      for p in entry["points"]:
        for key in ("valid_avg_acc", "avg_acc", "plasticity", "online_acc"):
          assert 0 <= p[key] <= 1, (name, method, key)
        assert -1 <= p["forgetting"] <= 1
        assert p["bwt"] == pytest.approx(-p["forgetting"])
        assert p["kl_mean"] >= 0
        assert set(p["config"]) == set(entry["grid"])
      acc = np.asarray(entry["per_seed"]["acc_matrix"])
      assert acc.shape == (2, segments, tasks)
      assert ((acc >= 0) & (acc <= 1)).all()
      assert np.shape(entry["curves"]["task1_acc"]) == (2, points)
    for figure in ("fronts", "task1"):
      assert (tmp_path / f"{name}_{figure}.png").stat().st_size > 10_000
  assert "Forgetting on each front at AdamW's plasticity" in markdown
  # --report-only recomputes the derived metrics from the saved runs.
  for protocol in results["protocols"].values():
    for entry in protocol["methods"].values():
      del entry["front_forgetting"]
  (tmp_path / "results.json").write_text(json.dumps(results))
  again = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "continual.py"),
       "--report-only", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert again.returncode == 0, again.stderr[-3000:]
  assert (tmp_path / "results.md").read_text() == markdown
  rewritten = json.loads((tmp_path / "results.json").read_text())
  for protocol in rewritten["protocols"].values():
    for entry in protocol["methods"].values():
      assert "front_forgetting" in entry


def test_grid_axes_step_past_their_edges_on_their_own_scale():
  assert cl_grid.AXES["lr"].beyond([1e-3, 3e-3, 9e-3], "high") == (
      pytest.approx(2.7e-2))
  assert cl_grid.AXES["lr"].beyond([1e-3, 3e-3, 9e-3], "low") == (
      pytest.approx(1e-3 / 3))
  assert cl_grid.AXES["strength"].beyond([10.0, 100.0], "low") == (
      pytest.approx(1.0))
  assert cl_grid.AXES["alpha"].beyond([0.2, 0.4, 0.6, 0.8], "high") == (
      pytest.approx(1.0))
  assert cl_grid.AXES["alpha"].beyond([0.4, 0.6, 1.0], "high") is None
  # The grid's own 3x step at its edge, then the fraction's bound, 1.
  fractions = [0.01, 0.03, 0.1, 0.3]
  assert cl_grid.AXES["fraction"].beyond(fractions, "high") == (
      pytest.approx(0.9))
  assert cl_grid.AXES["fraction"].beyond([*fractions, 0.9], "high") == 1.0
  # A weight average's decay steps in 1 - decay: 0.99, 0.9 -> 0 (a bound).
  assert cl_grid.AXES["decay"].beyond([0.9, 0.99, 0.999], "low") == 0.0
  assert cl_grid.AXES["decay"].beyond([0.9, 0.99, 0.999], "high") == (
      pytest.approx(0.9999))
  assert cl_grid.AXES["lr"].beyond([0.5], "high") == (
      pytest.approx(0.5 * 10 ** 0.5))


def test_grid_widening_adds_only_the_new_row_and_column():
  grid = {"lr": [1.0, 3.0, 9.0], "strength": [0.1, 1.0, 10.0]}
  chosen = {"lr": 9.0, "strength": 0.1}
  assert cl_grid.at_edge(grid, chosen, "strength") == ["lr", "strength"]
  wider = cl_grid.widen(grid, chosen, "strength")
  assert wider == {"lr": [1.0, 3.0, 9.0, pytest.approx(27.0)],
                   "strength": [pytest.approx(0.01), 0.1, 1.0, 10.0]}
  done = {k: np.asarray(v, float) for k, v in zip(
      ("lr", "strength"), zip(*itertools.product(*grid.values())))}
  new = cl_grid.missing(wider, done)
  assert len(new["lr"]) == 4 * 4 - 9
  assert cl_grid.widen(grid, {"lr": 3.0, "strength": 1.0}, "strength") is None
  # AdamW's weight decay is a choice between two values, not swept.
  assert cl_grid.at_edge({"lr": [1.0, 3.0, 9.0], "wd": [0.0, 0.1]},
                         {"lr": 3.0, "wd": 0.1}, "lr") == []
  bounded = {"lr": [1.0, 3.0, 9.0], "alpha": [0.6, 0.8, 1.0]}
  assert cl_grid.at_bound(bounded, {"lr": 3.0, "alpha": 1.0}, "alpha") == [
      "alpha"]
  assert cl_grid.widen(bounded, {"lr": 3.0, "alpha": 1.0}, "alpha") is None


def test_tuning_widens_until_the_choice_is_inside_the_grid():
  # A fake engine whose validation optimum is lr = 81, strength = 1:
  # two rounds move the lr edge from 9 to 27 to 81, a third brackets it.
  calls = []

  def run(batch):
    calls.append(len(batch["lr"]))
    score = -(np.log(batch["lr"] / 81.0) ** 2
              + np.log(batch["strength"]) ** 2)
    return {"score": score[None, :], "seconds": 1.0}

  def choose(raw, configs):
    i = int(np.argmax(raw["score"][0]))
    return {k: float(v[i]) for k, v in configs.items()}

  base = {"lr": np.repeat([1.0, 3.0, 9.0], 3),
          "strength": np.tile([0.1, 1.0, 10.0], 3)}
  raw, configs, info = cl_grid.tune(run, choose, base, "strength")
  assert info["rounds"] == 3
  assert set(calls) == {9}  # every batch padded to the base size
  assert info["grid"]["lr"] == pytest.approx([1, 3, 9, 27, 81, 243])
  assert raw["score"].shape == (1, 6 * 3) and raw["seconds"] == len(calls)
  best = choose(raw, configs)
  assert best == pytest.approx({"lr": 81.0, "strength": 1.0})
  assert cl_grid.at_edge(info["grid"], best, "strength") == []
  _, _, capped = cl_grid.tune(run, choose, base, "strength", max_rounds=1)
  assert capped["rounds"] == 1 and max(capped["grid"]["lr"]) == (
      pytest.approx(27.0))
