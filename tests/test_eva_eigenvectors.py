"""Eva's leading-eigenvector statistics and the reference's statistics subset (issue 14).

Dense references: the Kronecker factors A, G of ``statistics="kronecker_factors"`` (themselves
tested against explicit im2col and jax.grad in test_capture/test_kfac), their eigendecomposition
(``np.linalg.eigh`` in float64) and the explicit Sherman–Morrison solve of
γ (F̃ + γI)⁻¹ vec(Ĝ) with F̃ = (λ_a u uᵀ) ⊗ (λ_g v vᵀ) (``np.linalg.solve``).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import eva_optax
from eva_optax import collectors


class BatchNormMLP(nn.Module):
  """Dense → BatchNorm (ḡ of the first Dense is exactly 0 over the batch) → ReLU → Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=False)(nn.Dense(6, use_bias=False)(x))
    return nn.Dense(3)(nn.relu(x))


class BatchNormConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Conv(4, (3, 3))(x)))
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


class ScannedMLP(nn.Module):
  """Two Dense layers stacked with nn.scan (stack axis 0 on the kernels and the statistics)."""

  @nn.compact
  def __call__(self, x):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return nn.tanh(nn.Dense(5)(h)), None
    x = nn.Dense(5)(x)
    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)()(x, None)
    return nn.Dense(3)(x)


class Attention(nn.Module):
  """Stock self-attention with a causal mask: the key projection's ḡ vanishes (softmax)."""

  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(
        x, mask=nn.make_causal_mask(x[..., 0]))
    return nn.Dense(3)(h)


class NnxBatchNormConv(nnx.Module):
  """Stock NNX Conv → BatchNorm → ReLU → mean pool → Linear."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.mean(nnx.relu(self.bn(self.conv(x))), axis=(1, 2)))


MODELS = {
    "batchnorm_mlp": (BatchNormMLP, (16, 5)),
    "batchnorm_conv": (BatchNormConv, (8, 6, 6, 2)),
    "scanned_mlp": (ScannedMLP, (16, 4)),
    "attention": (Attention, (4, 6, 5)),
}


def _problem(name, batch=None):
  model_cls, shape = MODELS[name]
  if batch is not None:
    shape = (batch,) + shape[1:]
  x = jax.random.normal(jax.random.key(0), shape)
  model = model_cls()
  variables = model.init(jax.random.key(1), x)
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(p, x):
    out = (model.apply({"params": p, **rest}, x, mutable=list(rest))[0] if rest
           else model.apply({"params": p}, x))
    return jnp.mean(jnp.sum(jnp.sin(out) * out, axis=tuple(range(1, out.ndim))))

  return loss_fn, variables["params"], x


def _capture(loss_fn, params, x, statistics, **kwargs):
  return eva_optax.flax.value_and_grad(loss_fn, statistics=statistics)(params, x, **kwargs)


def _flat(tree):
  return collectors.flatten_curvature(tree)


def _random_estimates(factors, seed=3, record=collectors.KroneckerEigenvectors):
  """Nonzero estimates shaped like the power-iteration records (stack axes leading)."""
  out = {}
  for i, (name, f) in enumerate(_flat(factors).items()):
    ka, kg = jax.random.split(jax.random.key(seed + i))
    out[name] = record(
        jax.random.normal(ka, f.a.shape[:-1]), jax.random.normal(kg, f.g.shape[:-1]))
  return out


def _layer_matrix(tree, layer):
  """A layer's kernel as float64 ``[d_in, d_out]`` with its bias row appended, if any."""
  kernel = np.asarray(tree[layer]["kernel"], np.float64)
  matrix = kernel.reshape(-1, kernel.shape[-1])
  if "bias" in tree[layer]:
    matrix = np.concatenate([matrix, np.asarray(tree[layer]["bias"], np.float64)[None]])
  return matrix


