"""Teach a language model something new while it keeps what it had.

A byte-level transformer (``examples/byte_lm.py``, Flax NNX) is trained in
three stages:

1. **pretraining** on English prose (the Python documentation's topics);
2. **a trained behaviour**: requests of one kind (``"Request: delete the
   ..."``) answered with a refusal, ``" I will not do that."``, and of
   another kind (``read``, ``print``, ...) with ``" Sure, here it is."``,
   mixed half and half with prose; measured on held-out requests (unseen
   objects) as the fraction answered exactly so under greedy decoding;
3. **a new capability**: fine-tuning on the standard library's Python source.

Stage 3 is run by every method, each swept over its knob, from the same
pretrained model, on the same batches per seed:

==============  ========================================================
``adamw``       plain AdamW (knob: learning rate)
``l2_init``     ``baselines.l2_init`` toward the pretrained weights (strength)
``ewc``         ``baselines.ewc`` with the Fisher of stages 1-2: prose's and
                the replies', combined by ``sal.combine_fishers`` (strength)
``lora``        ``nnx.LoRA`` on the attention and MLP matrices (rank)
``wise_ft``     interpolation pretrained -> AdamW fine-tuned (coefficient)
``replay``      a fraction of each code batch is prose (uses old data)
``sal``         ``chain(sal.protect(restore=lambda), adamw)`` after
                ``sal.fisher_kronecker`` + ``sal.consolidate`` (lambda)
``sal_probe``   ``chain(sal.protect(budget=eps), adamw)`` after the same
                consolidation, passed the KL drift of a probe of earlier
                text and requests as ``drift=`` (eps, nats)
``sal_continued`` one ``chain(sal.protect(), adamw)`` through all three
                stages, no consolidate call; its restore is set for stage 3
``sal_element`` (optional) ``chain(sal.protect(restore=lambda,
                granularity="element"), adamw)`` after
                ``sal.fisher_diagonal`` + ``sal.consolidate`` (lambda)
==============  ========================================================

Every method but AdamW fine-tunes at AdamW's *matched* learning rate: the
one that forgets least (validation prose-loss rise) among those whose
validation code loss is within 2 % of AdamW's best, the reference point
of the comparison; the methods then trade code loss for retention from
there. Reported on held-out test text: the code loss after
stage 3 (``new_loss``), the rise of the prose loss over stage 3
(``old_loss_rise``) and the share of the held-out requests answered as
trained before stage 3 that still are after it (``behaviour_retention``),
means over seeds (the seed varies the stage-3 batches and LoRA's init; the
pretrained model is one).

  python examples/finetune_lm.py [--quick] [--seeds 3] [--out FILE]
  python examples/finetune_lm.py --refine FILE --out FILE  # see refine_values
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import sal_jax as sal
from sal_jax import baselines

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import byte_lm as lm  # pylint: disable=g-import-not-at-top,wrong-import-position


@dataclasses.dataclass(frozen=True)
class Config:
  width: int = 96
  depth: int = 2
  context: int = 64
  batch: int = 16
  pretrain_steps: int = 2000
  behaviour_steps: int = 150
  finetune_steps: int = 300
  pretrain_lr: float = 1e-3
  eval_rows: int = 256
  fisher_rows: int = 256
  probe_rows: int = 16
  # One density for every trained method: half-decade steps (factors of
  # about 3; WiSE-FT's coefficient, a linear interpolation, in eighths),
  # each grid running from about plain AdamW to clearly over-protected
  # and bracketing where the method crosses AdamW's matched code loss.
  # Replay, the reference that uses old data, keeps its own grid.
  grids: tuple = (
      ("adamw", "learning rate", (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)),
      ("l2_init", "strength", (0.003, 0.01, 0.03, 0.1, 0.3)),
      ("ewc", "strength (Fisher of mean 1)", (0.003, 0.01, 0.03, 0.1, 0.3)),
      ("lora", "rank", (1, 3, 10, 30, 96)),  # 96: full rank (width 96)
      ("wise_ft", "coefficient", (0.5, 0.625, 0.75, 0.875, 1.0)),
      ("replay", "prose fraction", (0.0625, 0.125, 0.25, 0.5)),
      ("sal", "restore", (3.0, 10.0, 30.0, 100.0, 300.0)),
      ("sal_probe", "budget (nats)", (0.02, 0.063, 0.2, 0.63, 2.0)),
      ("sal_continued", "restore", (0.3, 1.0, 3.0, 10.0, 30.0)),
      ("sal_probe_loss", "budget (nats of probe-loss rise)",
       (0.01, 0.03, 0.1, 0.3)),
      ("sal_element", "restore", (3.0, 10.0, 30.0, 100.0, 300.0)),
  )
  # These run only when asked for (--methods), to keep the default run
  # within 30 minutes.
  optional: tuple = ("sal_probe_loss", "sal_element")


QUICK = Config(width=64, depth=1, pretrain_steps=300, behaviour_steps=60,
               finetune_steps=60, eval_rows=64, fisher_rows=32, grids=tuple(
                   (name, knob, (values[0], values[-1]))
                   for name, knob, values in Config.grids))
LORA_LR_FACTOR = 3.0
MATCH = 1.02  # "matched new-domain loss": within 2 % of AdamW's best


# -- steps ------------------------------------------------------------------


def mean_loss(model, tokens, mask):
  return lm.token_losses(model, tokens, mask).mean()


# How often each step function was traced (= compiled): once per optimizer,
# not once per knob value or seed, since each method's knob is injected.
TRACES = collections.Counter()


@nnx.jit
def train_step(model, optimizer, tokens, mask):
  TRACES["train_step"] += 1
  loss, grads = nnx.value_and_grad(mean_loss)(model, tokens, mask)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def lora_step(model, optimizer, tokens, mask):
  TRACES["lora_step"] += 1
  only_lora = nnx.DiffState(0, nnx.LoRAParam)
  loss, grads = nnx.value_and_grad(mean_loss, argnums=only_lora)(
      model, tokens, mask)
  optimizer.update(model, grads)
  return loss


def probe_drift(model, probe):
  """Mean of the KL drift on the prose probe and on the requests' replies."""
  return 0.5 * (
      sal.prediction_drift(probe["text_logits"], model(probe["text"][:, :-1]))
      + sal.prediction_drift(probe["request_logits"],
                             model(probe["requests"][:, :-1]),
                             where=probe["reply_mask"] > 0))


