"""The Flax capture: ā and ḡ against explicit computations (im2col, jax.grad of explicit code)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eva_optax

# float32 sums of O(100) terms of O(1): relative error ~1e-6; 1e-5 leaves a margin for the
# different summation orders of the reference.
RTOL, ATOL = 1e-5, 1e-6


def _im2col(x, kernel_size, strides, padding, dilation=None):
  """Explicit patches [B, *out, *kernel, C] by slicing — the textbook definition."""
  rank = len(kernel_size)
  dilation = dilation or (1,) * rank
  span = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
  if isinstance(padding, str):
    pads = []
    for size, k, s in zip(x.shape[1:1 + rank], span, strides):
      out = math.ceil(size / s) if padding == "SAME" else math.ceil((size - k + 1) / s)
      total = max((out - 1) * s + k - size, 0) if padding == "SAME" else 0
      pads.append((total // 2, total - total // 2))
  else:
    pads = [tuple(p) for p in padding]
  xp = jnp.pad(x, [(0, 0)] + pads + [(0, 0)])
  out_shape = [(xp.shape[1 + d] - span[d]) // strides[d] + 1 for d in range(rank)]
  cols = []
  for offset in np.ndindex(*kernel_size):
    index = (slice(None),) + tuple(
        slice(o * dl, o * dl + (n - 1) * s + 1, s)
        for o, dl, n, s in zip(offset, dilation, out_shape, strides))
    cols.append(xp[index])
  return jnp.stack(cols, axis=-2).reshape(x.shape[0], *out_shape, *kernel_size, x.shape[-1])


def _capture(model, params, x, y=None):
  def loss_fn(p, x):
    out = model.apply({"params": p}, x)
    return jnp.mean(jnp.sum(jnp.sin(out) * out, axis=tuple(range(1, out.ndim))))
  return eva_optax.flax.value_and_grad(loss_fn, statistics="kronecker_vectors")(params, x)


@pytest.mark.parametrize("kernel_size,strides,padding,use_bias,dilation", [
    ((3, 3), (2, 2), "SAME", True, None),
    ((3, 3), (1, 1), "VALID", False, None),
    ((2, 3), (2, 1), ((1, 0), (2, 1)), True, None),
    ((3, 2), (1, 1), "SAME", True, (2, 1)),
    ((3,), (2,), "SAME", True, None),
    ((4,), (1,), "VALID", False, None),
])
def test_conv_statistics_match_explicit_im2col(kernel_size, strides, padding, use_bias,
                                               dilation):
  rank = len(kernel_size)
  x = jax.random.normal(jax.random.key(0), (3,) + (7, 6)[:rank] + (2,))
  conv = nn.Conv(5, kernel_size, strides=strides, padding=padding, use_bias=use_bias,
                 kernel_dilation=dilation or 1)
  params = conv.init(jax.random.key(1), x)["params"]
  (loss, grads), curvature = _capture(conv, params, x)

  patches = _im2col(x, kernel_size, strides, padding, dilation)
  kernel = params["kernel"].reshape(-1, 5)
  flat = patches.reshape(-1, kernel.shape[0])
  # The im2col ordering is the one the kernel reshape uses: patches @ K is the convolution.
  expected_out = (flat @ kernel).reshape(conv.apply({"params": params}, x).shape)
  if use_bias:
    expected_out = expected_out + params["bias"]
  np.testing.assert_allclose(conv.apply({"params": params}, x), expected_out, rtol=1e-5, atol=1e-5)
  stats = curvature  # a bare layer is the root module: its record is the whole pytree
  np.testing.assert_allclose(stats.a, flat.mean(0), rtol=RTOL, atol=ATOL)

  # ḡ: B × mean over (batch, positions) of ∂L/∂y, with ∂L/∂y from jax.grad of explicit code.
  def explicit_loss(eps):
    out = (flat @ kernel).reshape(expected_out.shape) + eps
    if use_bias:
      out = out + params["bias"]
    return jnp.mean(jnp.sum(jnp.sin(out) * out, axis=tuple(range(1, out.ndim))))
  dy = jax.grad(explicit_loss)(jnp.zeros(expected_out.shape))
  g_expected = x.shape[0] * dy.reshape(-1, 5).mean(0)
  np.testing.assert_allclose(stats.g, g_expected, rtol=RTOL, atol=ATOL)


def test_circular_padding_means_wrapped_patches():
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
  conv = nn.Conv(4, (3, 3), padding="CIRCULAR")
  params = conv.init(jax.random.key(1), x)["params"]
  _, stats = _capture(conv, params, x)
  wrapped = jnp.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="wrap")
  expected = _im2col(wrapped, (3, 3), (1, 1), "VALID").reshape(-1, 27).mean(0)
  np.testing.assert_allclose(stats.a, expected, rtol=RTOL, atol=ATOL)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="inner")(jnp.tanh(nn.Dense(6)(x)))


class Nested(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = Block(name="block")(x)
    return nn.Dense(3, use_bias=False, name="head")(nn.relu(x))


def _nested_explicit(params, x, eps):
  """The same network written out, with a full-shape output perturbation per layer."""
  p = params["block"]
  h1 = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"] + eps["Dense_0"]
  h2 = jnp.tanh(h1) @ p["inner"]["kernel"] + p["inner"]["bias"] + eps["inner"]
  out = nn.relu(h2) @ params["head"]["kernel"] + eps["head"]
  return (jnp.tanh(h1), nn.relu(h2)), out


def _nested_loss(out):
  return jnp.mean(jnp.sum(jnp.sin(out) * out, axis=-1))


def test_nested_dense_statistics_match_explicit_gradients():
  x = jax.random.normal(jax.random.key(0), (8, 5))
  model = Nested()
  params = model.init(jax.random.key(1), x)["params"]
  (loss, grads), curvature = _capture(model, params, x)

  shapes = {"Dense_0": (8, 6), "inner": (8, 4), "head": (8, 3)}
  zeros = {k: jnp.zeros(v) for k, v in shapes.items()}
  (a1, a2), _ = _nested_explicit(params, x, zeros)
  dy = jax.grad(lambda e: _nested_loss(_nested_explicit(params, x, e)[1]))(zeros)
  expected = {("block", "Dense_0"): (x, dy["Dense_0"]), ("block", "inner"): (a1, dy["inner"]),
              ("head",): (a2, dy["head"])}
  assert set(curvature) == {"block", "head"} and set(curvature["block"]) == {"Dense_0", "inner"}
  for path, (inputs, out_grad) in expected.items():
    stats = curvature[path[0]] if len(path) == 1 else curvature[path[0]][path[1]]
    np.testing.assert_allclose(stats.a, inputs.mean(0), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats.g, x.shape[0] * out_grad.mean(0), rtol=RTOL, atol=ATOL)
  # For a Dense layer with bias, ḡ is the bias gradient.
  np.testing.assert_allclose(curvature["block"]["inner"].g, grads["block"]["inner"]["bias"],
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(loss, _nested_loss(_nested_explicit(params, x, zeros)[1]), rtol=1e-6)


def test_statistics_are_per_example_means_independent_of_batch_size():
  x = jax.random.normal(jax.random.key(2), (512, 5))
  model = Nested()
  params = model.init(jax.random.key(1), x)["params"]
  _, full = _capture(model, params, x)
  parts = [_capture(model, params, chunk)[1] for chunk in jnp.split(x, 8)]  # batches of 64
  mean_of_parts = jax.tree.map(lambda *v: jnp.mean(jnp.stack(v), 0), *parts)
  # Same scale at B = 64 and B = 512: the 512-batch statistic is the mean of the 64-batch ones.
  for got, want in zip(jax.tree.leaves(full), jax.tree.leaves(mean_of_parts)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  g_norm = jnp.linalg.norm(full["head"].g)
  assert g_norm > 1e-2  # the check above compares nonzero vectors


def test_has_aux_and_value_match_jax_value_and_grad():
  x = jax.random.normal(jax.random.key(0), (4, 5))
  model = Nested()
  params = model.init(jax.random.key(1), x)["params"]

  def loss_fn(p, x, scale=1.0, mode="train"):  # a non-array argument used in Python control flow
    out = model.apply({"params": p}, x)
    return (scale if mode == "eval" else 1.0) * _nested_loss(out), {"out": out}

  (value, grads), curvature = eva_optax.flax.value_and_grad(
      loss_fn, statistics="kronecker_vectors", has_aux=True)(params, x, scale=2.0, mode="eval")
  (ref_loss, ref_aux), ref_grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, x, scale=2.0, mode="eval")
  np.testing.assert_allclose(value[0], ref_loss, rtol=1e-6)
  np.testing.assert_allclose(value[1]["out"], ref_aux["out"], rtol=1e-6)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


class Grouped(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(4, (3, 3), feature_group_count=2)(x)


@pytest.mark.parametrize("module,match", [
    (Grouped(), r"'Conv_0' \(Conv\) uses .*grouped convolution"),
    (nn.DenseGeneral(3, batch_dims=(0,)), "batch_dims"),
    (nn.Einsum((5, 5), "bld,ld->bd"), "equation"),  # d is in input, kernel and output
    (nn.ConvTranspose(3, (2, 2)), "transposed"),
])
def test_unsupported_layers_raise_naming_the_layer_and_exclude(module, match):
  x = jnp.ones((2, 4, 4, 4)) if isinstance(module, (Grouped, nn.ConvTranspose)) else jnp.ones(
      (2, 5, 5))
  params = module.init(jax.random.key(0), x)["params"]
  with pytest.raises(NotImplementedError, match=match) as raised:
    _capture(module, params, x)
  assert "exclude=" in str(raised.value)


def test_unknown_statistics_raise():
  with pytest.raises(ValueError, match="unknown statistics"):
    eva_optax.flax.value_and_grad(lambda p: 0.0, statistics="hessian")


def test_axis_name_pmeans_statistics_to_the_global_batch():
  assert jax.local_device_count() >= 4, "tests/conftest.py sets 4 host devices"
  x = jax.random.normal(jax.random.key(4), (4 * 8, 5))
  model = Nested()
  params = model.init(jax.random.key(1), x)["params"]

  def loss_fn(p, x):
    return _nested_loss(model.apply({"params": p}, x))

  capture = eva_optax.flax.value_and_grad(loss_fn, statistics="kronecker_vectors",
                                          axis_name="data")
  _, per_device = jax.pmap(capture, axis_name="data", in_axes=(None, 0))(
      params, x.reshape(4, 8, 5))
  _, single = eva_optax.flax.value_and_grad(loss_fn, statistics="kronecker_vectors")(params, x)
  for got, want in zip(jax.tree.leaves(per_device), jax.tree.leaves(single)):
    for replica in got:  # every replica holds the global-batch statistic
      np.testing.assert_allclose(replica, want, rtol=1e-5, atol=1e-6)