def _unit(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.mark.parametrize("name", list(MODELS))
def test_one_power_step_is_the_factor_times_the_unit_estimate(name):
  loss_fn, params, x = _problem(name)
  _, factors = _capture(loss_fn, params, x, "kronecker_factors")
  estimates = _random_estimates(factors)
  _, records = _capture(loss_fn, params, x, "kronecker_eigenvectors",
                        eigenvector_estimates=estimates)
  for layer, f in _flat(factors).items():
    r, e = _flat(records)[layer], estimates[layer]
    for field in ("a", "g"):
      factor = np.asarray(getattr(f, field), np.float64)
      expected = np.einsum("...ij,...j->...i", factor, _unit(np.asarray(getattr(e, field))))
      scale = np.max(np.abs(expected))
      # float32 sums over ≤ 200 rows: 1e-5 of the largest entry.
      np.testing.assert_allclose(getattr(r, field), expected, rtol=1e-5, atol=1e-5 * scale,
                                 err_msg=f"{layer}.{field}")


def test_zero_estimates_start_from_a_fixed_vector():
  loss_fn, params, x = _problem("batchnorm_mlp")
  zeros = jax.tree.map(jnp.zeros_like, _random_estimates(_capture(
      loss_fn, params, x, "kronecker_factors")[1]))
  first = _capture(loss_fn, params, x, "kronecker_eigenvectors", eigenvector_estimates=zeros)[1]
  again = _capture(loss_fn, params, x, "kronecker_eigenvectors", eigenvector_estimates=zeros)[1]
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
    assert np.linalg.norm(a) > 0


def _run_power_iteration(loss_fn, params, x, steps, statistics="kronecker_eigenvectors",
                         **eva_kwargs):
  """``steps`` updates of scale_by_eva (a power-iteration ``statistics``) at fixed params and
  batch."""
  capture = eva_optax.flax.value_and_grad(loss_fn, statistics=statistics)
  layouts = capture.describe(params, x).layouts
  tx = eva_optax.scale_by_eva(statistics=statistics, scaling=None, layouts=layouts,
                              **eva_kwargs)
  state = tx.init(params)
  capture = jax.jit(capture)
  for _ in range(steps):
    (_, grads), curvature = capture(params, x,
                                    eigenvector_estimates=eva_optax.eigenvector_estimates(state))
    updates, state = tx.update(grads, state, params, curvature=curvature)
  return grads, updates, state, layouts


@pytest.mark.parametrize("name", ["batchnorm_mlp", "batchnorm_conv", "attention"])
def test_power_iteration_converges_to_the_leading_eigenpairs(name):
  loss_fn, params, x = _problem(name)
  _, factors = _capture(loss_fn, params, x, "kronecker_factors")
  _, means = _capture(loss_fn, params, x, "kronecker_vectors")
  grads, _, state, layouts = _run_power_iteration(loss_fn, params, x, 60)
  estimates = eva_optax.eigenvector_estimates(state)
  vanished = 0
  for layer, f in _flat(factors).items():
    for field in ("a", "g"):
      w, q = np.linalg.eigh(np.asarray(getattr(f, field), np.float64))
      m = np.asarray(getattr(estimates[layer], field), np.float64)
      # Power iteration converges like (λ₂/λ₁)^steps; these factors' gaps make 60 steps ample.
      np.testing.assert_allclose(np.linalg.norm(m), w[-1], rtol=1e-4, err_msg=f"{layer}.{field}")
      assert abs(q[:, -1] @ _unit(m)) > 1 - 1e-5, f"{layer}.{field}"
    vanished += float(np.linalg.norm(_flat(means)[layer].g)) < 1e-6
  # The point of the variant: layers whose mean output gradient vanishes get a correction.
  assert vanished >= 1
  diagnostics = eva_optax.eva_diagnostics(grads, estimates, layouts=layouts)
  for layer, d in diagnostics.items():
    assert np.all(np.asarray(d["signal_to_damping"]) > 1.0), layer


# The rank-one curvature's eigenvalue from the running estimates' norms: λ_a λ_g (the factors'
# eigenvalues; for the gradient's singular vectors both norms are σ), √(λ λ) for the Fisher's
# eigenvector (both norms are its one eigenvalue λ).
_SIGNAL = {"kronecker_eigenvectors": lambda na, ng: na * ng,
           "gradient_singular_vectors": lambda na, ng: na * ng,
           "fisher_eigenvectors": lambda na, ng: np.sqrt(na * ng)}


@pytest.mark.parametrize("statistics", list(_SIGNAL))
@pytest.mark.parametrize("damping_mode,damping", [("relative", 1e-3), ("absolute", 1e-8),
                                                  ("absolute", 1e3)])
def test_update_equals_dense_sherman_morrison(damping_mode, damping, statistics):
  """γ (F̃ + γI)⁻¹ vec(Ĝ) with F̃ = s (u uᵀ) ⊗ (v vᵀ) built densely from the estimates (u, v
  their unit vectors, s = :data:`_SIGNAL`); the absolute γ = 1e-8 is the ill-conditioned
  regime (s/γ > 1e3 on every layer)."""
  loss_fn, params, x = _problem("batchnorm_conv")
  grads, updates, state, _ = _run_power_iteration(
      loss_fn, params, x, 5, statistics, damping=damping, damping_mode=damping_mode)
  for layer, m in eva_optax.eigenvector_estimates(state).items():
    ma, mg = np.asarray(m.a, np.float64), np.asarray(m.g, np.float64)
    signal = _SIGNAL[statistics](np.linalg.norm(ma), np.linalg.norm(mg))
    fisher = signal * np.kron(np.outer(_unit(ma), _unit(ma)), np.outer(_unit(mg), _unit(mg)))
    gamma = max(damping, 0.5 * signal) if damping_mode == "relative" else damping
    if damping_mode == "absolute" and damping == 1e-8:
      assert signal / gamma > 1e3, layer
    matrix, got = _layer_matrix(grads, layer), _layer_matrix(updates, layer)
    expected = gamma * np.linalg.solve(fisher + gamma * np.eye(fisher.shape[0]), matrix.ravel())
    # The float32 direction removes r⟨Ĝ,u⟩u from Ĝ with |r| ≤ 1: error ~1e-6 of ‖Ĝ‖.
    np.testing.assert_allclose(got.ravel(), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(matrix).max(), err_msg=layer)


def test_rank_one_vectors_are_exact_and_overflow_safe():
  rng = np.random.default_rng(0)
  for scale in (1e-30, 1.0, 1e30):
    m = rng.normal(size=7).astype(np.float32) * scale
    g = rng.normal(size=3).astype(np.float32)
    vectors = collectors.rank_one_vectors(collectors.KroneckerEigenvectors(m, g))
    a = np.asarray(vectors.a, np.float64)
    m64 = np.asarray(m, np.float64)
    np.testing.assert_allclose(np.outer(a, a), np.outer(m64, m64) / np.linalg.norm(m64),
                               rtol=1e-5, atol=0)
  zero = collectors.rank_one_vectors(collectors.KroneckerEigenvectors(np.zeros(3), np.ones(2)))
  np.testing.assert_array_equal(zero.a, 0.0)


def test_nnx_capture_matches_the_dense_factors():
  model = NnxBatchNormConv(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (8, 6, 6, 2))

  def loss_fn(m, x):
    out = m(x)
    return jnp.mean(jnp.sum(jnp.sin(out) * out, axis=-1))

  _, factors = eva_optax.nnx.value_and_grad(loss_fn, statistics="kronecker_factors")(model, x)
  estimates = _random_estimates(factors)
  _, records = eva_optax.nnx.value_and_grad(loss_fn, statistics="kronecker_eigenvectors")(
      model, x, eigenvector_estimates=estimates)
  for layer, f in _flat(factors).items():
    for field in ("a", "g"):
      expected = np.asarray(getattr(f, field)) @ _unit(np.asarray(getattr(estimates[layer],
                                                                          field)))
      np.testing.assert_allclose(getattr(_flat(records)[layer], field), expected, rtol=1e-5,
                                 atol=1e-5 * np.abs(expected).max())


_RECORDS = {"kronecker_eigenvectors": collectors.KroneckerEigenvectors,
            "fisher_eigenvectors": collectors.FisherEigenvectors,
            "gradient_singular_vectors": collectors.GradientSingularVectors}


@pytest.mark.parametrize("statistics", ["kronecker_vectors", "kronecker_factors",
                                        "kronecker_eigenvectors", "fisher_eigenvectors"])
def test_statistics_subset_equals_the_statistics_of_the_first_examples(statistics):
  """Per-example units: the first k of a batch of B give what a batch of those k gives."""
  loss_fn, params, x = _problem("scanned_mlp", batch=16)
  kwargs = {}
  if statistics in _RECORDS:
    kwargs["eigenvector_estimates"] = _random_estimates(
        _capture(loss_fn, params, x, "kronecker_factors")[1], record=_RECORDS[statistics])
  subset = eva_optax.flax.value_and_grad(loss_fn, statistics=statistics,
                                         statistics_batch_size=5)
  (loss, grads), records = subset(params, x, **kwargs)
  (loss_all, grads_all), _ = _capture(loss_fn, params, x, statistics, **kwargs)
  _, expected = _capture(loss_fn, params, x[:5], statistics, **kwargs)
  np.testing.assert_allclose(loss, loss_all, rtol=1e-6)  # the loss and gradient: whole batch
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_all)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(records), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6 * np.abs(b).max())


