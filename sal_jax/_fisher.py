"""Consolidating from a known starting point: the diagonal Fisher.

The shift-consolidation estimator consolidates at the shifts it sees. A
model that was pretrained elsewhere and is now fine-tuned with a fresh
``optax.chain(sal.protect(), ...)`` has shown it no shift: nothing is
protected. :func:`fisher_diagonal` measures the importance of every
parameter for the old task, :func:`consolidate` writes it and the pretrained
params into the protect state (one online-EWC consolidation, as at a
detected shift), and :func:`prediction_drift` measures how far the
fine-tuned predictions moved from the old ones.
"""

from __future__ import annotations

import collections.abc
import functools
from typing import Any, Callable, Iterable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sal_jax import _estimators
from sal_jax import _metrics
from sal_jax import _nnx_interop
from sal_jax import _protect
from sal_jax import _shift_consolidation
from sal_jax import _tree_utils
from sal_jax import _validation


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


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _consolidate_state(state: _protect.ProtectState, params, fisher,
                       decay) -> _protect.ProtectState:
  est = state.estimator_state
  if not isinstance(est, _shift_consolidation.ShiftConsolidationState):
    raise ValueError(
        "sal_jax.consolidate: the protect state's estimator keeps "
        f"{type(est).__name__}, which has no anchor and consolidated "
        "importance; use the shift-consolidation estimator (the default "
        "of sal.protect()).")
  treedef = jax.tree.structure(est.anchor, is_leaf=_is_masked)
  leaves = {}
  for name, tree in (("params", params), ("fisher", fisher)):
    try:
      leaves[name] = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
      raise ValueError(
          f"sal_jax.consolidate: {name} does not have the tree of the params "
          f"the optimizer was initialised with: {jax.tree.structure(tree)} "
          f"vs {treedef}.") from e
  anchors = treedef.flatten_up_to(est.anchor)
  consolidated = treedef.flatten_up_to(est.consolidated)
  live = [i for i, a in enumerate(anchors) if not _is_masked(a)]
  for i in live:
    for name in ("params", "fisher"):
      if jnp.shape(leaves[name][i]) != jnp.shape(anchors[i]):
        raise ValueError(
            f"sal_jax.consolidate: {name} leaf {i} has shape "
            f"{jnp.shape(leaves[name][i])} where the optimizer state has "
            f"{jnp.shape(anchors[i])}.")
  # The estimator's importance is relative: each step adds g^2 over the
  # mean of g^2 (its slow energy), so that a consolidation adds a tree of
  # unit mean. The Fisher enters normalised the same way, by its mean over
  # every entry this protect state covers.
  fishers = {i: jnp.asarray(leaves["fisher"][i], jnp.float32) for i in live}
  entries = max(sum(f.size for f in fishers.values()), 1)
  mean = sum(jnp.sum(f) for f in fishers.values()) / entries
  safe_mean = jnp.where(mean > 0, mean, 1.0)
  new_anchors, new_consolidated = list(anchors), list(consolidated)
  for i in live:
    f = jnp.where(mean > 0, fishers[i] / safe_mean, 0.0)
    c = consolidated[i]
    # Per leaf (a scalar importance), the leaf's mean, as the estimator does.
    unit = f if jnp.shape(c) == f.shape else jnp.mean(f)
    new_consolidated[i] = (decay * c + unit).astype(c.dtype)
    new_anchors[i] = jnp.array(leaves["params"][i], dtype=anchors[i].dtype)
  # The distance from the previous anchor: the relative drift's scale.
  travelled = _estimators.weighted_distance(
      [new_consolidated[i] for i in live], [new_anchors[i] for i in live],
      [anchors[i] for i in live])
  est = est._replace(
      anchor=treedef.unflatten(new_anchors),
      consolidated=treedef.unflatten(new_consolidated),
      consolidations=est.consolidations + 1,
      reference=(decay * est.reference + travelled).astype(jnp.float32))
  return state._replace(estimator_state=est)


