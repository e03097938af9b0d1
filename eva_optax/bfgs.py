"""BFGS building blocks of K-BFGS (Goldfarb, Ren, Bahamou, NeurIPS 2020), as small pure functions.

All functions work on float32 arrays, trace under ``jit`` and never branch in Python on traced
values. Notation: ``h`` an inverse-Hessian approximation (symmetric positive definite), ``(s, y)``
a curvature pair with the secant equation ``h' y = s`` after an update.

* :func:`bfgs_inverse_update`: the dense BFGS update of ``h``.
* :func:`powell_damping`, :func:`levenberg_marquardt_damping`, :func:`double_damping`: the
  paper's double damping (its Algorithm "DD"): Powell's damping in the H form, then
  Levenberg–Marquardt damping.
* :func:`safely_positive`: the skip rule for pairs whose curvature is not safely positive or
  not finite.
* :class:`LBFGSMemory`, :func:`lbfgs_init`, :func:`lbfgs_push`, :func:`lbfgs_product` (compact
  representation) and :func:`lbfgs_two_loop` (the two-loop recursion): limited-memory BFGS with
  a fixed initial matrix ``h0 = gamma * I``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
# The reference's threshold: a pair is used only when sᵀy > SAFE_CURVATURE · sᵀs · ‖g‖, g the
# mean output gradient (or mean input for the activation side) of the current step.
SAFE_CURVATURE = 1e-4


def _dot(x, y):
  return jnp.dot(x, y, precision=_HIGHEST)


def _safe_divide(numerator, denominator):
  """``numerator / denominator``, 0 where the denominator is 0 (the value is then unused)."""
  ok = denominator != 0
  return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


def bfgs_inverse_update(h: jax.Array, s: jax.Array, y: jax.Array) -> jax.Array:
  """The BFGS update of an inverse-Hessian approximation.

  ``h' = (I − ρ s yᵀ) h (I − ρ y sᵀ) + ρ s sᵀ`` with ρ = 1/sᵀy, computed as
  ``h + (ρ + ρ² yᵀhy) s sᵀ − ρ (s (hy)ᵀ + (hy) sᵀ)`` and symmetrized. It satisfies the secant
  equation ``h' y = s`` and keeps ``h`` positive definite when sᵀy > 0.

  Args:
    h: ``[n, n]`` symmetric positive definite, float32.
    s, y: ``(n,)`` the pair; the caller makes sure sᵀy > 0 (:func:`safely_positive`).

  Returns:
    ``[n, n]`` the updated matrix.
  """
  hy = jnp.matmul(h, y, precision=_HIGHEST)
  rho = 1.0 / _dot(s, y)
  new = (h + (rho + rho * rho * _dot(y, hy)) * jnp.outer(s, s)
         - rho * (jnp.outer(s, hy) + jnp.outer(hy, s)))
  return 0.5 * (new + new.T)


def powell_damping(s: jax.Array, y: jax.Array, hy: jax.Array, mu1: float) -> jax.Array:
  """Powell's damping in the H form: the damped ``s``.

  When sᵀy < μ₁ yᵀhy, ``s ← θ s + (1 − θ) hy`` with θ = (1 − μ₁) yᵀhy / (yᵀhy − sᵀy), which makes
  sᵀy = μ₁ yᵀhy exactly; otherwise ``s`` is returned unchanged. Afterwards sᵀy ≥ μ₁ yᵀhy.

  Args:
    s, y: ``(n,)`` the pair.
    hy: ``(n,)`` h·y for the current inverse approximation h.
    mu1: μ₁ ∈ (0, 1) (the paper: 0.2).
  """
  sy, yhy = _dot(s, y), _dot(y, hy)
  damp = sy < mu1 * yhy
  theta = _safe_divide((1.0 - mu1) * yhy, yhy - sy)
  return jnp.where(damp, theta * s + (1.0 - theta) * hy, s)


def levenberg_marquardt_damping(s: jax.Array, y: jax.Array, mu2: float) -> jax.Array:
  """Levenberg–Marquardt damping: the damped ``y``.

  When sᵀy < μ₂ sᵀs, ``y ← θ y + (1 − θ) s`` with θ = (1 − μ₂) sᵀs / (sᵀs − sᵀy), which makes
  sᵀy = μ₂ sᵀs exactly (as if the Hessian had μ₂·I added along s); otherwise ``y`` is returned
  unchanged. Afterwards sᵀy ≥ μ₂ sᵀs, which bounds the updated inverse's growth by 1/μ₂ along s.

  Args:
    s, y: ``(n,)`` the pair.
    mu2: μ₂ ∈ (0, 1) (the paper: √λ), so that θ ∈ [0, 1).
  """
  ss, sy = _dot(s, s), _dot(s, y)
  damp = sy < mu2 * ss
  theta = _safe_divide((1.0 - mu2) * ss, ss - sy)
  return jnp.where(damp, theta * y + (1.0 - theta) * s, y)


def double_damping(s: jax.Array, y: jax.Array, h_product: Callable[[jax.Array], jax.Array],
                   mu1: float, mu2: float) -> tuple[jax.Array, jax.Array]:
  """The paper's double damping: :func:`powell_damping` (μ₁), then
  :func:`levenberg_marquardt_damping` (μ₂).

  The result satisfies sᵀy ≥ μ₂ sᵀs always, and also sᵀy ≥ μ₁ yᵀhy whenever the largest
  eigenvalue of h is at most 1/μ₁ (sᵀy − μ₁ yᵀhy is concave in y, non-negative after the first
  step and at y = s, and the second step moves y towards s).

  Args:
    s, y: ``(n,)`` the pair.
    h_product: ``v -> h v`` of the current inverse approximation (dense or L-BFGS).
    mu1, mu2: μ₁ of Powell's damping, μ₂ of the Levenberg–Marquardt damping, both in (0, 1).

  Returns:
    The damped ``(s, y)``.
  """
  s = powell_damping(s, y, h_product(y), mu1)
  return s, levenberg_marquardt_damping(s, y, mu2)


def safely_positive(s: jax.Array, y: jax.Array, scale: jax.Array,
                    threshold: float = SAFE_CURVATURE) -> jax.Array:
  """Whether to use the pair: finite, and sᵀy > threshold · sᵀs · ``scale`` (the reference uses
  ``scale`` = ‖g‖, the current mean gradient of the side being updated). Boolean scalar."""
  sy, ss = _dot(s, y), _dot(s, s)
  finite = jnp.isfinite(sy) & jnp.isfinite(ss) & jnp.all(jnp.isfinite(s)) & jnp.all(
      jnp.isfinite(y))
  return finite & (sy > threshold * ss * scale) & (sy > 0)


class LBFGSMemory(NamedTuple):
  """The last ``m`` accepted pairs of one L-BFGS matrix, oldest first (float32 arrays).

  Fields are in alphabetical order (as :class:`~eva_optax.ScaleByKroneckerState`, which says
  why); construct it by keyword.

  Attributes:
    s, y: ``[m, n]`` the pairs; empty slots are zero.
    valid: ``[m]`` float32, 1 for a stored pair, 0 for an empty slot (empty slots come first).
  """

  s: jax.Array
  valid: jax.Array
  y: jax.Array


def lbfgs_init(n: int, memory_size: int) -> LBFGSMemory:
  """An empty memory of ``memory_size`` pairs of length ``n``."""
  # One zeros array per field: a state leaf shared by two fields cannot be donated to jit.
  return LBFGSMemory(s=jnp.zeros((memory_size, n), jnp.float32),
                     valid=jnp.zeros((memory_size,), jnp.float32),
                     y=jnp.zeros((memory_size, n), jnp.float32))


def lbfgs_push(memory: LBFGSMemory, s: jax.Array, y: jax.Array, accept) -> LBFGSMemory:
  """Appends the pair as the newest (dropping the oldest) when ``accept``; otherwise unchanged."""
  pushed = LBFGSMemory(
      s=jnp.concatenate([memory.s[1:], s[None].astype(jnp.float32)]),
      valid=jnp.concatenate([memory.valid[1:], jnp.ones((1,), jnp.float32)]),
      y=jnp.concatenate([memory.y[1:], y[None].astype(jnp.float32)]))
  return jax.tree.map(lambda new, old: jnp.where(accept, new, old), pushed, memory)


def lbfgs_product(memory: LBFGSMemory, v: jax.Array, gamma=1.0) -> jax.Array:
  """``h v`` for the L-BFGS matrix h built from ``h0 = gamma·I`` and the stored pairs, by the
  compact representation (Byrd, Nocedal, Schnabel 1994):

  ``h = γI + [S, γY] [[R⁻ᵀ(D + γYᵀY)R⁻¹, −R⁻ᵀ], [−R⁻¹, 0]] [Sᵀ; γYᵀ]``, R the upper triangle
  of SᵀY, D its diagonal. Empty slots get a unit diagonal in R and D and zero vectors, so they
  contribute nothing.

  Args:
    memory: the pairs.
    v: ``(n,)`` or ``[n, k]`` (k vectors at once, as columns).
    gamma: γ > 0 of the initial matrix.

  Returns:
    Same shape as ``v``.
  """
  s, y, valid = memory.s, memory.y, memory.valid
  vector = v.ndim == 1
  v = v[:, None] if vector else v
  sy = jnp.matmul(s, y.T, precision=_HIGHEST)
  empty = jnp.diag(1.0 - valid)
  r = jnp.triu(sy) + empty
  d = jnp.diag(jnp.diag(sy)) + empty
  yy = jnp.matmul(y, y.T, precision=_HIGHEST)
  sv = jnp.matmul(s, v, precision=_HIGHEST)
  yv = gamma * jnp.matmul(y, v, precision=_HIGHEST)
  # [[R⁻ᵀ(D + γYᵀY)R⁻¹, −R⁻ᵀ], [−R⁻¹, 0]] applied to [Sᵀv; γYᵀv].
  r_inv_sv = jax.scipy.linalg.solve_triangular(r, sv, lower=False)
  top = jax.scipy.linalg.solve_triangular(
      r, jnp.matmul(d + gamma * yy, r_inv_sv, precision=_HIGHEST) - yv, trans=1, lower=False)
  bottom = -r_inv_sv
  out = gamma * v + jnp.matmul(s.T, top, precision=_HIGHEST) + gamma * jnp.matmul(
      y.T, bottom, precision=_HIGHEST)
  return out[:, 0] if vector else out


def lbfgs_two_loop(memory: LBFGSMemory, v: jax.Array, gamma=1.0) -> jax.Array:
  """``h v`` by the two-loop recursion (Nocedal 1980); equal to :func:`lbfgs_product` up to
  rounding. ``v``: ``(n,)`` or ``[n, k]``."""
  s, y, valid = memory.s, memory.y, memory.valid
  rho = valid * _safe_divide(1.0, jnp.sum(s * y, axis=1))
  q = v.astype(jnp.float32)

  def backward(q, i):  # newest to oldest
    alpha = rho[i] * jnp.tensordot(s[i], q, axes=(0, 0), precision=_HIGHEST)
    return q - jnp.multiply.outer(y[i], alpha) if q.ndim > 1 else q - alpha * y[i], alpha

  q, alphas = jax.lax.scan(backward, q, jnp.arange(s.shape[0])[::-1])
  r = gamma * q

  def forward(r, inputs):  # oldest to newest
    i, alpha = inputs
    beta = rho[i] * jnp.tensordot(y[i], r, axes=(0, 0), precision=_HIGHEST)
    step = alpha - beta
    return (r + jnp.multiply.outer(s[i], step) if r.ndim > 1 else r + step * s[i]), None

  r, _ = jax.lax.scan(forward, r, (jnp.arange(s.shape[0]), alphas[::-1]))
  return r
