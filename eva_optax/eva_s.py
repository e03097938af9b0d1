"""Eva-s: Shampoo vectorized — one running vector per tensor mode and Sherman–Morrison.

Journal extension of Eva ("Eva: A General Vectorized Approximation Framework for Second-order
Optimization"), DESIGN §4. Where Shampoo keeps a d_i × d_i statistic per mode of a gradient
tensor G of rank k, Eva-s keeps a vector per mode,

    v_i ← β₂ v_i + w · (mean of G over every mode but i),   w = 1 if β₂ = 1 else 1 − β₂,

and preconditions with the damped rank-one Kronecker product F̃ = ⊗_i v_i v_iᵀ, whose inverse is
closed-form (Sherman–Morrison): with v = v₁ ∘ … ∘ v_k (outer product) and μ = Π_i ‖v_i‖²,

    P = γ (F̃ + γI)⁻¹ vec(G) = G − (⟨G, v⟩ / (γ + μ)) · v,

then P is rescaled to ‖G‖ (SGD grafting). Cost O(size of G), state Σ_i d_i per tensor.
Tensors of rank ≤ 1 pass through unchanged.

The vectors belong to the modes of the tensor *as it is* (a conv kernel ``[kh, kw, c_in,
c_out]`` has four), as DESIGN §4 specifies: unlike Shampoo there is no block or merge step —
merging would only change which rank-one component is removed, and every vector is already as
cheap as it can be.
"""

from __future__ import annotations

import string
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from eva_optax import guards, transform

_HIGHEST = jax.lax.Precision.HIGHEST


class EvaSState(NamedTuple):
  """State of :func:`scale_by_eva_s`.

  Attributes:
    count: int32 scalar, number of updates so far.
    stats: pytree like the params; per tensor of rank k ≥ 2 a tuple of k float32 vectors
      ``(d_i,)`` (the running mode means v_i), ``()`` for tensors of rank ≤ 1.
  """

  count: jax.Array
  stats: Any


def mode_means(grad: jax.Array) -> tuple:
  """Per mode i, the mean of ``grad`` over all other modes: a tuple of ``(d_i,)`` vectors."""
  axes = range(grad.ndim)
  return tuple(jnp.mean(grad, axis=tuple(a for a in axes if a != i)) for i in axes)


def eva_s_direction(grad: jax.Array, vectors, damping) -> jax.Array:
  """Sherman–Morrison direction of one tensor, rescaled to ‖G‖ (DESIGN §4).

  Args:
    grad: G, any shape of rank k ≥ 2, float32.
    vectors: k vectors v_i of shape ``(grad.shape[i],)``, float32.
    damping: γ > 0.

  Returns:
    ‖G‖ · P/‖P‖ with P = G − (⟨G, v⟩/(γ + Π‖v_i‖²)) v, v = v₁∘…∘v_k; shape and dtype of G
    (0 where P = 0, i.e. G = 0).
  """
  letters = string.ascii_letters[:grad.ndim]
  outer = jnp.einsum(",".join(letters) + "->" + letters, *vectors, precision=_HIGHEST)
  signal = 1.0
  for v in vectors:
    signal = signal * jnp.dot(v, v, precision=_HIGHEST)
  projection = jnp.vdot(grad, outer)
  direction = grad - (projection / (jnp.asarray(damping, grad.dtype) + signal)) * outer
  norm = jnp.linalg.norm(direction)
  scale = jnp.where(norm > 0, jnp.linalg.norm(grad) / jnp.where(norm > 0, norm, 1), 0.0)
  return direction * scale


def scale_by_eva_s(damping: float = 1e-3, *, beta2: float = 1.0
                   ) -> optax.GradientTransformationExtraArgs:
  """Eva-s' direction, to compose with momentum and a learning rate.

  Gradient-only: it does not use :func:`~eva_optax.scale_by_kronecker` and needs no captured
  curvature; every tensor of rank ≥ 2 is preconditioned (layer kernels, embeddings, …),
  rank ≤ 1 tensors (biases, norm scales) pass through.

  Args:
    damping: γ > 0 (default 1e-3), in the units of Π‖v_i‖² (gradient-mean units to the power k).
      With β₂ = 1 the vectors are running sums, μ grows with the step count and γ matters only
      for the first steps and for tensors whose mode means vanish.
    beta2: β₂ ∈ [0, 1] of the vectors: 1 (default, the reference) keeps running sums, otherwise
      v_i ← β₂ v_i + (1 − β₂) · mean (starting from 0).

  Returns:
    ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params=None,
    **extra_args)`` ignores ``params``, ``curvature=`` and any other extra argument. Updates
    have the gradients' dtypes; the vectors are float32. Under ``pmap``/``shard_map`` average
    the gradients over devices first (as for any optimizer).

  Raises:
    ValueError: ``damping <= 0`` or ``beta2`` outside [0, 1]; at update time, a state that
      does not fit the gradients (stale: see :mod:`eva_optax.guards`).
    TypeError: integer parameters or gradients; a state restored from a checkpoint without a
      target.
  """
  transform.check_positive("damping", damping)
  transform.check_unit_interval("beta2", beta2)

  def init_fn(params):
    def vectors(p):
      if p.ndim <= 1:
        return ()
      return tuple(jnp.zeros((d,), jnp.float32) for d in p.shape)
    return EvaSState(jnp.zeros((), jnp.int32), jax.tree.map(vectors, params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args  # gradient-only: curvature= and other extra arguments are ignored
    weight = jnp.where(beta2 == 1, 1.0, 1.0 - beta2)
    originals, treedef = jax.tree.flatten(updates)
    out, stats = [], []
    for update, vectors in zip(originals, map(transform.as_sequence,
                                              treedef.flatten_up_to(state.stats))):
      if update.ndim <= 1:
        out.append(update)
        stats.append(vectors)
        continue
      grad = update.astype(jnp.float32)
      vectors = tuple((beta2 * v + weight * m).astype(jnp.float32)
                      for v, m in zip(vectors, mode_means(grad)))
      out.append(eva_s_direction(grad, vectors, damping).astype(update.dtype))
      stats.append(vectors)
    return treedef.unflatten(out), EvaSState(state.count + 1, treedef.unflatten(stats))

  return guards.guarded(optax.GradientTransformationExtraArgs(init_fn, update_fn), "eva_s")


def eva_s(
    learning_rate: optax.ScalarOrSchedule,
    *,
    damping: float = 1e-3,
    beta2: float = 1.0,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
  """The complete Eva-s optimizer: :func:`scale_by_eva_s` →
  ``optax.add_decayed_weights(weight_decay)`` → ``optax.trace(momentum, nesterov)`` →
  ``−learning_rate``.

  Args:
    learning_rate: η, float or optax schedule (SGD-like scale: the direction has ‖G‖).
    damping, beta2: as in :func:`scale_by_eva_s`.
    momentum: heavy-ball coefficient of ``optax.trace`` (default 0.9, the reference).
    nesterov: Nesterov momentum (default True, the reference).
    weight_decay: L2 coefficient added to the preconditioned direction.

  Returns:
    ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params)`` (extra
    arguments such as ``curvature=`` are ignored). Works in ``optax.chain`` and
    ``optax.inject_hyperparams``.

  Raises:
    ValueError, TypeError: as :func:`scale_by_eva_s`; ``ValueError`` for a negative or
      non-finite ``learning_rate``.
  """
  return transform.with_momentum(
      scale_by_eva_s(damping, beta2=beta2),
      learning_rate, momentum, nesterov, weight_decay)