def probe_loss_rise(model, probe):
  """Mean of the rises (floored at 0) of the probe's own losses.

  Unlike the KL, an improvement of the old predictions does not count.
  """
  text = lm.token_losses(model, probe["text"], probe["text_mask"]).mean()
  replies = lm.token_losses(model, probe["requests"],
                            probe["reply_mask"]).mean()
  return 0.5 * (jnp.maximum(text - probe["text_loss"], 0.0)
                + jnp.maximum(replies - probe["reply_loss"], 0.0))


def _budgeted_step(name, drift_fn):
  """A train step that passes ``drift_fn(model, probe)`` as ``drift=``."""

  @nnx.jit
  def step(model, optimizer, tokens, mask, probe):
    TRACES[name] += 1
    loss, grads = nnx.value_and_grad(mean_loss)(model, tokens, mask)
    optimizer.update(model, grads, drift=drift_fn(model, probe))
    return loss

  return step


probe_step = _budgeted_step("probe_step", probe_drift)
probe_loss_step = _budgeted_step("probe_loss_step", probe_loss_rise)


@nnx.jit
def _eval_losses(model, tokens, mask):
  return lm.token_losses(model, tokens, mask)


# -- data and evaluation ----------------------------------------------------


class Data:
  """The three corpora, fixed evaluation rows and batch samplers."""

  def __init__(self, cfg: Config):
    self.cfg = cfg
    n = cfg.context + 1
    self.prose = lm.prose_corpus()
    self.code = lm.code_corpus()
    self.behaviour = lm.behaviour_sets(n)
    self.eval = {(corpus, part): lm.fixed_windows(data[part], cfg.eval_rows, n)
                 for corpus, data in (("prose", self.prose),
                                      ("code", self.code))
                 for part in ("val", "test")}
    self.ones = np.ones((cfg.batch, cfg.context), np.float32)

  def prose_batch(self, rng):
    return lm.windows(self.prose["train"], self.cfg.batch, self.cfg.context + 1,
                      rng), self.ones

  def behaviour_batch(self, rng):
    """Half requests (loss on the reply), half prose."""
    half = self.cfg.batch // 2
    rows = rng.integers(0, len(self.behaviour["train"].tokens), half)
    prose = lm.windows(self.prose["train"], self.cfg.batch - half,
                       self.cfg.context + 1, rng)
    tokens = np.concatenate([self.behaviour["train"].tokens[rows], prose])
    mask = np.concatenate([self.behaviour["train"].mask[rows],
                           self.ones[half:]])
    return tokens, mask

  def code_batch(self, rng, prose_fraction=0.0):
    k = int(round(prose_fraction * self.cfg.batch))
    n = self.cfg.context + 1
    tokens = np.concatenate([
        lm.windows(self.prose["train"], k, n, rng),
        lm.windows(self.code["train"], self.cfg.batch - k, n, rng)])
    return tokens, self.ones


