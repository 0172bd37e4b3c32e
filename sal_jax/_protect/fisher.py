"""The diagonal Fisher: how much each parameter mattered for the old task.

The shift-consolidation estimator consolidates at the shifts it sees. A
model that was pretrained elsewhere and is now fine-tuned with a fresh
``optax.chain(sal.protect(), ...)`` has shown it no shift: nothing is
protected. :func:`fisher_diagonal` measures the importance of every
parameter for the old task; :func:`sal_jax.consolidate` writes it into the
protect state.
"""

from __future__ import annotations

import collections.abc
import functools
from typing import Any, Callable, Iterable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sal_jax._common import units as _units


def _leading_size(batch: Any, index: int) -> int:
  """The batch's example count; raises for a bad batch."""
  if isinstance(batch, (str, bytes)):
    raise TypeError(
        f"sal_jax.fisher_diagonal: batch {index} is a {type(batch).__name__}"
        "; batches must be an iterable of batches (pass a single batch as "
        "[batch]).")
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError(
        f"sal_jax.fisher_diagonal: batch {index} holds no arrays.")
  shapes = [jnp.shape(x) for x in leaves]
  if any(len(s) == 0 for s in shapes):
    raise ValueError(
        f"sal_jax.fisher_diagonal: every array of batch {index} needs a "
        f"leading example axis; got shapes {shapes}.")
  sizes = sorted({s[0] for s in shapes})
  if len(sizes) > 1:
    raise ValueError(
        f"sal_jax.fisher_diagonal: the arrays of batch {index} differ in "
        f"their leading (example) axis: sizes {sizes}.")
  return sizes[0]


def _check_losses(shape: tuple[int, ...], size: int, what: str) -> None:
  if tuple(shape) != (size,):
    raise ValueError(
        "sal_jax.fisher_diagonal: loss_fn(params, batch) must return the "
        f"vector of per-example losses, shape ({size},), for {what}; got "
        f"shape {tuple(shape)}. Return the losses before any mean or sum.")


class _ByIdentity:
  """A callable as a static jit argument, hashed by identity."""

  def __init__(self, fn):
    self.fn = fn

  def __hash__(self):
    return id(self.fn)

  def __eq__(self, other):
    return isinstance(other, _ByIdentity) and other.fn is self.fn


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _add_square_sums(loss_fn, chunk_size, unit, params, batch, total):
  """``total`` plus the sum over the batch of the per-example grads'
  squares, in ``unit`` (see :mod:`sal_jax._common.units`)."""
  loss_fn = loss_fn.fn
  size = jax.tree.leaves(batch)[0].shape[0]
  _check_losses(jax.eval_shape(loss_fn, params, batch).shape, size,
                f"a batch of {size}")

  def example_loss(p, example):
    losses = loss_fn(p, jax.tree.map(lambda x: x[None], example))
    _check_losses(jnp.shape(losses), 1, "a batch of 1")
    return losses[0]

  example_grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))

  def add_chunk(total, chunk):
    grads = example_grads(params, chunk)
    def add(t, g):
      energies = jax.vmap(lambda e: _units.energy(e, 1.0, unit))(g)
      return t + jnp.sum(energies, axis=0)
    return jax.tree.map(add, total, grads), None

  full, rest = divmod(size, chunk_size)
  if full:
    # Chunks of chunk_size examples in a loop: memory for chunk_size
    # per-example gradients, whatever the batch size.
    chunks = jax.tree.map(
        lambda x: x[:full * chunk_size].reshape(
            (full, chunk_size) + x.shape[1:]), batch)
    total, _ = jax.lax.scan(add_chunk, total, chunks)
  if rest:
    total, _ = add_chunk(
        total, jax.tree.map(lambda x: x[full * chunk_size:], batch))
  return total


