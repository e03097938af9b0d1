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
@pytest.mark.parametrize("relative_damping", [0.01, 1.0])
@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2), (2, 3, 2, 3)])
def test_equals_the_dense_definition(shape, relative_damping, beta2):
  rng = np.random.default_rng(len(shape))
  # A shared rank-one component with nonzero means, so that the projection removes a sizeable
  # part of G.
  base = 2.0 * functools.reduce(np.multiply.outer, [1 + np.abs(rng.normal(size=d)) for d in shape])
  grads = [(base + 0.5 * rng.normal(size=shape)).astype(np.float32) for _ in range(3)]
  g64 = [g.astype(np.float64) for g in grads]
  vectors = _dense_vectors(g64, beta2)
  damping = relative_damping * np.prod([v @ v for v in vectors])
  tx = eva_optax.scale_by_eva_s(damping, beta2=beta2)
  state = tx.init({"w": jnp.zeros(shape)})
  update = jax.jit(tx.update)
  for g in grads:
    out, state = update({"w": jnp.asarray(g)}, state)
  for got, want in zip(state.stats["w"], vectors):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  want = _dense_direction(g64[-1], vectors, damping)
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
