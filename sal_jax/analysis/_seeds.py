"""Semantic seeds: a named, L2-normalised embedding stored as a JSON file.

A seed is a plain ``dict``::

  {"format": "sal_semantic_seed", "version": 1, "name": str,
   "description": str, "dimensions": int, "embedding": np.ndarray (float32),
   "metadata": dict}

This is host-side file I/O (numpy and :mod:`json`), not meant for ``jit``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

SEED_FORMAT = "sal_semantic_seed"
SEED_VERSION = 1


def _normalised(embedding, what: str) -> np.ndarray:
  vector = np.asarray(embedding, dtype=np.float64)
  if vector.ndim != 1 or vector.size == 0:
    raise ValueError(
        f"sal_jax: {what} must be a non-empty 1-D vector, got shape "
        f"{vector.shape}.")
  if not np.all(np.isfinite(vector)):
    raise ValueError(f"sal_jax: {what} contains non-finite values.")
  norm = math.sqrt(float(np.sum(vector * vector)))
  if norm > 0.0:
    vector = vector / norm
  return vector.astype(np.float32)


def create_seed(
    name: str,
    embedding,
    description: str = "",
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
  r"""Builds a semantic seed from an embedding.

  .. math::
    e = v / \|v\|_2 \quad (\text{a zero vector stays zero})

  Args:
    name: the seed's name (non-empty).
    embedding: a 1-D vector of finite numbers.
    description: free text.
    metadata: a JSON-serialisable dict (default empty).

  Returns:
    The seed dict (see the module docstring); ``embedding`` is float32.

  Raises:
    ValueError: for an empty name, a non-1-D or empty embedding,
      non-finite values, or metadata that is not a JSON-serialisable dict.

  Examples:
    >>> from sal_jax.analysis import create_seed
    >>> create_seed("calm", [1.0, 1.0, 1.0, 1.0])["embedding"]
    array([0.5, 0.5, 0.5, 0.5], dtype=float32)

  References:
    The original SAL library, ``sal.utils.create_seed``.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"sal_jax: a seed needs a non-empty name, got {name!r}.")
  metadata = {} if metadata is None else metadata
  if not isinstance(metadata, dict):
    raise ValueError(
        f"sal_jax: seed metadata must be a dict, got {type(metadata)}.")
  try:
    json.dumps(metadata, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"sal_jax: seed metadata is not JSON-serialisable: {e}") from None
  vector = _normalised(embedding, "seed embedding")
  return {"format": SEED_FORMAT, "version": SEED_VERSION, "name": name,
          "description": str(description), "dimensions": int(vector.size),
          "embedding": vector, "metadata": dict(metadata)}


def save_seed(path: str | os.PathLike, seed: dict[str, Any]) -> None:
  """Writes a seed to a JSON file.

  Args:
    path: the file to write (parent directories are created).
    seed: a seed from :func:`create_seed` (or :func:`load_seed`).

  Raises:
    ValueError: if ``seed`` lacks a field or holds non-finite values.

  Examples:
    >>> import os, tempfile
    >>> from sal_jax import analysis
    >>> path = os.path.join(tempfile.mkdtemp(), "calm.json")
    >>> analysis.save_seed(path, analysis.create_seed("calm", [3.0, 4.0]))
    >>> analysis.load_seed(path)["embedding"]
    array([0.6, 0.8], dtype=float32)

  References:
    The original SAL library's semantic seed files (``sal.utils``).
  """
  missing = [k for k in ("name", "embedding") if k not in seed]
  if missing:
    raise ValueError(f"sal_jax: seed lacks the fields {missing}.")
  checked = create_seed(seed["name"], seed["embedding"],
                        seed.get("description", ""), seed.get("metadata"))
  record = dict(checked, embedding=[float(x) for x in checked["embedding"]])
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2, allow_nan=False)


def load_seed(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a seed written by :func:`save_seed`.

  Args:
    path: the JSON file.

  Returns:
    The seed dict, ``embedding`` as a float32 array (re-normalised).

  Raises:
    ValueError: if the file is not a seed, or its embedding is invalid
      (wrong length, non-finite values).

  Examples:
    >>> import os, tempfile
    >>> from sal_jax import analysis
    >>> path = os.path.join(tempfile.mkdtemp(), "zero.json")
    >>> analysis.save_seed(path, analysis.create_seed("zero", [0.0, 0.0, 0.0]))
    >>> analysis.load_seed(path)["dimensions"]
    3

  References:
    The original SAL library's semantic seed files (``sal.utils``).
  """
  with open(path, encoding="utf-8") as f:
    try:
      record = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"sal_jax: {path} is not valid JSON: {e}") from None
  if not isinstance(record, dict) or "embedding" not in record or (
      "name" not in record):
    raise ValueError(f"sal_jax: {path} is not a semantic seed file.")
  if record.get("format", SEED_FORMAT) != SEED_FORMAT:
    raise ValueError(
        f"sal_jax: {path} has format {record.get('format')!r}, expected "
        f"{SEED_FORMAT!r}.")
  try:
    values = [float(x) for x in record["embedding"]]
  except (TypeError, ValueError):
    raise ValueError(
        f"sal_jax: {path} has a non-numeric embedding.") from None
  seed = create_seed(record["name"], values, record.get("description", ""),
                     record.get("metadata"))
  if "dimensions" in record and record["dimensions"] != seed["dimensions"]:
    raise ValueError(
        f"sal_jax: {path} says dimensions={record['dimensions']} but holds "
        f"{seed['dimensions']} values.")
  return seed
