"""Eva against dense references: explicit Kronecker products solved with jnp.linalg.solve."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from eva_optax import KroneckerVectors, layers


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), strides=2, padding="SAME")(x))
    return nn.Dense(4, use_bias=False)(x.reshape(x.shape[0], -1))


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    hidden = jnp.tanh(nn.Dense(6)(x))
    return nn.Dense(4, use_bias=False)(hidden)


def _setup(model, x_shape, batch=16):
  x = jax.random.normal(jax.random.key(0), (batch,) + x_shape)
  labels = jnp.arange(batch) % 4
  params = model.init(jax.random.key(1), x)["params"]

  def loss_fn(p, x):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), labels).mean()

  (_, grads), curvature = eva_optax.flax.value_and_grad(
      loss_fn, statistics="kronecker_vectors")(params, x)
  return params, grads, curvature


def _dense_eva(a, g, grad_matrix, gamma):
  """γ (ā āᵀ ⊗ ḡ ḡᵀ + γ I)⁻¹ vec(Ĝ), vec row-major over Ĝ [d_in, d_out]."""
  fisher = jnp.kron(jnp.outer(a, a), jnp.outer(g, g))
  solved = jnp.linalg.solve(fisher + gamma * jnp.eye(fisher.shape[0]), grad_matrix.reshape(-1))
  return gamma * solved.reshape(grad_matrix.shape)


def _augmented(curvature, grads):
  flat = eva_optax.collectors.flatten_curvature(curvature)
  out = {}
  for name, layer in layers.find_layers(grads).items():
    a = flat[name].a
    out[name] = (jnp.append(a, 1.0) if "bias" in layer else a, flat[name].g,
                 layers.to_matrix(layer))
  return out


@pytest.mark.parametrize("model,x_shape", [(Mlp(), (5,)), (ConvNet(), (6, 6, 2))],
                         ids=["dense", "conv_stride2_same"])
@pytest.mark.parametrize("damping_mode", ["absolute", "relative"])
def test_unscaled_update_equals_dense_kronecker_solve(model, x_shape, damping_mode):
  params, grads, curvature = _setup(model, x_shape)
  damping, lam = 0.05, 0.5
  tx = eva_optax.scale_by_eva(damping, damping_mode=damping_mode, relative_damping=lam,
                              scaling=None)
  updates, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  got = layers.find_layers(updates)
  removed = []
  for name, (a, g, grad_matrix) in _augmented(curvature, grads).items():
    signal = jnp.sum(a * a) * jnp.sum(g * g)
    gamma = damping if damping_mode == "absolute" else jnp.maximum(damping, lam * signal)
    want = _dense_eva(a, g, grad_matrix, gamma)
    # f32 solve of a system with condition number (signal + γ)/γ ≤ ~1e3 here: relative error
    # ≲ 1e3 · 1.2e-7 ≈ 1e-4 of ‖Ĝ‖, far below the corrections (≥ 1e-2 of ‖Ĝ‖) checked below.
    scale = float(jnp.max(jnp.abs(grad_matrix)))
    np.testing.assert_allclose(layers.to_matrix(got[name]), want, atol=2e-4 * scale, rtol=0)
    removed.append(float(jnp.linalg.norm(want - grad_matrix) / jnp.linalg.norm(grad_matrix)))
  assert max(removed) > 1e-2, "the correction must be material for the test to mean anything"


def test_a_model_that_is_one_layer_is_preconditioned():
  dense = nn.Dense(3)
  x = jax.random.normal(jax.random.key(0), (8, 4))
  params = dense.init(jax.random.key(1), x)["params"]
  loss_fn = lambda p: jnp.mean(jnp.sin(dense.apply({"params": p}, x)) ** 2)
  (_, grads), curvature = eva_optax.flax.value_and_grad(
      loss_fn, statistics="kronecker_vectors")(params)
  tx = eva_optax.scale_by_eva(1e-3, scaling=None)
  updates, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  a = jnp.append(curvature.a, 1.0)
  want = _dense_eva(a, curvature.g, layers.to_matrix(grads),
                    jnp.maximum(1e-3, 0.5 * jnp.sum(a * a) * jnp.sum(curvature.g ** 2)))
  np.testing.assert_allclose(layers.to_matrix(updates), want, rtol=1e-4, atol=1e-6)
  assert not np.allclose(updates["kernel"], grads["kernel"])


def test_kl_normalize_scales_by_inverse_root_of_inner_product():
  params, grads, curvature = _setup(Mlp(), (5,))
  raw, _ = eva_optax.scale_by_eva(0.05, scaling=None).update(
      grads, eva_optax.scale_by_eva(0.05).init(params), params, curvature=curvature)
  tx = eva_optax.scale_by_eva(0.05, scaling="kl_normalize")
  normalized, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  total = sum(jnp.vdot(v, g) for v, g in zip(jax.tree.leaves(raw), jax.tree.leaves(grads)))
  for got, v in zip(jax.tree.leaves(normalized), jax.tree.leaves(raw)):
    np.testing.assert_allclose(got, v / jnp.sqrt(total), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lr,kappa", [(1e-3, 1.0), (10.0, 1e-4), (0.3, 1e-3)])
def test_trust_region_is_the_sgd_step_on_v_shrunk_to_the_kl_radius(lr, kappa):
  """ν = min(1, √κ / (η √Σ⟨V, Ĝ⟩)) on the unscaled direction V: a small step passes unchanged
  (the first row), a long one is cut to √κ (the second)."""
  params, grads, curvature = _setup(Mlp(), (5,))
  raw, _ = eva_optax.scale_by_eva(0.05, scaling=None).update(
      grads, eva_optax.scale_by_eva(0.05).init(params), params, curvature=curvature)
  tx = eva_optax.scale_by_eva(0.05, scaling="trust_region", kl_clip=kappa, learning_rate=lr)
  clipped, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  total = float(sum(jnp.vdot(v, g) for v, g in zip(jax.tree.leaves(raw),
                                                   jax.tree.leaves(grads))))
  nu = min(1.0, np.sqrt(kappa) / (lr * np.sqrt(total)))
  assert (nu == 1.0) == (lr * np.sqrt(total) <= np.sqrt(kappa))
  for got, v in zip(jax.tree.leaves(clipped), jax.tree.leaves(raw)):
    np.testing.assert_allclose(got, nu * v, rtol=1e-5, atol=1e-8)


def _reference_iclr_step(x, labels, params, lr, gamma_ref, kappa):
  """One step of the ICLR reference (PyTorch conventions): ḡ_ref from the mean loss's output
  gradient averaged over rows (so it carries 1/B), Ṽ = (Ĝ − …)/γ_ref, KL clip with η²."""
  eps_shapes = {"Dense_0": (x.shape[0], 6), "Dense_1": (x.shape[0], 4)}

  def explicit(p, eps):
    h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"] + eps["Dense_0"]
    out = jnp.tanh(h) @ p["Dense_1"]["kernel"] + eps["Dense_1"]
    return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean(), jnp.tanh(h)

  zeros = {k: jnp.zeros(v) for k, v in eps_shapes.items()}
  (_, hidden), (grads, dy) = jax.value_and_grad(explicit, argnums=(0, 1), has_aux=True)(
      params, zeros)
  inputs = {"Dense_0": jnp.append(x.mean(0), 1.0), "Dense_1": hidden.mean(0)}
  directions, vg_sum = {}, 0.0
  for name in ("Dense_0", "Dense_1"):
    a, g_ref = inputs[name], dy[name].mean(0)
    G = layers.to_matrix(grads[name])
    coef = (a @ G @ g_ref) / (jnp.sum(a * a) * jnp.sum(g_ref * g_ref) + gamma_ref)
    directions[name] = (G - coef * jnp.outer(a, g_ref)) / gamma_ref
    vg_sum += jnp.sum(directions[name] * G) * lr ** 2
  nu = jnp.minimum(1.0, jnp.sqrt(kappa / vg_sum))
  return {k: -lr * nu * v for k, v in directions.items()}, nu


@pytest.mark.parametrize("lr", [0.1, 1e-5])
def test_kl_clip_reproduces_one_reference_step(lr):
  batch, gamma_ref, kappa = 128, 0.03, 1e-3
  x = jax.random.normal(jax.random.key(3), (batch, 5))
  labels = jnp.arange(batch) % 4
  params = Mlp().init(jax.random.key(1), x)["params"]
  want, nu = _reference_iclr_step(x, labels, params, lr, gamma_ref, kappa)

  def loss_fn(p, x):
    return optax.softmax_cross_entropy_with_integer_labels(
        Mlp().apply({"params": p}, x), labels).mean()

  (_, grads), curvature = eva_optax.flax.value_and_grad(
      loss_fn, statistics="kronecker_vectors")(params, x)
  tx = eva_optax.eva(lr, damping=gamma_ref * batch ** 2, damping_mode="absolute",
                     scaling="kl_clip", kl_clip=kappa, batch_size=batch)
  updates, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  assert (nu < 1.0) == (lr == 0.1)  # one case clips, the other does not
  for name in want:
    np.testing.assert_allclose(layers.to_matrix(updates[name]), want[name],
                               rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want[name]))))


def test_kl_clip_uses_the_schedule_value_at_the_step_count():
  params, grads, curvature = _setup(Mlp(), (5,))
  schedule = optax.linear_schedule(1.0, 0.01, 3)
  kw = dict(damping_mode="absolute", scaling="kl_clip")
  with_schedule = eva_optax.scale_by_eva(1.0, learning_rate=schedule, **kw)
  state = with_schedule.init(params)
  for step in range(3):
    updates, state = with_schedule.update(grads, state, params, curvature=curvature)
    constant = eva_optax.scale_by_eva(1.0, learning_rate=schedule(step), **kw)
    cstate = constant.init(params)._replace(count=jnp.asarray(step, jnp.int32),
                                            stats=state.stats)
    want, _ = constant.update(grads, cstate, params, curvature=curvature)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6)


def test_running_average_first_step_takes_new_then_weights_new_by_stat_decay():
  params = {"d": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = eva_optax.scale_by_eva(1.0, stat_decay=0.95)
  state = tx.init(params)
  first = {"d": KroneckerVectors(jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, -1.0]))}
  second = {"d": KroneckerVectors(jnp.array([3.0, 0.0, 1.0]), jnp.array([0.0, 2.0]))}
  _, state = tx.update(grads, state, params, curvature=first)
  np.testing.assert_allclose(state.stats["d"].a, first["d"].a)
  _, state = tx.update(grads, state, params, curvature=second)
  np.testing.assert_allclose(state.stats["d"].a, 0.95 * second["d"].a + 0.05 * first["d"].a)
  np.testing.assert_allclose(state.stats["d"].g, 0.95 * second["d"].g + 0.05 * first["d"].g)
  assert state.stats["d"].a.dtype == jnp.float32


def test_non_finite_statistics_leave_the_running_average_intact():
  params = {"d": {"kernel": jnp.zeros((3, 2))}}
  grads = {"d": {"kernel": jnp.ones((3, 2))}}
  tx = eva_optax.scale_by_eva(1.0)
  good = {"d": KroneckerVectors(jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, -1.0]))}
  bad = {"d": KroneckerVectors(jnp.array([1.0, jnp.nan, 3.0]), jnp.array([1.0, -1.0]))}
  _, state = tx.update(grads, tx.init(params), params, curvature=good)
  _, after = jax.jit(tx.update)(grads, state, params, curvature=bad)
  np.testing.assert_array_equal(after.stats["d"].a, state.stats["d"].a)
  np.testing.assert_array_equal(after.stats["d"].g, state.stats["d"].g)


def test_uncaptured_parameters_pass_through_unchanged():
  params = {"d": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
            "other": {"kernel": jnp.ones((2, 2))}, "scale": jnp.ones(4)}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  curvature = {"d": KroneckerVectors(jnp.ones(3), jnp.ones(2))}
  tx = eva_optax.scale_by_eva(1.0, scaling=None)
  updates, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  np.testing.assert_array_equal(updates["other"]["kernel"], grads["other"]["kernel"])
  np.testing.assert_array_equal(updates["scale"], grads["scale"])
  assert not np.allclose(updates["d"]["kernel"], grads["d"]["kernel"])


def test_gradient_along_rank_one_direction_is_removed_by_the_bounded_fraction():
  # Ĝ = ā ḡᵀ exactly: relative damping removes signal/(signal + λ·signal) = 1/(1+λ) of it.
  a, g = jnp.array([1.0, 2.0, 0.5]), jnp.array([0.3, -1.0])
  params = {"d": {"kernel": jnp.zeros((3, 2))}}
  grads = {"d": {"kernel": jnp.outer(a, g)}}
  tx = eva_optax.scale_by_eva(1e-6, damping_mode="relative", relative_damping=0.5, scaling=None)
  updates, state = tx.update(grads, tx.init(params), params,
                             curvature={"d": KroneckerVectors(a, g)})
  np.testing.assert_allclose(updates["d"]["kernel"], grads["d"]["kernel"] * (1 - 1 / 1.5),
                             rtol=1e-5)
  diag = eva_optax.eva_diagnostics(grads, state.stats, damping=1e-6, relative_damping=0.5)
  np.testing.assert_allclose(diag["d"]["removed_fraction"], 1 / 1.5, rtol=1e-5)
  np.testing.assert_allclose(diag["d"]["signal_to_damping"], 2.0, rtol=1e-5)


# --- bad input ---------------------------------------------------------------------------------

def _tiny():
  params = {"d": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  return params, jax.tree.map(jnp.ones_like, params)


def test_missing_curvature_raises():
  params, grads = _tiny()
  tx = eva_optax.eva(0.1)
  with pytest.raises(ValueError, match="needs the captured statistics"):
    tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("curvature,error,match", [
    ({"nope": KroneckerVectors(jnp.ones(3), jnp.ones(2))}, ValueError, "'nope'.*no 'nope/kernel'"),
    ({"params": {"d": KroneckerVectors(jnp.ones(3), jnp.ones(2))}}, ValueError,
     r"variables\['params'\]"),
    ({"d": KroneckerVectors(jnp.ones(4), jnp.ones(2))}, ValueError,
     r"curvature\['d'\].a has shape \(4,\).*has \(3,\).*layouts"),
    ({}, ValueError, "covers none of the parameters' kernels"),
    ({"d": KroneckerVectors(jnp.ones(3, jnp.int32), jnp.ones(2))}, TypeError, "floating"),
    ({"d": (jnp.ones(3), jnp.ones(2))}, TypeError, "needs KroneckerVectors"),
])
def test_mismatched_curvature_raises_naming_the_layer(curvature, error, match):
  params, grads = _tiny()
  tx = eva_optax.eva(0.1)
  with pytest.raises(error, match=match):
    jax.jit(tx.update)(grads, tx.init(params), params, curvature=curvature)


@pytest.mark.parametrize("kwargs,match", [
    ({"damping": 0.0}, "damping must be > 0"),
    ({"damping": -1.0}, "damping must be > 0"),
    ({"damping_mode": "adaptive"}, "damping_mode"),
    ({"relative_damping": -0.1}, "relative_damping"),
    ({"scaling": "kl"}, "scaling"),
    ({"scaling": "kl_clip", "damping_mode": "absolute", "kl_clip": 0.0}, "kl_clip must be > 0"),
    ({"scaling": "kl_clip"}, "needs damping_mode='absolute'"),
    ({"scaling": "trust_region", "kl_clip": -1.0}, "kl_clip must be > 0"),
])
def test_bad_hyperparameters_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    eva_optax.eva(0.1, **kwargs)


def test_kl_clip_without_learning_rate_raises():
  with pytest.raises(ValueError, match="learning_rate"):
    eva_optax.scale_by_eva(1.0, damping_mode="absolute", scaling="kl_clip")
  with pytest.raises(ValueError, match="learning_rate"):
    eva_optax.scale_by_eva(1.0, scaling="trust_region")