def evaluate(model, data: Data) -> dict:
  out = {}
  for (corpus, part), rows in data.eval.items():
    mask = np.ones((len(rows), data.cfg.context), np.float32)
    out[f"{corpus}_{part}"] = float(_eval_losses(model, rows, mask).mean())
  for part in ("val", "test"):
    out[f"answered_{part}"] = lm.answered_as_trained(
        model, data.behaviour[part])
  return out


def summarise(before: dict, after: dict) -> dict:
  kept = after["answered_test"][before["answered_test"]]
  kept_val = after["answered_val"][before["answered_val"]]
  return {
      "new_loss": after["code_test"],
      "old_loss_rise": after["prose_test"] - before["prose_test"],
      "behaviour_retention": float(kept.mean()) if kept.size else 0.0,
      "new_loss_val": after["code_val"],
      "old_loss_rise_val": after["prose_val"] - before["prose_val"],
      "behaviour_retention_val": float(kept_val.mean()) if kept_val.size
                                 else 0.0,
  }


def run_steps(model, optimizer, step, sample, steps, seed, desc, *extra):
  rng = np.random.default_rng(seed)
  # cached_partial skips re-walking the model and optimizer graphs per call.
  step = nnx.cached_partial(step, model, optimizer)
  losses = []
  for _ in tqdm(range(steps), desc=desc, leave=False, mininterval=1.0):
    losses.append(step(*sample(rng), *extra))
  return float(np.mean(jax.device_get(losses[-20:])))


# -- stages 1 and 2 ---------------------------------------------------------


def pretrain(data: Data, optimizer_for, seed: int, desc: str):
  """Stages 1 and 2; returns the model and its optimizer."""
  cfg = data.cfg
  model = lm.ByteLM(nnx.Rngs(seed), width=cfg.width, depth=cfg.depth,
                    context=cfg.context)
  optimizer = optimizer_for(model)
  run_steps(model, optimizer, train_step, data.prose_batch,
            cfg.pretrain_steps, seed, f"{desc}: prose")
  run_steps(model, optimizer, train_step, data.behaviour_batch,
            cfg.behaviour_steps, seed + 1, f"{desc}: behaviour")
  return model, optimizer


def fisher_of_old_data(model, data: Data, fisher=sal.fisher_diagonal):
  """The Fisher of stages 1-2 (diagonal, or ``sal.fisher_kronecker``'s):
  of prose windows and of the trained replies, each normalised to mean 1
  and averaged (``sal.combine_fishers``): pooled, the confidently learned
  replies' tiny Fisher would barely count."""
  graphdef, params = nnx.split(model, nnx.Param)

  def example_losses(p, batch):
    return lm.token_losses(nnx.merge(graphdef, p), *batch)

  rng = np.random.default_rng(7)
  rows = data.cfg.fisher_rows
  pick = rng.integers(0, len(data.behaviour["train"].tokens), rows)
  sources = [
      (lm.windows(data.prose["train"], rows, data.cfg.context + 1, rng),
       np.ones((rows, data.cfg.context), np.float32)),
      (data.behaviour["train"].tokens[pick], data.behaviour["train"].mask[pick]),
  ]
  return params, sal.combine_fishers(
      [fisher(example_losses, params, [batch]) for batch in sources],
      params=params)


def make_probe(model, data: Data):
  """Earlier text and trained requests, with the pretrained model's logits."""
  rng = np.random.default_rng(11)
  n = data.cfg.probe_rows
  text = lm.windows(data.prose["train"], n, data.cfg.context + 1, rng)
  pick = rng.integers(0, len(data.behaviour["train"].tokens), n)
  requests = data.behaviour["train"].tokens[pick]
  reply_mask = data.behaviour["train"].mask[pick]
  text_mask = np.ones((n, data.cfg.context), np.float32)
  return {
      "text": jnp.asarray(text), "text_mask": jnp.asarray(text_mask),
      "requests": jnp.asarray(requests), "reply_mask": jnp.asarray(reply_mask),
      "text_logits": model(text[:, :-1]),
      "request_logits": model(requests[:, :-1]),
      "text_loss": lm.token_losses(model, text, text_mask).mean(),
      "reply_loss": lm.token_losses(model, requests, reply_mask).mean()}


