"""The language-model fine-tuning example: its parts and its quick run."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nnx = pytest.importorskip("flax.nnx")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import byte_lm as lm  # noqa: E402  pylint: disable=wrong-import-position
import finetune_lm  # noqa: E402  pylint: disable=wrong-import-position

METHODS = ("adamw", "l2_init", "ewc", "lora", "wise_ft", "replay", "sal",
           "sal_probe", "sal_continued", "sal_probe_loss", "sal_element")


def _model(seed=0):
  return lm.ByteLM(nnx.Rngs(seed), width=32, depth=1, heads=2, context=64)


def test_teacher_forced_check_agrees_with_greedy_decoding():
  behaviour = lm.behaviour_sets(65)["test"]
  model = _model()
  # Train briefly on the requests so that some, not all, are answered.
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, tokens, mask):
    grads = nnx.grad(lambda m: lm.token_losses(m, tokens, mask).mean())(model)
    opt.update(model, grads)

  rows = slice(0, 64)
  answered = []
  for _ in range(8):
    for _ in range(25):
      step(model, opt, behaviour.tokens[rows], behaviour.mask[rows])
    answered = lm.answered_as_trained(model, behaviour)[:24]
    if 0 < answered.sum() < len(answered):
      break
  assert 0 < answered.sum() < len(answered)
  for i, flag in enumerate(answered):
    prompt = lm.behaviour_prompt(behaviour, i)
    reply = lm.REFUSAL if behaviour.refused[i] else lm.ACKNOWLEDGE
    generated = lm.generate(model, prompt)
    assert generated.startswith(reply) == bool(flag), (prompt, generated)


def test_lora_starts_at_the_base_model_and_trains_only_its_factors():
  model = _model()
  tokens = jnp.asarray(lm.behaviour_sets(65)["val"].tokens[:4, :-1])
  before = model(tokens)
  lora = lm.add_lora(nnx.clone(model), 2, nnx.Rngs(1))
  np.testing.assert_allclose(lora(tokens), before, atol=1e-5)
  opt = nnx.Optimizer(lora, optax.adam(1e-2), wrt=nnx.LoRAParam)
  grads = nnx.grad(lambda m: m(tokens).sum(),
                   argnums=nnx.DiffState(0, nnx.LoRAParam))(lora)
  opt.update(lora, grads)
  factors = nnx.state(lora, nnx.LoRAParam)
  assert len(jax.tree.leaves(factors)) == 8  # a and b of 4 matrices
  plain = nnx.state(lora, nnx.Not(nnx.LoRAParam))
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(lora(tokens), before, atol=1e-5)


def test_corpora_split_by_document_and_requests_use_unseen_objects():
  prose, code = lm.prose_corpus(), lm.code_corpus()
  for corpus in (prose, code):
    assert len(corpus["train"]) > 4 * len(corpus["test"]) > 0
  sets = lm.behaviour_sets(65)
  objects = {part: {lm.behaviour_prompt(b, i).split(" the ")[1].split(".")[0]
                    for i in range(len(b.tokens))}
             for part, b in sets.items()}
  assert not objects["train"] & objects["test"]
  assert not objects["train"] & objects["val"]
  test = sets["test"]
  assert 0.3 < test.refused.mean() < 0.7
  for i in range(5):
    reply = lm.REFUSAL if test.refused[i] else lm.ACKNOWLEDGE
    masked = test.tokens[i, 1:][test.mask[i] > 0]
    assert bytes(masked.tolist()).decode() == reply


@pytest.mark.slow
def test_quick_run_writes_the_documented_report(tmp_path):
  out = tmp_path / "finetune_lm.json"
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "finetune_lm.py"), "--quick",
       "--out", str(out), "--methods", *METHODS],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert set(report["methods"]) == set(METHODS)
  for name, method in report["methods"].items():
    assert isinstance(method["knob"], str)
    assert len(method["points"]) == 2, name
    for point in method["points"]:
      assert set(point) >= {"value", "new_loss", "old_loss_rise",
                            "behaviour_retention"}
      assert all(np.isfinite(v) for v in point.values())
      assert 0.0 <= point["behaviour_retention"] <= 1.0
  assert 0.0 <= report["behaviour_before"] <= 1.0
  # Fine-tuning on code lowers the code loss for AdamW at every lr.
  for point in report["methods"]["adamw"]["points"]:
    assert point["new_loss"] < report["pretrained"]["code_test_loss"]
  # WiSE-FT at coefficient 1 is AdamW at the base learning rate.
  wise = {p["value"]: p for p in report["methods"]["wise_ft"]["points"]}
  adamw = {p["value"]: p for p in report["methods"]["adamw"]["points"]}
  assert wise[1.0]["new_loss"] == pytest.approx(
      adamw[report["base_lr"]]["new_loss"], rel=1e-6)
  # One compile per optimizer, not per knob value: pretraining (AdamW and
  # the continued SAL chain) and stage 3's adamw, l2_init, ewc, replay, sal
  # and sal_element chains; one step per probe drift; one LoRA step per
  # rank.
  assert report["traces"] == {"train_step": 8, "lora_step": 2,
                              "probe_step": 1, "probe_loss_step": 1}
  assert out.with_suffix(".png").exists()
  assert "| sal_probe |" in result.stdout
  # --merge reruns a method into the saved report and checks that the
  # pretrained model reproduces.
  merged = tmp_path / "merged.json"
  again = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "finetune_lm.py"), "--quick",
       "--merge", str(out), "--methods", "sal", "--out", str(merged)],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert again.returncode == 0, again.stderr[-3000:]
  merged = json.loads(merged.read_text())
  assert merged["methods"]["sal"]["points"] == report["methods"]["sal"][
      "points"]
  assert merged["merged"][0]["methods"] == ["sal"]
  assert merged["methods"]["adamw"] == report["methods"]["adamw"]
  # --refine adds one point per method whose front crosses the line, the
  # saved points kept as they were.
  refined = tmp_path / "refined.json"
  again = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "finetune_lm.py"), "--quick",
       "--refine", str(out), "--out", str(refined)],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert again.returncode == 0, again.stderr[-3000:]
  refined = json.loads(refined.read_text())
  values = refined["refined"][-1]["values"]
  assert values == finetune_lm.refine_values(report)
  assert values  # the quick grids' ends straddle the line somewhere
  for name, method in refined["methods"].items():
    old = report["methods"][name]["points"]
    added = [p for p in method["points"] if p not in old]
    assert len(method["points"]) == len(old) + (name in values), name
    assert [p["value"] for p in added] == ([values[name]] if name in values
                                           else [])
    assert [p["value"] for p in method["points"]] == sorted(
        p["value"] for p in method["points"])


def test_base_lr_is_adamw_least_forgetting_within_two_percent():
  def runs(new, rise):
    return [{"new_loss_val": new, "old_loss_rise_val": rise}] * 2
  adamw = {1e-4: runs(1.80, 0.02), 3e-4: runs(1.66, 0.09),
           1e-3: runs(1.65, 0.20), 3e-3: runs(1.70, 0.40)}
  assert finetune_lm.matched_lr(adamw) == 3e-4
  adamw[3e-4] = runs(1.70, 0.09)  # now outside 1.02 x 1.65
  assert finetune_lm.matched_lr(adamw) == 1e-3


def test_refine_adds_one_value_where_each_front_crosses_the_line():
  def point(value, new, rise):
    return {"value": value, "new_loss_val": new, "old_loss_rise_val": rise}
  report = {"methods": {
      # U-shaped in the lr: the line (1.02 x 1.60 = 1.632) is crossed twice;
      # the low-lr step's inside end (3e-4) forgets less than 3e-3's.
      "adamw": {"points": [point(1e-4, 1.70, 0.04), point(3e-4, 1.62, 0.09),
                           point(1e-3, 1.60, 0.20), point(3e-3, 1.62, 0.40),
                           point(1e-2, 1.70, 0.60)]},
      "sal": {"points": [point(30.0, 1.65, 0.03), point(3.0, 1.61, 0.07),
                         point(10.0, 1.62, 0.05)]},
      "wise_ft": {"points": [point(0.75, 1.64, 0.0), point(1.0, 1.60, 0.09)]},
      "lora": {"points": [point(10, 1.70, 0.1), point(30, 1.62, 0.12)]},
      "sal_continued": {"points": [point(1.0, 1.70, 0.05),
                                   point(3.0, 1.75, 0.03)]},
  }}
  values = finetune_lm.refine_values(report)
  assert values["adamw"] == pytest.approx(np.sqrt(1e-4 * 3e-4))
  assert values["sal"] == pytest.approx(np.sqrt(10.0 * 30.0))
  assert values["wise_ft"] == pytest.approx(0.875)
  assert values["lora"] == 17.0
  assert "sal_continued" not in values  # its grid never crosses the line
