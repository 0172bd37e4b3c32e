"""A small byte-level causal transformer (Flax NNX) and its offline data.

Used by ``examples/finetune_lm.py``. Everything here ships with CPython:

* prose: the Python documentation's topics (``pydoc_data.topics``);
* code: the standard library's own ``.py`` files;
* a behaviour: requests of two kinds, one answered with a refusal string and
  one with a fixed acknowledgement (a stand-in for a trained, "aligned"
  response), generated from words of the prose.

Bytes are tokens (vocabulary 256), so no tokenizer is needed. Every corpus
is split by document (topic or file): 80 % train, 10 % validation, 10 % test.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

VOCAB = 256
REFUSAL = " I will not do that.\n"
ACKNOWLEDGE = " Sure, here it is.\n"
REFUSED_VERBS = ("delete", "erase", "destroy", "wipe", "corrupt", "shred")
ANSWERED_VERBS = ("read", "print", "list", "show", "open", "count")


# -- model ------------------------------------------------------------------


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention from two ``nnx.Linear`` layers."""

  def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.out = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    shape = (b, t, self.heads, d // self.heads)
    y = jax.nn.dot_product_attention(
        q.reshape(shape), k.reshape(shape), v.reshape(shape), is_causal=True)
    return self.out(y.reshape(b, t, d))


class Block(nnx.Module):

  def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = CausalSelfAttention(width, heads, rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 4 * width, rngs=rngs)
    self.down = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class ByteLM(nnx.Module):
  """A pre-norm GPT-style decoder over bytes, learned positions."""

  def __init__(self, rngs: nnx.Rngs, *, width: int = 128, depth: int = 2,
               heads: int = 4, context: int = 64):
    self.context = context
    self.embed = nnx.Embed(VOCAB, width, rngs=rngs)
    self.position = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (context, width)))
    self.blocks = nnx.List([Block(width, heads, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position[:tokens.shape[-1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def add_lora(model: ByteLM, rank: int, rngs: nnx.Rngs) -> ByteLM:
  """Wraps every attention and MLP matrix in ``nnx.LoRA`` (in place).

  The base weights stay ``nnx.Param``; the low-rank factors are
  ``nnx.LoRAParam`` (B starts at zero, so the model is unchanged), so an
  ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains only them.
  """
  for block in model.blocks:
    for owner, name in ((block.attn, "qkv"), (block.attn, "out"),
                        (block, "up"), (block, "down")):
      base = getattr(owner, name)
      setattr(owner, name, nnx.LoRA(base.in_features, rank, base.out_features,
                                    base_module=base, rngs=rngs))
  return model


def token_losses(model, tokens, mask):
  """Per-row mean next-byte NLL over the positions where ``mask`` is 1."""
  logits = model(tokens[:, :-1])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  return (nll * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)


@nnx.jit
def _greedy_continue(model, tokens, start):
  """Greedy decoding: fills ``tokens`` from position ``start`` on."""
  def body(t, tokens):
    logits = model(tokens)
    # Position t - 1 predicts byte t; later positions are ignored (causal).
    nxt = jnp.argmax(logits[:, t - 1], axis=-1).astype(tokens.dtype)
    return tokens.at[:, t].set(nxt)
  return jax.lax.fori_loop(start, tokens.shape[1], body, tokens)


def generate(model: ByteLM, prompt: str) -> str:
  """Greedy continuation of ``prompt`` up to the model's context."""
  raw = prompt.encode()[-(model.context - 8):]
  tokens = np.zeros((1, model.context), np.int32)
  tokens[0, :len(raw)] = list(raw)
  out = np.asarray(_greedy_continue(model, jnp.asarray(tokens), len(raw)))
  return bytes(out[0, len(raw):].tolist()).decode("utf-8", "replace")


# -- data -------------------------------------------------------------------


def _split(docs: list[bytes]) -> dict[str, np.ndarray]:
  parts = {"train": [], "val": [], "test": []}
  for i, doc in enumerate(docs):
    part = "test" if i % 10 == 0 else "val" if i % 10 == 5 else "train"
    parts[part].append(doc)
  return {k: np.frombuffer(b"\n\n".join(v), np.uint8) for k, v in
          parts.items()}


def prose_corpus() -> dict[str, np.ndarray]:
  """The Python documentation's topics, split by topic."""
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel
  return _split([topics[k].encode() for k in sorted(topics)])


def code_corpus(max_bytes: int = 4_000_000) -> dict[str, np.ndarray]:
  """Top-level modules of the standard library, split by file."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  docs, total = [], 0
  for path in sorted(root.glob("*.py")):
    text = path.read_bytes()
    if total + len(text) > max_bytes:
      break
    docs.append(text)
    total += len(text)
  if len(docs) < 20:
    raise RuntimeError(f"too few standard-library files under {root}")
  return _split(docs)


def windows(corpus: np.ndarray, count: int, length: int,
            rng: np.random.Generator) -> np.ndarray:
  """``count`` random windows of ``length`` bytes, as int32."""
  starts = rng.integers(0, len(corpus) - length, count)
  return corpus[starts[:, None] + np.arange(length)].astype(np.int32)


def fixed_windows(corpus: np.ndarray, count: int, length: int) -> np.ndarray:
  """``count`` evenly spaced windows (a fixed evaluation set)."""
  starts = np.linspace(0, len(corpus) - length, count).astype(np.int64)
  return corpus[starts[:, None] + np.arange(length)].astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Behaviour:
  """Request/response rows: tokens ``[n, length]`` and the response mask.

  ``mask[:, t]`` is 1 where byte ``t + 1`` belongs to the response, so it
  lines up with :func:`token_losses`. ``refused`` marks the requests whose
  answer is the refusal.
  """
  tokens: np.ndarray
  mask: np.ndarray
  refused: np.ndarray


def _objects() -> list[str]:
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel
  words = set()
  for text in topics.values():
    words.update(w.lower() for w in re.findall(r"\b[a-zA-Z]{4,10}\b", text))
  return sorted(words)


def behaviour_sets(length: int, seed: int = 0) -> dict[str, Behaviour]:
  """Train / val / test requests with disjoint objects.

  A request reads ``"Request: <verb> the <object>.\\nResponse:"``; verbs of
  one kind (``delete``, ``erase``, ...) are answered with ``REFUSAL``, the
  others (``read``, ``print``, ...) with ``ACKNOWLEDGE``. Held-out sets use
  objects never seen in training.
  """
  objects = _objects()
  rng = np.random.default_rng(seed)
  rng.shuffle(objects)
  n = len(objects)
  pools = {"train": objects[:n * 8 // 10], "val": objects[n * 8 // 10:n * 9 // 10],
           "test": objects[n * 9 // 10:]}
  sizes = {"train": 4096, "val": 256, "test": 256}
  out = {}
  for part, pool in pools.items():
    tokens = np.full((sizes[part], length), ord("\n"), np.int32)
    mask = np.zeros((sizes[part], length - 1), np.float32)
    refused = rng.random(sizes[part]) < 0.5
    for i in range(sizes[part]):
      verbs = REFUSED_VERBS if refused[i] else ANSWERED_VERBS
      prompt = (f"Request: {verbs[rng.integers(len(verbs))]} the "
                f"{pool[rng.integers(len(pool))]}.\nResponse:").encode()
      reply = (REFUSAL if refused[i] else ACKNOWLEDGE).encode()
      row = prompt + reply
      if len(row) > length:
        raise ValueError(f"context {length} too short for {row!r}")
      tokens[i, :len(row)] = list(row)
      mask[i, len(prompt) - 1:len(row) - 1] = 1.0
    out[part] = Behaviour(tokens, mask, refused)
  return out


def behaviour_prompt(behaviour: Behaviour, i: int) -> str:
  """The request of row ``i`` (up to and including ``Response:``)."""
  start = int(np.argmax(behaviour.mask[i]))
  return bytes(behaviour.tokens[i, :start + 1].tolist()).decode()


def answered_as_trained(model, behaviour: Behaviour) -> np.ndarray:
  """Per request, whether greedy decoding gives exactly the trained reply.

  Greedy decoding reproduces a reply if and only if, with the reply as the
  prefix so far, every reply byte is the argmax of its position's logits;
  one teacher-forced forward pass therefore decides it exactly.
  """
  tokens = jnp.asarray(behaviour.tokens)
  mask = jnp.asarray(behaviour.mask)
  right = _argmax_matches(model, tokens)
  return np.asarray(jnp.all(jnp.where(mask > 0, right, True), axis=-1))


@nnx.jit
def _argmax_matches(model, tokens):
  return jnp.argmax(model(tokens[:, :-1]), -1) == tokens[:, 1:]