@pytest.mark.parametrize("statistics", list(_RECORDS))
def test_pmap_statistics_equal_one_device_on_the_global_batch(statistics):
  loss_fn, params, x = _problem("scanned_mlp", batch=16)
  estimates = _random_estimates(_capture(loss_fn, params, x, "kronecker_factors")[1],
                                record=_RECORDS[statistics])
  _, single = _capture(loss_fn, params, x, statistics, eigenvector_estimates=estimates)
  capture = eva_optax.flax.value_and_grad(loss_fn, statistics=statistics, axis_name="data")
  devices = jax.local_device_count()
  per_device = jax.pmap(lambda xs: capture(params, xs, eigenvector_estimates=estimates)[1],
                        axis_name="data")(x.reshape(devices, -1, *x.shape[1:]))
  # The Fisher's entries are sums of products of four float32 factors whose per-device
  # partial sums cancel differently: 1e-5 of the largest entry (measured 1.3e-6).
  scale = 1e-5 if statistics == "fisher_eigenvectors" else 1e-6
  for a, b in zip(jax.tree.leaves(per_device), jax.tree.leaves(single)):
    np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=scale * np.abs(b).max())
    np.testing.assert_array_equal(a[0], a[-1])


def test_statistics_subset_gives_batchnorm_layers_a_noisy_mean_output_gradient():
  loss_fn, params, x = _problem("batchnorm_mlp", batch=32)
  _, whole = _capture(loss_fn, params, x, "kronecker_vectors")
  _, first = eva_optax.flax.value_and_grad(loss_fn, statistics="kronecker_vectors",
                                           statistics_batch_size=8)(params, x)
  assert float(jnp.linalg.norm(whole["Dense_0"].g)) < 1e-6
  assert float(jnp.linalg.norm(first["Dense_0"].g)) > 1e-3


