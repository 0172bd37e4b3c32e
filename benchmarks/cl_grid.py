"""Tuning grids that bracket their optimum: widen the grid at its edge.

A configuration chosen at the edge of a grid says the optimum may lie
beyond it. :func:`tune` applies one rule to every method: after the base
grid (the same budget for all), while the chosen configuration sits at the
smallest or largest value of a swept axis (the learning rate and the
method's knob), that axis gains the next value beyond the edge and the new
configurations (the new value crossed with the other axes' values) are
trained; up to :data:`MAX_ROUNDS` times. An edge that is a natural bound of
its axis (WiSE-FT's coefficient 1, the momentum filter's fraction 1, the
average's decay 0: each is plain AdamW) is not widened.

Steps beyond an edge repeat the grid's own spacing at that edge, on the
axis's scale (:data:`AXES`): logarithmic for rates and strengths, linear for
WiSE-FT's coefficient, logarithmic in ``1 - decay`` for a weight average.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable

import numpy as np

MAX_ROUNDS = 3


@dataclasses.dataclass(frozen=True)
class Axis:
  """How a hyperparameter axis extends past its grid.

  Attributes:
    scale: "log" (steps are ratios), "linear" (differences) or "log1m"
      (ratios of ``1 - value``).
    low: the natural lower bound, or None.
    high: the natural upper bound, or None.
    step: the step used when the grid holds a single value (a ratio for
      "log" and "log1m", a difference for "linear").
  """
  scale: str = "log"
  low: float | None = None
  high: float | None = None
  step: float = math.sqrt(10.0)

  def _to(self, v: float) -> float:
    if self.scale == "log":
      return math.log(v)
    if self.scale == "log1m":
      return math.log(1.0 - v)
    return v

  def _from(self, u: float) -> float:
    if self.scale == "log":
      return math.exp(u)
    if self.scale == "log1m":
      return 1.0 - math.exp(u)
    return u

  def beyond(self, values: list[float], side: str) -> float | None:
    """The next value past the ``"low"`` or ``"high"`` edge, or None.

    None when the edge already is the axis's natural bound; a step that
    would cross the bound stops on it.
    """
    values = sorted(values)
    edge = values[0] if side == "low" else values[-1]
    bound = self.low if side == "low" else self.high
    if bound is not None and math.isclose(edge, bound, abs_tol=1e-12):
      return None
    if len(values) > 1:
      inner = values[1] if side == "low" else values[-2]
      step = abs(self._to(edge) - self._to(inner))
    else:
      step = (abs(math.log(self.step)) if self.scale != "linear"
              else self.step)
    # In 1 - value, the low side of the value is the high side of the log.
    sign = -1.0 if side == "low" else 1.0
    if self.scale == "log1m":
      sign = -sign
    new = float(f"{self._from(self._to(edge) + sign * step):.10g}")
    if bound is not None and (math.isclose(new, bound, abs_tol=1e-9)
                              or (side == "low" and new < bound)
                              or (side == "high" and new > bound)):
      new = bound
    return new


AXES = {
    "lr": Axis(),
    "strength": Axis(step=10.0),
    "eps": Axis(),
    "noise": Axis(step=10.0),
    "replay": Axis(step=2.0),
    "alpha": Axis("linear", 0.0, 1.0, step=0.2),
    "fraction": Axis(high=1.0),
    "decay": Axis("log1m", 0.0, None, step=10.0),
}


def swept_axes(grid: dict[str, list[float]], knob: str) -> list[str]:
  """The axes that are tuned for an optimum: the learning rate and knob."""
  return [a for a in dict.fromkeys(("lr", knob)) if a in grid]


def at_edge(grid: dict[str, list[float]], config: dict[str, float],
            knob: str) -> list[str]:
  """The swept axes whose chosen value is the grid's smallest or largest."""
  return [a for a in swept_axes(grid, knob)
          if config[a] in (min(grid[a]), max(grid[a]))]


def at_bound(grid: dict[str, list[float]], config: dict[str, float],
             knob: str) -> list[str]:
  """The edge axes of :func:`at_edge` that sit on a natural bound."""
  out = []
  for a in at_edge(grid, config, knob):
    sides = [s for s, v in (("low", min(grid[a])), ("high", max(grid[a])))
             if config[a] == v]
    if all(AXES[a].beyond(grid[a], s) is None for s in sides):
      out.append(a)
  return out


