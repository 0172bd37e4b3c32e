"""Continual-learning protocols on data that ships offline.

Every protocol is a sequence of *tasks* (for the task-free stream: the
segments between permutation switches) with train / validation / test
splits, laid out as fixed-shape arrays so one jitted program trains every
seed and hyperparameter configuration:

* ``pmnist``: permuted MNIST-1D (``mnist1d.data.make_dataset``, generated
  locally), each task a fixed permutation of the 40 input positions (task 0
  unpermuted), one shared 10-way head.
* ``digits_task``: scikit-learn's digits split into the pairs 0/1, 2/3, ...,
  task-incremental. The network has a 10-way output whose logits are masked
  to the current task's two classes at train and test time; that is
  equivalent to one 2-way head per task (each task owns two output units,
  and the softmax sees only those).
* ``digits_domain``: the same pairs, domain-incremental: one shared 2-way
  head, label = first or second digit of the pair.
* ``stream``: a task-free stream of input-permuted MNIST-1D whose
  permutation changes every ``steps_per_task`` steps, with small batches;
  methods get no boundary signal (EWC and online EWC use the known switches
  as *oracle boundaries*). Its headline metric is the online accuracy (each
  incoming batch scored before the update, as in UPGD).

Splits: the MNIST-1D training set (4000) is split 3200 / 800 into train and
validation, its 1000 test examples are the test split; digits are split
70 / 30 into train+val / test (stratified, fixed seed), and 20 % of the
first part is the validation split. The data (permutations and splits) is
the same for every seed; seeds change the initialisation and batch order.

The network is an MLP with two hidden layers of 256 ReLU units (40-256-256-10
on MNIST-1D, 64-256-256-10 or -2 on digits). ``--quick`` shrinks everything
(:data:`QUICK_SCHEDULE`, 64 hidden units, the first 200 evaluation examples
of a task) and pads all protocols to common shapes (:func:`pad_to_common`).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

PROTOCOLS = ("pmnist", "digits_task", "digits_domain", "stream")
DIGIT_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
MNIST1D_VAL = 800  # validation examples taken from the MNIST-1D train set
PERMUTATION_SEEDS = {"pmnist": 0, "stream": 1}


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How long a protocol trains and how finely it is observed.

  Attributes:
    num_tasks: tasks (stream: permutations).
    batch_size: examples per step.
    steps_per_task: optimizer steps per task (stream: between switches).
    chunks_per_task: evaluation points per task (the curves' resolution).
    fisher_examples: examples for the empirical Fisher at a task end (EWC),
      a multiple of 32 (``cl_engine.FISHER_CHUNK``).
  """
  num_tasks: int
  batch_size: int
  steps_per_task: int
  chunks_per_task: int
  fisher_examples: int


# Full schedules. pmnist: 3 epochs of 3200 / 64 per task; digits: about 10
# epochs of the ~200 training examples of a pair; stream: 12 permutations,
# switching every 200 steps of 8 examples.
SCHEDULES = {
    "pmnist": Schedule(10, 64, 150, 5, 256),
    "digits_task": Schedule(5, 32, 60, 5, 128),
    "digits_domain": Schedule(5, 32, 60, 5, 128),
    "stream": Schedule(12, 8, 200, 10, 256),
}
# --quick: one small schedule for every protocol, so that (after
# :func:`pad_to_common`) all protocols share array shapes and one compiled
# program per method serves them all.
QUICK_SCHEDULE = Schedule(3, 16, 30, 3, 32)
QUICK_EVAL_EXAMPLES = 200  # --quick evaluates on the first 200 per task
HIDDEN = (256, 256)
QUICK_HIDDEN = (64, 64)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A protocol's data, as fixed-shape numpy arrays, and its schedule.

  Attributes:
    name: key in :data:`PROTOCOLS`.
    title: one-line description.
    schedule: the :class:`Schedule`.
    hidden: hidden layer widths of the MLP.
    num_inputs: input features carrying data; the columns of ``x_train``
      beyond it are zero padding (see :func:`pad_to_common`).
    num_outputs: width of the output layer.
    task_free: no task boundaries are given to the methods.
    x_train: ``[N, D]`` training inputs of all tasks, concatenated.
    y_train: ``[N]`` labels.
    train_ranges: per task, the ``(start, stop)`` of its rows in ``x_train``.
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
  task_free: bool
  x_train: np.ndarray
  y_train: np.ndarray
  train_ranges: tuple[tuple[int, int], ...]
  class_masks: np.ndarray
  val: tuple[np.ndarray, np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray, np.ndarray]

  @property
  def num_tasks(self) -> int:
    return len(self.train_ranges)

  @property
  def layer_sizes(self) -> tuple[int, ...]:
    return (self.x_train.shape[1], *self.hidden, self.num_outputs)


@functools.lru_cache(maxsize=1)
def _mnist1d() -> tuple[np.ndarray, ...]:
  """MNIST-1D generated with its default arguments (seed 42)."""
  from mnist1d.data import get_dataset_args, make_dataset
  args = get_dataset_args()
  data = make_dataset(args)
  x, y = data["x"].astype(np.float32), data["y"].astype(np.int32)
  return (x[MNIST1D_VAL:], y[MNIST1D_VAL:], x[:MNIST1D_VAL], y[:MNIST1D_VAL],
          data["x_test"].astype(np.float32), data["y_test"].astype(np.int32))