def fisher_diagonal(
    loss_fn: Callable[[chex.ArrayTree, Any], jax.Array],
    params: chex.ArrayTree,
    batches: Iterable[Any],
    *,
    chunk_size: int = 32,
) -> chex.ArrayTree:
  r"""The diagonal of the Fisher information, from per-example gradients.

  With :math:`\ell_n(\theta)` the loss (negative log-likelihood) of example
  :math:`n` and :math:`N` the examples of all batches,

  .. math::
    F_i = \frac{1}{N} \sum_{n=1}^{N}
      \Big(\frac{\partial \ell_n}{\partial \theta_i}\Big)^2 .

  With the data's own labels this is the *empirical* Fisher; with labels
  sampled from the model's predictions, :math:`y_n \sim p_\theta(\cdot \mid
  x_n)`, it is a one-sample Monte Carlo estimate of the true Fisher, which
  needs no labels at all (Martens 2020 on why the two differ). Per-example
  gradients are taken ``chunk_size`` at a time (a vmapped gradient in a
  ``lax.scan``), so memory holds ``chunk_size`` gradients, not a batch of
  them; each batch shape compiles once (a smaller last batch once more).

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning the vector of per-example
      losses of ``batch``, shape ``[batch_size]`` (not their mean); each
      example's loss must depend on that example alone.
    params: the parameters (a pytree of float arrays).
    batches: an iterable of batches, each a pytree of arrays sharing a
      leading example axis; batches of any sizes, each example weighs the
      same.
    chunk_size: how many per-example gradients to hold at once.

  Returns:
    A float32 tree like ``params``: the mean over all examples of the squared
    per-example gradients.

  Raises:
    TypeError: if ``batches`` is a single array or dict, not an iterable of
      batches.
    ValueError: for no examples, a batch whose arrays differ in their
      leading axis, a loss_fn that does not return one loss per example, or
      ``chunk_size < 1``.

  Examples:
    >>> import jax.numpy as jnp, sal_jax as sal
    >>> def loss_fn(params, batch):  # a Gaussian NLL, up to a constant
    ...   return 0.5 * jnp.square(batch["x"] * params["w"] - batch["y"])
    >>> batch = {"x": jnp.array([1.0, 2.0]), "y": jnp.array([1.0, 1.0])}
    >>> sal.fisher_diagonal(loss_fn, {"w": jnp.zeros(())}, [batch])  # (1 + 4) / 2
    {'w': Array(2.5, dtype=float32)}

  References:
    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
    networks", PNAS 2017;
    Martens, "New Insights and Perspectives on the Natural Gradient Method",
    JMLR 2020 (the empirical vs the true Fisher).
  """
  return _fisher(loss_fn, params, batches, chunk_size, "element")


def _fisher(loss_fn, params, batches, chunk_size, unit):
  """The mean over the examples of the squared per-example gradients, in
  ``unit``."""
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or (
      chunk_size < 1):
    raise ValueError(
        "sal_jax.fisher_diagonal: chunk_size must be an int >= 1, got "
        f"{chunk_size!r}.")
  if (isinstance(batches, (jax.Array, np.ndarray, collections.abc.Mapping))
      or not isinstance(batches, collections.abc.Iterable)):
    raise TypeError(
        "sal_jax.fisher_diagonal: batches must be an iterable of batches, "
        f"got a {type(batches).__name__}; pass a single batch as [batch].")
  total = jax.tree.map(lambda p: _units.zeros(p, unit), params)
  count = 0
  for index, batch in enumerate(batches):
    size = _leading_size(batch, index)
    if size:
      total = _add_square_sums(_ByIdentity(loss_fn), chunk_size, unit,
                               params, batch, total)
      count += size
  if not count:
    raise ValueError(
        "sal_jax.fisher_diagonal: batches held no examples.")
  return jax.tree.map(lambda t: t / count, total)


def fisher_kronecker(
    loss_fn: Callable[[chex.ArrayTree, Any], jax.Array],
    params: chex.ArrayTree,
    batches: Iterable[Any],
    *,
    chunk_size: int = 32,
) -> chex.ArrayTree:
  r"""The Fisher of each kernel on its input side, for a Kronecker state.

  For a kernel :math:`W` with ``n_in`` inputs (all axes but the last) and
  ``n_out >= n_in`` outputs, with :math:`G_n` the gradient of example
  :math:`n`'s loss reshaped to ``n_in x n_out``,

  .. math::
    L = \frac{1}{N} \sum_n G_n G_n^\top, \qquad
    c_j = \frac{1}{N} \sum_n \sum_i (G_n)_{ij}^2,

  flattened into one array (:math:`L` then :math:`c`), the unit that
  ``protect(granularity="kronecker")`` keeps (see
  :func:`sal_jax.shift_consolidation_estimator`); every other leaf gets
  :func:`fisher_diagonal`'s per-element value. The diagonal of :math:`L`
  holds the row sums of the diagonal Fisher and :math:`c` its column
  sums; the off-diagonal entries say which input directions the examples
  used. Pass it to :func:`sal_jax.consolidate` for a Kronecker state.
  Computed like :func:`fisher_diagonal` (per-example gradients
  ``chunk_size`` at a time), with ``n_in^2 n_out`` more multiply-adds per
  example and kernel.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning the vector of per-example
      losses of ``batch``.
    params: the parameters.
    batches: an iterable of batches sharing a leading example axis.
    chunk_size: how many per-example gradients to hold at once.

  Returns:
    A float32 tree with the structure of ``params``: Kronecker units for
    the kernels that keep one, per-element Fishers elsewhere.

  Raises:
    TypeError, ValueError: as :func:`fisher_diagonal`.

  Examples:
    >>> import jax.numpy as jnp, sal_jax as sal
    >>> def loss_fn(params, batch):  # one linear map, squared error
    ...   return 0.5 * jnp.sum(jnp.square(batch["x"] @ params["w"]
    ...                                   - batch["y"]), axis=-1)
    >>> batch = {"x": jnp.array([[1.0, 0.0], [1.0, 1.0]]),
    ...          "y": jnp.ones((2, 2))}
    >>> f = sal.fisher_kronecker(loss_fn, {"w": jnp.zeros((2, 2))}, [batch])
    >>> f["w"]  # L = mean of |r|^2 x x^T (residuals r = -1), then c
    Array([2. , 1. , 1. , 1. , 1.5, 1.5], dtype=float32)

  References:
    Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature", ICML 2015;
    Ritter, Botev & Barber, "Online Structured Laplace Approximations for
    Overcoming Catastrophic Forgetting", NeurIPS 2018.
  """
  return _fisher(loss_fn, params, batches, chunk_size, "kronecker")


