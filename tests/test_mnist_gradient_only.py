"""Shampoo and Eva-s against SGD on real MNIST (the benchmark's MLP classifier on a subset).

The MLP (784-512-256-10) rather than the autoencoder keeps Shampoo's root refreshes cheap on a
CPU (~70 blocks instead of ~400). Skips, with the reason, only when the MNIST IDX files are
absent (set EVA_OPTAX_DATA).
"""

import jax
import numpy as np
import pytest

from benchmarks import datasets, models
from test_mnist import train_loss

STEPS, BATCH, SUBSET = 60, 256, 7680


@pytest.mark.data
def test_shampoo_and_eva_s_beat_sgd_on_mnist(mnist_dir):
  task = models.TASKS["mnist_mlp"]()
  data = task.prepare(datasets.load_mnist(mnist_dir))
  data = data._replace(x_train=data.x_train[:SUBSET], y_train=data.y_train[:SUBSET])
  params = task.model.init(jax.random.key(0), data.x_train[:1])["params"]
  # Same steps, batches and cosine schedule; each at its registry default lr and settings.
  losses = {name: train_loss(task, data, params, name, STEPS, BATCH)
            for name in ("sgd", "eva_s", "shampoo")}
  for name in ("eva_s", "shampoo"):
    assert np.isfinite(losses[name]) and losses[name] < losses["sgd"], losses
