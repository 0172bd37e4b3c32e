"""Metrics of the continual-learning benchmark, selection and fronts.

With ``R[i, j]`` the accuracy on task ``j`` after training segment ``i``
(``segment_tasks[i]`` the task segment ``i`` trained) and ``S`` segments:

* average final accuracy: ``mean_j R[S-1, j]``;
* plasticity: ``mean_i R[i, segment_tasks[i]]``, the accuracy on a task
  right after training it;
* forgetting: ``mean_j (R[last(j), j] - R[S-1, j])`` over the tasks ``j``
  other than the last segment's, ``last(j)`` the last segment that trained
  ``j``; with one segment per task this is Avalanche's stream forgetting;
* BWT: minus the forgetting (Avalanche's ``StreamBWT``).

A configuration is chosen on the validation split and reported on the test
split: among the configurations that learn each task (validation
plasticity at least :data:`PLASTICITY_FLOOR` x the validation accuracy of
the network trained on each task alone), the one with the best validation
average final accuracy (mean over seeds). Without the floor, validation
prefers learning rates too small to learn the tasks, which forget little
because they learn little. The trade-off
front of a method is the set of its configurations that no other of its
configurations beats in both plasticity and the second axis.
"""

from __future__ import annotations

import numpy as np

MATCH_TOLERANCE = 0.01  # "matched plasticity": within 1 point
PLASTICITY_FLOOR = 0.9  # chosen configurations learn each task to 0.9x


def average_accuracy(acc: np.ndarray) -> np.ndarray:
  """Mean over tasks of the final accuracy, ``mean_j R[S-1, j]``."""
  return np.mean(acc[..., -1, :], -1)


def plasticity(acc: np.ndarray, segment_tasks) -> np.ndarray:
  """Accuracy on each segment's task right after it, averaged."""
  segment_tasks = np.asarray(segment_tasks)
  rows = np.arange(len(segment_tasks))
  return np.mean(acc[..., rows, segment_tasks], -1)


def forgetting(acc: np.ndarray, segment_tasks) -> np.ndarray:
  """Drop from each task's accuracy after its last training to the end.

  Averaged over the tasks other than the last segment's.
  """
  segment_tasks = list(segment_tasks)
  last = {task: i for i, task in enumerate(segment_tasks)}
  earlier = [t for t in sorted(last) if t != segment_tasks[-1]]
  drops = [acc[..., last[t], t] - acc[..., -1, t] for t in earlier]
  return np.mean(np.stack(drops, -1), -1)


def bwt(acc: np.ndarray, segment_tasks) -> np.ndarray:
  """Backward transfer, minus :func:`forgetting`."""
  return -forgetting(acc, segment_tasks)


def points(raw: dict, configs: dict[str, np.ndarray],
           segment_tasks) -> list[dict]:
  """One entry per configuration: its metrics, mean over seeds (test).

  ``valid_avg_acc`` and ``valid_plasticity`` are the validation split's;
  the rest the test split's (``avg_acc_std`` the std over seeds).
  """
  test, val = raw["acc_test"], raw["acc_val"]
  per_config = {
      "valid_avg_acc": average_accuracy(val).mean(0),
      "valid_plasticity": plasticity(val, segment_tasks).mean(0),
      "avg_acc": average_accuracy(test).mean(0),
      "avg_acc_std": average_accuracy(test).std(0),
      "plasticity": plasticity(test, segment_tasks).mean(0),
      "forgetting": forgetting(test, segment_tasks).mean(0),
      "forgetting_std": forgetting(test, segment_tasks).std(0),
      "bwt": bwt(test, segment_tasks).mean(0),
      "online_acc": raw["online_acc"].mean(0),
      "kl_mean": raw["kl_per_task"].mean((0, 2)),
  }
  names = list(configs)
  return [{"config": {k: float(configs[k][c]) for k in names},
           **{k: float(v[c]) for k, v in per_config.items()}}
          for c in range(len(configs[names[0]]))]


