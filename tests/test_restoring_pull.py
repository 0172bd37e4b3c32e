"""The restoring pull is not rescaled by the gradient's scale or the optimizer.

``chain(protect(restore=lam), opt)`` after ``consolidate`` with a unit
importance, params displaced by ``d`` from the anchor, and gradients of pure
noise of scale ``s`` (so only the pull moves the mean). The pull is
``lam * sqrt(e) * d_i`` with ``e`` protect's running mean of the gradient's
energy (the mean of ``g^2`` over the network), here ``lam * s * d_i``, so
each step moves ``d`` by (``eta`` the learning rate, ``beta`` SGD's
momentum):

* Adam / AdamW, which divide by each entry's gradient RMS: ``eta * lam * d``,
  the same for every ``s`` (while the pull is small beside the noise, which
  Adam's normaliser also sees, and where every entry has the network's mean
  gradient RMS: an entry with a larger one is pulled less);
* SGD: ``eta * lam * s * d``; with momentum ``eta * lam * s * d / (1 - beta)``
  (for a pull that varies slowly beside the momentum's memory): the pull
  keeps its ratio to the gradient, and SGD's learning rate, which must
  follow the gradient's scale, sets both.

Measured over 1000 steps as the decay rate of the mean displacement, it
must match within 10 % at gradient scales 1e-3, 1 and 1e3.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sal_jax as sal

N = 4096
STEPS = 1000
WARMUP = 50  # protect's gradient-RMS average settles first
RESTORE = 1.0


def _decay_rate(optimizer, scale, d0):
  anchor = {"w": jnp.zeros(N)}
  tx = optax.chain(sal.protect(restore=RESTORE), optimizer)
  state = sal.consolidate(tx.init(anchor), anchor, {"w": jnp.ones(N)})

  @jax.jit
  def run(params, state):
    def body(carry, key):
      params, state = carry
      grads = {"w": scale * jax.random.normal(key, (N,))}
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), jnp.mean(
          params["w"])
    keys = jax.random.split(jax.random.key(0), STEPS + 1)
    return jax.lax.scan(body, (params, state), keys)[1]

  mean = np.asarray(run({"w": jnp.full(N, d0)}, state), np.float64)
  return (np.log(mean[WARMUP]) - np.log(mean[-1])) / (STEPS - WARMUP)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "sgd_momentum"])
def test_displacement_toward_the_anchor_matches_the_stated_formula(name,
                                                                   scale):
  if name in ("adam", "adamw"):
    lr = 1e-3
    optimizer = getattr(optax, name)(lr)
    expected = lr * RESTORE
  else:
    lr = 1e-3 / scale if name == "sgd" else 1e-4 / scale
    momentum = 0.9 if name == "sgd_momentum" else None
    optimizer = optax.sgd(lr, momentum)
    expected = lr * RESTORE * scale / (1 - (momentum or 0.0))
  rate = _decay_rate(optimizer, scale, d0=0.1)
  np.testing.assert_allclose(rate, expected, rtol=0.1)