@pytest.mark.parametrize("kwargs,call_kwargs,match", [
    ({"statistics": "kronecker_eigenvectors"}, {}, "needs this step's estimates"),
    ({"statistics": "kronecker_vectors"}, {"eigenvector_estimates": {}}, "only used with"),
    ({"statistics": "kronecker_eigenvectors"}, {"eigenvector_estimates": {}}, "has no"),
    ({"statistics": "kronecker_eigenvectors", "weight_sharing": "reduce"}, None, "expand"),
    ({"statistics": "fisher_eigenvectors", "weight_sharing": "reduce"}, None, "expand"),
    ({"statistics": ("fisher_eigenvectors", "kronecker_eigenvectors")}, None, "one of them"),
    ({"statistics": "fisher_eigenvectors"}, {}, "needs this step's estimates"),
    ({"statistics": "kronecker_vectors", "statistics_batch_size": 0}, None, "positive int"),
    ({"statistics": "kronecker_vectors", "statistics_batch_size": 2.0}, None, "positive int"),
])
def test_misuse_raises(kwargs, call_kwargs, match):
  loss_fn, params, x = _problem("batchnorm_mlp")
  with pytest.raises(ValueError, match=match):
    eva_optax.flax.value_and_grad(loss_fn, **kwargs)(params, x, **(call_kwargs or {}))


def test_estimates_of_another_model_raise_naming_the_layer():
  loss_fn, params, x = _problem("batchnorm_mlp")
  other = eva_optax.scale_by_eva(statistics="kronecker_eigenvectors").init(
      {"Dense_0": {"kernel": jnp.zeros((7, 6))}, "Dense_1": params["Dense_1"]})
  with pytest.raises(ValueError, match="Dense_0.*re-init"):
    _capture(loss_fn, params, x, "kronecker_eigenvectors",
             eigenvector_estimates=eva_optax.eigenvector_estimates(other))


