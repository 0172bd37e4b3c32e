"""Continual-learning protocols on data that ships offline.

A protocol is a sequence of training *segments*, each drawn from one of its
*tasks* (a task may recur), with train / validation / test splits per task,
laid out as fixed-shape arrays so one jitted program trains every seed and
hyperparameter configuration. Every task is trained until its validation
accuracy has plateaued (AdamW's chosen configuration reaches at least 0.9x
the accuracy of the same network trained on each task alone, measured by
``continual.py`` and recorded as ``single_task_accuracy``).

* ``permuted_digits``: scikit-learn's digits, 5 tasks, each a fixed
  permutation of the 64 pixels (task 0 unpermuted), one shared 10-way head;
  task boundaries known (the permuted-MNIST protocol on offline data).
* ``split_mnist1d``: MNIST-1D (``mnist1d``, generated locally) split into
  the class pairs 0/1, 2/3, ..., domain-incremental: one shared 2-way head,
  label = first or second class of the pair (split MNIST's protocol).
* ``digits_task``: digits split into pairs, task-incremental: the 10-way
  output's logits are masked to the current task's two classes at train
  and test time (one 2-way head per task).
* ``digits_domain``: the digit pairs, domain-incremental (shared 2-way head).
* ``stream``: task-free permuted digits with small batches; the permutation
  switches abruptly, no boundary is given. Headline: online accuracy (each
  batch scored before its update).
* ``recurring``: task-free permuted digits whose tasks return: A B A C A.
* ``gradual``: task-free permuted digits whose distribution drifts: over the
  first half of each segment the share of examples from the new task rises
  linearly from 0 to 1 (no abrupt switch to detect).

On the task-free protocols, methods that need boundaries (EWC, online EWC,
WiSE-FT) are given the segment ends as *oracle boundaries*.

Splits: the MNIST-1D training set (4000) is split 3200 / 800 into train and
validation, its 1000 test examples are the test split; digits are split
70 / 30 into train+val / test (stratified, fixed seed), and 20 % of the
first part is the validation split. The data (permutations and splits) is
the same for every seed; seeds change the initialisation and batch order.

The network is an MLP with two hidden layers of 64 ReLU units. ``--quick``
shrinks everything (:data:`QUICK_SCHEDULE`, 32 hidden units, the first 200
evaluation examples of a task, 3 segments) and pads all protocols to common
shapes (:func:`pad_to_common`) so one compilation per method serves them.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

PROTOCOLS = ("permuted_digits", "split_mnist1d", "digits_task", "digits_domain",
             "stream", "recurring", "gradual")
TASK_FREE = ("stream", "recurring", "gradual")
DIGIT_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
MNIST1D_VAL = 800  # validation examples taken from the MNIST-1D train set
PERMUTATION_SEEDS = {"permuted_digits": 0, "stream": 1, "recurring": 2,
                     "gradual": 3}
SEGMENT_TASKS = {"recurring": (0, 1, 0, 2, 0)}
RAMP_FRACTION = {"gradual": 0.5}  # share of a segment spent drifting in


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How long a protocol trains and how finely it is observed.

  Attributes:
    num_segments: training segments (tasks, or stream segments).
    batch_size: examples per step.
    steps_per_segment: optimizer steps per segment.
    chunks_per_segment: evaluation points per segment (curve resolution).
    fisher_examples: examples for the empirical Fisher at a boundary (EWC),
      a multiple of 32 (``cl_engine.FISHER_CHUNK``).
  """
  num_segments: int
  batch_size: int
  steps_per_segment: int
  chunks_per_segment: int
  fisher_examples: int


