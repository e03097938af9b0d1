"""Dense linear algebra for the preconditioners (DESIGN §3, §5).

Inverse p-th roots of symmetric positive (semi-)definite matrices, used by Shampoo:

* :func:`inverse_pth_root` — the coupled Newton iteration (Higham, "Functions of Matrices",
  eq. 7.18; the form used by Anil et al., "Scalable Second Order Optimization for Deep
  Learning"), matmuls only, so it runs well on accelerators;
* :func:`inverse_pth_root_eigh` — the same root through a symmetric eigendecomposition.

Both symmetrize their input, divide it by its largest |entry| (undone on the root, so a finite
matrix of any scale works), add the ridge ε·λ_max(A)·I, compute in float64 when
``jax_enable_x64`` is on (float32 with ``precision=HIGHEST`` matmuls otherwise) and return
``(root, residual)``. They take one matrix; batch them with ``jax.vmap``.
:func:`select_root` implements the "keep the last good root" rule of DESIGN §5.

Overflow-safe building blocks shared by the optimizers: :func:`unit_vector` (direction and
log-norm of a vector), :func:`rescale_to_norm` (grafting) and :func:`max_abs`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST

# Defaults of Anil et al.'s inverse-root computation.
NEWTON_TOLERANCE = 1e-6
NEWTON_MAX_ITERATIONS = 100
NEWTON_ERROR_GROWTH = 1.2  # stop (keeping the previous iterate) when the error grows by more
RIDGE_EPSILON = 1e-6
FAILURE_THRESHOLD = 0.1  # a root whose residual exceeds this is not used


class RootResult(NamedTuple):
  """An inverse p-th root and its quality.

  Attributes:
    root: A_ε^{-1/p}, ``[n, n]``, in the working dtype (float64 with x64, else float32), where
      A_ε = sym(A) + ε·λ_max(sym(A))·I.
    residual: scalar, max |X^p A_ε − I| of the returned root X (Newton: tracked by the
      iteration; eigh: computed explicitly). NaN or large means the root is unusable.
  """

  root: jax.Array
  residual: jax.Array


def working_dtype():
  """float64 when ``jax_enable_x64`` is on, else float32."""
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST)


def _matrix_power(matrix: jax.Array, p: int) -> jax.Array:
  """matrix^p for a static integer p ≥ 1, by repeated squaring (⌊log₂ p⌋ + popcount(p) − 1
  matmuls)."""
  result, square = None, matrix
  while True:
    if p & 1:
      result = square if result is None else _mm(result, square)
    p >>= 1
    if not p:
      return result
    square = _mm(square, square)


def max_abs(tree) -> jax.Array:
  """The largest |entry| over every array leaf of ``tree``, float32 scalar (0 for no entries;
  NaN when an entry is NaN)."""
  return jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0).astype(jnp.float32)
                            for x in jax.tree.leaves(tree)] or [jnp.zeros((), jnp.float32)]))


def _scaled(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(m, x/m)`` with m the largest |entry| of ``x`` (1 when x = 0): entries of x/m lie in
  [-1, 1], so their squares neither overflow nor (for the largest) underflow."""
  largest = jnp.max(jnp.abs(x))
  safe = jnp.where(largest > 0, largest, 1.0)
  return safe, x / safe