def test_estimates_of_the_other_power_iteration_raise():
  loss_fn, params, x = _problem("batchnorm_mlp")
  kronecker = eva_optax.scale_by_eva(statistics="kronecker_eigenvectors").init(params)
  with pytest.raises(ValueError, match="no FisherEigenvectors.*fisher_eigenvectors"):
    _capture(loss_fn, params, x, "fisher_eigenvectors",
             eigenvector_estimates=eva_optax.eigenvector_estimates(kronecker))


def test_eigenvector_estimates_needs_an_eigenvector_state():
  params = {"Dense_0": {"kernel": jnp.zeros((3, 2))}}
  with pytest.raises(ValueError, match="kronecker_eigenvectors"):
    eva_optax.eigenvector_estimates(eva_optax.eva(0.1).init(params))
  with pytest.raises(ValueError, match="statistics must be one of"):
    eva_optax.eva(0.1, statistics="kronecker_factors")


def test_eva_with_eigenvectors_trains_end_to_end_under_jit():
  loss_fn, params, x = _problem("batchnorm_conv")
  tx = eva_optax.eva(0.05, statistics="kronecker_eigenvectors")
  capture = eva_optax.flax.value_and_grad(loss_fn, statistics="kronecker_eigenvectors")

  @jax.jit
  def step(params, state):
    (loss, grads), curvature = capture(
        params, x, eigenvector_estimates=eva_optax.eigenvector_estimates(state))
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  losses = []
  for _ in range(30):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


@pytest.mark.parametrize("kernel_size,strides,padding,use_bias,dilation", [
    ((3, 3), (2, 2), "SAME", True, (1, 1)),
    ((3, 3), (1, 1), "VALID", False, (1, 1)),
    ((2, 3), (2, 1), ((1, 0), (2, 1)), True, (1, 1)),
    ((3, 2), (1, 1), "CIRCULAR", True, (2, 1)),
    ((3,), (2,), "CAUSAL", True, (1,)),
])
def test_conv_power_step_without_patches_equals_the_dense_factor(kernel_size, strides, padding,
                                                                 use_bias, dilation):
  """The conv's A û is a one-channel convolution and its kernel gradient (no im2col); the
  reference is K-FAC's A, built from im2col patches (checked against explicit slicing in
  test_capture)."""
  rank = len(kernel_size)
  x = jax.random.normal(jax.random.key(0), (3,) + (7, 6)[:rank] + (2,))
  model = nn.Conv(3, kernel_size, strides=strides, padding=padding, use_bias=use_bias,
                  kernel_dilation=dilation)
  params = model.init(jax.random.key(1), x)["params"]

  def loss_fn(p, x):
    out = model.apply({"params": p}, x)
    return jnp.mean(jnp.sum(jnp.sin(out) * out, axis=tuple(range(1, out.ndim))))

  _, factors = _capture(loss_fn, params, x, "kronecker_factors")
  estimates = _random_estimates({"": factors})
  _, records = _capture(loss_fn, params, x, "kronecker_eigenvectors",
                        eigenvector_estimates=estimates[""])
  for field in ("a", "g"):
    expected = np.asarray(getattr(factors, field), np.float64) @ _unit(
        np.asarray(getattr(estimates[""], field)))
    np.testing.assert_allclose(getattr(records, field), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max(), err_msg=field)


# Fisher-eigenvector statistics (statistics="fisher_eigenvectors"). Dense reference: each
# layer's rows taken independently of the capture — its input (conv: im2col by
# lax.conv_general_dilated_patches) and g = B·∂L/∂y from a zero perturbation added to its
# output through flax.linen.intercept_methods — and the explicit Fisher
# F = (1/B) Σ_rows vec(a gᵀ) vec(a gᵀ)ᵀ in float64.

_MATMULS = (nn.Dense, nn.DenseGeneral, nn.Conv)


