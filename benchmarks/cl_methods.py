"""The methods compared by the continual-learning benchmark, with their grids.

Each method is a factory ``make(hp, key) -> optax transformation`` whose
hyperparameters ``hp`` arrive as traced scalars (one jitted program trains
every configuration of the grid under ``vmap``), ``key`` a per-seed raw
PRNG key (UPGD's noise), plus a tuning grid and optional hooks for the
engine (``cl_engine``): ``boundary`` at every segment end (on task-free
protocols these are *oracle* boundaries), ``eval_params`` for the weights
evaluated, ``replay`` for a reservoir buffer of earlier examples.

Every method gets the same budget of :data:`BUDGET` configurations, the
learning rate always among them: AdamW and SGD 6 learning rates x 2 values
of their second knob (weight decay, momentum); the reference SAL 6 learning
rates x 2 thresholds; every other method 3 learning rates x 4 values of its
knob (the strength, the average's decay, the filtered fraction, the replay
weight, the interpolation coefficient). The learning-rate grids are centred
per protocol (:data:`LR_CENTER`, AdamW's best on pilot runs), in
half-decade steps; the internal decays of the penalties (SAL's included)
stay at their library defaults, the same rule for every method.
``--quick`` keeps 2 configurations.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
import optax

import sal_jax as sal
from sal_jax import baselines

BUDGET = 12
LR_CENTER = {"permuted_digits": 3e-3, "split_mnist1d": 3e-3,
             "digits_task": 1e-3, "digits_domain": 3e-4, "stream": 1e-3,
             "recurring": 3e-3, "gradual": 3e-3}
SGD_FACTOR = 30.0  # SGD's learning rates sit this much above Adam's
HALF_DECADES_6 = (1 / 30, 1 / 10, 1 / 3, 1.0, 3.0, 10.0)
HALF_DECADES_3 = (1 / 3, 1.0, 3.0)
ONLINE_EWC_DECAY = 0.9  # gamma of online EWC (Schwarz et al.)


@dataclasses.dataclass(frozen=True)
class Method:
  """A benchmarked method.

  Attributes:
    name: registry key.
    description: the optax expression, for the report.
    make: ``make(hp, key)`` -> the transformation; ``hp`` maps the grid's
      axes to (traced) scalars.
    knob: the axis other than the learning rate that trades plasticity for
      retention ("lr" when there is none).
    grid: axis -> values, the learning rate as multiples of the protocol's
      :data:`LR_CENTER` (times :data:`SGD_FACTOR` for ``sgd_scale``).
    sgd_scale: the method's learning rate is SGD-like.
    boundary: optional ``(opt_state, params, params_before, fisher_fn, hp)
      -> (opt_state, params)`` at every segment end.
    eval_params: optional ``(opt_state, params) -> params`` evaluated.
    replay: mixes a replayed batch into every step (``hp["replay"]`` is its
      loss weight).
  """
  name: str
  description: str
  make: Callable[[dict, Any], optax.GradientTransformation]
  knob: str
  grid: dict[str, tuple[float, ...]]
  sgd_scale: bool = False
  boundary: Callable | None = None
  eval_params: Callable | None = None
  replay: bool = False

  def configs(self, protocol: str, quick: bool = False
              ) -> dict[str, np.ndarray]:
    """The configurations as ``{axis: float array [C]}``.

    ``quick`` keeps the learning-rate centre and the first and last value
    of the knob (or two learning rates when the knob is the rate).
    """
    center = LR_CENTER[protocol] * (SGD_FACTOR if self.sgd_scale else 1.0)
    grid = dict(self.grid)
    grid["lr"] = tuple(center * f for f in grid["lr"])
    if quick:
      grid = {k: v[:1] for k, v in grid.items()}
      if self.knob == "lr":
        grid["lr"] = (center, 3 * center)
      else:
        grid["lr"] = (center,)
        grid[self.knob] = (self.grid[self.knob][0], self.grid[self.knob][-1])
    names = list(grid)
    rows = list(itertools.product(*(grid[k] for k in names)))
    return {k: np.asarray([r[i] for r in rows], np.float64)
            for i, k in enumerate(names)}


def _ewc_boundary(online: bool) -> Callable:
  def boundary(opt_state, params, params_before, fisher, hp):
    del params_before, hp
    if online:
      opt_state = baselines.ewc_consolidate(opt_state, params, fisher(),
                                          online=True,
                                          decay=ONLINE_EWC_DECAY)
    else:
      opt_state = baselines.ewc_consolidate(opt_state, params, fisher())
    return opt_state, params
  return boundary


def _wise_ft_boundary(opt_state, params, params_before, fisher, hp):
  """WiSE-FT at a boundary: ``theta_before + alpha (theta - theta_before)``."""
  del fisher
  alpha = hp["alpha"]
  mixed = optax.tree_utils.tree_add_scale(
      params_before, alpha,
      optax.tree_utils.tree_sub(params, params_before))
  return opt_state, mixed


def _averaged(opt_state, params):
  del params
  return baselines.averaged_params(opt_state)


def _penalty_then_adamw(penalty: Callable) -> Callable:
  return lambda hp, key: optax.chain(penalty(hp["strength"]),
                                     optax.adamw(hp["lr"]))


def _adamw(hp, key):
  return optax.adamw(hp["lr"])


STRENGTHS_EWC = (10.0, 100.0, 1e3, 1e4)
STRENGTHS_PATH = (0.01, 0.1, 1.0, 10.0)  # SI and MAS
METHODS = {m.name: m for m in (
    Method("adamw", "optax.adamw(lr, weight_decay=wd)",
           lambda hp, key: optax.adamw(hp["lr"], weight_decay=hp["wd"]),
           "lr", {"lr": HALF_DECADES_6, "wd": (1e-4, 1e-2)}),
    Method("sgd", "optax.sgd(lr, momentum)",
           lambda hp, key: optax.chain(
               optax.trace(hp["momentum"]),
               optax.scale_by_learning_rate(hp["lr"])),
           "lr", {"lr": HALF_DECADES_6, "momentum": (0.0, 0.9)},
           sgd_scale=True),
    Method("sal", "chain(sal.protect(restore=strength, granularity="
           "'element'), adamw(lr)) (a per-element importance)",
           lambda hp, key: optax.chain(
               sal.protect(restore=hp["strength"], granularity="element"),
               optax.adamw(hp["lr"])),
           "strength", {"lr": HALF_DECADES_3,
                        "strength": (0.1, 1.0, 10.0, 100.0)}),
    Method("sal_factored", "chain(sal.protect(restore=strength, "
           "granularity='factored'), adamw(lr)) (row and column importance "
           "per matrix)",
           lambda hp, key: optax.chain(
               sal.protect(restore=hp["strength"], granularity="factored"),
               optax.adamw(hp["lr"])),
           "strength", {"lr": HALF_DECADES_3,
                        "strength": (0.1, 1.0, 10.0, 100.0)}),
    Method("sal_factored_running", "chain(sal.protect(restore=strength, "
           "estimator=shift_consolidation_estimator(granularity='element', "
           "running_unit='factored')), adamw(lr)) (per-element pull, "
           "factored running "
           "importance: 2x state)",
           lambda hp, key: optax.chain(
               sal.protect(restore=hp["strength"],
                           estimator=sal.shift_consolidation_estimator(
                               granularity="element",
                               running_unit="factored")),
               optax.adamw(hp["lr"])),
           "strength", {"lr": HALF_DECADES_3,
                        "strength": (0.1, 1.0, 10.0, 100.0)}),
    Method("sal_kronecker", "chain(sal.protect(restore=strength, "
           "granularity='kronecker'), adamw(lr)) (protect's default: a "
           "second moment per kernel)",
           lambda hp, key: optax.chain(
               sal.protect(restore=hp["strength"], granularity="kronecker"),
               optax.adamw(hp["lr"])),
           "strength", {"lr": HALF_DECADES_3,
                        "strength": (0.1, 1.0, 10.0, 100.0)}),
    Method("sal_bf16", "chain(sal.protect(restore=strength, "
           "estimator=shift_consolidation_estimator(granularity='element', "
           "importance_dtype=jnp.bfloat16)), adamw(lr)) (importances in "
           "bfloat16: 2x state)",
           lambda hp, key: optax.chain(
               sal.protect(restore=hp["strength"],
                           estimator=sal.shift_consolidation_estimator(
                               granularity="element",
                               importance_dtype=jnp.bfloat16)),
               optax.adamw(hp["lr"])),
           "strength", {"lr": HALF_DECADES_3,
                        "strength": (0.1, 1.0, 10.0, 100.0)}),
    Method("sal_budget", "chain(sal.protect(relative_budget=eps, "
           "granularity='element'), adamw(lr)) (a data-free drift budget)",
           lambda hp, key: optax.chain(
               sal.protect(relative_budget=hp["eps"], granularity="element"),
               optax.adamw(hp["lr"])),
           "eps", {"lr": HALF_DECADES_3, "eps": (0.01, 0.03, 0.1, 0.3)}),
    Method("sal_reference", "chain(sal.protect(estimator='reference', "
           "threshold), adamw(lr))",
           lambda hp, key: optax.chain(
               sal.protect(estimator="reference", threshold=hp["threshold"]),
               optax.adamw(hp["lr"])),
           "lr", {"lr": HALF_DECADES_6, "threshold": (0.5, 0.9)}),
    Method("ewc", "chain(baselines.ewc(strength), adamw(lr)) + ewc_consolidate "
           "at boundaries", _penalty_then_adamw(baselines.ewc), "strength",
           {"lr": HALF_DECADES_3, "strength": STRENGTHS_EWC},
           boundary=_ewc_boundary(online=False)),
    Method("online_ewc", "ewc + ewc_consolidate(online=True, "
           f"decay={ONLINE_EWC_DECAY}) at boundaries",
           _penalty_then_adamw(baselines.ewc), "strength",
           {"lr": HALF_DECADES_3, "strength": STRENGTHS_EWC},
           boundary=_ewc_boundary(online=True)),
    Method("streaming_ewc", "chain(baselines.streaming_ewc(strength), adamw)",
           _penalty_then_adamw(baselines.streaming_ewc), "strength",
           {"lr": HALF_DECADES_3, "strength": STRENGTHS_EWC}),
    Method("streaming_si", "chain(baselines.streaming_si(strength), adamw)",
           _penalty_then_adamw(baselines.streaming_si), "strength",
           {"lr": HALF_DECADES_3, "strength": STRENGTHS_PATH}),
    Method("streaming_mas", "chain(baselines.streaming_mas(strength), adamw)",
           _penalty_then_adamw(baselines.streaming_mas), "strength",
           {"lr": HALF_DECADES_3, "strength": STRENGTHS_PATH}),
    Method("l2_init", "chain(baselines.l2_init(strength), adamw)",
           _penalty_then_adamw(baselines.l2_init), "strength",
           {"lr": HALF_DECADES_3, "strength": (1e-4, 1e-3, 1e-2, 1e-1)}),
    Method("upgd", "baselines.upgd(lr, noise_std=noise)",
           lambda hp, key: baselines.upgd(hp["lr"], noise_std=hp["noise"],
                                        key=key),
           "noise", {"lr": HALF_DECADES_3,
                     "noise": (1e-4, 1e-3, 1e-2, 1e-1)}, sgd_scale=True),
    Method("weight_average", "chain(adamw(lr), baselines.weight_average(decay))"
           ", evaluated on the average",
           lambda hp, key: optax.chain(optax.adamw(hp["lr"]),
                                       baselines.weight_average(hp["decay"])),
           "decay", {"lr": HALF_DECADES_3,
                     "decay": (0.9, 0.99, 0.999, 0.9999)},
           eval_params=_averaged),
    Method("wise_ft", "adamw(lr); at boundaries theta <- theta_before + "
           "alpha (theta - theta_before)", _adamw, "alpha",
           {"lr": HALF_DECADES_3, "alpha": (0.2, 0.4, 0.6, 0.8)},
           boundary=_wise_ft_boundary),
    Method("momentum_filter", "baselines.momentum_filter(lr, fraction) (MoFO)",
           lambda hp, key: baselines.momentum_filter(hp["lr"],
                                                   hp["fraction"]),
           "fraction", {"lr": HALF_DECADES_3,
                        "fraction": (0.01, 0.03, 0.1, 0.3)}),
    Method("replay", "adamw(lr) on each batch + replay weight x a batch "
           "from a reservoir buffer of 256 earlier examples", _adamw, "replay", {"lr": HALF_DECADES_3,
                              "replay": (0.25, 0.5, 1.0, 2.0)},
           replay=True),
)}
BOUNDARY_METHODS = tuple(n for n, m in METHODS.items()
                         if m.boundary is not None)
REFERENCE_METHODS = ("replay",)  # store old data: reported apart
