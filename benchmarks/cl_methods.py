"""The methods compared by the continual-learning benchmark, with their grids.

Each method is a factory ``make(hp, key) -> optax transformation`` whose
hyperparameters ``hp`` arrive as traced scalars (one jitted program trains
every configuration of the grid under ``vmap``), ``key`` a per-seed raw
PRNG key (UPGD's noise), plus a tuning grid. Every method gets the same budget
(6 configurations; 2 with ``--quick``) and the learning rate is always part
of it: 6 learning rates for methods without a strength, 3 learning rates x 2
strengths for the others. Task-boundary methods (EWC, online EWC) also have a
``consolidate`` hook the engine calls at every task end with the empirical
Fisher of the task; on the task-free stream the engine feeds it the known
permutation switches ("oracle boundaries").

``SAL_NEW`` names the estimator (and any extra ``sal.protect`` arguments)
of the ``sal`` entry, so the new SAL is switched in here in one line.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import numpy as np
import optax

import sal_jax as sal
from sal_jax import contrib

SAL_NEW = dict()  # protect's defaults: shift consolidation, per element,
                 # no gate, restoring pull

# Grids: half-decade learning-rate steps; strengths a "weak" and a "strong"
# value two decades apart. The ranges were placed on validation accuracy of
# shortened pilot runs (5 pmnist tasks, 5 digits_domain tasks, 6 stream
# segments): AdamW's best learning rate is 3e-4 to 3e-3 there, and each
# penalty's best strength lies in, or just outside, its pair.
ADAM_LRS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
SGD_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
ADAM_LRS_3 = (3e-4, 1e-3, 3e-3)
# The restoring pull's pair, placed on validation accuracy (each protocol's
# best configuration, summed over the four protocols, 3 seeds) among
# {0.3, 1}: 2.523, {0.3, 3}: 2.515, {0.3, 10}: 2.523 and {1, 30}: 2.533.
# Those runs spelled "no gate" threshold=1.0, which protect clipped to 0.9
# (a soft gate on scores above 0.9); gate="none" scored 2.541 with {1, 30}.
SAL_RESTORE = (1.0, 30.0)
ONLINE_EWC_DECAY = 0.9  # gamma of online EWC (Schwarz et al.), fixed


@dataclasses.dataclass(frozen=True)
class Method:
  """A benchmarked method.

  Attributes:
    name: registry key.
    description: the optax expression, for the report.
    make: ``make(hp, key)`` -> the transformation; ``hp`` maps the grid's
      axes to (traced) scalars.
    grid: axis name -> values; the configurations are their product.
    consolidate: optional task-end hook ``(opt_state, params, fisher, hp) ->
      opt_state``.
  """
  name: str
  description: str
  make: Callable[[dict, Any], optax.GradientTransformation]
  grid: dict[str, tuple[float, ...]]
  consolidate: Callable | None = None

  def configs(self, quick: bool = False) -> dict[str, np.ndarray]:
    """The configurations as ``{axis: float array [C]}``.

    ``quick`` keeps two neighbouring learning rates from the upper middle of
    the grid and the first value of every other axis.
    """
    grid = dict(self.grid)
    if quick:
      lrs = grid["lr"]
      middle = len(lrs) // 2
      grid = {k: (v[middle:middle + 2] if k == "lr" else v[:1])
              for k, v in grid.items()}
    names = list(grid)
    rows = list(itertools.product(*(grid[k] for k in names)))
    return {k: np.asarray([r[i] for r in rows])
            for i, k in enumerate(names)}


def _ewc_consolidate(online: bool) -> Callable:
  def consolidate(opt_state, params, fisher, hp):
    del hp
    if online:
      return contrib.ewc_consolidate(opt_state, params, fisher, online=True,
                                     decay=ONLINE_EWC_DECAY)
    return contrib.ewc_consolidate(opt_state, params, fisher)
  return consolidate


def _penalty_then_adamw(penalty: Callable) -> Callable:
  return lambda hp, key: optax.chain(penalty(hp["strength"]),
                                     optax.adamw(hp["lr"]))


METHODS = {m.name: m for m in (
    Method("adamw", "optax.adamw(lr)",
           lambda hp, key: optax.adamw(hp["lr"]), {"lr": ADAM_LRS}),
    Method("sgd", "optax.sgd(lr)",
           lambda hp, key: optax.sgd(hp["lr"]), {"lr": SGD_LRS}),
    Method("sal_reference", "chain(sal.protect(estimator='reference'), "
           "adamw(lr))",
           lambda hp, key: optax.chain(sal.protect(estimator="reference"),
                                       optax.adamw(hp["lr"])),
           {"lr": ADAM_LRS}),
    Method("sal", f"chain(sal.protect(**{SAL_NEW}, restore=strength), "
           "adamw(lr))",
           lambda hp, key: optax.chain(
               sal.protect(**SAL_NEW, restore=hp["strength"]),
               optax.adamw(hp["lr"])),
           {"lr": ADAM_LRS_3, "strength": SAL_RESTORE}),
    Method("ewc", "chain(contrib.ewc(strength), adamw(lr)) + ewc_consolidate",
           _penalty_then_adamw(contrib.ewc),
           {"lr": ADAM_LRS_3, "strength": (10.0, 1000.0)},
           consolidate=_ewc_consolidate(online=False)),
    Method("online_ewc",
           f"ewc + ewc_consolidate(online=True, decay={ONLINE_EWC_DECAY})",
           _penalty_then_adamw(contrib.ewc),
           {"lr": ADAM_LRS_3, "strength": (10.0, 1000.0)},
           consolidate=_ewc_consolidate(online=True)),
    Method("streaming_ewc", "chain(contrib.streaming_ewc(strength), adamw)",
           _penalty_then_adamw(contrib.streaming_ewc),
           {"lr": ADAM_LRS_3, "strength": (10.0, 1000.0)}),
    Method("streaming_si", "chain(contrib.streaming_si(strength), adamw)",
           _penalty_then_adamw(contrib.streaming_si),
           {"lr": ADAM_LRS_3, "strength": (0.1, 10.0)}),
    Method("streaming_mas", "chain(contrib.streaming_mas(strength), adamw)",
           _penalty_then_adamw(contrib.streaming_mas),
           {"lr": ADAM_LRS_3, "strength": (0.1, 10.0)}),
    Method("l2_init", "chain(contrib.l2_init(strength), adamw)",
           _penalty_then_adamw(contrib.l2_init),
           {"lr": ADAM_LRS_3, "strength": (1e-3, 1e-1)}),
    Method("upgd", "contrib.upgd(lr, noise_std=noise)",
           lambda hp, key: contrib.upgd(hp["lr"], noise_std=hp["noise"],
                                        key=key),
           {"lr": (3e-2, 1e-1, 3e-1), "noise": (1e-3, 1e-2)}),
)}