def _layer_inputs(loss_fn, params, x):
  """``{path: (module, input, output shape)}`` of every Dense/DenseGeneral/Conv call."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, _MATMULS):
      seen["/".join(context.module.path)] = (context.module, args[0], y.shape)
    return y

  with nn.intercept_methods(record):
    loss_fn(params, x)
  return seen


def _output_gradients(loss_fn, params, x, shapes):
  """``{path: ∂L/∂y}`` by a zero perturbation added to each layer's output."""
  def perturbed(eps):
    def add(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      name = "/".join(context.module.path)
      return y + eps[name] if context.method_name == "__call__" and name in eps else y
    with nn.intercept_methods(add):
      return loss_fn(params, x)
  return jax.grad(perturbed)({name: jnp.zeros(s) for name, s in shapes.items()})


def _input_rows(module, inputs, d_in):
  if isinstance(module, nn.Conv):
    c_in, taps = inputs.shape[-1], int(np.prod(module.kernel_size))
    strides = module.strides or 1
    strides = (strides,) * len(module.kernel_size) if isinstance(strides, int) else strides
    rows = jax.lax.conv_general_dilated_patches(
        inputs, module.kernel_size, strides, module.padding,
        dimension_numbers=("NHWC", "OIHW", "NHWC"))
    # Patch features come channel-major; the kernel's rows are offset-major (HWIO).
    return np.asarray(rows).reshape(-1, c_in, taps).transpose(0, 2, 1).reshape(-1, d_in)
  return np.asarray(inputs).reshape(-1, d_in)


def _kernels(tree):
  """``{path: kernel}`` of a params-like tree."""
  return {"/".join(p.key for p in path[:-1]): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if path[-1].key == "kernel"}


def _reference_rows(loss_fn, params, x):
  """``{path: (a [rows, d_in (+1)], g [rows, d_out])}`` in float64, g = B·∂L/∂y."""
  seen = _layer_inputs(loss_fn, params, x)
  cts = _output_gradients(loss_fn, params, x, {n: s for n, (_, _, s) in seen.items()})
  kernels = _kernels(params)
  out = {}
  for name, (module, inputs, shape) in seen.items():
    kernel = kernels[name]
    n_out = 1 if isinstance(module.features, int) else len(module.features)
    d_out = int(np.prod(shape[len(shape) - n_out:]))
    d_in = kernel.size // d_out
    a = _input_rows(module, inputs, d_in).astype(np.float64)
    if module.use_bias:
      a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    g = inputs.shape[0] * np.asarray(cts[name], np.float64).reshape(-1, d_out)
    out[name] = (a, g, kernel)
  return out


def _dense_fisher(a, g, batch):
  per_row = np.einsum("ri,rj->rij", a, g).reshape(a.shape[0], -1)
  return per_row.T @ per_row / batch


def _random_estimates_like(rows, record, seed=3):
  """Nonzero estimates of ``record`` type shaped like the reference rows' a and g."""
  out = {}
  for i, (name, (a, g, _)) in enumerate(rows.items()):
    ka, kg = jax.random.split(jax.random.key(seed + i))
    out[name] = record(jax.random.normal(ka, a.shape[1:]), jax.random.normal(kg, g.shape[1:]))
  return out


def _dense_fisher_step(a, g, batch, u, v):
  fuv = (_dense_fisher(a, g, batch) @ np.kron(u, v)).reshape(a.shape[1], g.shape[1])
  return fuv @ v, u @ fuv


def _reference_gradient(a, g):
  """C = mean over rows of a gᵀ."""
  return a.T @ g / a.shape[0]


def _dense_gradient_step(a, g, batch, u, v):
  c = _reference_gradient(a, g)
  return c @ v, u @ c


_DENSE_STEPS = {"fisher_eigenvectors": _dense_fisher_step,
                "gradient_singular_vectors": _dense_gradient_step}


@pytest.mark.parametrize("statistics", list(_DENSE_STEPS))
@pytest.mark.parametrize("name", ["batchnorm_mlp", "batchnorm_conv", "attention"])
def test_joint_power_step_is_the_dense_contraction(name, statistics):
  loss_fn, params, x = _problem(name)
  rows = _reference_rows(loss_fn, params, x)
  (_, grads), _ = _capture(loss_fn, params, x, "kronecker_vectors")
  estimates = _random_estimates_like(rows, _RECORDS[statistics])
  _, records = _capture(loss_fn, params, x, statistics, eigenvector_estimates=estimates)
  assert set(rows) == set(_flat(records))
  for layer, (a, g, kernel) in rows.items():
    d_in = kernel.size // g.shape[1]
    # The reference rows are right: their Σ a gᵀ / B is the kernel's gradient.
    kernel_grad = np.asarray(_kernels(grads)[layer]).reshape(d_in, -1)
    np.testing.assert_allclose((a[:, :d_in].T @ g) / x.shape[0], kernel_grad,
                               rtol=1e-4, atol=1e-6 * np.abs(kernel_grad).max(), err_msg=layer)
    u, v = _unit(np.asarray(estimates[layer].a)), _unit(np.asarray(estimates[layer].g))
    expected = _DENSE_STEPS[statistics](a, g, x.shape[0], u, v)
    for got, want in zip(_flat(records)[layer], expected):
      # float32 sums of ≤ 200 rows (the Fisher's of products of four factors): 1e-5 of the
      # largest entry.
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(),
                                 err_msg=layer)


