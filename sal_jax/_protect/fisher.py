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
from typing import Any, Callable, Iterable

import chex
import jax
import jax.numpy as jnp
import numpy as np


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


@functools.partial(jax.jit, static_argnums=(0, 1))
def _add_square_sums(loss_fn, chunk_size, params, batch, total):
  """``total`` plus the sum over the batch of squared per-example grads."""
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
    return jax.tree.map(
        lambda t, g: t + jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0),
        total, grads), None

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
  total = jax.tree.map(
      lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  count = 0
  for index, batch in enumerate(batches):
    size = _leading_size(batch, index)
    if size:
      total = _add_square_sums(_ByIdentity(loss_fn), chunk_size, params,
                               batch, total)
      count += size
  if not count:
    raise ValueError(
        "sal_jax.fisher_diagonal: batches held no examples.")
  return jax.tree.map(lambda t: t / count, total)
