"""The Pulse-Split-Cascade's merge: the original's greedy pairwise order.

Viable pulses whose embeddings' cosine exceeds a threshold merge, in slot
order, the absorbing pulse's embedding updated after every merge; one
``lax.while_loop`` over the cosine rows (see :func:`greedy_merge`).

References:
  The original SAL library, ``sal.psc.PulseCascade._attempt_merges``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


_COS_EPS = 1e-8


def _cos_rows(v: jax.Array, m: jax.Array) -> jax.Array:
  """Cosine of ``v`` (D,) with every row of ``m`` (P, D)."""
  nv = jnp.maximum(jnp.linalg.norm(v), _COS_EPS)
  nm = jnp.maximum(jnp.linalg.norm(m, axis=-1), _COS_EPS)
  return (m @ v) / (nm * nv)


def greedy_merge(emb, c, n, r, active, merge_threshold):
  """The original's greedy pairwise merge, as one ``lax.while_loop``.

  For ``i`` in slot order (skipping merged ones), ``j > i`` in slot order:
  if ``cos(e_i, e_j) > threshold`` then ``j`` merges into ``i`` and ``e_i``
  changes, so later ``j`` are compared with the updated ``e_i``. Each
  iteration computes the cosine of the current ``e_i`` with all rows and
  takes the first eligible ``j`` past the last merge (the ``j`` the
  sequential scan would merge next), or moves on to row ``i + 1``: at most
  ``P + merges`` iterations.
  """
  p = emb.shape[0]
  idx = jnp.arange(p)
  threshold = jnp.asarray(merge_threshold, emb.dtype)

  def cond(s):
    return s[0] < p

  def body(s):
    i, start, emb, c, n, r, merged, merged_into, count = s
    sims = _cos_rows(emb[i], emb)
    cand = (active[i] & ~merged[i] & active & ~merged & (idx >= start)
            & (sims > threshold))
    found = jnp.any(cand)
    j = jnp.argmax(cand)
    merged_s = (i, j + 1,
                emb.at[i].set((emb[i] + emb[j]) / 2),
                c.at[i].set(jnp.maximum(c[i], c[j])),
                n.at[i].set((n[i] + n[j]) / 2),
                r.at[i].set(jnp.maximum(r[i], r[j])),
                merged.at[j].set(True),
                merged_into.at[j].set(i),
                count + 1)
    next_row = (i + 1, i + 2, emb, c, n, r, merged, merged_into, count)
    return optax.tree_utils.tree_where(found, merged_s, next_row)

  init = (jnp.zeros((), jnp.int32), jnp.ones((), jnp.int32), emb, c, n, r,
          jnp.zeros((p,), bool), jnp.full((p,), -1, jnp.int32),
          jnp.zeros((), jnp.int32))
  return jax.lax.while_loop(cond, body, init)[2:]