@pytest.mark.parametrize("name", ["batchnorm_mlp", "batchnorm_conv", "attention"])
def test_fisher_power_iteration_converges_to_a_kronecker_eigenvector(name):
  """The running estimates reach a fixed point of the alternating iteration on the dense F:
  (I ⊗ vᵀ) F (u ⊗ v) = λ u and (uᵀ ⊗ I) F (u ⊗ v) = λ v with λ = (u ⊗ v)ᵀ F (u ⊗ v), a local
  maximum of the Rayleigh quotient over Kronecker products (not always the global one: on the
  attention query the fixed start reaches 1.815 where another start reaches 1.898)."""
  loss_fn, params, x = _problem(name)
  rows = _reference_rows(loss_fn, params, x)
  _, means = _capture(loss_fn, params, x, "kronecker_vectors")
  grads, _, state, layouts = _run_power_iteration(loss_fn, params, x, 80, "fisher_eigenvectors")
  estimates = eva_optax.eigenvector_estimates(state)
  vanished = 0
  for layer, (a, g, _) in rows.items():
    fisher = _dense_fisher(a, g, x.shape[0])
    ma, mg = (np.asarray(m, np.float64) for m in estimates[layer])
    u, v = _unit(ma), _unit(mg)
    fuv = (fisher @ np.kron(u, v)).reshape(a.shape[1], g.shape[1])
    lam = float(np.kron(u, v) @ fisher @ np.kron(u, v))
    # float32 running averages at their fixed point: 1e-4 of λ.
    np.testing.assert_allclose(fuv @ v, lam * u, rtol=0, atol=1e-4 * lam, err_msg=layer)
    np.testing.assert_allclose(u @ fuv, lam * v, rtol=0, atol=1e-4 * lam, err_msg=layer)
    np.testing.assert_allclose([np.linalg.norm(ma), np.linalg.norm(mg)], lam, rtol=1e-4,
                               err_msg=layer)
    # A Kronecker-product direction cannot exceed the Fisher's top eigenvalue.
    assert lam <= np.linalg.eigvalsh(fisher)[-1] * (1 + 1e-9), layer
    vanished += float(np.linalg.norm(_flat(means)[layer].g)) < 1e-6
  assert vanished >= 1
  for layer, d in eva_optax.eva_diagnostics(grads, estimates, layouts=layouts).items():
    assert np.all(np.asarray(d["signal_to_damping"]) > 1.0), layer


def test_fisher_rank_one_vectors_are_exact_and_overflow_safe():
  rng = np.random.default_rng(0)
  for scale in (1e-30, 1.0, 1e30):
    ma = rng.normal(size=7).astype(np.float32) * scale
    mg = rng.normal(size=3).astype(np.float32) * scale
    vectors = collectors.fisher_rank_one_vectors(collectors.FisherEigenvectors(ma, mg))
    a, g = (np.asarray(v, np.float64) for v in vectors)
    ma64, mg64 = np.asarray(ma, np.float64), np.asarray(mg, np.float64)
    lam = np.sqrt(np.linalg.norm(ma64) * np.linalg.norm(mg64))
    np.testing.assert_allclose(np.kron(np.outer(a, a), np.outer(g, g)),
                               lam * np.kron(np.outer(_unit(ma64), _unit(ma64)),
                                             np.outer(_unit(mg64), _unit(mg64))),
                               rtol=1e-5, atol=1e-7 * lam)


