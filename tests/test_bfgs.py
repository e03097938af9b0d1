"""The BFGS building blocks of K-BFGS (eva_optax.bfgs): secant equation, double damping, positive
definiteness, L-BFGS against dense BFGS, Hessian-action BFGS, skipping of bad pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_optax import bfgs

MU1, MU2 = 0.2, np.sqrt(0.3)  # the paper's Powell μ₁ and Levenberg–Marquardt μ₂ = √λ


def _spd(key, n, scale=1.0):
  m = jax.random.normal(key, (n, n))
  return scale * (m @ m.T / n + 0.1 * jnp.eye(n))


def _pair(key, n):
  ks, ky = jax.random.split(key)
  return jax.random.normal(ks, (n,)), jax.random.normal(ky, (n,))


def test_bfgs_update_satisfies_the_secant_equation_and_stays_symmetric():
  n = 7
  h = _spd(jax.random.key(0), n)
  s, y = _pair(jax.random.key(1), n)
  y = jnp.where(jnp.dot(s, y) > 0, y, -y)  # a pair with positive curvature
  new = bfgs.bfgs_inverse_update(h, s, y)
  # float32: ρ = 1/sᵀy and the products lose ~1e-6 relative; 1e-4 leaves margin, an off-by-one
  # term (e.g. the ρ² yᵀhy factor dropped) misses by O(1).
  np.testing.assert_allclose(new @ y, s, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(new, new.T)
  assert np.min(np.linalg.eigvalsh(np.asarray(new, np.float64))) > 0


def test_powell_damping_alone_gives_the_mu1_bound_for_any_h():
  for i in range(50):
    kh, kp = jax.random.split(jax.random.key(i))
    h = _spd(kh, 6, scale=float(jax.random.uniform(kh, minval=0.1, maxval=20.0)))
    s, y = _pair(kp, 6)
    hy = h @ y
    s_damped = bfgs.powell_damping(s, y, hy, MU1)
    assert float(s_damped @ y) >= MU1 * float(y @ hy) * (1 - 1e-5) - 1e-6
    if float(s @ y) >= MU1 * float(y @ hy):  # already fine: unchanged
      np.testing.assert_array_equal(s_damped, s)


def test_double_damping_gives_both_bounds():
  # sᵀy ≥ μ₂ sᵀs always; sᵀy ≥ μ₁ yᵀHy too when ‖H‖ ≤ 1/μ₁ (bfgs.double_damping's docstring).
  damped_both = 0
  for i in range(100):
    kh, kp = jax.random.split(jax.random.key(i))
    h = _spd(kh, 6)
    h = h / float(np.max(np.linalg.eigvalsh(np.asarray(h)))) / MU1 * 0.99
    s, y = _pair(kp, 6)
    s2, y2 = bfgs.double_damping(s, y, lambda v: h @ v, MU1, MU2)
    sy = float(s2 @ y2)
    assert sy >= MU2 * float(s2 @ s2) * (1 - 1e-5) - 1e-6
    assert sy >= MU1 * float(y2 @ h @ y2) * (1 - 1e-5) - 1e-6
    damped_both += bool(float(s @ y) < 0)
  assert damped_both > 20  # the random pairs did exercise the damping


def test_h_stays_symmetric_positive_definite_over_many_random_pairs():
  n, h = 8, jnp.eye(8)
  accepted = 0
  for i in range(300):
    s, y = _pair(jax.random.key(i), n)
    y = y * float(jax.random.uniform(jax.random.key(1000 + i), minval=-3.0, maxval=3.0))
    s, y = bfgs.double_damping(s, y, lambda v: h @ v, MU1, MU2)
    accept = bfgs.safely_positive(s, y, 1.0)
    accepted += bool(accept)
    h = jnp.where(accept, bfgs.bfgs_inverse_update(h, s, jnp.where(accept, y, s)), h)
    np.testing.assert_array_equal(h, h.T)
    eig = np.linalg.eigvalsh(np.asarray(h, np.float64))
    assert eig.min() > 0 and np.isfinite(eig).all(), (i, eig.min())
  assert accepted > 250


def _accepted_pairs(key, n, count):
  """``count`` doubly damped pairs along a dense BFGS run from I, and that run's H."""
  h, pairs = jnp.eye(n), []
  for i in range(count):
    s, y = _pair(jax.random.fold_in(key, i), n)
    s, y = bfgs.double_damping(s, y, lambda v: h @ v, MU1, MU2)
    assert bfgs.safely_positive(s, y, 1.0)
    pairs.append((s, y))
    h = bfgs.bfgs_inverse_update(h, s, y)
  return pairs, h