# -- stage 3 ----------------------------------------------------------------


def set_hyperparam(optimizer, name, value, index=None):
  """Sets an ``inject_hyperparams`` value of an nnx.Optimizer (in a chain:
  of its ``index``-th transformation)."""
  state = optimizer.opt_state if index is None else optimizer.opt_state[index]
  state.hyperparams[name][...] = jnp.asarray(value, jnp.float32)


class Methods:
  """Builds each method's optimizer once, so every value reuses one compile."""

  def __init__(self, base_lr: float, fisher=None, params=None):
    self.fisher, self.params = fisher, params
    if fisher is not None:
      mean = np.mean(np.concatenate([np.ravel(f) for f in
                                     jax.tree.leaves(fisher)]))
      self.fisher = jax.tree.map(lambda f: f / mean, fisher)
    self.base_lr = base_lr
    adamw = optax.adamw(base_lr)
    self.tx = {
        "adamw": optax.inject_hyperparams(optax.adamw)(learning_rate=base_lr),
        "l2_init": optax.chain(
            optax.inject_hyperparams(baselines.l2_init)(strength=1.0), adamw),
        "ewc": optax.chain(
            optax.inject_hyperparams(baselines.ewc)(strength=1.0), adamw),
        "replay": adamw,
        "sal": optax.chain(
            optax.inject_hyperparams(sal.protect)(restore=1.0), adamw),
        "sal_probe": optax.chain(
            optax.inject_hyperparams(sal.protect)(budget=0.1), adamw),
        "sal_element": optax.chain(
            optax.inject_hyperparams(sal.protect)(
                restore=1.0, granularity="element"), adamw),
        "lora": optax.adamw(LORA_LR_FACTOR * base_lr),
    }

  def optimizer(self, name, value, model):
    tx = self.tx["sal_probe" if name == "sal_probe_loss" else name]
    wrt = nnx.LoRAParam if name == "lora" else nnx.Param
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    if name == "adamw":
      set_hyperparam(optimizer, "learning_rate", value)
    elif name in ("l2_init", "ewc", "sal", "sal_probe", "sal_probe_loss",
                  "sal_element"):
      knob = {"l2_init": "strength", "ewc": "strength", "sal": "restore",
              "sal_probe": "budget", "sal_probe_loss": "budget",
              "sal_element": "restore"}[name]
      set_hyperparam(optimizer, knob, value, index=0)
    if name == "ewc":
      baselines.ewc_consolidate(optimizer, self.params, self.fisher)
    if name in ("sal", "sal_probe", "sal_probe_loss"):
      sal.consolidate(optimizer, self.params, self.kronecker_fisher)
    if name == "sal_element":
      sal.consolidate(optimizer, self.params, self.fisher)
    return optimizer


def finetune(name, value, pretrained, methods: Methods, data: Data, seed,
             probe, continued=None):
  """Stage 3 for one method and knob value; returns the fine-tuned model."""
  steps, desc = data.cfg.finetune_steps, f"{name} {value:g}"
  sample = data.code_batch
  if name == "sal_continued":
    model, optimizer = continued
    model, optimizer = nnx.clone(model), nnx.clone(optimizer)
    set_hyperparam(optimizer, "restore", value, index=0)
    set_hyperparam(optimizer, "learning_rate", methods.base_lr, index=1)
    step, extra = train_step, ()
  else:
    model = nnx.clone(pretrained)
    if name == "lora":
      model = lm.add_lora(model, int(value), nnx.Rngs(seed))
    optimizer = methods.optimizer(name, value, model)
    step = {"lora": lora_step, "sal_probe": probe_step,
            "sal_probe_loss": probe_loss_step}.get(name, train_step)
    extra = (probe,) if name.startswith("sal_probe") else ()
    if name == "replay":
      sample = lambda rng: data.code_batch(rng, value)  # noqa: E731
  run_steps(model, optimizer, step, sample, steps, 1000 + seed, desc, *extra)
  return model


def interpolate(pretrained, finetuned, coefficient):
  """WiSE-FT: (1 - a) * pretrained + a * fine-tuned, as a new model."""
  model = nnx.clone(pretrained)
  start = nnx.state(pretrained, nnx.Param)
  end = nnx.state(finetuned, nnx.Param)
  nnx.update(model, jax.tree.map(
      lambda a, b: (1 - coefficient) * a + coefficient * b, start, end))
  return model


