"""Flax NNX: the capture on native NNX models, with nnx.Optimizer and with split/merge + optax;
an NNX model trains exactly like the same Linen model."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx

import eva_optax
from test_common import CAPTURE_ROWS, ROWS, capture_fn, second_pass


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(5, 8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))


class NnxCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3, 3), strides=2, rngs=rngs)
    self.hidden = nnx.Linear(36, 8, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.conv(x))
    return self.out(jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1))))


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2, name="conv")(x))
    x = nn.relu(nn.Dense(8, use_bias=False, name="hidden")(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, name="out")(x)


MODELS = {"mlp": (NnxMLP, LinenMLP, (32, 5)), "cnn": (NnxCNN, LinenCNN, (32, 6, 6, 2))}


def _data(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  labels = jax.random.randint(jax.random.key(1), (shape[0],), 0, 3)
  return x, labels


def nnx_loss(model, x, labels):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()


def nnx_step(tx, statistics):
  """A jitted ``nnx.Optimizer`` step with the NNX capture (plain ``nnx.value_and_grad`` for
  gradient-only optimizers)."""
  capture = (eva_optax.nnx.value_and_grad(nnx_loss, statistics=statistics) if statistics
             else None)

  @nnx.jit
  def step(model, optimizer, x, labels):
    if capture is None:
      loss, grads = nnx.value_and_grad(nnx_loss)(model, x, labels)
      optimizer.update(model, grads)
    else:
      (loss, grads), curvature = capture(model, x, labels)
      optimizer.update(model, grads, curvature=curvature,
                       curvature_fn=eva_optax.nnx.curvature_fn(nnx_loss, model, x, labels,
                                                               statistics=statistics))
    return loss

  return step


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("factory,statistics,hparams", ROWS)
def test_nnx_optimizer_trains_like_the_linen_model(kind, factory, statistics, hparams):
  nnx_cls, linen_cls, shape = MODELS[kind]
  x, labels = _data(shape)
  model = nnx_cls(nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, factory(0.05, **hparams), wrt=nnx.Param)
  step = nnx_step(optimizer.tx, statistics)
  for _ in range(3):
    step(model, optimizer, x, labels)

  linen_loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      linen_cls().apply({"params": p}, x), labels).mean()
  tx = factory(0.05, **hparams)
  state, capture = tx.init(params), capture_fn(linen_loss, statistics)
  for _ in range(3):
    (_, grads), curvature = capture(params)
    updates, state = tx.update(grads, state, params, curvature=curvature,
                               **second_pass(linen_loss, statistics))
    params = optax.apply_updates(params, updates)
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


class Block(nnx.Module):
  def __init__(self, width, rngs):
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=width, decode=False, rngs=rngs)
    self.up = nnx.Linear(width, 4 * width, rngs=rngs)
    self.down = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm(x), mask=nnx.make_causal_mask(x[..., 0]))
    return x + self.down(jax.nn.gelu(self.up(x)))


class NnxLM(nnx.Module):
  """Embed, a stack of blocks made with nnx.vmap and run with nnx.scan under nnx.remat, head."""

  def __init__(self, rngs, vocab=11, width=8, depth=2):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return Block(width, rngs)

    self.blocks = blocks(rngs)
    self.head = nnx.Linear(width, vocab, rngs=rngs)

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def body(x, block):
      return block(x)

    return self.head(body(self.embed(tokens), self.blocks))


def lm_loss(model, tokens):
  return optax.softmax_cross_entropy_with_integer_labels(model(tokens[:, :-1]),
                                                         tokens[:, 1:]).mean()


@pytest.mark.parametrize("factory,statistics,hparams", CAPTURE_ROWS)
def test_nnx_transformer_stack_trains_with_every_kernel_preconditioned(factory, statistics,
                                                                       hparams):
  tokens = jax.random.randint(jax.random.key(0), (8, 9), 0, 11)
  model = NnxLM(nnx.Rngs(0))
  capture = eva_optax.nnx.value_and_grad(lm_loss, statistics=statistics)
  info = capture.describe(model, tokens)
  assert info.layouts["blocks/attn/query"] == eva_optax.Layout(stacked_axes=1, output_axes=2)
  # Global-norm clipping at 1, as usual for Transformers (K-FAC at the row's γ = 1e-2 and loose
  # KL clip diverges on this model without it).
  optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), factory(
      0.05, layouts=info.layouts, **hparams)), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, tokens):
    (loss, grads), curvature = capture(model, tokens)
    optimizer.update(model, grads, curvature=curvature,
                     curvature_fn=eva_optax.nnx.curvature_fn(lm_loss, model, tokens,
                                                             statistics=statistics))
    return loss

  first = step(model, optimizer, tokens)
  for _ in range(40):
    loss = step(model, optimizer, tokens)
  assert float(loss) < 0.9 * float(first)
  (_, _), curvature = capture(model, tokens)
  rows = eva_optax.coverage(nnx.state(model, nnx.Param), curvature, info)
  kernels = [r for r in rows if r.parameter.endswith("kernel")]
  assert len(kernels) == 7 and all(r.preconditioned for r in kernels)
  assert [r.parameter for r in rows if not r.preconditioned] == ["embed/embedding"]


def test_split_merge_with_plain_optax_equals_nnx_optimizer():
  x, labels = _data((32, 5))
  model = NnxMLP(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  capture = eva_optax.nnx.value_and_grad(nnx_loss, statistics="kronecker_vectors")
  tx = eva_optax.eva(0.1)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    (_, grads), curvature = capture(nnx.merge(graphdef, params), x, labels)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state

  for _ in range(3):
    params, state = step(params, state)
  reference = NnxMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(reference, eva_optax.eva(0.1), wrt=nnx.Param)
  for _ in range(3):
    nnx_step(optimizer.tx, "kronecker_vectors")(reference, optimizer, x, labels)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(params)),
                  jax.tree.leaves(nnx.to_pure_dict(nnx.state(reference, nnx.Param))),
                  strict=True):
    # jax.jit and nnx.jit fuse differently; KL-normalized steps carry the rounding (as in
    # test_common's jit-vs-eager rows).
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nnx_capture_leaves_the_model_unchanged_and_raises_for_unsupported_layers():
  x, labels = _data((32, 6, 6, 2))
  model = NnxCNN(nnx.Rngs(0))
  before, linear_call = nnx.graphdef(model), nnx.Linear.__call__
  capture = eva_optax.nnx.value_and_grad(nnx_loss, statistics="kronecker_factors")
  capture(model, x, labels)
  assert nnx.graphdef(model) == before  # no probe or mark left behind
  assert nnx.Linear.__call__ is linear_call  # the class is restored
  model.conv = nnx.Conv(2, 4, (3, 3), strides=2, feature_group_count=2, rngs=nnx.Rngs(1))
  with pytest.raises(NotImplementedError, match=r"'conv'.*grouped.*exclude=\['conv'\]"):
    capture(model, x, labels)
  (_, _), curvature = eva_optax.nnx.value_and_grad(
      nnx_loss, statistics="kronecker_factors", exclude="conv")(model, x, labels)
  assert set(curvature) == {"hidden", "out"}


class Hybrid(nnx.Module):
  """A Linen body held through nnx.bridge.ToNNX, and an NNX head."""

  def __init__(self, rngs):
    self.body = nnx.bridge.ToNNX(nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(6)]), rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.body(x)))


class LinenHybrid(nn.Module):
  def setup(self):
    self.body = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(6)])
    self.head = nn.Dense(3)

  def __call__(self, x):
    return self.head(nn.relu(self.body(x)))


def test_a_linen_model_through_nnx_bridge_is_captured_like_linen():
  x, labels = _data((32, 5))
  model = Hybrid(nnx.Rngs(0))
  nnx.bridge.lazy_init(model, x)
  kinds = ("kronecker_vectors", "kronecker_factors")
  (_, grads), curvature = eva_optax.nnx.value_and_grad(nnx_loss, statistics=kinds)(
      model, x, labels)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  linen_loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      LinenHybrid().apply({"params": p}, x), labels).mean()
  (_, want_grads), want = eva_optax.flax.value_and_grad(linen_loss, statistics=kinds)(params)
  assert set(eva_optax.collectors.flatten_curvature(curvature["kronecker_vectors"])) == {
      "body/layers_0", "body/layers_2", "head"}
  for a, b in zip(jax.tree.leaves((nnx.to_pure_dict(grads), curvature)),
                  jax.tree.leaves((want_grads, want)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  optimizer = nnx.Optimizer(model, eva_optax.eva(0.1), wrt=nnx.Param)
  step = nnx_step(optimizer.tx, "kronecker_vectors")
  first = step(model, optimizer, x, labels)
  for _ in range(10):
    loss = step(model, optimizer, x, labels)
  assert float(loss) < float(first)
  assert set(nnx.to_pure_dict(nnx.state(model, nnx.Param))["body"]["layers_0"]) == {"kernel",
                                                                                    "bias"}