def select(entries: list[dict], floor: float = 0.0) -> int:
  """The best validation accuracy among configurations above the floor.

  ``floor`` bounds the validation plasticity from below; when no
  configuration reaches it, the one with the highest validation plasticity
  is chosen.
  """
  learned = [i for i, p in enumerate(entries)
             if p["valid_plasticity"] >= floor]
  if not learned:
    return int(np.argmax([p["valid_plasticity"] for p in entries]))
  return max(learned, key=lambda i: entries[i]["valid_avg_acc"])


def pareto_front(x: np.ndarray, y: np.ndarray, maximize_y: bool
                 ) -> np.ndarray:
  """Indices of the points not dominated in (max ``x``, max/min ``y``).

  Sorted by increasing ``x``.
  """
  y = np.asarray(y) if maximize_y else -np.asarray(y)
  x = np.asarray(x)
  keep = [i for i in range(len(x))
          if not np.any((x >= x[i]) & (y >= y[i])
                        & ((x > x[i]) | (y > y[i])))]
  return np.asarray(sorted(keep, key=lambda i: x[i]), int)


def matched(entries: list[dict], target: float,
            tolerance: float = MATCH_TOLERANCE) -> int | None:
  """The configuration chosen at matched plasticity, or None.

  Among the configurations whose *validation* plasticity is within
  ``tolerance`` of ``target`` (AdamW's chosen configuration's), the one
  with the best validation accuracy; its test metrics are then reported.
  """
  near = [i for i, p in enumerate(entries)
          if abs(p["valid_plasticity"] - target) <= tolerance]
  if not near:
    return None
  return max(near, key=lambda i: entries[i]["valid_avg_acc"])


def front_forgetting(entries: list[dict], target: float) -> float | None:
  """The forgetting of a method's front at plasticity ``target``, or None.

  The front: the configurations that no other one of the method beats on
  both test plasticity (higher) and test forgetting (lower); between the
  two front points whose plasticities bracket ``target``, linearly
  interpolated. Where the whole front is more plastic than ``target``, its
  least plastic point (it matches the target's plasticity or beats it);
  None where no configuration reaches ``target``. A description of the
  measured front, not a configuration: it answers "forgetting at matched
  plasticity" where no single configuration lands within
  :data:`MATCH_TOLERANCE` of the target.
  """
  x = np.array([p["plasticity"] for p in entries], float)
  y = np.array([p["forgetting"] for p in entries], float)
  front = pareto_front(x, y, maximize_y=False)
  xs, ys = x[front], y[front]
  if not len(xs) or target > xs[-1]:
    return None
  return float(np.interp(target, xs, ys))  # below xs[0]: ys[0]


def summarize(raw: dict, configs: dict[str, np.ndarray],
              segment_tasks, floor: float = 0.0) -> dict:
  """Points, the validation choice and the chosen run's details.

  ``floor`` is the validation plasticity a chosen configuration must reach
  (see :func:`select`).

  Returns:
    A JSON-ready dict: ``points`` (see :func:`points`), ``chosen``,
    ``per_seed`` (the chosen configuration's test accuracy matrix, KL per
    task and scalar metrics per seed) and ``curves`` of the chosen
    configuration per seed.
  """
  entries = points(raw, configs, segment_tasks)
  c = select(entries, floor)
  acc = raw["acc_test"][:, c]
  return {
      "points": entries,
      "chosen": c,
      "per_seed": {
          "acc_matrix": acc.tolist(),
          "kl_per_task": raw["kl_per_task"][:, c].tolist(),
          "avg_acc": average_accuracy(acc).tolist(),
          "forgetting": forgetting(acc, segment_tasks).tolist(),
          "plasticity": plasticity(acc, segment_tasks).tolist(),
          "online_acc": raw["online_acc"][:, c].tolist(),
          "task1_loss_init": raw["task1_loss_init"][:, c].tolist()},
      "curves": {k: v[:, c].tolist() for k, v in raw["curves"].items()},
  }
