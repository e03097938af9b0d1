"""Eva-s against its dense definition γ (⊗ v_i v_iᵀ + γI)⁻¹ vec(G), rescaled to ‖G‖."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax


def _dense_direction(grad, vectors, damping):
  """Explicit Kronecker product and a dense solve, float64 (C-order vec matches ⊗ order)."""
  factor = functools.reduce(np.kron, [np.outer(v, v) for v in vectors])
  solved = damping * np.linalg.solve(factor + damping * np.eye(grad.size), grad.ravel())
  return (solved * np.linalg.norm(grad) / np.linalg.norm(solved)).reshape(grad.shape)


def _dense_vectors(grads, beta2):
  w = 1.0 if beta2 == 1 else 1.0 - beta2
  vectors = [np.zeros(d) for d in grads[0].shape]
  for g in grads:
    for i in range(g.ndim):
      mean = g.mean(axis=tuple(a for a in range(g.ndim) if a != i))
      vectors[i] = beta2 * vectors[i] + w * mean
  return vectors


@pytest.mark.parametrize("beta2", [1.0, 0.9])
# γ relative to μ = Π‖v_i‖², so that the float64 reference solve stays well conditioned
# (κ(F̃ + γI) = 1 + μ/γ ≤ 101); an absolute γ ≪ μ would make the reference itself inexact.
# In "relative" mode with λ = 0.5 the floor γ = 0.01μ is lifted to γ_eff = 0.5μ.
@pytest.mark.parametrize("relative_damping,mode", [(0.01, "absolute"), (1.0, "absolute"),
                                                   (0.01, "relative")])
@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2), (2, 3, 2, 3)])
def test_equals_the_dense_definition(shape, relative_damping, mode, beta2):
  rng = np.random.default_rng(len(shape))
  # A shared rank-one component with nonzero means, so that the projection removes a sizeable
  # part of G.
  base = 2.0 * functools.reduce(np.multiply.outer, [1 + np.abs(rng.normal(size=d)) for d in shape])
  grads = [(base + 0.5 * rng.normal(size=shape)).astype(np.float32) for _ in range(3)]
  g64 = [g.astype(np.float64) for g in grads]
  vectors = _dense_vectors(g64, beta2)
  damping = relative_damping * np.prod([v @ v for v in vectors])
  tx = eva_optax.scale_by_eva_s(damping, damping_mode=mode, beta2=beta2)
  state = tx.init({"w": jnp.zeros(shape)})
  update = jax.jit(tx.update)
  for g in grads:
    out, state = update({"w": jnp.asarray(g)}, state)
  for got, want in zip(state.stats["w"], vectors):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  mu = np.prod([v @ v for v in vectors])
  want = _dense_direction(g64[-1], vectors, max(damping, 0.5 * mu) if mode == "relative"
                          else damping)
  # The correction is not a no-op here (else the test could not fail on it) …
  assert np.linalg.norm(want - g64[-1]) > 0.02 * np.linalg.norm(g64[-1])
  # … and float32 reductions over ≤ 36 entries agree with the float64 solve to ~1e-6 relative.
  np.testing.assert_allclose(out["w"], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_rank_one_or_less_passes_through():
  params = {"b": jnp.zeros(5), "s": jnp.zeros(())}
  grads = {"b": jnp.arange(5.0), "s": jnp.asarray(3.0)}
  tx = eva_optax.scale_by_eva_s()
  out, state = jax.jit(tx.update)(grads, tx.init(params))
  for k in params:
    np.testing.assert_array_equal(out[k], grads[k])
    assert state.stats[k] == ()


def test_gradient_only_ignores_extra_arguments_and_keeps_dtypes():
  params = {"w": jnp.zeros((4, 3), jnp.bfloat16)}
  grads = {"w": jnp.ones((4, 3), jnp.bfloat16)}
  tx = optax.chain(eva_optax.eva_s(0.1), optax.scale(1.0))
  out, state = tx.update(grads, tx.init(params), params, curvature=None, other=1)
  assert out["w"].dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state[0][0].stats))


def test_state_is_two_percent_of_shampoo():
  params = {"w": jnp.zeros((512, 256)), "c": jnp.zeros((3, 3, 64, 128))}
  bytes_of = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  small = bytes_of(eva_optax.scale_by_eva_s().init(params))
  large = bytes_of(eva_optax.scale_by_shampoo().init(params))
  assert small <= 0.02 * large, (small, large)


@pytest.mark.parametrize("kwargs,match", [({"damping": 0.0}, "damping must be > 0"),
                                          ({"beta2": -0.1}, r"beta2 must lie in \[0, 1\]")])
def test_bad_hyperparameters_are_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    eva_optax.eva_s(0.1, **kwargs)


# --- bad numbers (issue 15) -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3), (3, 1)])
def test_a_gradient_along_the_running_vector_is_kept_not_lost_in_cancellation(shape):
  # A [1, n] kernel (or a Dense(1) head, [n, 1]): G is always along v₀∘v₁, so the absolute
  # correction removes all but γ/(γ+μ) ~ 1e-7 of it and float32 leaves rounding noise (was
  # [[-2.77, 22.19, 0]], then [[0, 0, 0]]). With the removed fraction bounded by 2/3 the kept
  # third dominates the rounding: the rescale to ‖G‖ gives G itself (float64: exactly G).
  grad = jnp.asarray([-4.0, 22.0, 0.0]).reshape(shape)
  tx = eva_optax.scale_by_eva_s()
  state = tx.init({"w": jnp.zeros(shape)})
  for _ in range(3):
    out, state = jax.jit(tx.update)({"w": grad}, state)
    np.testing.assert_allclose(out["w"], grad, rtol=1e-6, atol=0)


def _quadratic_distance(steps, **kwargs):
  target = jnp.asarray([[1.0, -2.0], [3.0, 0.5]])
  loss = lambda p: jnp.sum((p - target) ** 2)
  tx = eva_optax.eva_s(0.01, **kwargs)

  def body(carry, _):
    p, state = carry
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return (optax.apply_updates(p, updates), state), None

  p = jnp.zeros((2, 2))
  (p, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))((p, tx.init(p)))
  return float(jnp.linalg.norm(p - target))


def test_the_component_along_the_running_vector_keeps_training_with_running_sums():
  # β₂ = 1: μ = Π‖v_i‖² grows with every step. Absolute damping removes the component along
  # v₀v₁ᵀ entirely and P stalls far from P* (measured 2.06 after 500 steps, 3.0 after 30k);
  # the default relative damping keeps ≥ 1/3 of it and converges to float32 resolution
  # (measured 5e-7 after 500 steps).
  assert _quadratic_distance(500) < 1e-5
  assert _quadratic_distance(500, damping_mode="absolute") > 1.0


def _random_grad(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(4, 3)) + 1.0, jnp.float32)


@pytest.mark.parametrize("scale", [1e15, 1e30])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_huge_finite_gradients_give_the_rescaled_finite_update(scale, mode):
  # The direction is homogeneous of degree 1 in G at fixed μ/γ: v scales with G, so with γ
  # tiny against μ (μ/γ ≥ 1e6 here, r = 1/(1+λ) or 1 − 1e-6) the update of c·G is c times the
  # update of G. Before: Π‖v_i‖² overflowed for c ≥ 1e15 and the update was NaN for good.
  # On the first step, which accepts a gradient of any finite scale (later, a jump of c > 1e6
  # is skipped: test_a_huge_gradient_is_skipped_whole_and_the_run_continues_as_without_it).
  grad = _random_grad()
  tx = eva_optax.scale_by_eva_s(1e-12, damping_mode=mode)
  state = tx.init({"w": grad})
  small, _ = tx.update({"w": grad}, state)
  huge, state = tx.update({"w": scale * grad}, state)
  assert int(state.count) == 1
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in state.stats["w"])
  np.testing.assert_allclose(huge["w"] / scale, small["w"], rtol=1e-5, atol=1e-6)


def _eva_s_run(factors):
  """Parameters and state after one jitted eva_s step (momentum 0.9, weight decay) per
  gradient factor, on a fixed random gradient."""
  tx = eva_optax.eva_s(0.01, weight_decay=1e-2)
  params = {"w": jnp.ones((4, 3))}

  @jax.jit
  def step(params, state, factor):
    updates, state = tx.update({"w": factor * _random_grad()}, state, params)
    return optax.apply_updates(params, updates), state, updates

  state, updates = tx.init(params), []
  for factor in factors:
    params, state, update = step(params, state, jnp.float32(factor))
    updates.append(update["w"])
  return params, state, updates


@pytest.mark.parametrize("value", [1e30, -1e30])
def test_a_huge_gradient_is_skipped_whole_and_the_run_continues_as_without_it(value):
  # Before: a finite ±1e30 gradient took a ±1e30-sized step. Now it jumps past 1e6 × the
  # running scale: zero update, every state entry kept (the momentum trace included), so the
  # run goes on exactly as if the step had not happened; only the running scale rose (10×,
  # averaged back down since).
  clean = _eva_s_run([1.0] * 5)
  hit = _eva_s_run([1.0, 1.0, value, 1.0, 1.0, 1.0])
  assert not np.any(hit[2][2])
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(hit[:2])[0],
                               jax.tree.leaves(clean[:2])):
    if "grad_scale" in jax.tree_util.keystr(path):
      assert want < got < 10 * want
    else:
      np.testing.assert_array_equal(got, want)


def test_a_gradient_growing_tenfold_per_step_is_followed_not_skipped():
  # 10× per step for 8 steps (1e7 in all, past the 1e6 factor): the running scale follows, so
  # every step counts and moves the parameters.
  _, state, updates = _eva_s_run([10.0 ** k for k in range(8)])
  assert int(state[0].count) == 8
  assert all(np.all(np.isfinite(u)) and np.any(u) for u in updates)


def test_a_non_finite_gradient_leaves_the_vectors_and_later_updates_clean():
  grads = [jnp.asarray(np.random.default_rng(i).normal(size=(4, 3)) + 1.0, jnp.float32)
           for i in range(3)]
  tx = eva_optax.scale_by_eva_s()
  update = jax.jit(tx.update)
  _, clean = update({"w": grads[0]}, tx.init({"w": grads[0]}))
  for bad in (jnp.nan, jnp.inf):
    out, state = update({"w": grads[1].at[0, 0].set(bad)}, clean)
    assert not bool(jnp.all(jnp.isfinite(out["w"])))  # visible to optax.apply_if_finite
    for got, kept in zip(state.stats["w"], clean.stats["w"]):
      np.testing.assert_array_equal(got, kept)
    np.testing.assert_array_equal(update({"w": grads[2]}, state)[0]["w"],
                                  update({"w": grads[2]}, clean)[0]["w"])