# Full schedules, in epochs of a task's training examples (1005 for
# permuted digits, ~640 for an MNIST-1D pair, ~200 for a digit pair):
# permuted_digits 13, split_mnist1d 20, digits 16, stream 13 at batch 16,
# recurring and gradual 13 per segment. Placed on AdamW pilot runs
# so that every task plateaus (see the module docstring).
SCHEDULES = {
    "permuted_digits": Schedule(5, 32, 400, 4, 256),
    "split_mnist1d": Schedule(5, 32, 400, 4, 256),
    "digits_task": Schedule(5, 32, 100, 5, 128),
    "digits_domain": Schedule(5, 32, 100, 5, 128),
    "stream": Schedule(5, 16, 800, 8, 256),
    "recurring": Schedule(5, 32, 400, 4, 256),
    "gradual": Schedule(5, 32, 400, 4, 256),
}
QUICK_SCHEDULE = Schedule(3, 16, 30, 3, 32)
QUICK_EVAL_EXAMPLES = 200  # --quick evaluates on the first 200 per task
HIDDEN = (64, 64)
QUICK_HIDDEN = (32, 32)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A protocol's data, as fixed-shape numpy arrays, and its schedule.

  Attributes:
    name: key in :data:`PROTOCOLS`.
    title: one-line description.
    schedule: the :class:`Schedule`.
    hidden: hidden layer widths of the MLP.
    num_inputs: input features carrying data; further columns of
      ``x_train`` are zero padding (see :func:`pad_to_common`).
    num_outputs: width of the output layer.
    num_tasks: distinct tasks; further rows of ``class_masks``, ``val`` and
      ``test`` are padding.
    task_free: no task boundaries are given to the methods.
    segment_tasks: the task trained in each segment.
    ramp_steps: steps at the start of each segment over which the data
      drift from the previous segment's task to the new one (0: abrupt).
    x_train: ``[N, D]`` training inputs of all tasks, concatenated.
    y_train: ``[N]`` labels.
    row_task: ``[N]`` the task of each training row.
    train_ranges: per task, the ``(start, stop)`` of its rows.
    class_masks: ``[T, K]`` bool, the output units a task uses.
    val: ``(x [T, M, D], y [T, M], valid [T, M])``, padded per task.
    test: the same for the test split.
  """
  name: str
  title: str
  schedule: Schedule
  hidden: tuple[int, ...]
  num_inputs: int
  num_outputs: int
  num_tasks: int
  task_free: bool
  segment_tasks: tuple[int, ...]
  ramp_steps: int
  x_train: np.ndarray
  y_train: np.ndarray
  row_task: np.ndarray
  train_ranges: tuple[tuple[int, int], ...]
  class_masks: np.ndarray
  val: tuple[np.ndarray, np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray, np.ndarray]

  @property
  def layer_sizes(self) -> tuple[int, ...]:
    return (self.x_train.shape[1], *self.hidden, self.num_outputs)


@functools.lru_cache(maxsize=1)
def _mnist1d() -> tuple[np.ndarray, ...]:
  """MNIST-1D generated with its default arguments (seed 42)."""
  from mnist1d.data import get_dataset_args, make_dataset
  data = make_dataset(get_dataset_args())
  x, y = data["x"].astype(np.float32), data["y"].astype(np.int32)
  return (x[MNIST1D_VAL:], y[MNIST1D_VAL:], x[:MNIST1D_VAL], y[:MNIST1D_VAL],
          data["x_test"].astype(np.float32), data["y_test"].astype(np.int32))


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, ...]:
  """scikit-learn's digits in [0, 1], split train / validation / test."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_rest, x_te, y_rest, y_te = train_test_split(
      x, y, test_size=0.3, random_state=0, stratify=y)
  x_tr, x_va, y_tr, y_va = train_test_split(
      x_rest, y_rest, test_size=0.2, random_state=0, stratify=y_rest)
  return x_tr, y_tr, x_va, y_va, x_te, y_te


def _permuted(data: tuple[np.ndarray, ...], num_tasks: int, seed: int
              ) -> list[dict]:
  """Task ``t`` permutes the input positions (task 0 keeps them)."""
  x, y, xv, yv, xt, yt = data
  rng = np.random.default_rng(seed)
  tasks = []
  for t in range(num_tasks):
    perm = np.arange(x.shape[1]) if t == 0 else rng.permutation(x.shape[1])
    tasks.append(dict(train=(x[:, perm], y), val=(xv[:, perm], yv),
                      test=(xt[:, perm], yt), classes=tuple(range(10))))
  return tasks


def _split(data: tuple[np.ndarray, ...], num_tasks: int, domain: bool
           ) -> list[dict]:
  """Class pairs; labels are the classes, or 0 / 1 (``domain``)."""
  x_tr, y_tr, x_va, y_va, x_te, y_te = data
  tasks = []
  for first, second in DIGIT_PAIRS[:num_tasks]:
    def select(xs, ys):
      keep = (ys == first) | (ys == second)
      labels = (ys[keep] == second).astype(np.int32) if domain else ys[keep]
      return xs[keep], labels
    tasks.append(dict(train=select(x_tr, y_tr), val=select(x_va, y_va),
                      test=select(x_te, y_te),
                      classes=(0, 1) if domain else (first, second)))
  return tasks


def _pad_split(tasks: list[dict], split: str, num_inputs: int):
  """Stacks one split of every task into ``[T, M, ...]`` arrays + validity."""
  size = max(len(t[split][1]) for t in tasks)
  xs = np.zeros((len(tasks), size, num_inputs), np.float32)
  ys = np.zeros((len(tasks), size), np.int32)
  valid = np.zeros((len(tasks), size), bool)
  for i, t in enumerate(tasks):
    x, y = t[split]
    xs[i, :len(y)], ys[i, :len(y)], valid[i, :len(y)] = x, y, True
  return xs, ys, valid


