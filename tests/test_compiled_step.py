"""What XLA makes of a protected update: no full-size copies, no temporaries.

The protection step is elementwise; a compiled update that copies a
parameter-sized array out of a conditional, or writes a squared gradient to a
temporary that several reductions read, moves that many more bytes every
step. These tests read the compiled HLO and XLA's memory analysis of one
jitted, donated update (default XLA flags), not the clock.
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import sal_jax as sal

SHAPES = {"w1": (384, 512), "b1": (512,), "w2": (512, 256), "b2": (256,)}
BIG = 384 * 512 * 4  # bytes of the largest leaf


def _compiled_update(protect):
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  tx = optax.chain(protect, optax.adamw(1e-3))
  state = tx.init(params)

  def update(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(update, donate_argnums=(0, 1)).lower(
      params, state, params).compile()


@pytest.mark.parametrize("name,protect", [
    ("element", lambda: sal.protect(granularity="element")),
    ("leaf", lambda: sal.protect(granularity="leaf")),
    ("factored", lambda: sal.protect(granularity="factored")),
    ("running_factored", lambda: sal.protect(
        estimator=sal.shift_consolidation_estimator(
            granularity="element", running_unit="factored"))),
    ("budget", lambda: sal.protect(relative_budget=0.1,
                                   granularity="element")),
    ("bfloat16_importances", lambda: sal.protect(
        estimator=sal.shift_consolidation_estimator(
            granularity="element", importance_dtype=jnp.bfloat16))),
    ("factored_bfloat16", lambda: sal.protect(
        estimator=sal.shift_consolidation_estimator(
            granularity="factored", importance_dtype=jnp.bfloat16))),
])
def test_update_has_no_full_size_copies_or_temporaries(name, protect):
  compiled = _compiled_update(protect())
  hlo = compiled.as_text()
  matrices = "|".join(f"{m},{n}" for m, n in (SHAPES["w1"], SHAPES["w2"]))
  copies = re.findall(rf"\w+\[(?:{matrices})\]\{{[^}}]*\}} copy\(", hlo)
  assert not copies, f"{name}: {len(copies)} full-size copies"
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < BIG / 4, f"{name}: {temp} bytes of temporaries"


def test_the_memory_check_sees_a_shared_temporary():
  """Self-check: a square that two reductions and an output share is
  written to a temporary, and the memory analysis reports it."""
  params = {"w1": jnp.zeros(SHAPES["w1"])}

  def step(p):
    square = jnp.square(p["w1"])
    return jnp.sum(square, 0), jnp.sum(square, 1), p["w1"] * 2.0 + square

  compiled = jax.jit(step, donate_argnums=0).lower(params).compile()
  assert compiled.memory_analysis().temp_size_in_bytes >= BIG / 4


def test_the_kronecker_default_copies_no_kernel():
  """The default (Kronecker-factored) copies no full-size kernel either.
  Its running second moments are written through temporaries of their own
  size (the sketch's product), which the README's cost section reports."""
  compiled = _compiled_update(sal.protect())
  hlo = compiled.as_text()
  matrices = "|".join(f"{m},{n}" for m, n in (SHAPES["w1"], SHAPES["w2"]))
  copies = re.findall(rf"\w+\[(?:{matrices})\]\{{[^}}]*\}} copy\(", hlo)
  assert not copies, f"{len(copies)} full-size copies"
