"""Inverse p-th roots (eva_optax.linalg) against NumPy's float64 eigendecomposition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_optax import linalg

EPS = linalg.RIDGE_EPSILON
U32 = 2.0 ** -24  # float32 unit roundoff


def _spd(n, condition, seed):
  """Random SPD matrix with eigenvalues log-spaced from 1 down to 1/condition."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return (q * np.logspace(0, -np.log10(condition), n)) @ q.T


def _reference(a, p, eps=EPS):
  """(A + ε λ_max I)^{-1/p} in float64."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * (w + eps * w[-1]) ** (-1.0 / p)) @ v.T


def _relative_error(got, want):
  return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()


_newton = jax.jit(linalg.inverse_pth_root, static_argnums=1)


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("n", [3, 16, 64])
def test_coupled_newton_matches_eigh_in_float32(n, p):
  for condition in (1.0, 1e2, 1e4, 1e6):
    a = _spd(n, condition, seed=n)
    result = _newton(jnp.asarray(a, jnp.float32), p)
    assert result.root.dtype == jnp.float32
    # Rounding A to float32 perturbs its eigenvalues by ~u·λ_max, i.e. λ_min by a relative
    # u·κ (κ = 1/(1/condition + ε) after the ridge), and the root maps a relative change δ of
    # an eigenvalue to δ/p: bound u·κ/p (floor 2e-5 for κ ≈ 1). Measured: 1.5e-3 at κ = 5e5,
    # p = 2 (bound 1.5e-2); ≤ 4e-6 at κ ≤ 100.
    kappa = 1.0 / (1.0 / condition + EPS)
    error = _relative_error(result.root, _reference(a, p))
    assert error < max(2e-5, U32 * kappa / p), (condition, error)
    # The iteration's own residual max|M − I| reached float32 noise (a few ulps of 1).
    assert float(result.residual) < 1e-5, condition


@pytest.mark.parametrize("n,condition,p", [(16, 1e6, 2), (64, 1e6, 4), (64, 1e4, 8),
                                           (32, 1.0, 2)])
def test_coupled_newton_reaches_its_tolerance_in_float64(n, condition, p):
  a = _spd(n, condition, seed=1)
  with jax.enable_x64(True):
    result = linalg.inverse_pth_root(jnp.asarray(a), p)
    assert result.root.dtype == jnp.float64
    # Stops at max|M − I| ≤ 1e-6; X = A^{-1/p} M^{1/p}·(…) so X's relative error ≈ ‖M − I‖/p,
    # well inside 2e-6 (a float32 computation would miss this by orders of magnitude at 1e6).
    assert float(result.residual) <= linalg.NEWTON_TOLERANCE
    assert _relative_error(result.root, _reference(a, p)) < 2e-6
    eigh = linalg.inverse_pth_root_eigh(jnp.asarray(a), p)
    assert _relative_error(eigh.root, _reference(a, p)) < 1e-10


@pytest.mark.parametrize("p", [2, 4])
def test_eigh_root_in_float32(p):
  a = _spd(32, 1e2, seed=3)
  result = linalg.inverse_pth_root_eigh(jnp.asarray(a, jnp.float32), p)
  assert result.root.dtype == jnp.float32
  assert _relative_error(result.root, _reference(a, p)) < 2e-5
  assert float(result.residual) < 1e-4


def test_vmapped_batch_equals_one_at_a_time():
  stack = np.stack([_spd(8, c, seed=i) for i, c in enumerate((1.0, 1e3, 1e6))])
  batched = jax.vmap(lambda m: linalg.inverse_pth_root(m, 4))(jnp.asarray(stack, jnp.float32))
  for i in range(3):
    single = linalg.inverse_pth_root(jnp.asarray(stack[i], jnp.float32), 4)
    np.testing.assert_allclose(batched.root[i], single.root, rtol=1e-5, atol=1e-6)


def test_input_is_symmetrized():
  a = _spd(8, 1e2, seed=4)
  skew = np.triu(np.ones((8, 8)), 1) * 1e-3
  skewed = linalg.inverse_pth_root(jnp.asarray(a + skew - skew.T, jnp.float32), 2)
  clean = linalg.inverse_pth_root(jnp.asarray(a, jnp.float32), 2)
  np.testing.assert_allclose(skewed.root, clean.root, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(skewed.root, skewed.root.T)


def test_zero_matrix_gives_a_finite_root():
  result = linalg.inverse_pth_root(jnp.zeros((4, 4)), 2)
  assert np.all(np.isfinite(result.root))


@pytest.mark.parametrize("method", ["newton", "eigh"])
@pytest.mark.parametrize("bad", ["nan", "indefinite"])
def test_failed_root_keeps_the_previous_one(method, bad):
  previous = jnp.full((2, 4, 4), 7.0)
  good = _spd(4, 10.0, seed=5)
  if bad == "nan":
    bad_matrix = good.copy()
    bad_matrix[0, 0] = np.nan
  else:  # the iteration diverges / the eigenvalues are negative: residual ≫ 0.1
    bad_matrix = -good
  stack = jnp.asarray(np.stack([good, bad_matrix]), jnp.float32)
  root_fn = linalg.inverse_pth_root if method == "newton" else linalg.inverse_pth_root_eigh
  result = jax.vmap(lambda m: root_fn(m, 2))(stack)
  assert not (float(result.residual[1]) <= linalg.FAILURE_THRESHOLD)  # NaN or large
  chosen = linalg.select_root(result, previous)
  np.testing.assert_allclose(chosen[0], _reference(good, 2), rtol=1e-4)
  np.testing.assert_array_equal(chosen[1], previous[1])


def test_residual_above_threshold_keeps_the_previous_root():
  a = jnp.asarray(_spd(16, 1e4, seed=6), jnp.float32)
  early = linalg.inverse_pth_root(a, 4, max_iterations=2)  # stopped far from convergence
  assert float(early.residual) > linalg.FAILURE_THRESHOLD
  previous = jnp.eye(16)
  np.testing.assert_array_equal(linalg.select_root(early, previous), previous)


def test_power_iteration_finds_the_largest_eigenvalue():
  a = _spd(32, 1e3, seed=7) * 5.0
  np.testing.assert_allclose(float(linalg.power_iteration(jnp.asarray(a, jnp.float32))), 5.0,
                             rtol=1e-4)


@pytest.mark.parametrize("p", [0, -2, 2.0, True])
def test_bad_root_order_is_an_error(p):
  with pytest.raises(ValueError, match="root order p must be a positive Python int"):
    linalg.inverse_pth_root(jnp.eye(3), p)


@pytest.mark.parametrize("method", ["newton", "eigh"])
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_a_finite_matrix_of_any_scale_gets_its_root(method, scale):
  # (cA)^{-1/p} = c^{-1/p} A^{-1/p}. Before the max-abs scaling, c = 1e30 overflowed ‖A‖_F
  # and the power iteration into a NaN root, which select_root discarded at every refresh
  # (Shampoo statistics after one huge gradient: roots frozen for good).
  a = _spd(8, 1e3, 3)
  p = 4
  got = linalg.batched_inverse_pth_root(jnp.asarray(scale * a[None], jnp.float32), p,
                                        method=method)
  assert float(got.residual[0]) < 1e-3
  # float32 root of a κ = 1e3 matrix: ~κ·u ≈ 6e-5 of its largest entry, as unscaled.
  np.testing.assert_allclose(np.asarray(got.root[0], np.float64) * scale ** (1 / p),
                             _reference(a, p), rtol=0, atol=1e-4 * np.abs(_reference(a, p)).max())