def _segment_tasks(name: str, num_segments: int) -> tuple[int, ...]:
  if name in SEGMENT_TASKS:
    tasks = SEGMENT_TASKS[name]
    return tasks[:num_segments] if num_segments <= len(tasks) else tasks
  return tuple(range(num_segments))


def build(name: str, quick: bool = False) -> Protocol:
  """The protocol ``name`` with its full or ``--quick`` schedule."""
  if name not in PROTOCOLS:
    raise ValueError(f"unknown protocol {name!r}; expected one of "
                     f"{list(PROTOCOLS)}")
  schedule = QUICK_SCHEDULE if quick else SCHEDULES[name]
  segment_tasks = _segment_tasks(name, schedule.num_segments)
  if len(segment_tasks) != schedule.num_segments:
    raise ValueError(f"{name}: {len(segment_tasks)} segment tasks for "
                     f"{schedule.num_segments} segments")
  num_tasks = max(segment_tasks) + 1
  domain = name in ("digits_domain", "split_mnist1d")
  if name in PERMUTATION_SEEDS:
    tasks = _permuted(_digits(), num_tasks, PERMUTATION_SEEDS[name])
  else:
    tasks = _split(_mnist1d() if name == "split_mnist1d" else _digits(),
                   num_tasks, domain)
  num_outputs = 2 if domain else 10
  s = schedule
  titles = {
      "permuted_digits": ("permuted digits, shared 10-way head, boundaries "
                          "known"),
      "split_mnist1d": ("split MNIST-1D, domain-incremental (class pairs, "
                        "shared 2-way head)"),
      "digits_task": "split digits, task-incremental (head masked per task)",
      "digits_domain": "split digits, domain-incremental (shared 2-way head)",
      "stream": (f"task-free stream: permuted digits, abrupt switches "
                 f"every {s.steps_per_segment} steps of batch "
                 f"{s.batch_size}"),
      "recurring": ("task-free, recurring tasks: permuted digits in the "
                    f"order {'-'.join(chr(65 + t) for t in segment_tasks)}"),
      "gradual": ("task-free, gradual drift: permuted digits, the new "
                  "task's share of each batch rises linearly over the first "
                  f"{RAMP_FRACTION.get(name, 0):.0%} of a segment"),
  }
  if quick:
    for t in tasks:
      for split in ("val", "test"):
        t[split] = tuple(a[:QUICK_EVAL_EXAMPLES] for a in t[split])
  num_inputs = tasks[0]["train"][0].shape[1]
  class_masks = np.zeros((len(tasks), num_outputs), bool)
  for i, t in enumerate(tasks):
    class_masks[i, list(t["classes"])] = True
  sizes = np.cumsum([0] + [len(t["train"][1]) for t in tasks])
  return Protocol(
      name=name, title=titles[name], schedule=schedule,
      hidden=QUICK_HIDDEN if quick else HIDDEN,
      num_inputs=num_inputs, num_outputs=num_outputs, num_tasks=num_tasks,
      task_free=name in TASK_FREE, segment_tasks=segment_tasks,
      ramp_steps=int(RAMP_FRACTION.get(name, 0.0) * s.steps_per_segment),
      x_train=np.concatenate([t["train"][0] for t in tasks]),
      y_train=np.concatenate([t["train"][1] for t in tasks]),
      row_task=np.repeat(np.arange(len(tasks), dtype=np.int32),
                         np.diff(sizes)),
      train_ranges=tuple(zip(sizes[:-1].tolist(), sizes[1:].tolist())),
      class_masks=class_masks,
      val=_pad_split(tasks, "val", num_inputs),
      test=_pad_split(tasks, "test", num_inputs))


def single_task(protocol: Protocol, task: int,
                steps_per_segment: int) -> Protocol:
  """Task ``task`` of the protocol alone, trained ``steps_per_segment`` steps.

  The reference for plasticity: the same network and batch size on one
  task, with no predecessor. The training arrays stay whole (only the
  task's rows are sampled) and the evaluation arrays keep their padded
  shapes, so every task's (and under ``--quick`` every protocol's)
  single-task run shares one compilation.
  """
  def only(split):
    return tuple(a[task:task + 1] for a in split)

  s = dataclasses.replace(protocol.schedule, num_segments=1,
                          steps_per_segment=steps_per_segment)
  return dataclasses.replace(
      protocol, schedule=s, num_tasks=1, task_free=False,
      segment_tasks=(0,), ramp_steps=0,
      train_ranges=(protocol.train_ranges[task],),
      class_masks=protocol.class_masks[task:task + 1], val=only(protocol.val),
      test=only(protocol.test))