def combine_fishers(
    fishers: Sequence[chex.ArrayTree],
    weights: Sequence[float] | None = None,
    *,
    params: chex.ArrayTree | None = None,
) -> chex.ArrayTree:
  r"""Combines the Fishers of several things to keep, each on its own scale.

  The Fisher of a behaviour the model has learned confidently (a fixed
  reply, say) is tiny next to that of broad text, whose losses are high:
  pooled into one :func:`fisher_diagonal`, the behaviour barely counts and
  is the first thing fine-tuning erases. Normalising each source's Fisher
  to mean 1 before adding gives every source the weight you choose:

  .. math::
    F = \sum_k w_k \, \frac{F_k}{\operatorname{mean}(F_k)}, \qquad
    \sum_k w_k = 1,

  where the mean runs over every entry of every leaf; :math:`F` has mean
  1, but for a source whose Fisher is zero everywhere: it adds nothing.

  Args:
    fishers: the Fishers of the sources, trees of the same structure and
      shapes (e.g. from :func:`fisher_diagonal`, one per source).
    weights: the sources' weights :math:`w_k > 0`, normalised to sum to 1;
      ``None`` (the default): equal.
    params: the params the Fishers belong to; needed for Fishers from
      :func:`fisher_kronecker`, whose means run over the params' entries.

  Returns:
    A float32 tree like each Fisher.

  Raises:
    ValueError: for no Fishers, Fishers of different structures or shapes,
      or weights of the wrong length or not positive.

  Examples:
    >>> import jax.numpy as jnp, sal_jax as sal
    >>> text = {"w": jnp.array([2.0, 6.0])}       # mean 4
    >>> reply = {"w": jnp.array([0.0, 0.002])}    # mean 0.001
    >>> sal.combine_fishers([text, reply])
    {'w': Array([0.25, 1.75], dtype=float32)}

  References:
    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
    networks", PNAS 2017 (one Fisher per earlier task, each its own
    penalty).
  """
  where = "sal_jax.combine_fishers"
  fishers = list(fishers)
  if not fishers:
    raise ValueError(f"{where}: no Fishers given.")
  structure = jax.tree.structure(fishers[0])
  shapes = [jnp.shape(x) for x in jax.tree.leaves(fishers[0])]
  for k, fisher in enumerate(fishers[1:], 1):
    if (jax.tree.structure(fisher) != structure
        or [jnp.shape(x) for x in jax.tree.leaves(fisher)] != shapes):
      raise ValueError(
          f"{where}: Fisher {k} differs from Fisher 0 in its tree structure "
          "or leaf shapes; every Fisher must be a tree like the params.")
  if weights is None:
    weights = [1.0] * len(fishers)
  weights = [float(w) for w in weights]
  if len(weights) != len(fishers) or not all(
      w > 0 and np.isfinite(w) for w in weights):
    raise ValueError(
        f"{where}: weights must be {len(fishers)} positive numbers, one "
        f"per Fisher; got {weights!r}.")
  total = sum(weights)
  if params is None:
    size = max(sum(int(np.prod(s)) for s in shapes), 1)
    like = [None] * len(shapes)
  else:
    like = structure.flatten_up_to(params)
    size = max(sum(int(np.size(p)) for p in like), 1)

  def sum_of(x, p):
    x = jnp.asarray(x, jnp.float32)
    return jnp.sum(x) if p is None else _units.total(x, p)

  def normalised(fisher, weight):
    mean = sum(sum_of(x, p) for x, p in zip(jax.tree.leaves(fisher),
                                             like)) / size
    safe = jnp.where(mean > 0, mean, 1.0)
    scale = jnp.where(mean > 0, weight / total / safe, 0.0)
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) * scale, fisher)

  parts = [normalised(f, w) for f, w in zip(fishers, weights)]
  return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *parts)
