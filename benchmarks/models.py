"""Benchmark tasks: a Flax Linen model, its loss, its test metric and its data.

Every loss is a **mean over the batch**: ``eva_optax.flax.value_and_grad`` rescales the captured
statistics by the batch size into per-example units, which is only right for a mean.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import datasets

EVAL_CHUNK = 1000  # examples per jitted evaluation call, to bound memory on large test sets


class MLP(nn.Module):
  """Dense layers with ReLU between them; the last layer is linear (logits)."""

  features: Sequence[int]

  @nn.compact
  def __call__(self, x):
    for width in self.features[:-1]:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.features[-1])(x)


class Autoencoder(nn.Module):
  """The deep MNIST autoencoder 784-1000-500-250-30-250-500-1000-784 (ReLU, linear 30-unit
  code). It returns logits: the sigmoid output lives in the loss, which is numerically safer."""

  @nn.compact
  def __call__(self, x):
    for width in (1000, 500, 250):
      x = nn.relu(nn.Dense(width)(x))
    x = nn.Dense(30)(x)
    for width in (250, 500, 1000):
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(784)(x)


class DeepAutoencoder(nn.Module):
  """A deep autoencoder of the K-BFGS paper (Goldfarb, Ren, Bahamou 2020, after Hinton and
  Salakhutdinov 2006): ReLU Dense layers of ``widths`` (the last one is the linear code), the
  mirrored decoder, and a linear output of ``output`` units (logits or values, see the loss)."""

  widths: Sequence[int]
  output: int

  @nn.compact
  def __call__(self, x):
    for width in self.widths[:-1]:
      x = nn.relu(nn.Dense(width)(x))
    x = nn.Dense(self.widths[-1])(x)
    for width in reversed(self.widths[:-1]):
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.output)(x)


# The paper's CURVES and FACES layouts (MNIST's is `Autoencoder`).
CURVES_WIDTHS = (400, 200, 100, 50, 25, 6)   # 784-400-200-100-50-25-6-...-784
FACES_WIDTHS = (2000, 1000, 500, 30)         # 625-2000-1000-500-30-...-625


class CNN(nn.Module):
  """Three 3x3 convolutions (the last two with stride 2), then a 128-unit hidden layer."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), padding="SAME")(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2, padding="SAME")(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2, padding="SAME")(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(10)(x)