def consolidate(
    opt_state: Any,
    params: chex.ArrayTree,
    fisher: chex.ArrayTree,
    *,
    decay: chex.Numeric = _shift_consolidation.DEFAULT_CONSOLIDATION_DECAY,
) -> Any:
  r"""Consolidates ``params`` with importance ``fisher`` into a protect state.

  One online-EWC consolidation, as the shift-consolidation estimator makes
  at a detected shift, with the importance given: with :math:`F` the
  diagonal Fisher (e.g. :func:`fisher_diagonal` on the old task),
  :math:`\kappa` = ``decay`` and the mean over every entry the protect
  state covers,

  .. math::
    \Omega^*_i \leftarrow \kappa \Omega^*_i + \frac{F_i}{\operatorname{mean}(F)},
    \qquad \theta^*_i \leftarrow \theta_i

  (per leaf at leaf granularity: the leaf's mean of :math:`F_i /
  \operatorname{mean}(F)`). The estimator's own importance is relative, the
  squared gradient over the mean squared gradient, so each consolidation
  adds importance of mean 1; the Fisher enters normalised the same way, so
  that ``protect(restore=...)`` keeps the strength it has for detected
  shifts and does not depend on the scale of the loss (the raw Fisher of a
  well-fit model is tiny: a mean of 1e-6 in ``examples/fisher_no_labels.py``).
  The restoring pull
  :math:`\lambda \Omega^*_i \sqrt{\hat e_s} (\theta_i - \theta^*_i)` then
  holds the pretrained params while fine-tuning. Every protect state found
  (as :func:`sal_jax.find_protect_states` finds them, through chains, masks,
  ``inject_hyperparams``, ``MultiSteps``) is consolidated, each over the
  entries it covers; ``consolidations`` counts this one. The scale of
  ``protect(relative_budget=...)``'s estimate grows by the weighted
  distance from the previous anchor (the params at ``init``): zero for a
  state initialised at ``params``, where the relative budget has no scale
  and does not bind (use ``budget=`` with a measured drift there). A shift
  detected later moves the anchor again, as in online EWC. Usable inside ``jax.jit``.

  Args:
    opt_state: an optimizer state holding a :func:`sal_jax.protect` state
      with the shift-consolidation estimator, or a ``flax.nnx.Optimizer``
      (updated in place).
    params: the params to anchor to, the tree the optimizer was built for.
    fisher: the importance of each entry, a non-negative tree like
      ``params``.
    decay: :math:`\kappa \in [0, 1]`, the share of the earlier
      consolidated importance kept; pass the ``consolidation_decay`` of a
      non-default estimator.

  Returns:
    The new optimizer state (an ``nnx.Optimizer``: the same, updated).

  Raises:
    ValueError: if no protect state is found, its estimator has no anchor,
      ``params`` or ``fisher`` do not match the optimizer's params, or
      ``decay`` is outside ``[0, 1]``.

  Examples:
    >>> import jax.numpy as jnp, optax, sal_jax as sal
    >>> params = {"w": jnp.ones(2)}
    >>> tx = optax.chain(sal.protect(), optax.adamw(1e-3))
    >>> state = sal.consolidate(tx.init(params), params,
    ...                         {"w": jnp.array([0.25, 0.75])})
    >>> sal.find_protect_states(state)[0].estimator_state.consolidated
    {'w': Array([0.5, 1.5], dtype=float32)}

  References:
    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
    networks", PNAS 2017;
    Schwarz et al., "Progress & Compress", ICML 2018 (online EWC).
  """
  _validation.check_number("sal_jax.consolidate", "decay", decay, 0.0, 1.0)
  params = _nnx_interop.unwrap_variables(params)
  fisher = _nnx_interop.unwrap_variables(fisher)
  _tree_utils.check_same_structure(fisher, params, "fisher", "params")

  def rewrite(opt_state):
    found = 0

    def replace(x):
      nonlocal found
      if not _metrics._is_protect_state(x):
        return x
      found += 1
      return _consolidate_state(x, params, fisher, decay)

    new_state = jax.tree.map(replace, opt_state,
                             is_leaf=_metrics._is_protect_state)
    if not found:
      raise ValueError(
          "sal_jax.consolidate: no ProtectState found in the optimizer "
          "state; is sal_jax.protect() part of the optimizer?")
    return new_state

  return _nnx_interop.rewrite_state(opt_state, rewrite, "sal_jax.consolidate")


def prediction_drift(
    anchor_logits: jax.Array,
    logits: jax.Array,
    *,
    where: jax.Array | None = None,
) -> jax.Array:
  r"""How far predictions moved: the mean KL from the old to the new ones.

  With :math:`p = \operatorname{softmax}(a)` of the anchor (old) logits and
  :math:`q = \operatorname{softmax}(z)` of the new ones, over the last axis,

  .. math::
    D = \operatorname{mean}_n \sum_k p_{nk}
      (\log p_{nk} - \log q_{nk}),

  the mean over every leading axis (the batch) of
  :math:`\mathrm{KL}(p \,\|\, q)`, in nats, from ``log_softmax`` (stable for
  large logits; classes with :math:`p = 0` add 0). It needs no labels:
  evaluate the pretrained and the fine-tuned model on the same inputs.

  Args:
    anchor_logits: the old model's logits, ``[..., classes]``.
    logits: the new model's logits, the same shape.
    where: optional boolean mask over the leading axes
      (``logits.shape[:-1]``, or broadcastable to it); the mean is over the
      entries where it is True (NaN if none is).

  Returns:
    A float scalar, >= 0; 0 for equal predictions.

  Raises:
    ValueError: for logits of different shapes, scalars, or a mask that
      does not broadcast to the leading axes.

  Examples:
    >>> import jax.numpy as jnp, sal_jax as sal
    >>> old = jnp.array([[2.0, 0.0], [0.0, 0.0]])
    >>> float(sal.prediction_drift(old, old))
    0.0
    >>> new = jnp.array([[0.0, 0.0], [0.0, 0.0]])
    >>> first = jnp.array([True, False])  # log 2 - entropy of softmax([2, 0])
    >>> round(float(sal.prediction_drift(old, new, where=first)), 4)
    0.3278

  References:
    Li & Hoiem, "Learning without Forgetting", ECCV 2016 (the old model's
    predictions as the target to keep).
  """
  anchor_logits = jnp.asarray(anchor_logits)
  logits = jnp.asarray(logits)
  if anchor_logits.shape != logits.shape or logits.ndim < 1:
    raise ValueError(
        "sal_jax.prediction_drift: anchor_logits and logits must have the "
        f"same shape [..., classes]; got {anchor_logits.shape} and "
        f"{logits.shape}.")
  dtype = jnp.promote_types(
      jnp.result_type(anchor_logits, logits), jnp.float32)
  log_p = jax.nn.log_softmax(anchor_logits.astype(dtype), axis=-1)
  log_q = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  p = jnp.exp(log_p)
  # Where p = 0 the term is 0, also for log q = -inf (and in the gradient).
  diff = jnp.where(p > 0, log_p - log_q, 0.0)
  kl = jnp.sum(p * diff, axis=-1)
  if where is None:
    return jnp.mean(kl)
  where = jnp.asarray(where)
  try:
    where = jnp.broadcast_to(where.astype(jnp.bool_), kl.shape)
  except ValueError as e:
    raise ValueError(
        f"sal_jax.prediction_drift: where of shape {where.shape} does not "
        f"broadcast to the leading axes {kl.shape}.") from e
  return jnp.mean(kl, where=where)
