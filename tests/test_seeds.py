"""Semantic seed files (fixture ``utils.create_seed``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sal_jax import analysis
from conftest import ARRAY_TOL, load_fixture

SEEDS = load_fixture()["utils"]["create_seed"]


def test_create_seed_ones_is_l2_normalised():
  seed = analysis.create_seed("ones", np.ones(4))
  assert seed["dimensions"] == 4
  assert seed["embedding"].dtype == np.float32
  np.testing.assert_allclose(seed["embedding"], SEEDS["ones_dim4"], **ARRAY_TOL)


def test_create_seed_zero_stays_zero():
  seed = analysis.create_seed("zero", np.zeros(3))
  np.testing.assert_array_equal(seed["embedding"], SEEDS["zero_dim3"])


def test_save_load_round_trip(tmp_path):
  seed = analysis.create_seed("calm", [1.0, -2.0, 2.0], "a test seed",
                              {"source": "unit test"})
  path = tmp_path / "sub" / "calm.json"
  analysis.save_seed(path, seed)
  with open(path) as f:
    assert json.load(f)["format"] == "sal_semantic_seed"
  loaded = analysis.load_seed(path)
  assert loaded["name"] == "calm"
  assert loaded["description"] == "a test seed"
  assert loaded["metadata"] == {"source": "unit test"}
  np.testing.assert_allclose(loaded["embedding"], [1 / 3, -2 / 3, 2 / 3],
                             **ARRAY_TOL)


@pytest.mark.parametrize("embedding", [[1.0, float("nan")],
                                       [float("inf"), 0.0], [], [[1.0]]])
def test_create_seed_rejects_bad_embeddings(embedding):
  with pytest.raises(ValueError, match="seed embedding"):
    analysis.create_seed("bad", embedding)


def test_create_seed_rejects_bad_name_and_metadata():
  with pytest.raises(ValueError, match="name"):
    analysis.create_seed("", [1.0])
  with pytest.raises(ValueError, match="metadata"):
    analysis.create_seed("x", [1.0], metadata={"f": object()})


def test_load_seed_rejects_bad_files(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text("{not json")
  with pytest.raises(ValueError, match="JSON"):
    analysis.load_seed(path)
  path.write_text(json.dumps({"name": "x"}))
  with pytest.raises(ValueError, match="not a semantic seed"):
    analysis.load_seed(path)
  path.write_text(json.dumps({"name": "x", "embedding": [1.0, "NaN"]}))
  with pytest.raises(ValueError):
    analysis.load_seed(path)
  path.write_text(json.dumps({"name": "x", "embedding": [1.0], "dimensions": 2}))
  with pytest.raises(ValueError, match="dimensions"):
    analysis.load_seed(path)