SAMPLE_PROMPTS = ("The for statement is used to ", "def __init__(self, ",
                  "Request: delete the window.\nResponse:")


def samples(model) -> dict:
  return {p: lm.generate(model, p) for p in SAMPLE_PROMPTS}


# -- the run ----------------------------------------------------------------


def mean_points(runs: dict) -> list[dict]:
  """Per knob value, the mean over seeds of each metric."""
  return [{"value": float(value),
           **{k: float(np.mean([r[k] for r in per_seed]))
              for k in per_seed[0]}}
          for value, per_seed in runs.items()]


def matched_lr(adamw_runs: dict) -> float:
  """AdamW's least-forgetting lr within 2 % of its best code loss (valid)."""
  val = {lr: (np.mean([r["new_loss_val"] for r in runs]),
              np.mean([r["old_loss_rise_val"] for r in runs]))
         for lr, runs in adamw_runs.items()}
  best = min(new for new, _ in val.values())
  return min((lr for lr, (new, _) in val.items() if new <= MATCH * best),
             key=lambda lr: val[lr][1])


def sweep(cfg: Config, seeds: int, methods_wanted, base_lr=None,
          values=None) -> dict:
  """Runs ``methods_wanted`` over their grids (or over ``values``, a dict
  method -> knob values); with ``base_lr`` given, the methods fine-tune at
  that lr rather than at the one AdamW's grid matches."""
  data = Data(cfg)
  report = {"config": dataclasses.asdict(cfg), "methods": {}, "samples": {}}
  knobs = {name: (knob, grid) for name, knob, grid in cfg.grids}
  if values is not None:
    knobs = {name: (knobs[name][0], tuple(v)) for name, v in values.items()}
  t0 = time.time()
  pretrained, _ = pretrain(
      data, lambda m: nnx.Optimizer(m, optax.adamw(cfg.pretrain_lr),
                                    wrt=nnx.Param), 0, "pretraining")
  before = evaluate(pretrained, data)
  report["pretrained"] = {
      "prose_test_loss": before["prose_test"],
      "code_test_loss": before["code_test"],
      "behaviour_test": float(before["answered_test"].mean()),
      "seconds": time.time() - t0}
  report["behaviour_before"] = float(before["answered_test"].mean())
  report["samples"]["pretrained"] = samples(pretrained)

  # AdamW first: the other methods fine-tune at its matched lr.
  results = {name: {} for name in knobs}
  finetuned = {}
  adamw_only = Methods(cfg.pretrain_lr)
  lrs = knobs["adamw"][1] if "adamw" in methods_wanted else ()
  # WiSE-FT interpolates toward AdamW fine-tuned at the base lr.
  base_runs = (base_lr,) if ("wise_ft" in methods_wanted and base_lr
                             is not None and base_lr not in lrs) else ()
  for seed in range(seeds):
    for lr in (*lrs, *base_runs):
      model = finetune("adamw", lr, pretrained, adamw_only, data, seed,
                       None)
      finetuned[seed, lr] = model
      summary = summarise(before, evaluate(model, data))
      if lr in lrs:
        results["adamw"].setdefault(lr, []).append(summary)
      else:
        report.setdefault("base_lr_runs", []).append(summary)
  if base_lr is None:
    base_lr = matched_lr(results["adamw"])
  report["base_lr"] = base_lr

  params, fisher = fisher_of_old_data(pretrained, data)
  methods = Methods(base_lr, fisher, params)
  if {"sal", "sal_probe", "sal_probe_loss"} & set(methods_wanted):
    _, methods.kronecker_fisher = fisher_of_old_data(
        pretrained, data, sal.fisher_kronecker)
  probe = make_probe(pretrained, data)
  continued = before_continued = None
  if "sal_continued" in methods_wanted:
    continued = pretrain(data, lambda m: nnx.Optimizer(m, optax.chain(
        optax.inject_hyperparams(sal.protect)(restore=1.0),
        optax.inject_hyperparams(optax.adamw)(learning_rate=cfg.pretrain_lr)),
                                                       wrt=nnx.Param),
                         0, "pretraining with sal.protect()")
    before_continued = evaluate(continued[0], data)
    report["pretrained_continued"] = {
        "prose_test_loss": before_continued["prose_test"],
        "code_test_loss": before_continued["code_test"],
        "behaviour_test": float(before_continued["answered_test"].mean()),
        "consolidations": int(sal.metrics(continued[1])["consolidations"])}

  runs = [(name, value) for name, (_, values) in knobs.items()
          for value in values if name in methods_wanted
          and name not in ("adamw", "wise_ft")]
  for seed in range(seeds):
    for name, value in tqdm(runs, desc=f"stage 3, seed {seed}"):
      model = finetune(name, value, pretrained, methods, data, seed, probe,
                       continued)
      start = before_continued if name == "sal_continued" else before
      results[name].setdefault(value, []).append(
          summarise(start, evaluate(model, data)))
      if seed == 0:
        report["samples"][f"{name} {value:g}"] = samples(model)
    for coefficient in (knobs["wise_ft"][1] if "wise_ft" in methods_wanted
                        else ()):
      model = interpolate(pretrained, finetuned[seed, base_lr], coefficient)
      results["wise_ft"].setdefault(coefficient, []).append(
          summarise(before, evaluate(model, data)))
  for lr in lrs if seeds else ():
    report["samples"][f"adamw {lr:g}"] = samples(finetuned[0, lr])

  for name, (knob, _) in knobs.items():
    if results[name]:
      report["methods"][name] = {"knob": knob,
                                 "points": mean_points(results[name]),
                                 "seeds": {f"{v:g}": r for v, r in
                                           results[name].items()}}
  report["traces"] = dict(TRACES)
  report["seconds"] = time.time() - t0
  return report


