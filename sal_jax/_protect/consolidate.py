"""Consolidating from a known starting point.

:func:`consolidate` writes a parameter importance (e.g. the diagonal Fisher
of :func:`sal_jax.fisher_diagonal`) and the pretrained params into the
protect state: one online-EWC consolidation, as at a detected shift.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from sal_jax._common import nnx_interop as _nnx_interop
from sal_jax._common import tree_utils as _tree_utils
from sal_jax._common import units as _units
from sal_jax._common import validation as _validation
from sal_jax._protect import estimators as _estimators
from sal_jax._protect import metrics as _metrics
from sal_jax._protect import protect as _protect
from sal_jax._protect import shift_consolidation as _shift_consolidation


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _unit_hint(anchor, consolidated) -> str:
  if _units.is_kronecker_unit(consolidated, anchor):
    full = jnp.shape(_units.zeros(anchor, "kronecker"))
    return f" (or, from sal.fisher_kronecker, {full})"
  return ""


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
      shape = jnp.shape(leaves[name][i])
      # A Fisher may come as a Kronecker unit (fisher_kronecker's) where
      # the state keeps one (full or low-rank).
      if shape != jnp.shape(anchors[i]) and not (
          name == "fisher" and _units.is_kronecker_unit(leaves[name][i],
                                                        anchors[i])
          and _units.is_kronecker_unit(consolidated[i], anchors[i])):
        raise ValueError(
            f"sal_jax.consolidate: {name} leaf {i} has shape {shape} where "
            f"the optimizer state has {jnp.shape(anchors[i])}"
            f"{_unit_hint(anchors[i], consolidated[i])}.")
  # The estimator's importance is relative: each step adds g^2 over the
  # mean of g^2 (its slow energy), so that a consolidation adds a tree of
  # unit mean. The Fisher enters normalised the same way, by its mean over
  # every entry this protect state covers.
  fishers = {i: jnp.asarray(leaves["fisher"][i], jnp.float32) for i in live}
  entries = max(sum(jnp.size(anchors[i]) for i in live), 1)
  mean = sum(_units.total(fishers[i], anchors[i]) for i in live) / entries
  safe_mean = jnp.where(mean > 0, mean, 1.0)
  new_anchors, new_consolidated = list(anchors), list(consolidated)
  for i in live:
    f = jnp.where(mean > 0, fishers[i] / safe_mean, 0.0)
    # In the estimator's unit: per element, the leaf's mean (a scalar), a
    # matrix's row and column means (factored) or, for a per-element
    # Fisher in a Kronecker unit, its row and column sums.
    if jnp.shape(f) != jnp.shape(anchors[i]):
      unit = f  # already a (full) Kronecker unit
    else:
      unit = _units.factor(f, consolidated[i])
    new_consolidated[i] = _units.accumulate(
        consolidated[i], unit, decay, anchors[i]).astype(consolidated[i].dtype)
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
    fisher: for the default (Kronecker-factored) state,
      :func:`sal_jax.fisher_kronecker`'s tree, whose kernels keep their
      second moment (a low-rank state keeps its top directions); or the
      importance of each entry, a non-negative tree like ``params``
      (:func:`sal_jax.fisher_diagonal`), which a Kronecker state takes as
      :math:`L` = the diagonal of its row sums (no directions).
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
  # A leaf of fisher_kronecker's (a Kronecker unit) differs from its
  # param's shape; the state checks it. Any other difference is an error.
  if jax.tree.structure(fisher) != jax.tree.structure(params) or not all(
      jnp.shape(f) == jnp.shape(p) or _units.is_kronecker_unit(f, p)
      for f, p in zip(jax.tree.leaves(fisher), jax.tree.leaves(params))):
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