def build_all(names: list[str], quick: bool = False) -> list[Protocol]:
  """The protocols ``names``, padded to common shapes where that is free.

  Under ``quick`` all of them are padded together. Otherwise protocols
  with the same schedule, inputs and outputs are padded together (extra
  training rows and tasks only), so they share compilations without any
  padded weight: padded weights would change the statistics that SAL and
  MoFO take over a whole tensor.
  """
  protocols = [build(name, quick) for name in names]
  if quick:
    return pad_to_common(protocols)
  groups: dict[tuple, list[int]] = {}
  for i, p in enumerate(protocols):
    groups.setdefault((p.schedule, p.x_train.shape[1], p.num_outputs),
                      []).append(i)
  out = list(protocols)
  for members in groups.values():
    for i, p in zip(members, pad_to_common([protocols[i] for i in members])):
      out[i] = p
  return out


def _pad(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """``a`` in the corner of a zero array of ``shape``."""
  out = np.zeros(shape, a.dtype)
  out[tuple(slice(0, n) for n in a.shape)] = a
  return out


def pad_to_common(protocols: list[Protocol]) -> list[Protocol]:
  """Zero-pads protocols with the same schedule to the same array shapes.

  Inputs get zero columns, the output layer extra units that every task's
  class mask excludes, the training and evaluation sets extra rows (never
  sampled; invalid for evaluation), the task axis extra tasks (never
  trained; dropped by the metrics, which read ``num_tasks``).
  ``cl_engine.init_mlp`` initialises the weights of padded inputs and of
  unused output units to zero, so the network computes the same function,
  every method sees the same gradients on the real weights, and the padded
  weights stay at zero (UPGD's noise moves them, without effect on the
  outputs): the results do not change, only the arrays line up, and one
  compiled program per method serves every protocol (used by ``--quick``).
  """
  if len({p.schedule for p in protocols}) != 1:
    raise ValueError("pad_to_common needs protocols with one schedule")
  inputs = max(p.x_train.shape[1] for p in protocols)
  outputs = max(p.num_outputs for p in protocols)
  rows = max(len(p.y_train) for p in protocols)
  tasks = max(p.class_masks.shape[0] for p in protocols)
  val = max(p.val[1].shape[1] for p in protocols)
  test = max(p.test[1].shape[1] for p in protocols)

  def split(arrays, size):
    x, y, valid = arrays
    return (_pad(x, (tasks, size, inputs)), _pad(y, (tasks, size)),
            _pad(valid, (tasks, size)))

  return [dataclasses.replace(
      p, num_outputs=outputs,
      x_train=_pad(p.x_train, (rows, inputs)),
      y_train=_pad(p.y_train, (rows,)),
      row_task=_pad(p.row_task, (rows,)),
      class_masks=_pad(p.class_masks, (tasks, outputs)),
      val=split(p.val, val), test=split(p.test, test))
      for p in protocols]


def _task_stream(rng: np.random.Generator, start: int, stop: int):
  """Rows of one task, epoch by epoch (a fresh permutation per epoch)."""
  while True:
    yield from rng.permutation(np.arange(start, stop))


def batch_orders(protocol: Protocol, seed: int):
  """Per-seed training order: the batches of every step and Fisher examples.

  Each task's examples are drawn epoch by epoch (a fresh permutation of the
  task's rows per epoch, continued where the task's previous segment left
  off). During a segment's first ``ramp_steps`` steps each example comes
  from the new task with probability rising linearly from 0 to 1, and
  otherwise from the previous segment's task. The Fisher examples of a
  segment are drawn from the batches it trained on.

  Returns:
    ``(orders [S, chunks, steps_per_chunk, B], fisher [S, F])``: int32 row
    indices into ``protocol.x_train``.
  """
  s = protocol.schedule
  if s.steps_per_segment % s.chunks_per_segment:
    raise ValueError("steps_per_segment must be a multiple of "
                     "chunks_per_segment")
  rng = np.random.default_rng(1000 + seed)
  streams = [_task_stream(rng, *r) for r in protocol.train_ranges]
  orders, fisher = [], []
  previous = None
  for task in protocol.segment_tasks:
    shape = (s.steps_per_segment, s.batch_size)
    rows = np.fromiter(streams[task], np.int64, count=np.prod(shape)
                       ).reshape(shape)
    if protocol.ramp_steps and previous is not None and previous != task:
      ramp = protocol.ramp_steps
      share = (np.arange(ramp) + 1) / (ramp + 1)
      old = rng.random((ramp, s.batch_size)) >= share[:, None]
      rows[:ramp][old] = np.fromiter(streams[previous], np.int64,
                                     count=int(old.sum()))
    orders.append(rows.reshape(s.chunks_per_segment, -1, s.batch_size))
    fisher.append(rng.choice(rows.reshape(-1), s.fisher_examples,
                             replace=False))
    previous = task
  return (np.stack(orders).astype(np.int32),
          np.stack(fisher).astype(np.int32))