def _saved(cfg: Config, seeds: int, path: pathlib.Path, flag: str) -> dict:
  """A saved report, if it was run with this configuration and seeds."""
  old = json.loads(path.read_text())
  now = json.loads(json.dumps(dataclasses.asdict(cfg)))
  # The grids may gain methods; the rest must be as it was.
  same = all(old["config"][k] == v for k, v in now.items()
             if k not in ("grids", "optional"))
  grids = {g[0]: g for g in now["grids"]}
  same &= all(grids.get(g[0]) == g for g in old["config"]["grids"])
  if not same:
    raise SystemExit(f"{flag}: {path} was run with another configuration")
  if old["seeds"] != seeds:
    raise SystemExit(f"{flag}: {path} was run with {old['seeds']} seeds")
  return old


def _check_pretrained(old: dict, new: dict, flag: str) -> None:
  for key in ("prose_test_loss", "code_test_loss", "behaviour_test"):
    if abs(new["pretrained"][key] - old["pretrained"][key]) > 1e-5:
      raise SystemExit(
          f"{flag}: the pretrained model no longer reproduces ({key}: "
          f"{new['pretrained'][key]} vs {old['pretrained'][key]})")


def _record(old: dict, new: dict, key: str, **what) -> dict:
  """``old`` with ``new``'s samples and, under ``key``, a record of the
  added run (``what``, its traces and seconds)."""
  old["samples"].update({k: v for k, v in new["samples"].items()
                         if k != "pretrained"})
  old.setdefault(key, []).append(
      {**what, "traces": new["traces"], "seconds": new["seconds"]})
  return old


def merge(cfg: Config, seeds: int, names, path: pathlib.Path) -> dict:
  """Adds methods to a saved report, checking that it reproduces."""
  old = _saved(cfg, seeds, path, "--merge")
  names = [n for n in names if n not in ("adamw", "wise_ft")]
  new = sweep(cfg, seeds, set(names), base_lr=old["base_lr"])
  _check_pretrained(old, new, "--merge")
  old["methods"].update(new["methods"])
  return _record(old, new, "merged", methods=names)


def refine_values(report: dict) -> dict:
  """Per method, one knob value inside the step of its front that crosses
  the matched line (validation code loss at 1.02 x AdamW's best).

  Every method, AdamW included, gets the same: where two neighbouring
  values of its grid have their validation code losses on either side of
  the line, the value between them (the geometric mean; WiSE-FT's
  coefficient: the arithmetic one; LoRA's rank: rounded). Where the front
  crosses the line more than once (AdamW's code loss is U-shaped in the
  lr), the crossing whose inside end forgets less (validation prose-loss
  rise). A method whose grid has no crossing gets none. Chosen on
  validation only: the test split is what the refined point reports.
  """
  methods = report["methods"]
  line = MATCH * min(p["new_loss_val"] for p in methods["adamw"]["points"])
  out = {}
  for name, method in methods.items():
    points = sorted(method["points"], key=lambda p: p["value"])
    inside = lambda p: p["new_loss_val"] <= line  # noqa: E731
    steps = [(p, q) for p, q in zip(points, points[1:])
             if inside(p) != inside(q)]
    if not steps:
      continue
    p, q = min(steps, key=lambda s: min(
        x["old_loss_rise_val"] for x in s if inside(x)))
    lo, hi = p["value"], q["value"]
    if name == "wise_ft":
      value = (lo + hi) / 2
    else:
      value = float(np.sqrt(lo * hi))
      if name == "lora":
        value = float(round(value))
    if lo < value < hi:
      out[name] = value
  return out