def widen(grid: dict[str, list[float]], config: dict[str, float],
          knob: str) -> dict[str, list[float]] | None:
  """``grid`` with one more value past each edge ``config`` sits on.

  Returns None when there is nothing to widen (no edge, or only natural
  bounds).
  """
  new = {a: sorted(v) for a, v in grid.items()}
  changed = False
  for a in at_edge(grid, config, knob):
    for side, edge in (("low", min(grid[a])), ("high", max(grid[a]))):
      if config[a] != edge:
        continue
      value = AXES[a].beyond(grid[a], side)
      if value is not None:
        new[a] = sorted({*new[a], value})
        changed = True
  return new if changed else None


def _key(config: dict[str, float]) -> tuple:
  return tuple((k, float(f"{v:.10g}")) for k, v in sorted(config.items()))


def missing(grid: dict[str, list[float]], configs: dict[str, np.ndarray]
            ) -> dict[str, np.ndarray]:
  """The configurations of ``grid``'s product not yet in ``configs``."""
  names = list(grid)
  size = len(configs[names[0]])
  done = {_key({k: float(configs[k][i]) for k in names})
          for i in range(size)}
  rows = [dict(zip(names, r))
          for r in itertools.product(*(grid[k] for k in names))]
  rows = [r for r in rows if _key(r) not in done]
  return {k: np.asarray([r[k] for r in rows], np.float64) for k in names}


def _concat(a: dict, b: dict) -> dict:
  """Raw run outputs ``[S, C, ...]`` joined along configurations."""
  out = {}
  for k, v in a.items():
    if isinstance(v, dict):
      out[k] = _concat(v, b[k])
    elif k == "seconds":
      out[k] = v + b[k]
    else:
      out[k] = np.concatenate([v, b[k]], axis=1)
  return out


def _take(raw: dict, n: int) -> dict:
  return {k: (_take(v, n) if isinstance(v, dict)
              else v if k == "seconds" else v[:, :n])
          for k, v in raw.items()}


def tune(run: Callable[[dict[str, np.ndarray]], dict],
         choose: Callable[[dict, dict[str, np.ndarray]], dict[str, float]],
         configs: dict[str, np.ndarray], knob: str,
         max_rounds: int = MAX_ROUNDS) -> tuple[dict, dict, dict]:
  """Runs ``configs``, then widens the grid while the choice is at an edge.

  Args:
    run: trains a batch of configurations, returning raw outputs
      ``[S, C, ...]`` (see ``cl_engine.run``). It is always called with
      batches of the base grid's size, padded by repeating the last
      configuration, so one compiled program serves every round.
    choose: ``choose(raw, configs)`` -> the chosen configuration.
    configs: the base grid's configurations ``{axis: [C]}``.
    knob: the method's knob (see :func:`swept_axes`).
    max_rounds: widening rounds at most.

  Returns:
    ``(raw, configs, info)``: every configuration's outputs and the
    configurations (base first), and ``info`` with ``rounds`` (widening
    rounds run), ``grid`` (the final grid) and ``base_size``.
  """
  size = len(next(iter(configs.values())))
  grid = {k: sorted(set(v.tolist())) for k, v in configs.items()}
  raw = run(configs)
  rounds = 0
  while rounds < max_rounds:
    wider = widen(grid, choose(raw, configs), knob)
    if wider is None:
      break
    new = missing(wider, configs)
    grid, rounds = wider, rounds + 1
    count = len(next(iter(new.values())))
    for start in range(0, count, size):
      batch = {k: v[start:start + size] for k, v in new.items()}
      n = len(next(iter(batch.values())))
      padded = {k: np.concatenate([v, np.repeat(v[-1:], size - n)])
                for k, v in batch.items()}
      raw = _concat(raw, _take(run(padded), n))
      configs = {k: np.concatenate([configs[k], batch[k]]) for k in configs}
  return raw, configs, {"rounds": rounds, "grid": grid, "base_size": size}
