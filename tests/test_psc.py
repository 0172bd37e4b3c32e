"""Pulse-Split-Cascade: parity with the original, capacity, jit, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sal_jax import contrib as C
from conftest import ARRAY_TOL, SCALAR_TOL, as_array, load_fixture

SECTION = load_fixture()["psc"]
CODES = {s.name.lower(): int(s) for s in C.PulseStatus}
NAMES = {v: k for k, v in CODES.items()}
ORIGINAL_STAT_KEYS = ("current_step", "total_pulses_created", "active_pulses",
                      "expired_pulses", "merged_pulses", "total_merges",
                      "num_lineages", "emergence_events")


def _identity(e):
  return e


_viable = C.viable_pulses
_lineages = C.cascade_lineages
_statistics = C.cascade_statistics


def _constant_measure(e):
  del e
  return 0.9, 0.5, 0.6


def _stats(state):
  return {k: int(v) for k, v in _statistics(state).items()}


def _state_with(pulses, capacity=8, dims=2):
  """A cascade whose first slots hold the given pulse dicts (one lineage)."""
  p = capacity
  state = C.cascade_init(jnp.ones(dims), p)
  status = np.zeros(p, np.int32)
  c, n, r = (np.zeros(p, np.float32) for _ in range(3))
  gen = np.zeros(p, np.int32)
  for i, pulse in enumerate(pulses):
    status[i] = CODES[pulse["state"]]
    c[i], n[i], r[i] = pulse["coherence"], pulse["novelty"], pulse["resonance"]
    gen[i] = pulse.get("generation", 0)
  root = np.where(status != 0, 0, -1).astype(np.int32)
  fit = np.where(status != 0, c * (n + r) / 2, 0).astype(np.float32)
  return state._replace(status=jnp.asarray(status), coherence=jnp.asarray(c),
                        novelty=jnp.asarray(n), resonance=jnp.asarray(r),
                        generation=jnp.asarray(gen), root=jnp.asarray(root),
                        best_fitness=jnp.asarray(fit))


def test_pulse_cases():
  for case in SECTION["pulse_cases"]:
    status = CODES[case["state"]]
    c, n, r = case["coherence"], case["novelty"], case["resonance"]
    np.testing.assert_allclose(float(C.pulse_fitness(c, n, r)),
                               case["fitness"], **SCALAR_TOL)
    assert bool(C.pulse_is_viable(status, c, r)) == case["is_viable"], case
    assert bool(C.pulse_can_split(status, c, n, r)) == case["can_split"], case


def test_pulse_defaults_and_split_threshold_is_used():
  d = SECTION["pulse_defaults"]
  assert float(C.pulse_fitness(d["coherence"], d["novelty"],
                               d["resonance"])) == d["fitness"]
  active = CODES["active"]
  # Default 0.5 = the original's hard-coded rule; the argument now counts.
  assert bool(C.pulse_can_split(active, 0.55, 0.5, 0.5))
  assert not bool(C.pulse_can_split(active, 0.55, 0.5, 0.5,
                                    split_threshold=0.6))
  assert bool(C.pulse_can_split(active, 0.61, 0.5, 0.5, split_threshold=0.6))


@pytest.mark.parametrize("case", SECTION["emergence_select_cases"],
                         ids=lambda c: c["name"])
def test_emergence_select_cases(case):
  state = _state_with(case["pulses"])
  got = int(C.emergence_select(state.status, state.coherence, state.novelty,
                               state.resonance))
  want = case["selected_index"]
  assert got == (-1 if want is None else want)
  slot, after = C.emerge(state)
  assert int(slot) == got
  any_viable = bool(jnp.any(_viable(state)))
  assert int(after.emergence_events) == int(any_viable)


def test_lineage_records():
  records = SECTION["lineage"]["records"]
  added = []
  for rec in records:
    added.append(rec["added"])
    state = _state_with(added)
    stats = _lineages(state)
    assert bool(stats.is_lineage[0]) and not bool(stats.is_lineage[1])
    assert int(stats.total_generations[0]) == rec["total_generations"]
    assert int(stats.num_active[0]) == rec["active_pulses"]
    np.testing.assert_allclose(float(stats.best_fitness[0]),
                               rec["best_fitness"], **SCALAR_TOL)
    np.testing.assert_allclose(float(stats.overall_fitness[0]),
                               rec["overall_fitness"], **SCALAR_TOL)
    assert (int(stats.best_index[0]) == len(added) - 1) == \
        rec["best_is_last_added"]
  state = state._replace(status=jnp.where(state.status != 0, CODES["expired"],
                                          0))
  np.testing.assert_allclose(
      float(_lineages(state).overall_fitness[0]),
      SECTION["lineage"]["overall_fitness_after_all_expired"], **SCALAR_TOL)


def _no_split_evolve(e):
  return 0.9 * e + 0.1 * jnp.roll(e, 1) - 0.05


def _no_split_measure(e):
  return (jax.nn.sigmoid(jnp.sum(e)), jnp.float32(0.2),
          0.5 + 0.5 * jnp.tanh(e[0]))


def test_cascade_no_split_replays_the_original():
  run = SECTION["cascade_no_split"]
  assert run["constructor_kwargs"] == {"max_generations": 0}
  state = C.cascade_init(as_array(run["initial_embeddings"]),
                         run["cascade_defaults"]["max_pulses"])
  step = jax.jit(functools.partial(
      C.cascade_step, evolve_fn=_no_split_evolve,
      measure_fn=_no_split_measure, max_generations=0))
  for rec in run["steps"]:
    if rec["step"]:
      state = step(state, jax.random.key(rec["step"]))
    host = jax.device_get(state)
    viable = np.asarray(_viable(state))
    for pulse in rec["pulses"]:
      i = pulse["index"]
      where = f"step {rec['step']} pulse {i}"
      assert NAMES[int(host.status[i])] == pulse["state"], where
      assert int(host.generation[i]) == pulse["generation"], where
      for key in ("coherence", "novelty", "resonance"):
        np.testing.assert_allclose(getattr(host, key)[i], pulse[key],
                                   **SCALAR_TOL, err_msg=where)
      np.testing.assert_allclose(
          host.coherence[i] * (host.novelty[i] + host.resonance[i]) / 2,
          pulse["fitness"], **SCALAR_TOL)
      assert bool(viable[i]) == pulse["is_viable"], where
      np.testing.assert_allclose(host.embeddings[i], pulse["embedding"],
                                 **ARRAY_TOL, err_msg=where)
    stats = _stats(state)
    assert {k: stats[k] for k in ORIGINAL_STAT_KEYS} == rec["statistics"]
    if "returned_viable_indices" in rec:
      viable = np.flatnonzero(np.asarray(_viable(state))).tolist()
      assert viable == rec["returned_viable_indices"]
  assert not bool(jnp.any(state.status == CODES["split"]))
  assert int(state.merged_into[1]) == 0  # pulse 1 merged into pulse 0
  slot, state = C.emerge(state)
  assert int(slot) == run["emerge_index"]
  assert [e["pulse_id"] for e in run["emergence_events"]] == [int(slot)]
  stats = _stats(state)
  assert {k: stats[k] for k in ORIGINAL_STAT_KEYS} == run["final_statistics"]
  assert tuple(stats)[:len(ORIGINAL_STAT_KEYS)] == ORIGINAL_STAT_KEYS
  assert int(C.best_lineage(state)) == run["best_lineage_index"]
  lineages = _lineages(state)
  for lin in run["lineages"]:
    root = lin["root_index"]
    assert bool(lineages.is_lineage[root])
    np.testing.assert_allclose(float(lineages.overall_fitness[root]),
                               lin["overall_fitness"], **SCALAR_TOL)
    np.testing.assert_allclose(float(lineages.best_fitness[root]),
                               lin["best_fitness"], **SCALAR_TOL)
    assert int(lineages.total_generations[root]) == lin["total_generations"]


def _structural_run(max_pulses, steps, max_generations=10):
  state = C.cascade_init(jnp.ones(4), max_pulses)
  step = functools.partial(
      C.cascade_step, evolve_fn=_identity, measure_fn=_constant_measure,
      merge_threshold=2.0, max_generations=max_generations)
  out = []
  for t in range(steps):
    state = step(state, jax.random.key(t))
    out.append(state)
  return out


def _structural_record(state):
  viable = np.asarray(_viable(state))
  status = np.asarray(state.status)
  counts = {name: int(np.sum(status == code))
            for name, code in CODES.items() if name != "free"}
  stats = _stats(state)
  return dict(num_viable=int(viable.sum()),
              statistics={k: stats[k] for k in ORIGINAL_STAT_KEYS},
              viable_generations=sorted(
                  np.asarray(state.generation)[viable].tolist()),
              states_count=counts)


def test_cascade_split_structural_matches_while_under_the_cap():
  recorded = SECTION["cascade_split_structural"]["steps"]
  states = _structural_run(32, len(recorded))
  for rec, state in zip(recorded[:4], states[:4]):  # 31 pulses: cap unmet.
    want = {k: rec[k] for k in ("num_viable", "statistics",
                                "viable_generations", "states_count")}
    assert _structural_record(state) == want, rec["step"]


def test_population_cap_never_exceeds_max_pulses():
  # The original reaches 63 pulses with a cap of 32 (cap checked at the
  # start of a step). Fixed: two free slots are needed per split.
  recorded = SECTION["cascade_split_structural"]["steps"]
  assert recorded[4]["statistics"]["total_pulses_created"] == 63
  for state in _structural_run(32, len(recorded))[4:]:
    record = _structural_record(state)
    assert np.sum(np.asarray(state.status) != 0) <= 32
    assert record["statistics"]["total_pulses_created"] == 31
    assert record["num_viable"] == 16
    assert record["viable_generations"] == [4] * 16
    assert record["states_count"]["split"] == 15


def test_with_room_for_the_children_the_whole_recorded_run_matches():
  recorded = SECTION["cascade_split_structural"]["steps"]
  for rec, state in zip(recorded, _structural_run(64, len(recorded))):
    want = {k: rec[k] for k in ("num_viable", "statistics",
                                "viable_generations", "states_count")}
    assert _structural_record(state) == want, rec["step"]


def test_generation_cap():
  states = _structural_run(64, 5, max_generations=2)
  final = states[-1]
  assert int(jnp.max(final.generation)) == 2
  assert int(final.total_created) == 7
  assert int(jnp.sum(C.viable_pulses(final))) == 4


def test_children_fill_free_slots_with_lineage_bookkeeping():
  state = C.cascade_init(jnp.array([[1.0, 2.0], [-3.0, 1.0]]), 8)
  state = state._replace(novelty=state.novelty.at[1].set(0.2))  # 1 can't split
  key = jax.random.key(3)
  new = C.cascade_step(state, key, _identity, None, merge_threshold=2.0)
  assert new.status.tolist() == [2, 1, 1, 1, 0, 0, 0, 0]
  assert new.parent.tolist()[:4] == [-1, -1, 0, 0]
  assert new.root.tolist()[:4] == [0, 1, 0, 0]
  assert new.generation.tolist()[:4] == [0, 0, 1, 1]
  assert new.birth_step.tolist()[:4] == [0, 0, 1, 1]
  np.testing.assert_allclose(new.coherence[2:4], [0.9, 0.9])
  np.testing.assert_allclose(new.novelty[2:4], [1.0, 1.0])
  np.testing.assert_allclose(new.resonance[2:4], [0.5, 0.5])
  noise = np.asarray(new.embeddings[2:4]) - np.array([1.0, 2.0])
  assert np.all(np.abs(noise) > 0) and np.all(np.abs(noise) < 0.6)
  again = C.cascade_step(state, key, _identity, None, merge_threshold=2.0)
  np.testing.assert_array_equal(again.embeddings, new.embeddings)
  other = C.cascade_step(state, jax.random.key(4), _identity, None,
                         merge_threshold=2.0)
  assert not np.allclose(other.embeddings[2], new.embeddings[2])
  # With the default merge threshold the twins merge right away, in order.
  merged = C.cascade_step(state, key, _identity, None)
  assert merged.status.tolist()[:4] == [2, 1, 1, 3]
  assert int(merged.merged_into[3]) == 2 and int(merged.total_merges) == 1


def _reference_merge(emb, c, n, r, active, threshold):
  """The original ``_attempt_merges`` loop, in numpy float32."""
  emb, c, n, r = (np.array(a, np.float32) for a in (emb, c, n, r))
  order = [i for i in range(len(active)) if active[i]]
  merged = set()
  for a, i in enumerate(order):
    if i in merged:
      continue
    for j in order[a + 1:]:
      if j in merged:
        continue
      sim = emb[i] @ emb[j] / max(np.linalg.norm(emb[i]) *
                                  np.linalg.norm(emb[j]), 1e-16)
      if sim > threshold:
        emb[i] = (emb[i] + emb[j]) / 2
        c[i], r[i] = max(c[i], c[j]), max(r[i], r[j])
        n[i] = (n[i] + n[j]) / 2
        merged.add(j)
  return emb, c, n, r, sorted(merged)


def test_merge_uses_the_updated_embedding_like_the_original():
  # cos(e0, e1) = 0.8, cos(e0, e2) = 0.5, but cos((e0 + e1)/2, e2) = 0.75:
  # a merge decided from the initial cosine matrix would miss e2.
  emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.5, np.sqrt(0.75)]])
  state = C.cascade_init(emb, 8)
  new = C.cascade_step(state, jax.random.key(0), _identity, None,
                       max_generations=0, merge_threshold=0.7)
  assert new.status.tolist() == [1, 3, 3, 0, 0, 0, 0, 0]
  ref = _reference_merge(emb, state.coherence, state.novelty,
                         state.resonance, [True] * 3, 0.7)
  np.testing.assert_allclose(new.embeddings[0], ref[0][0], rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_merge_matches_the_original_loop(seed):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(4, 6))
  emb = (centers[rng.integers(0, 4, 24)] + 0.6 * rng.normal(size=(24, 6)))
  coh = rng.uniform(0.2, 1.0, 24).astype(np.float32)
  nov = rng.uniform(0.0, 1.0, 24).astype(np.float32)
  res = rng.uniform(0.1, 1.0, 24).astype(np.float32)
  state = C.cascade_init(emb.astype(np.float32), 24)._replace(
      coherence=jnp.asarray(coh), novelty=jnp.asarray(nov),
      resonance=jnp.asarray(res))
  active = np.asarray(_viable(state))
  new = C.cascade_step(state, jax.random.key(0), _identity, None,
                       max_generations=0, merge_threshold=0.8,
                       expire_threshold=0.0)
  ref_emb, ref_c, ref_n, ref_r, ref_merged = _reference_merge(
      emb, coh, nov, res, active, 0.8)
  assert ref_merged, "the draw should produce merges"
  assert np.flatnonzero(np.asarray(new.status) == 3).tolist() == ref_merged
  assert int(new.total_merges) == len(ref_merged)
  np.testing.assert_allclose(new.embeddings, ref_emb, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.coherence, ref_c, rtol=1e-6)
  np.testing.assert_allclose(new.novelty, ref_n, rtol=1e-6)
  np.testing.assert_allclose(new.resonance, ref_r, rtol=1e-6)


def _expiry_evolve(e):
  # Slot 3's embedding (e[1] > 5) turns into NaN; the others double.
  return jnp.where(e[1] > 5, jnp.nan, 2 * e)


def _expiry_measure(e):
  return jnp.where(e[0] > 0, 0.1, 0.9), 0.2, 0.5


def test_expiry_non_viable_and_non_finite_pulses():
  emb = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5], [-1.0, 9.0]])
  state = C.cascade_init(emb, 8)
  state = state._replace(resonance=state.resonance.at[2].set(0.1))
  new = C.cascade_step(state, jax.random.key(0), _expiry_evolve,
                       _expiry_measure, merge_threshold=2.0)
  # 0: coherence 0.1 < 0.3 expires; 1: evolves; 2: not viable, frozen;
  # 3: non-finite evolution (inside the compiled step) expires, unchanged.
  assert new.status.tolist()[:4] == [CODES["expired"], 1, 1, CODES["expired"]]
  np.testing.assert_allclose(new.embeddings[1], [0, 2])
  np.testing.assert_array_equal(new.embeddings[2], state.embeddings[2])
  np.testing.assert_array_equal(new.embeddings[3], state.embeddings[3])
  np.testing.assert_array_equal(new.coherence[3], state.coherence[3])
  assert np.all(np.isfinite(np.asarray(new.embeddings)))
  assert int(new.total_created) == 4  # n = 0.2: nothing may split


def test_step_is_one_compiled_program_without_recompilation():
  traces = []
  dims = 768

  def evolve(e):
    traces.append(None)
    return jnp.tanh(e) + 0.01 * jnp.roll(e, 1)

  step = jax.jit(functools.partial(
      C.cascade_step, evolve_fn=evolve,
      measure_fn=lambda e: (jnp.clip(jnp.std(e), 0, 1), 0.5, 0.6)))
  state = C.cascade_init(jax.random.normal(jax.random.key(0), (dims,)), 32)
  for t in range(6):
    state = step(state, jax.random.key(t))
  jax.block_until_ready(state)
  assert len(traces) == 1
  assert state.embeddings.shape == (32, dims)
  assert int(jnp.sum(state.status != 0)) <= 32


def test_initiate_adds_roots_until_full():
  state = C.cascade_init(jnp.ones(2), 2)
  state, slot = jax.jit(C.cascade_initiate)(state, jnp.array([1.0, -1.0]))
  assert int(slot) == 1 and int(state.root[1]) == 1
  assert _stats(state)["num_lineages"] == 2
  full, slot = C.cascade_initiate(state, jnp.zeros(2))
  assert int(slot) == -1
  jax.tree.map(np.testing.assert_array_equal, full, state)


def test_emerge_on_an_empty_population():
  state = C.cascade_init(jnp.ones(2), 3)
  state = state._replace(status=jnp.zeros(3, jnp.int32))
  slot, after = C.emerge(state)
  assert int(slot) == -1 and int(after.emergence_events) == 0
  assert int(C.best_lineage(state)) == -1


def test_invalid_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="non-zero size"):
    C.cascade_init(jnp.zeros((0,)))
  with pytest.raises(ValueError, match="non-zero size"):
    C.cascade_init(jnp.zeros((2, 0)))
  with pytest.raises(ValueError, match="max_pulses"):
    C.cascade_init(jnp.ones(3), 0)
  with pytest.raises(ValueError, match="do not fit"):
    C.cascade_init(jnp.ones((3, 2)), 2)
  with pytest.raises(ValueError, match="NaN or Inf"):
    C.cascade_init(jnp.array([1.0, jnp.nan]))
  state = C.cascade_init(jnp.ones(3), 4)
  with pytest.raises(ValueError, match="2 entries"):
    C.cascade_initiate(state, jnp.ones(2))
  with pytest.raises(ValueError, match="NaN or Inf"):
    C.cascade_initiate(state, jnp.array([1.0, jnp.inf, 0.0]))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="evolve_fn"):
    C.cascade_step(state, key, lambda e: e[:2])
  with pytest.raises(ValueError, match="measure_fn"):
    C.cascade_step(state, key, _identity, lambda e: (1.0, 0.5))
  with pytest.raises(ValueError, match="three scalars"):
    C.cascade_step(state, key, _identity, lambda e: (e, 0.5, 0.5))
  with pytest.raises(ValueError, match="max_generations"):
    C.cascade_step(state, key, _identity, max_generations=-1)