def refine(cfg: Config, seeds: int, path: pathlib.Path) -> dict:
  """Adds :func:`refine_values`' points to a saved report (reproduced)."""
  old = _saved(cfg, seeds, path, "--refine")
  values = refine_values(old)
  new = sweep(cfg, seeds, set(values), base_lr=old["base_lr"],
              values={name: (v,) for name, v in values.items()})
  _check_pretrained(old, new, "--refine")
  # AdamW at the base lr, rerun for WiSE-FT, must match the saved runs.
  base = old["methods"]["adamw"]["seeds"].get(f"{old['base_lr']:g}", [])
  for saved, rerun in zip(base, new.get("base_lr_runs", [])):
    if abs(saved["new_loss"] - rerun["new_loss"]) > 1e-4:
      raise SystemExit("--refine: AdamW at the base lr no longer "
                       f"reproduces ({rerun['new_loss']} vs "
                       f"{saved['new_loss']})")
  for name, method in new["methods"].items():
    into = old["methods"][name]
    into["points"] = sorted(into["points"] + method["points"],
                            key=lambda p: p["value"])
    into["seeds"].update(method["seeds"])
  return _record(old, new, "refined", values=values)


# -- report -----------------------------------------------------------------


def bars(report: dict) -> dict:
  """The issue's bars, from the mean points."""
  methods = report["methods"]
  adamw = methods["adamw"]["points"]
  best_loss = min(p["new_loss"] for p in adamw)
  # AdamW's own matched point: its least forgetting within 2 % of its best.
  best = min((p for p in adamw if p["new_loss"] <= MATCH * best_loss),
             key=lambda p: p["old_loss_rise"])
  out = {"adamw_best_new_loss": best_loss,
         "adamw_lr_at_best": best["value"],
         "adamw_old_loss_rise_at_best": best["old_loss_rise"],
         "adamw_retention_at_best": best["behaviour_retention"],
         "adamw_min_retention": min(p["behaviour_retention"] for p in adamw)}
  for name in ("sal", "sal_probe", "sal_probe_loss", "sal_continued",
               "l2_init", "ewc", "lora", "wise_ft", "replay"):
    if name not in methods:
      continue
    matched = [p for p in methods[name]["points"]
               if p["new_loss"] <= MATCH * best_loss]
    entry = {"matched_points": len(matched)}
    if matched:
      keep = min(matched, key=lambda p: p["old_loss_rise"])
      entry.update(value=keep["value"],
                   old_loss_rise_ratio=keep["old_loss_rise"]
                   / max(best["old_loss_rise"], 1e-9),
                   behaviour_retention=keep["behaviour_retention"])
    out[name] = entry
  for name in ("sal", "sal_probe", "sal_probe_loss", "sal_continued"):
    if name not in methods:
      continue
    # Points of this method (inside the other's code-loss range) that some
    # point of the other beats or ties on code loss and on forgetting
    # (prose-loss rise; behaviour kept).
    for key, worse in (("dominated_points", lambda q, p: q["old_loss_rise"]
                        <= p["old_loss_rise"]),
                       ("dominated_points_behaviour", lambda q, p:
                        q["behaviour_retention"] >= p["behaviour_retention"])):
      dominated = {}
      for other in ("lora", "l2_init", "ewc", "wise_ft", "adamw", "replay"):
        if other not in methods:
          continue
        front = methods[other]["points"]
        lo = min(p["new_loss"] for p in front)
        hi = max(p["new_loss"] for p in front)
        dominated[other] = sum(
            any(q["new_loss"] <= p["new_loss"] and worse(q, p) for q in front)
            for p in methods[name]["points"] if lo <= p["new_loss"] <= hi)
      out[name][key] = dominated
  return out