def unit_vector(vector: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(v/‖v‖, log‖v‖)`` without forming ‖v‖² from the raw entries.

  v is first divided by its largest |entry|, so the squares summed lie in [0, 1]: entries of
  1e20 (whose squares overflow float32) or 1e-25 (whose squares underflow to 0) give the exact
  direction and log-norm. ``v = 0`` gives ``(0, -inf)``; a NaN entry gives NaNs.
  """
  largest, scaled = _scaled(vector)
  # A product and a sum rather than a dot: an explicitly sharded v cannot be contracted.
  norm = jnp.sqrt(jnp.sum(scaled * scaled))  # in [1, √d] unless v = 0
  nonzero = norm > 0
  return (scaled / jnp.where(nonzero, norm, 1.0),
          jnp.where(nonzero, jnp.log(largest) + jnp.log(jnp.where(nonzero, norm, 1.0)),
                    -jnp.inf))


def rescale_to_norm(direction: jax.Array, target: jax.Array) -> jax.Array:
  """``direction`` rescaled to ``target``'s Frobenius norm (grafting); 0 when ``direction`` is
  0. Both norms are formed from max-abs-scaled entries, so huge (≳ 1e19) or tiny finite inputs
  give the finite, correctly scaled result instead of 0, inf or NaN."""
  _, unit_d = _scaled(direction)
  top_t, unit_t = _scaled(target)
  norm_d = jnp.linalg.norm(unit_d)  # in [1, √size] unless direction = 0
  return unit_d * (top_t * jnp.linalg.norm(unit_t) / jnp.where(norm_d > 0, norm_d, 1.0))


def symmetrize(matrix: jax.Array) -> jax.Array:
  """(A + Aᵀ)/2 in the working dtype."""
  matrix = jnp.asarray(matrix, working_dtype())
  return (matrix + matrix.T) / 2


def power_iteration(matrix: jax.Array, num_iterations: int = 100,
                    tolerance: float = 1e-6) -> jax.Array:
  """Largest eigenvalue of a symmetric positive semi-definite matrix by power iteration.

  Starts from the all-ones vector (deterministic, so every replica gets the same value) and stops
  after ``num_iterations`` or when the Rayleigh quotient changes by less than ``tolerance``
  (relative). Returns a scalar in the matrix's dtype; 0 for the zero matrix.
  """
  n = matrix.shape[-1]
  vector = jnp.ones((n,), matrix.dtype) / jnp.sqrt(jnp.asarray(n, matrix.dtype))

  def cond(state):
    i, _, value, previous = state
    return (i < num_iterations) & (jnp.abs(value - previous) > tolerance * jnp.abs(value))

  def body(state):
    i, v, value, _ = state
    w = jnp.matmul(matrix, v, precision=_HIGHEST)
    norm = jnp.linalg.norm(w)
    new_value = jnp.vdot(v, w)
    v = jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1), v)
    return i + 1, v, new_value, value

  zero = jnp.zeros((), matrix.dtype)
  _, v, value, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), vector, zero,
                                                   jnp.full((), jnp.inf, matrix.dtype)))
  # The Rayleigh quotient of the final vector (≤ λ_max, equal at convergence).
  return jnp.maximum(jnp.vdot(v, jnp.matmul(matrix, v, precision=_HIGHEST)), value)


def inverse_pth_root(
    matrix: jax.Array,
    p: int,
    *,
    ridge_epsilon: float = RIDGE_EPSILON,
    tolerance: float = NEWTON_TOLERANCE,
    max_iterations: int = NEWTON_MAX_ITERATIONS,
    error_growth: float = NEWTON_ERROR_GROWTH,
) -> RootResult:
  """A^{-1/p} of a symmetric positive semi-definite matrix by the coupled Newton iteration.

  With A_ε = sym(A) + ε·λ_max·I (λ_max by :func:`power_iteration`) and z = (1 + p)/(2‖A_ε‖_F):
  X₀ = z^{1/p} I, M₀ = z A_ε; then T = ((p + 1) I − M_k)/p, X_{k+1} = X_k T,
  M_{k+1} = T^p M_k. M_k = X_k^p A_ε stays invariant, M_k → I and X_k → A_ε^{-1/p}
  (Higham eq. 7.18; the scaling z puts M₀'s spectrum in (0, (p + 1)/2], where the iteration
  converges; the Frobenius norm, as in Anil et al., rather than λ_max keeps the first steps from
  overshooting for large p). Stops when max |M_k − I| ≤ ``tolerance``, after ``max_iterations``, or when the
  error grows by more than ``error_growth``× (rounding has taken over; that step is discarded).

  Args:
    matrix: ``[n, n]`` symmetric positive semi-definite (symmetrized here), any float dtype.
    p: static integer root order ≥ 1.
    ridge_epsilon: ε ≥ 0 of the ridge ε·λ_max(A)·I (relative, so scale-free).
    tolerance, max_iterations, error_growth: stopping rule (defaults of Anil et al.).

  Returns:
    :class:`RootResult`: root ``[n, n]`` in the working dtype (float64 under x64, else float32)
    and the final max |M − I|. A NaN/inf input gives a NaN root (use :func:`select_root`).

  Raises:
    ValueError: ``p`` not a positive integer, or ``matrix`` not square.
  """
  _check_root_args(matrix, p)
  # A^{-1/p} = (A/s)^{-1/p} s^{-1/p}: with s = max|A| the iteration (norms, power iteration,
  # matmuls) works on entries ≤ 1, so a finite A of any scale (e.g. 1e37 after a huge
  # gradient) gets its root instead of overflowing into a discarded NaN forever.
  scale, a = _scaled(symmetrize(matrix))
  n = a.shape[0]
  dtype = a.dtype
  identity = jnp.eye(n, dtype=dtype)
  max_eigenvalue = power_iteration(a)
  a = a + ridge_epsilon * max_eigenvalue * identity
  # ‖A_ε‖_F ≥ λ_max(A_ε); the guard keeps the zero matrix from dividing by zero.
  norm = jnp.linalg.norm(a)
  z = (1 + p) / (2 * jnp.where(norm > 0, norm, 1))
  x = jnp.power(z, 1.0 / p) * identity
  m = z * a
  error = jnp.max(jnp.abs(m - identity))

  def cond(state):
    i, _, _, error, improving = state
    return (i < max_iterations) & (error > tolerance) & improving

  def body(state):
    i, m, x, error, _ = state
    t = ((p + 1) * identity - m) / p
    new_m = _mm(_matrix_power(t, p), m)
    new_x = _mm(x, t)
    new_error = jnp.max(jnp.abs(new_m - identity))
    improving = new_error <= error_growth * error
    return (i + 1, jnp.where(improving, new_m, m), jnp.where(improving, new_x, x),
            jnp.where(improving, new_error, error), improving)

  _, _, x, error, _ = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), m, x, error, jnp.ones((), bool)))
  return RootResult((x + x.T) / 2 * jnp.power(scale, -1.0 / p), error)


def inverse_pth_root_eigh(matrix: jax.Array, p: int, *,
                          ridge_epsilon: float = RIDGE_EPSILON) -> RootResult:
  """A^{-1/p} of a symmetric positive semi-definite matrix by ``jnp.linalg.eigh``.

  A_ε = sym(A) + ε·λ_max·I with λ_max the largest eigenvalue; eigenvalues are clipped at
  ε·λ_max (rounding can push the smallest ones of a singular A below it). Same arguments and
  return as :func:`inverse_pth_root`; the residual max |X^p A_ε − I| is computed explicitly.
  """
  _check_root_args(matrix, p)
  scale, a = _scaled(symmetrize(matrix))  # as in inverse_pth_root: any finite scale
  identity = jnp.eye(a.shape[0], dtype=a.dtype)
  values, vectors = jnp.linalg.eigh(a)
  max_eigenvalue = jnp.maximum(values[-1], 0)
  ridge = ridge_epsilon * max_eigenvalue
  damped = jnp.maximum(values + ridge, ridge)
  root = _mm(vectors * jnp.power(damped, -1.0 / p), vectors.T)
  root = (root + root.T) / 2
  residual = jnp.max(jnp.abs(_mm(_matrix_power(root, p), a + ridge * identity) - identity))
  return RootResult(root * jnp.power(scale, -1.0 / p), residual)


def select_root(new: RootResult, previous_root: jax.Array,
                failure_threshold: float = FAILURE_THRESHOLD) -> jax.Array:
  """The new root when it is finite and its residual ≤ ``failure_threshold``, else the previous
  one (DESIGN §5: a failed root never poisons the state). Works batched (leading axes of
  ``previous_root`` match ``new.residual``'s). Returns ``previous_root``'s dtype."""
  ok = jnp.isfinite(new.residual) & (new.residual <= failure_threshold)
  ok &= jnp.all(jnp.isfinite(new.root), axis=(-2, -1))
  return jnp.where(ok[..., None, None], new.root.astype(previous_root.dtype), previous_root)


@functools.partial(jax.jit, static_argnames=("p", "method", "ridge_epsilon"))
def batched_inverse_pth_root(matrices: jax.Array, p: int, *, method: str = "newton",
                             ridge_epsilon: float = RIDGE_EPSILON) -> RootResult:
  """:func:`inverse_pth_root` (``method="newton"``) or :func:`inverse_pth_root_eigh`
  (``"eigh"``) of a stack ``[b, n, n]``, as one vmapped computation (one loop for the whole
  stack, so compile time does not grow with ``b``)."""
  if method == "newton":
    fn = functools.partial(inverse_pth_root, p=p, ridge_epsilon=ridge_epsilon)
  elif method == "eigh":
    fn = functools.partial(inverse_pth_root_eigh, p=p, ridge_epsilon=ridge_epsilon)
  else:
    raise ValueError(f"eva_optax: root method must be 'newton' or 'eigh', got {method!r}.")
  return jax.vmap(fn)(matrices)


def _check_root_args(matrix, p) -> None:
  if not isinstance(p, int) or isinstance(p, bool) or p < 1:
    raise ValueError(f"eva_optax: the root order p must be a positive Python int, got {p!r}.")
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f"eva_optax: expected a square matrix, got shape {matrix.shape}.")
