"""How far a fine-tuned model's predictions moved from the pretrained ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