class BasicBlock(nn.Module):
  """The basic residual block of He et al. 2016: two 3×3 convolutions with BatchNorm and ReLU;
  a strided 1×1 convolution with BatchNorm projects the shortcut where the shape changes."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    y = nn.relu(norm()(nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)))
    y = norm()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
    if x.shape != y.shape:
      x = norm()(nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x))
    return nn.relu(x + y)


class ResNet20(nn.Module):
  """ResNet-20 for 32×32 images (He et al. 2016, §4.2): a 3×3 convolution to 16 channels, three
  stages of three basic blocks with 16, 32, 64 channels (stride 2 entering stages 2 and 3),
  global average pooling and a Dense head; BatchNorm after every convolution (running averages
  in the ``batch_stats`` collection). The shortcut where the shape changes is a 1×1 convolution
  (the paper's option B) rather than zero padding, which stock Flax modules express directly.
  0.27 M parameters. ``train`` selects batch statistics (True) or the running averages."""

  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(16, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, features in enumerate((16, 32, 64)):
      for block in range(3):
        x = BasicBlock(features, 2 if stage > 0 and block == 0 else 1)(x, train)
    return nn.Dense(self.classes, name="head")(x.mean(axis=(1, 2)))


class TransformerBlock(nn.Module):
  """A pre-LayerNorm causal Transformer block: self-attention and a 4×-wide GELU MLP, each in a
  residual branch. Signature ``(carry, _) -> (carry, None)`` so that ``nn.scan`` stacks it."""

  heads: int

  @nn.compact
  def __call__(self, x, _=None):
    width = x.shape[-1]
    mask = nn.make_causal_mask(jnp.ones(x.shape[:-1], jnp.int32))
    x = x + nn.MultiHeadDotProductAttention(self.heads)(nn.LayerNorm()(x), mask=mask)
    hidden = nn.gelu(nn.Dense(4 * width)(nn.LayerNorm()(x)))
    return x + nn.Dense(width)(hidden), None


class TransformerLM(nn.Module):
  """A character-level causal Transformer language model from stock Flax modules: token and
  position ``nn.Embed``, ``depth`` blocks stacked with ``nn.scan`` (one stacked parameter axis)
  and rematerialized with ``nn.remat`` (unless ``remat=False``), a final LayerNorm and a Dense
  head. Input ``[B, T]`` int tokens, output ``[B, T, vocab]`` logits."""

  vocab: int
  width: int = 128
  depth: int = 4
  heads: int = 4
  context: int = 64
  remat: bool = True

  @nn.compact
  def __call__(self, tokens):
    positions = jnp.arange(tokens.shape[-1])
    x = nn.Embed(self.vocab, self.width)(tokens) + nn.Embed(self.context, self.width)(positions)
    block = nn.remat(TransformerBlock) if self.remat else TransformerBlock
    blocks = nn.scan(block, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=self.depth)
    x, _ = blocks(self.heads, name="blocks")(x, None)
    return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


class LSTMClassifier(nn.Module):
  """``nn.RNN(nn.LSTMCell)`` over a ``[B, T, d]`` sequence, then a Dense layer on the last
  hidden state (logits)."""

  hidden: int
  classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.classes)(nn.RNN(nn.LSTMCell(self.hidden))(x)[:, -1])


class Task(NamedTuple):
  """One benchmark problem.

  Attributes:
    name: the ``--task`` name.
    model: the Flax Linen module; ``model.apply(variables, x)`` gives the output.
    loss: ``(output, targets) -> scalar``, the mean over the batch.
    metric_name: what ``metric`` measures, for tables and plots.
    metric: ``(params, x, y, model_state=None) -> float`` on a whole (test) set.
    eval_loss: ``(params, x, y, model_state=None) -> float``, ``loss`` over a whole set.
    batch_size: default minibatch size.
    epochs: default number of epochs.
    load: ``data_dir -> Dataset`` of raw data.
    prepare: ``Dataset -> Dataset`` of model inputs and loss targets (flattening, targets = inputs).
    log_loss: whether loss curves read better on a log axis.
    mutable: collections the model updates in training (``("batch_stats",)`` for BatchNorm);
      the model then takes ``train=`` (True in training steps, False in evaluations).
    augment: ``(np.random.Generator, x_batch) -> x_batch`` applied on the host to training
      batches, or ``None``.
    steps: default number of steps (instead of ``epochs``), or ``None``.
    eval_every: steps between evaluations (``None``: once per epoch).
    goal: ``"max"`` when a higher ``metric`` is better, else ``"min"``.
    test_loss: like ``eval_loss`` on the test set, reported beside ``metric``; or ``None``.
    schedule: default ``--schedule``; ``warmup`` its warmup steps (``warmup_cosine``).
    baseline: the registry name the time-to-target table divides by.
    targets: default ``--targets`` (values of ``metric``).
    head: the output layer's name (Muon leaves it to Adam), or ``None``.
    eval_subset: default ``--eval-subset`` (training examples whose loss is reported).
  """

  name: str
  model: nn.Module
  loss: Callable[[jax.Array, jax.Array], jax.Array]
  metric_name: str
  metric: Callable[..., float]
  eval_loss: Callable[..., float]
  batch_size: int
  epochs: int
  load: Callable[[Optional[str]], datasets.Dataset]
  prepare: Callable[[datasets.Dataset], datasets.Dataset]
  log_loss: bool = False
  mutable: tuple[str, ...] = ()
  augment: Optional[Callable[[np.random.Generator, np.ndarray], np.ndarray]] = None
  steps: Optional[int] = None
  eval_every: Optional[int] = None
  goal: str = "max"
  test_loss: Optional[Callable[..., float]] = None
  schedule: str = "cosine"
  warmup: int = 0
  baseline: str = "sgd"
  targets: tuple[float, ...] = ()
  head: Optional[str] = None
  eval_subset: int = 10000

  def init(self, rng: jax.Array, x: np.ndarray) -> tuple[dict, dict]:
    """``(params, model_state)`` of a fresh model; ``model_state`` holds the ``mutable``
    collections (empty for models without any)."""
    kwargs = {"train": False} if self.mutable else {}
    variables = dict(self.model.init(rng, x, **kwargs))
    return variables.pop("params"), variables

  def apply(self, params, model_state, x, *, train: bool):
    """The model output; in training with ``mutable`` collections, ``(output, new_state)``."""
    variables = {"params": params, **(model_state or {})}
    if not self.mutable:
      return self.model.apply(variables, x)
    if train:
      output, state = self.model.apply(variables, x, train=True, mutable=list(self.mutable))
      return output, dict(state)
    return self.model.apply(variables, x, train=False)


def chunked_mean(batch_mean: Callable, params, x: np.ndarray, y: np.ndarray) -> float:
  """Mean over a whole set of a jitted per-batch mean, evaluated in chunks of ``EVAL_CHUNK``."""
  total = 0.0
  for start in range(0, len(x), EVAL_CHUNK):
    xs, ys = x[start:start + EVAL_CHUNK], y[start:start + EVAL_CHUNK]
    total += float(batch_mean(params, xs, ys)) * len(xs)
  return total / len(x)


def cross_entropy(logits, labels):
  """Softmax cross-entropy with integer labels, mean over the batch."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def reconstruction_error(logits, images):
  """Sigmoid cross-entropy summed over pixels, mean over the batch."""
  return optax.sigmoid_binary_cross_entropy(logits, images).sum(axis=-1).mean()


def half_squared_error(outputs, targets):
  """½ squared error summed over pixels, mean over the batch (the paper's FACES loss)."""
  return 0.5 * jnp.square(outputs - targets).reshape(len(outputs), -1).sum(axis=-1).mean()


def load_npz_images(name: str, pixels: int) -> Callable[[Optional[str]], datasets.Dataset]:
  """A loader of ``<data_dir>/<name>/<name>.npz`` holding float32 ``x_train``, ``x_test`` of
  shape ``(N, pixels)`` in the autoencoder's target range (labels are unused).

  The CURVES and FACES sets of Hinton and Salakhutdinov (2006) are not downloaded here (their
  original files are MATLAB archives); convert them to this layout once. Raises
  ``FileNotFoundError`` naming the path when the file is absent.
  """
  def load(data_dir: Optional[str]) -> datasets.Dataset:
    import os
    import pathlib
    root = pathlib.Path(data_dir or os.environ.get("EVA_OPTAX_DATA", ".")).expanduser()
    path = root / name / f"{name}.npz"
    if not path.is_file():
      raise FileNotFoundError(
          f"the {name} data set is not at {path}: save float32 arrays x_train, x_test of shape "
          f"(N, {pixels}) there (np.savez) and pass --data-dir {root}.")
    with np.load(path) as arrays:
      x_train, x_test = (arrays[k].astype(np.float32).reshape(-1, pixels)
                         for k in ("x_train", "x_test"))
    return datasets.Dataset(x_train, np.zeros(len(x_train), np.int32), x_test,
                            np.zeros(len(x_test), np.int32))
  return load


def _flatten(data: datasets.Dataset) -> datasets.Dataset:
  flat = lambda x: x.reshape(len(x), -1)
  return data._replace(x_train=flat(data.x_train), x_test=flat(data.x_test))


def _reconstruct(data: datasets.Dataset) -> datasets.Dataset:
  data = _flatten(data)
  return data._replace(y_train=data.x_train, y_test=data.x_test)


def accuracy(logits, labels):
  """Fraction of correct argmax predictions in the batch."""
  return jnp.mean(logits.argmax(axis=-1) == labels)


def _over_set(model: nn.Module, batch_fn: Callable, train_flag: bool) -> Callable[..., float]:
  """``(params, x, y, model_state=None) -> float``: ``batch_fn(output, y)`` averaged over a whole
  set, the model in evaluation mode (BatchNorm's running averages)."""
  kwargs = {"train": False} if train_flag else {}
  jitted = jax.jit(lambda v, x, y: batch_fn(model.apply(v, x, **kwargs), y))
  return lambda p, x, y, state=None: chunked_mean(jitted, {"params": p, **(state or {})}, x, y)


def _task(name, model, loss, batch_size, epochs, load, prepare, classifier=True, **options):
  train_flag = bool(options.get("mutable"))
  eval_loss = _over_set(model, loss, train_flag)
  # Classifiers report test accuracy, the autoencoder its loss on the test set.
  if classifier:
    metric_name, metric = "test accuracy", _over_set(model, accuracy, train_flag)
    options.setdefault("test_loss", eval_loss)
  else:
    metric_name, metric = "test reconstruction error", eval_loss
    options.setdefault("goal", "min")
  return Task(name, model, loss, metric_name, metric, eval_loss, batch_size, epochs, load,
              prepare, **options)


def _normalize_images(data: datasets.Dataset) -> datasets.Dataset:
  """uint8 HWC images to float32 standardized by the training set's per-channel mean and std."""
  pixels = data.x_train.reshape(-1, data.x_train.shape[-1])
  mean = pixels.mean(axis=0, dtype=np.float64)
  std = np.sqrt((np.square(pixels, dtype=np.float64)).mean(axis=0) - mean ** 2)
  scale = lambda x: ((x - mean) / std).astype(np.float32)
  return data._replace(x_train=scale(data.x_train), x_test=scale(data.x_test))


SHAKESPEARE_CONTEXT = 64


def _shakespeare_char() -> Task:
  """The character-level Transformer on Tiny Shakespeare (the widely used CPU configuration:
  4 layers, 4 heads, width 128, context 64, batch 12, no dropout, 2,000 steps; AdamW with
  warmup then cosine). Validation metric: mean cross-entropy in nats per character over every
  third non-overlapping 65-character window of the last 10 % of the text (572 windows)."""
  vocab = len(datasets.SHAKESPEARE_VOCABULARY)
  model = TransformerLM(vocab, width=128, depth=4, heads=4, context=SHAKESPEARE_CONTEXT,
                        remat=False)
  load = lambda data_dir: datasets.language_model_data(datasets.load_shakespeare(data_dir),
                                                       SHAKESPEARE_CONTEXT)
  eval_loss = _over_set(model, cross_entropy, False)
  return Task("shakespeare_char", model, cross_entropy, "validation loss", eval_loss, eval_loss,
              12, 1, load, lambda d: d, steps=2000, eval_every=100, goal="min",
              schedule="warmup_cosine", warmup=100, baseline="adamw", targets=(2.0, 1.88),
              head="head", eval_subset=256)


TASKS: dict[str, Callable[[], Task]] = {
    "digits_mlp": lambda: _task("digits_mlp", MLP((128, 10)), cross_entropy, 128, 20,
                                lambda _: datasets.load_digits(), lambda d: d),
    "mnist_autoencoder": lambda: _task("mnist_autoencoder", Autoencoder(), reconstruction_error,
                                       1000, 4, datasets.load_mnist, _reconstruct,
                                       classifier=False, log_loss=True),
    # The K-BFGS paper's other autoencoders (batch 1000 as there); data not shipped, see
    # load_npz_images.
    "curves_autoencoder": lambda: _task(
        "curves_autoencoder", DeepAutoencoder(CURVES_WIDTHS, 784), reconstruction_error, 1000,
        4, load_npz_images("curves", 784), _reconstruct, classifier=False, log_loss=True),
    "faces_autoencoder": lambda: _task(
        "faces_autoencoder", DeepAutoencoder(FACES_WIDTHS, 625), half_squared_error, 1000, 4,
        load_npz_images("faces", 625), _reconstruct, classifier=False, log_loss=True),
    "mnist_mlp": lambda: _task("mnist_mlp", MLP((512, 256, 10)), cross_entropy, 256, 2,
                               datasets.load_mnist, _flatten),
    "mnist_cnn": lambda: _task("mnist_cnn", CNN(), cross_entropy, 128, 2, datasets.load_mnist,
                               lambda d: d),
    # He et al.'s CIFAR recipe (batch 128, standard augmentation); the CPU protocol in
    # benchmarks/RESULTS.md trains far fewer steps than the paper's 64k.
    "cifar10_resnet": lambda: _task(
        "cifar10_resnet", ResNet20(), cross_entropy, 128, 30, datasets.load_cifar10,
        _normalize_images, mutable=("batch_stats",), augment=datasets.augment_crop_flip,
        eval_every=100, targets=(0.8,), head="head", eval_subset=2000,
        baseline="sgd_nesterov"),
    "shakespeare_char": _shakespeare_char,
}


def get_task(name: str) -> Task:
  """The task called ``name``; raises ``ValueError`` listing the known tasks otherwise."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}.")
  return TASKS[name]()
