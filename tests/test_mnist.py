"""Second-order optimizers against SGD on real MNIST training subsets, each at its registry
defaults for the task: the deep autoencoder of DESIGN §7 (Eva, Eva-f, K-FAC) and, as the cheaper
check, the MLP classifier for FOOF.

Skips, with the reason, only when the MNIST IDX files are absent (set EVA_OPTAX_DATA).
"""

import functools

import jax
import numpy as np
import optax
import pytest

from benchmarks import datasets, models, optimizers, train

STEPS, SUBSET = 100, 20000


@functools.cache
def _setup(task_name, mnist_dir):
  task = models.TASKS[task_name]()
  data = task.prepare(datasets.load_mnist(mnist_dir))
  data = data._replace(x_train=data.x_train[:SUBSET], y_train=data.y_train[:SUBSET])
  params = task.model.init(jax.random.key(0), data.x_train[:1])["params"]
  return task, data, params


def train_loss(task, data, params, name, steps, batch):
  """Loss on ``data``'s training set after ``steps`` steps of registry optimizer ``name`` at its
  defaults for ``task``, cosine schedule; full batches of one fixed permutation, so every
  optimizer sees the same batches."""
  config = optimizers.parse_entry(name)
  schedule = optax.cosine_decay_schedule(optimizers.learning_rate(config, task.name), steps)
  tx = optimizers.make(config, task.name, schedule)
  step = train.make_step(task, tx, optimizers.OPTIMIZERS[name].statistics)
  state = tx.init(params)
  order = np.random.default_rng(0).permutation(len(data.x_train))
  usable = len(order) // batch * batch
  for k in range(steps):
    index = order[k * batch % usable:][:batch]
    params, state, _ = step(params, state, data.x_train[index], data.y_train[index])
  return float(task.eval_loss(params, data.x_train, data.y_train))


@functools.cache
def _train_loss(task_name, name, mnist_dir):
  task, data, params = _setup(task_name, mnist_dir)
  return train_loss(task, data, params, name, STEPS, task.batch_size)


@pytest.mark.data
@pytest.mark.parametrize("task_name,name", [
    ("mnist_autoencoder", "eva"), ("mnist_autoencoder", "eva_f"),
    ("mnist_autoencoder", "kfac"), ("mnist_mlp", "foof")])
def test_beats_sgd_at_equal_steps(mnist_dir, task_name, name):
  loss, sgd = _train_loss(task_name, name, mnist_dir), _train_loss(task_name, "sgd", mnist_dir)
  assert np.isfinite(loss) and loss < sgd, (name, loss, sgd)