def test_eva_with_fisher_eigenvectors_trains_end_to_end_under_jit_with_nnx():
  model = NnxBatchNormConv(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (8, 6, 6, 2))
  y = jax.random.normal(jax.random.key(1), (8, 3))

  def loss_fn(m, x):
    return jnp.mean((m(x) - y) ** 2)

  capture = eva_optax.nnx.value_and_grad(loss_fn, statistics="fisher_eigenvectors")
  optimizer = nnx.Optimizer(model, eva_optax.eva(0.05, statistics="fisher_eigenvectors"),
                            wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    (loss, grads), curvature = capture(
        model, x, eigenvector_estimates=eva_optax.eigenvector_estimates(optimizer.opt_state))
    optimizer.update(model, grads, curvature=curvature)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(30)]
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
  diagnostics = eva_optax.eva_diagnostics(
      nnx.state(model, nnx.Param), eva_optax.eigenvector_estimates(optimizer.opt_state))
  assert float(diagnostics["conv"]["signal_to_damping"]) > 1.0


# Gradient-singular-vector statistics (statistics="gradient_singular_vectors"): dense reference
# C = mean over rows of a gᵀ from the same independent rows, and its SVD.


@pytest.mark.parametrize("name", ["batchnorm_mlp", "batchnorm_conv", "attention"])
def test_gradient_power_iteration_converges_to_the_leading_singular_triple(name):
  loss_fn, params, x = _problem(name)
  rows = _reference_rows(loss_fn, params, x)
  _, means = _capture(loss_fn, params, x, "kronecker_vectors")
  grads, _, state, layouts = _run_power_iteration(loss_fn, params, x, 60,
                                                  "gradient_singular_vectors")
  estimates = eva_optax.eigenvector_estimates(state)
  vanished = 0
  for layer, (a, g, _) in rows.items():
    left, sigma, right = np.linalg.svd(_reference_gradient(a, g))
    ma, mg = (np.asarray(m, np.float64) for m in estimates[layer])
    # Power iteration converges like (σ₂/σ₁)^(2·steps); these layers' gaps make 60 steps ample.
    np.testing.assert_allclose([np.linalg.norm(ma), np.linalg.norm(mg)], sigma[0], rtol=1e-4,
                               err_msg=layer)
    assert abs(left[:, 0] @ _unit(ma)) > 1 - 1e-5 and abs(right[0] @ _unit(mg)) > 1 - 1e-5
    vanished += float(np.linalg.norm(_flat(means)[layer].g)) < 1e-6
  assert vanished >= 1  # where ḡ vanishes, C = Cov(a, g) does not
  # σ² is in the means' units (a conv's is below the default floor 1e-3, as ‖ā‖²‖ḡ‖² is), so
  # the correction is active above a floor of 1e-8 on every layer, BatchNorm ones included.
  for layer, d in eva_optax.eva_diagnostics(grads, estimates, damping=1e-8,
                                            layouts=layouts).items():
    assert np.all(np.asarray(d["signal_to_damping"]) > 1.0), layer


def test_gradient_singular_vectors_are_evas_means_where_a_and_g_are_uncorrelated():
  """One row per layer (a batch of one example through Dense layers): C = a gᵀ = ā ḡᵀ, so after
  two power steps (stat_decay 1: no averaging) the update is the means' to float32 rounding."""
  model = nn.Sequential([nn.Dense(6), nn.tanh, nn.Dense(3)])
  x = jax.random.normal(jax.random.key(0), (1, 5))
  params = model.init(jax.random.key(1), x)["params"]

  def loss_fn(p, x):
    out = model.apply({"params": p}, x)
    return jnp.mean(jnp.sum(jnp.sin(out) * out, axis=-1))

  kwargs = {"stat_decay": 1.0, "damping": 1e-3, "damping_mode": "absolute"}
  grads, updates, _, _ = _run_power_iteration(loss_fn, params, x, 2,
                                              "gradient_singular_vectors", **kwargs)
  tx = eva_optax.scale_by_eva(scaling=None, **kwargs)
  _, curvature = _capture(loss_fn, params, x, "kronecker_vectors")
  expected, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  # One row: Ĝ lies along u ⊗ v and the direction (1 − r)Ĝ is what survives the subtraction
  # of r⟨Ĝ, u⟩u (r ≈ 1), so float32 errors are relative to Ĝ: 1e-5 of its largest entry.
  for got, want, grad in zip(*(jax.tree.leaves(t) for t in (updates, expected, grads))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(grad).max())
  # And the correction is active there (not a vacuous equality of two plain gradients).
  assert not np.allclose(jax.tree.leaves(updates)[0], jax.tree.leaves(grads)[0], rtol=1e-3)