def _permuted_mnist1d(num_tasks: int, seed: int) -> list[dict]:
  """Task ``t`` permutes the input positions (task 0 keeps them)."""
  x, y, xv, yv, xt, yt = _mnist1d()
  rng = np.random.default_rng(seed)
  tasks = []
  for t in range(num_tasks):
    perm = np.arange(x.shape[1]) if t == 0 else rng.permutation(x.shape[1])
    tasks.append(dict(train=(x[:, perm], y), val=(xv[:, perm], yv),
                      test=(xt[:, perm], yt), classes=tuple(range(10))))
  return tasks


def _split_digits(num_tasks: int, domain: bool) -> list[dict]:
  """Digit pairs; labels are the digits, or 0 / 1 (``domain``)."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_rest, x_te, y_rest, y_te = train_test_split(
      x, y, test_size=0.3, random_state=0, stratify=y)
  x_tr, x_va, y_tr, y_va = train_test_split(
      x_rest, y_rest, test_size=0.2, random_state=0, stratify=y_rest)
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


def build(name: str, quick: bool = False) -> Protocol:
  """The protocol ``name`` with its full or ``--quick`` schedule."""
  if name not in PROTOCOLS:
    raise ValueError(f"unknown protocol {name!r}; expected one of "
                     f"{list(PROTOCOLS)}")
  schedule = QUICK_SCHEDULE if quick else SCHEDULES[name]
  if name in ("pmnist", "stream"):
    tasks = _permuted_mnist1d(schedule.num_tasks, PERMUTATION_SEEDS[name])
    num_outputs = 10
  else:
    tasks = _split_digits(schedule.num_tasks, domain=name == "digits_domain")
    num_outputs = 2 if name == "digits_domain" else 10
  titles = {
      "pmnist": "permuted MNIST-1D, shared 10-way head",
      "digits_task": "split digits, task-incremental (head masked per task)",
      "digits_domain": "split digits, domain-incremental (shared 2-way head)",
      "stream": (f"task-free stream: permuted MNIST-1D, permutation switches"
                 f" every {schedule.steps_per_task} steps, batch "
                 f"{schedule.batch_size}"),
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
      num_inputs=num_inputs, num_outputs=num_outputs,
      task_free=name == "stream",
      x_train=np.concatenate([t["train"][0] for t in tasks]),
      y_train=np.concatenate([t["train"][1] for t in tasks]),
      train_ranges=tuple(zip(sizes[:-1].tolist(), sizes[1:].tolist())),
      class_masks=class_masks,
      val=_pad_split(tasks, "val", num_inputs),
      test=_pad_split(tasks, "test", num_inputs))


def build_all(names: list[str], quick: bool = False) -> list[Protocol]:
  """The protocols ``names``; under ``quick`` padded to common shapes."""
  protocols = [build(name, quick) for name in names]
  return pad_to_common(protocols) if quick else protocols


def _pad(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """``a`` in the corner of a zero array of ``shape``."""
  out = np.zeros(shape, a.dtype)
  out[tuple(slice(0, n) for n in a.shape)] = a
  return out


def pad_to_common(protocols: list[Protocol]) -> list[Protocol]:
  """Zero-pads protocols with the same schedule to the same array shapes.

  Inputs get zero columns, the output layer extra units that every task's
  class mask excludes, the training and evaluation sets extra rows (never
  sampled; invalid for evaluation). ``cl_engine.init_mlp`` initialises the
  weights of padded inputs and of unused output units to zero, so the
  network computes the same function, every method sees the same gradients
  on the real weights, and the padded weights stay at zero (UPGD's noise
  moves them, without effect on the outputs): the results do not change,
  only the arrays line up, and one compiled program per method serves every
  protocol (used by ``--quick``).
  """
  if len({p.schedule for p in protocols}) != 1:
    raise ValueError("pad_to_common needs protocols with one schedule")
  inputs = max(p.x_train.shape[1] for p in protocols)
  outputs = max(p.num_outputs for p in protocols)
  rows = max(len(p.y_train) for p in protocols)
  val = max(p.val[1].shape[1] for p in protocols)
  test = max(p.test[1].shape[1] for p in protocols)

  def split(arrays, size):
    x, y, valid = arrays
    t = len(y)
    return (_pad(x, (t, size, inputs)), _pad(y, (t, size)),
            _pad(valid, (t, size)))

  return [dataclasses.replace(
      p, num_outputs=outputs,
      x_train=_pad(p.x_train, (rows, inputs)),
      y_train=_pad(p.y_train, (rows,)),
      class_masks=_pad(p.class_masks, (p.num_tasks, outputs)),
      val=split(p.val, val), test=split(p.test, test))
      for p in protocols]


def batch_orders(protocol: Protocol, seed: int):
  """Per-seed training order: the batches of every step and Fisher examples.

  Each task's examples are drawn epoch by epoch (a fresh permutation of the
  task's training rows per epoch) until ``steps_per_task`` batches are
  filled; the Fisher examples of a task are drawn from the batches it
  trained on.

  Returns:
    ``(orders [T, chunks, steps_per_chunk, B], fisher [T, F])``: int32 row
    indices into ``protocol.x_train``.
  """
  s = protocol.schedule
  if s.steps_per_task % s.chunks_per_task:
    raise ValueError("steps_per_task must be a multiple of chunks_per_task")
  rng = np.random.default_rng(1000 + seed)
  needed = s.steps_per_task * s.batch_size
  orders, fisher = [], []
  for start, stop in protocol.train_ranges:
    epochs = -(-needed // (stop - start))
    rows = np.concatenate([rng.permutation(np.arange(start, stop))
                           for _ in range(epochs)])[:needed]
    orders.append(rows.reshape(s.chunks_per_task, -1, s.batch_size))
    fisher.append(rng.choice(rows, s.fisher_examples, replace=False))
  return (np.stack(orders).astype(np.int32),
          np.stack(fisher).astype(np.int32))
