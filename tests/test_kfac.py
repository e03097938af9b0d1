"""K-FAC, FOOF and Eva-f: captured factors against explicit per-example computations, updates
against their dense definitions, the inverse refresh schedule and its fallback, the sampled
Fisher, and errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from eva_optax import collectors
from eva_optax.kfac import damped_inverse, factored_damping
from test_capture import _im2col

# Factor entries are float32 sums of O(100) products of O(1) terms: ~1e-6 relative error.
RTOL, ATOL = 1e-5, 1e-6


def _per_example_loss(y):
  """ℓ_i of one example's output: nonlinear, so output gradients differ between rows."""
  return jnp.sum(jnp.sin(y) * y)


def _capture(model, params, x, statistics="kronecker_factors", **kwargs):
  def loss_fn(p, x):
    return jnp.mean(jax.vmap(_per_example_loss)(model.apply({"params": p}, x)))
  return eva_optax.flax.value_and_grad(loss_fn, statistics=statistics, **kwargs)(params, x)


def _with_ones(rows, use_bias):
  return np.concatenate([rows, np.ones((len(rows), 1))], 1) if use_bias else rows


def _explicit_factors(rows, output, use_bias):
  """A = mean over rows of [a,1][a,1]ᵀ; G = mean_i Σ_t g gᵀ with g = ∂ℓ_i/∂y (per example)."""
  rows = _with_ones(np.asarray(rows, np.float64), use_bias)
  per_example = np.asarray(jax.vmap(jax.grad(_per_example_loss))(output), np.float64)
  g = per_example.reshape(-1, per_example.shape[-1])
  return rows.T @ rows / len(rows), g.T @ g / output.shape[0]


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("x_shape", [(6, 5), (4, 3, 5)])  # batch; batch × sequence
def test_dense_factors_match_per_example_gradients(use_bias, x_shape):
  x = jax.random.normal(jax.random.key(0), x_shape)
  model = nn.Dense(4, use_bias=use_bias)
  params = model.init(jax.random.key(1), x)["params"]
  _, stats = _capture(model, params, x)
  a, g = _explicit_factors(x.reshape(-1, 5), model.apply({"params": params}, x), use_bias)
  np.testing.assert_allclose(stats.a, a, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(stats.g, g, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("kernel_size,strides,padding", [
    ((3, 3), (2, 2), "SAME"), ((2, 3), (1, 1), "VALID"), ((3,), (1,), "SAME")])
def test_conv_factors_match_explicit_im2col_and_per_example_gradients(use_bias, kernel_size,
                                                                     strides, padding):
  rank = len(kernel_size)
  x = jax.random.normal(jax.random.key(0), (3,) + (7, 6)[:rank] + (2,))
  model = nn.Conv(4, kernel_size, strides=strides, padding=padding, use_bias=use_bias)
  params = model.init(jax.random.key(1), x)["params"]
  _, stats = _capture(model, params, x)
  patches = _im2col(x, kernel_size, strides, padding)
  rows = patches.reshape(-1, np.prod(kernel_size) * 2)
  # Positions are averaged in A and summed (per example) in G: the KFC convention.
  a, g = _explicit_factors(rows, model.apply({"params": params}, x), use_bias)
  np.testing.assert_allclose(stats.a, a, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(stats.g, g, rtol=RTOL, atol=ATOL)


def test_several_statistics_at_once_agree_and_each_optimizer_picks_its_own():
  x = jax.random.normal(jax.random.key(0), (8, 5))
  model = nn.Dense(4)
  params = model.init(jax.random.key(1), x)["params"]
  statistics = ("kronecker_vectors", "kronecker_factors", "activation_factor",
                "activation_vector")
  (_, grads), curvature = _capture(model, params, x, statistics=statistics)
  assert set(curvature) == set(statistics)
  vectors, factors = curvature["kronecker_vectors"], curvature["kronecker_factors"]
  np.testing.assert_allclose(factors.a[-1, :-1], vectors.a, rtol=RTOL, atol=ATOL)  # [ā, 1]
  np.testing.assert_array_equal(curvature["activation_factor"].a, factors.a)
  np.testing.assert_array_equal(curvature["activation_vector"].a, vectors.a)
  for tx in (eva_optax.eva(0.1), eva_optax.kfac(0.1), eva_optax.foof(0.1), eva_optax.eva_f(0.1)):
    updates, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
    assert all(jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates))
  with pytest.raises(ValueError, match="needs 'kronecker_factors'"):
    tx = eva_optax.kfac(0.1)
    tx.update(grads, tx.init(params), params,
              curvature={"kronecker_vectors": curvature["kronecker_vectors"]})


# --- updates against dense definitions -------------------------------------------------------


class _Model(nn.Module):
  use_bias: bool

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Conv(3, (2, 2), strides=2, use_bias=self.use_bias, name="conv")(x))
    return nn.Dense(4, use_bias=self.use_bias, name="dense")(x.reshape(x.shape[0], -1))


def _one_step(tx, statistics, use_bias):
  x = jax.random.normal(jax.random.key(0), (16, 6, 6, 2))
  model = _Model(use_bias)
  params = model.init(jax.random.key(1), x)["params"]
  (_, grads), curvature = _capture(model, params, x, statistics=statistics)
  updates, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  return grads, curvature, updates


def _matrix(tree):
  return np.asarray(eva_optax.layers.to_matrix(tree), np.float64)


def _assert_matrix_close(got, want, rtol):
  """Relative error in the Frobenius norm, so near-zero entries do not dominate."""
  error = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert error < rtol, error


@pytest.mark.parametrize("inverse", ["cholesky", "eigh"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_kfac_update_equals_solving_with_the_damped_kronecker_product(inverse, use_bias):
  damping = 1e-2
  tx = eva_optax.scale_by_kfac(damping, inverse=inverse, scaling=None)
  grads, curvature, updates = _one_step(tx, "kronecker_factors", use_bias)
  for name in ("conv", "dense"):
    a = np.asarray(curvature[name].a, np.float64)
    g = np.asarray(curvature[name].g, np.float64)
    pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
    damped = np.kron(a + pi * np.sqrt(damping) * np.eye(len(a)),
                     g + np.sqrt(damping) / pi * np.eye(len(g)))
    gradient = _matrix(grads[name])
    want = np.linalg.solve(damped, gradient.ravel()).reshape(gradient.shape)
    # float32 Cholesky/eigh of damped factors with condition numbers ≲ 1e3: error ≲ 1e3·6e-8.
    assert np.linalg.cond(damped) < 2e3
    _assert_matrix_close(_matrix(updates[name]), want, rtol=1e-4)


@pytest.mark.parametrize("use_bias", [True, False])
def test_foof_update_equals_solving_with_the_damped_activation_factor(use_bias):
  damping = 1e-2
  tx = eva_optax.scale_by_foof(damping, scaling=None)
  grads, curvature, updates = _one_step(tx, "activation_factor", use_bias)
  for name in ("conv", "dense"):
    a = np.asarray(curvature[name].a, np.float64)
    damped = a + damping * np.eye(len(a))
    assert np.linalg.cond(damped) < 2e3
    _assert_matrix_close(_matrix(updates[name]),
                         np.linalg.solve(damped, _matrix(grads[name])), rtol=1e-4)


@pytest.mark.parametrize("damping_mode", ["absolute", "relative"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_eva_f_update_equals_the_damped_rank_one_solve(damping_mode, use_bias):
  damping, relative = 0.3, 0.5
  tx = eva_optax.scale_by_eva_f(damping, damping_mode=damping_mode, relative_damping=relative,
                                scaling=None)
  grads, curvature, updates = _one_step(tx, "activation_vector", use_bias)
  for name in ("conv", "dense"):
    a = np.asarray(curvature[name].a, np.float64)
    a = np.append(a, 1.0) if use_bias else a
    gamma = damping if damping_mode == "absolute" else max(damping, relative * a @ a)
    want = gamma * np.linalg.solve(np.outer(a, a) + gamma * np.eye(len(a)),
                                   _matrix(grads[name]))
    # Sherman–Morrison in float32 on a well-conditioned rank-one update: ~1e-6 relative.
    _assert_matrix_close(_matrix(updates[name]), want, rtol=1e-5)


def test_kl_clip_scales_the_kfac_direction_to_the_trust_region():
  lr, kappa = 0.5, 1e-4
  unscaled = eva_optax.scale_by_kfac(1e-2, scaling=None)
  clipped = eva_optax.scale_by_kfac(1e-2, kl_clip=kappa, learning_rate=lr)
  grads, curvature, directions = _one_step(unscaled, "kronecker_factors", True)
  updates = clipped.update(grads, clipped.init(grads), curvature=curvature)[0]
  total = sum(float(jnp.vdot(d, g)) for d, g in zip(jax.tree.leaves(directions),
                                                   jax.tree.leaves(grads)))
  nu = min(1.0, np.sqrt(kappa / (lr ** 2 * total)))
  assert nu < 1.0  # the clip binds in this configuration
  for u, d in zip(jax.tree.leaves(updates), jax.tree.leaves(directions)):
    np.testing.assert_allclose(u, nu * d, rtol=1e-5, atol=1e-8)


# --- the inverse refresh ----------------------------------------------------------------------


def _spd(key, n):
  m = jax.random.normal(key, (n, n))
  return m @ m.T / n + 0.1 * jnp.eye(n)


@pytest.mark.parametrize("period", [1, 3])
def test_inverses_are_refreshed_exactly_every_period_steps(period):
  params = {"layer": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
  grads = {"layer": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  # stat_decay=1: the running factors are this step's, so each refresh is identifiable.
  tx = eva_optax.scale_by_kfac(0.1, stat_decay=1.0, inverse_update_period=period, scaling=None)
  update = jax.jit(tx.update)
  state = tx.init(params)
  refreshed = None
  for step in range(7):
    factors = eva_optax.KroneckerFactors(_spd(jax.random.key(2 * step), 4),
                                         _spd(jax.random.key(2 * step + 1), 2))
    _, state = update(grads, state, curvature={"layer": factors})
    inverses = state.preconditioner["layer"]
    if step % period == 0:
      damp_a, damp_g = factored_damping(factors.a, factors.g, 0.1)
      want = (np.linalg.inv(factors.a + damp_a * np.eye(4)),
              np.linalg.inv(factors.g + damp_g * np.eye(2)))
      for got, expected in zip(inverses, want):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
      refreshed = inverses
    else:
      for got, kept in zip(inverses, refreshed):
        np.testing.assert_array_equal(got, kept)


def test_a_failed_inverse_keeps_the_previous_one_and_the_update_stays_finite():
  params = {"layer": {"kernel": jnp.zeros((3, 2))}}
  grads = {"layer": {"kernel": jnp.ones((3, 2))}}
  tx = eva_optax.scale_by_kfac(1e-2, stat_decay=1.0, inverse_update_period=1, scaling=None)
  good = eva_optax.KroneckerFactors(_spd(jax.random.key(0), 3), _spd(jax.random.key(1), 2))
  _, state = tx.update(grads, tx.init(params), curvature={"layer": good})
  # Finite but indefinite: the Cholesky factorization of A + π√γ I fails (NaN).
  bad = good._replace(a=-10.0 * jnp.eye(3))
  updates, new_state = tx.update(grads, state, curvature={"layer": bad})
  np.testing.assert_array_equal(new_state.stats["layer"].a, bad.a)  # the statistics are taken
  for got, kept in zip(new_state.preconditioner["layer"], state.preconditioner["layer"]):
    np.testing.assert_array_equal(got, kept)
  assert jnp.all(jnp.isfinite(updates["layer"]["kernel"]))


# --- sampled Fisher ---------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["softmax_cross_entropy", "sigmoid_cross_entropy",
                                          "squared_error"])
def test_sampled_fisher_changes_g_only_and_is_reproducible(distribution):
  x = jax.random.normal(jax.random.key(0), (32, 5))
  labels = jax.random.randint(jax.random.key(1), (32,), 0, 4)
  model = nn.Sequential([nn.Dense(6), nn.tanh, nn.Dense(4)])
  params = model.init(jax.random.key(2), x)["params"]
  predict = lambda p, x: model.apply({"params": p}, x)
  loss_fn = lambda p, x: optax.softmax_cross_entropy_with_integer_labels(
      predict(p, x), labels).mean()
  empirical = eva_optax.flax.value_and_grad(loss_fn, statistics="kronecker_factors")
  sampled = eva_optax.flax.value_and_grad(
      loss_fn, statistics="kronecker_factors",
      sampled_fisher=eva_optax.flax.SampledFisher(predict, distribution))
  (loss, grads), base = empirical(params, x)
  (loss_s, grads_s), first = sampled(params, x, fisher_rng=jax.random.key(3))
  _, again = sampled(params, x, fisher_rng=jax.random.key(3))
  _, other = sampled(params, x, fisher_rng=jax.random.key(4))
  # The loss and gradients are the data's; only G comes from the sampled labels.
  np.testing.assert_array_equal(loss_s, loss)
  for got, want in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(got, want)
  for layer in base:
    np.testing.assert_allclose(first[layer].a, base[layer].a, rtol=1e-6, atol=1e-7)
    assert not np.allclose(first[layer].g, base[layer].g, rtol=1e-2)
    np.testing.assert_array_equal(first[layer].g, again[layer].g)
    assert not np.allclose(first[layer].g, other[layer].g, rtol=1e-2)


def test_sampled_squared_error_fisher_of_a_linear_output_is_the_noise_covariance():
  """For y = x K + b and ½‖y − t‖² with t ~ N(y, I), g = y − t = −noise: over many examples
  G = mean of g gᵀ → I (d_out × d_out), with Monte-Carlo error ~ 1/√B."""
  x = jax.random.normal(jax.random.key(0), (20000, 3))
  model = nn.Dense(2)
  params = model.init(jax.random.key(1), x)["params"]
  predict = lambda p, x: model.apply({"params": p}, x)
  capture = eva_optax.flax.value_and_grad(
      lambda p, x: jnp.mean(predict(p, x) ** 2), statistics="kronecker_factors",
      sampled_fisher=eva_optax.flax.SampledFisher(predict, "squared_error"))
  _, stats = capture(params, x, fisher_rng=jax.random.key(2))
  np.testing.assert_allclose(stats.g, np.eye(2), atol=0.05)  # 5σ of the mean of 20000 draws


def test_sampled_fisher_errors():
  predict = lambda p, x: x
  with pytest.raises(ValueError, match="distribution must be one of"):
    eva_optax.flax.value_and_grad(lambda p: 0.0, statistics="kronecker_factors",
                                  sampled_fisher=eva_optax.flax.SampledFisher(predict, "poisson"))
  with pytest.raises(ValueError, match="use no output gradients"):
    eva_optax.flax.value_and_grad(
        lambda p: 0.0, statistics="activation_factor",
        sampled_fisher=eva_optax.flax.SampledFisher(predict, "squared_error"))
  capture = eva_optax.flax.value_and_grad(
      lambda p, x: jnp.sum(p["w"] * x), statistics="kronecker_factors",
      sampled_fisher=eva_optax.flax.SampledFisher(predict, "squared_error"))
  with pytest.raises(ValueError, match="needs the keyword fisher_rng"):
    capture({"w": jnp.ones(2)}, jnp.ones(2))


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("factory,kwargs,match", [
    (eva_optax.kfac, {"damping": 0.0}, "damping must be > 0"),
    (eva_optax.kfac, {"inverse_update_period": 0}, "inverse_update_period must be > 0"),
    (eva_optax.kfac, {"inverse": "lu"}, "inverse must be one of"),
    (eva_optax.kfac, {"kl_clip": -1.0}, "kl_clip must be > 0"),
    (eva_optax.foof, {"damping": -1.0}, "damping must be > 0"),
    (eva_optax.foof, {"scaling": "clip"}, "scaling must be one of"),
    (eva_optax.eva_f, {"damping": 0.0}, "damping must be > 0"),
    (eva_optax.eva_f, {"scaling": "kl_clip"}, "kl_normalize' or None"),
    (eva_optax.eva_f, {"damping_mode": "adaptive"}, "damping_mode must be one of"),
])
def test_bad_hyperparameters_raise(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(0.1, **kwargs)


def test_kl_clip_without_learning_rate_raises():
  with pytest.raises(ValueError, match="needs the learning_rate"):
    eva_optax.scale_by_kfac()


def test_wrong_record_type_raises_naming_the_layer():
  params = {"layer": {"kernel": jnp.zeros((3, 2))}}
  tx = eva_optax.kfac(0.1)
  vectors = collectors.KroneckerVectors(jnp.zeros(3), jnp.zeros(2))
  with pytest.raises(TypeError, match=r"curvature\['layer'\] is a KroneckerVectors.*"
                                      "KroneckerFactors"):
    tx.update(params, tx.init(params), params, curvature={"layer": vectors})
  with pytest.raises(ValueError, match=r"curvature\['layer'\].a has shape \(2, 2\)"):
    tx.update(params, tx.init(params), params,
              curvature={"layer": eva_optax.KroneckerFactors(jnp.eye(2), jnp.eye(2))})


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_stacked_refresh_runs_slice_by_slice_on_cpu(method):
  # A layer stack's inverses equal the slices' own; on the CPU they lower to unbatched LAPACK
  # calls in a loop (batched ones can deadlock XLA's 2-thread pool, see damped_inverse).
  x = jax.random.normal(jax.random.key(0), (4, 6, 6))
  stack = x @ jnp.swapaxes(x, 1, 2)
  stacked = jax.jit(jax.vmap(lambda m: damped_inverse(m, 0.1, method)))
  for i in range(4):
    np.testing.assert_allclose(stacked(stack)[i], damped_inverse(stack[i], 0.1, method),
                               rtol=1e-6, atol=1e-6)
  text = stacked.lower(stack).as_text()
  calls = [line for line in text.splitlines() if "lapack_" in line and "custom_call" in line]
  assert calls and all('num_batch_dims = "0"' in line for line in calls), calls
