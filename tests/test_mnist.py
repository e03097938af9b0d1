"""Eva against SGD on real MNIST: the deep autoencoder of DESIGN §7 on a training subset.

Skips, with the reason, only when the MNIST IDX files are absent (set EVA_OPTAX_DATA).
"""

import jax
import numpy as np
import optax
import pytest

from benchmarks import datasets, models, optimizers, train

STEPS, BATCH, SUBSET = 100, 1000, 20000


def _train_loss(task, data, name, params, order):
  config = optimizers.parse_entry(name)
  spec = optimizers.OPTIMIZERS[name]
  schedule = optax.cosine_decay_schedule(optimizers.learning_rate(config, task.name), STEPS)
  tx = spec.make(schedule, **spec.defaults)
  step = train.make_step(task, tx, spec.statistics)
  state = tx.init(params)
  for k in range(STEPS):
    index = order[k * BATCH % SUBSET:][:BATCH]
    params, state, loss = step(params, state, data.x_train[index], data.y_train[index])
  return task.eval_loss(params, data.x_train[:SUBSET], data.y_train[:SUBSET])


@pytest.mark.data
def test_eva_beats_sgd_on_the_mnist_autoencoder(mnist_dir):
  task = models.TASKS["mnist_autoencoder"]()
  data = task.prepare(datasets.load_mnist(mnist_dir))
  data = data._replace(x_train=data.x_train[:SUBSET], y_train=data.y_train[:SUBSET])
  params = task.model.init(jax.random.key(0), data.x_train[:1])["params"]
  order = np.random.default_rng(0).permutation(SUBSET)
  # Same steps, batches and cosine schedule; each at its tuned default learning rate.
  losses = {name: _train_loss(task, data, name, params, order) for name in ("sgd", "eva")}
  assert np.isfinite(losses["eva"]) and losses["eva"] < losses["sgd"], losses