@pytest.mark.parametrize("product", [bfgs.lbfgs_product, bfgs.lbfgs_two_loop])
def test_lbfgs_with_enough_memory_equals_dense_bfgs(product):
  n, count = 9, 6
  pairs, h = _accepted_pairs(jax.random.key(3), n, count)
  memory = bfgs.lbfgs_init(n, 10)  # memory ≥ number of pairs; 4 slots stay empty
  for s, y in pairs:
    memory = bfgs.lbfgs_push(memory, s, y, True)
  v = jax.random.normal(jax.random.key(4), (n, 5))
  # Same matrix by two float32 routes: agree to ~1e-5 relative of the product's scale.
  scale = float(jnp.max(jnp.abs(h @ v)))
  np.testing.assert_allclose(product(memory, v), h @ v, atol=1e-4 * scale)
  np.testing.assert_allclose(product(memory, v[:, 0]), h @ v[:, 0], atol=1e-4 * scale)


def test_lbfgs_keeps_only_the_newest_pairs_and_skips_rejected_ones():
  n = 9
  pairs, _ = _accepted_pairs(jax.random.key(5), n, 6)
  memory = bfgs.lbfgs_init(n, 3)
  for s, y in pairs:
    memory = bfgs.lbfgs_push(memory, s, y, True)
    memory = bfgs.lbfgs_push(memory, 100 * s, -y, False)  # rejected: no change
  h = jnp.eye(n)  # dense BFGS from I on the last three pairs only
  for s, y in pairs[-3:]:
    h = bfgs.bfgs_inverse_update(h, s, y)
  v = jax.random.normal(jax.random.key(6), (n,))
  np.testing.assert_allclose(bfgs.lbfgs_product(memory, v), h @ v,
                             atol=1e-4 * float(jnp.max(jnp.abs(h @ v))))


def test_empty_lbfgs_memory_is_the_initial_matrix():
  v = jnp.arange(4.0)
  np.testing.assert_allclose(bfgs.lbfgs_product(bfgs.lbfgs_init(4, 3), v, 2.5), 2.5 * v)
  np.testing.assert_allclose(bfgs.lbfgs_two_loop(bfgs.lbfgs_init(4, 3), v, 2.5), 2.5 * v)


def test_hessian_action_bfgs_converges_to_the_damped_inverse():
  n, lam = 6, 0.3
  a = _spd(jax.random.key(7), n)
  target = jnp.linalg.inv(a + np.sqrt(lam) * jnp.eye(n))
  h = jnp.eye(n)
  errors = []
  for i in range(200):  # K-BFGS's activation side: s = H ā, y = (A + √λ I) s, ā varying
    a_bar = jax.random.normal(jax.random.key(100 + i), (n,))
    s = h @ a_bar
    y = (a + np.sqrt(lam) * jnp.eye(n)) @ s
    if bfgs.safely_positive(s, y, jnp.linalg.norm(a_bar)):
      h = bfgs.bfgs_inverse_update(h, s, y)
    errors.append(float(jnp.linalg.norm(h - target) / jnp.linalg.norm(target)))
  assert errors[0] > 0.1  # far from the target at the start
  assert errors[-1] < 1e-3, errors[-1]


def test_non_finite_or_non_positive_pairs_are_rejected():
  s = jnp.ones(3)
  assert bfgs.safely_positive(s, s, 1.0)
  assert not bfgs.safely_positive(s, -s, 1.0)
  assert not bfgs.safely_positive(s, jnp.array([1.0, jnp.nan, 1.0]), 1.0)
  assert not bfgs.safely_positive(jnp.array([jnp.inf, 0.0, 0.0]), s, 1.0)
  assert not bfgs.safely_positive(jnp.zeros(3), jnp.zeros(3), 0.0)
  # sᵀy > 0 but below 1e-4·sᵀs·‖g‖: not safely positive.
  assert not bfgs.safely_positive(s, 1e-5 * s, 1.0)