def print_table(report: dict) -> None:
  print(f"\npretrained: prose loss {report['pretrained']['prose_test_loss']:.3f}"
        f", code loss {report['pretrained']['code_test_loss']:.3f}, "
        f"behaviour {report['behaviour_before']:.3f}; AdamW's matched "
        f"lr {report['base_lr']:g}")
  print("| method | knob | value | code loss | prose loss rise | behaviour "
        "kept |")
  print("|---|---|---|---|---|---|")
  for name, method in report["methods"].items():
    for p in method["points"]:
      print(f"| {name} | {method['knob']} | {p['value']:g} | "
            f"{p['new_loss']:.3f} | {p['old_loss_rise']:+.3f} | "
            f"{p['behaviour_retention']:.2f} |")


def print_matched(report: dict) -> None:
  """Per method, its point nearest AdamW's best code loss (the bars' view)."""
  b = report["bars"]
  print(f"\nAt matched code loss (<= 1.02 x AdamW's best, "
        f"{b['adamw_best_new_loss']:.3f}): AdamW's least prose-loss rise there "
        f"{b['adamw_old_loss_rise_at_best']:+.3f} (lr "
        f"{b['adamw_lr_at_best']:g}), behaviour kept "
        f"{b['adamw_retention_at_best']:.2f}")
  print("| method | matched points | value | prose rise / AdamW's | behaviour "
        "kept |")
  print("|---|---|---|---|---|")
  for name in report["methods"]:
    entry = b.get(name)
    if not entry:
      continue
    if entry["matched_points"]:
      print(f"| {name} | {entry['matched_points']} | {entry['value']:g} | "
            f"{entry['old_loss_rise_ratio']:.2f} | "
            f"{entry['behaviour_retention']:.2f} |")
    else:
      print(f"| {name} | 0 | - | - | - |")


def plot(report: dict, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  for i, (name, method) in enumerate(report["methods"].items()):
    points = method["points"]  # in the knob's order
    x = [p["new_loss"] for p in points]
    # tab20's dark then light shades: 11 methods, no colour twice.
    color = plt.get_cmap("tab20").colors[2 * i % 20 + (2 * i >= 20)]
    style = dict(color=color, marker="o", label=name,
                 ls="--" if name == "replay" else "-",
                 lw=2.5 if name.startswith("sal") else 1.2)
    axes[0].plot(x, [p["old_loss_rise"] for p in points], **style)
    axes[1].plot(x, [p["behaviour_retention"] for p in points], **style)
  axes[0].set_ylabel("rise of the prose loss over fine-tuning (nats/byte)")
  axes[1].set_ylabel("held-out requests still answered as trained")
  for ax in axes:
    ax.set_xlabel("code loss after fine-tuning (nats/byte, test)")
    ax.grid(alpha=0.3)
  axes[0].set_title("learning vs forgetting (lower left is better)")
  axes[1].set_title("learning vs behaviour kept (upper left is better)")
  axes[1].legend(fontsize=8, title="each curve: the method's knob, in order")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="a small model and short stages (a smoke test)")
  parser.add_argument("--seeds", type=int, default=None,
                      help="stage-3 seeds (default 3, 1 with --quick)")
  parser.add_argument("--methods", nargs="+",
                      default=[name for name, _, _ in Config.grids
                               if name not in Config.optional])
  parser.add_argument("--merge", metavar="FILE",
                      help="run only --methods (not adamw, wise_ft) at the "
                           "base lr of the report in FILE and add them to it")
  parser.add_argument("--refine", metavar="FILE",
                      help="add to the report in FILE one point per method "
                           "inside the step where its front crosses the "
                           "matched line (see refine_values)")
  parser.add_argument("--out", default="outputs/finetune_lm.json")
  parser.add_argument("--from-json", metavar="FILE",
                      help="no training: redo the table, bars and plot of a "
                           "saved report")
  args = parser.parse_args()
  if args.from_json:
    report = json.loads(pathlib.Path(args.from_json).read_text())
  else:
    cfg = QUICK if args.quick else Config()
    seeds = args.seeds or (1 if args.quick else 3)
    if args.refine:
      report = refine(cfg, seeds, pathlib.Path(args.refine))
    elif args.merge:
      report = merge(cfg, seeds, args.methods, pathlib.Path(args.merge))
    else:
      report = sweep(cfg, seeds, set(args.methods) | {"adamw", "wise_ft"})
      report["seeds"] = seeds
  report["bars"] = bars(report)
  print_table(report)
  print_matched(report)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  plot(report, out.with_suffix(".png"))
  print(f"\nwrote {out} and {out.with_suffix('.png')} in "
        f"{report['seconds']:.0f} s")


if __name__ == "__main__":
  main()
