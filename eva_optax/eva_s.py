"""Eva-s: Shampoo vectorized — one running vector per tensor mode and Sherman–Morrison.

Journal extension of Eva ("Eva: A General Vectorized Approximation Framework for Second-order
Optimization"), DESIGN §4. Where Shampoo keeps a d_i × d_i statistic per mode of a gradient
tensor G of rank k, Eva-s keeps a vector per mode,

    v_i ← β₂ v_i + w · (mean of G over every mode but i),   w = 1 if β₂ = 1 else 1 − β₂,

and preconditions with the damped rank-one Kronecker product F̃ = ⊗_i v_i v_iᵀ, whose inverse is
closed-form (Sherman–Morrison): with v = v₁ ∘ … ∘ v_k (outer product) and μ = Π_i ‖v_i‖²,

    P = γ (F̃ + γI)⁻¹ vec(G) = G − (⟨G, v⟩ / (γ + μ)) · v,

then P is rescaled to ‖G‖ (SGD grafting). Cost O(size of G), state Σ_i d_i per tensor.
Tensors of rank ≤ 1 pass through unchanged. By default γ is relative, γ_eff = max(γ, λμ) as in
Eva's relative damping: with the reference's running sums (β₂ = 1) μ grows without bound, and
an absolute γ would remove G's component along v completely, so that direction stops training.

The vectors belong to the modes of the tensor *as it is* (a conv kernel ``[kh, kw, c_in,
c_out]`` has four), as DESIGN §4 specifies: unlike Shampoo there is no block or merge step —
merging would only change which rank-one component is removed, and every vector is already as
cheap as it can be.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from eva_optax import collectors, guards, linalg, transform
from eva_optax.eva import check_damping_mode, remove_rank_one, removed_fraction


class EvaSState(NamedTuple):
  """State of :func:`scale_by_eva_s`.

  Fields are in alphabetical order (as :class:`~eva_optax.ScaleByKroneckerState`, which says
  why).

  Attributes:
    count: int32 scalar, number of updates so far (skipped steps not counted).
    grad_scale: float32 scalar, running scale of the gradient's largest |entry|
      (:func:`eva_optax.guards.skipping_scale_jumps`).
    stats: pytree like the params; per tensor of rank k ≥ 2 a tuple of k float32 vectors
      ``(d_i,)`` (the running mode means v_i), ``()`` for tensors of rank ≤ 1.
  """

  count: jax.Array
  grad_scale: jax.Array
  stats: Any


def mode_means(grad: jax.Array) -> tuple:
  """Per mode i, the mean of ``grad`` over all other modes: a tuple of ``(d_i,)`` vectors."""
  axes = range(grad.ndim)
  return tuple(jnp.mean(grad, axis=tuple(a for a in axes if a != i)) for i in axes)


def eva_s_direction(grad: jax.Array, vectors, damping, damping_mode: str = "relative",
                    relative_damping=0.5) -> jax.Array:
  """Sherman–Morrison direction of one tensor, rescaled to ‖G‖ (DESIGN §4).

  Args:
    grad: G, any shape of rank k ≥ 2, float32.
    vectors: k vectors v_i of shape ``(grad.shape[i],)``, float32.
    damping: γ > 0.
    damping_mode: ``"relative"`` (γ_eff = max(γ, λμ)) or ``"absolute"`` (γ_eff = γ), as
      :func:`~eva_optax.eva_layer`.
    relative_damping: λ ≥ 0 of the relative mode.

  Returns:
    ‖G‖ · P/‖P‖ with P = G − (⟨G, v⟩/(γ_eff + μ)) v, v = v₁∘…∘v_k, μ = Π‖v_i‖²; shape and
    dtype of G (0 where P = 0, i.e. G = 0). Computed from the unit vectors v_i/‖v_i‖ and log μ
    (:func:`~eva_optax.eva.remove_rank_one`), so statistics or gradients of any finite scale
    give a finite direction.
  """
  units, logs = zip(*map(linalg.unit_vector, vectors))
  fraction = removed_fraction(2 * sum(logs), damping, damping_mode, relative_damping)
  return linalg.rescale_to_norm(remove_rank_one(grad, units, fraction), grad)


def _tensor_step(grad, vectors, beta2, direction):
  """One tensor's (direction, vectors): v_i ← β₂v_i + w·mean_i(G), w = 1 if β₂ = 1 else 1 − β₂.
  Vectors that would not be finite (a NaN/Inf gradient, or sums that overflow) are not taken:
  the old ones are kept and precondition this step (a NaN gradient still gives a NaN update,
  which ``optax.apply_if_finite`` skips)."""
  weight = jnp.where(beta2 == 1, 1.0, 1.0 - beta2)
  new = tuple((beta2 * v + weight * m).astype(jnp.float32)
              for v, m in zip(vectors, mode_means(grad)))
  vectors = collectors.keep_unless(~collectors.all_finite(new), new, vectors)
  return direction(grad, vectors), vectors


def _init(params) -> EvaSState:
  """Zero state: per tensor of rank ≥ 2 the mode means of a zero gradient — zeros shaped, and
  on an explicit mesh sharded, like the vectors an update computes, so the state's type is
  stable across updates; ``()`` for rank ≤ 1."""
  def vectors(p):
    return () if p.ndim <= 1 else mode_means(jnp.zeros_like(p, dtype=jnp.float32))
  return EvaSState(count=jnp.zeros((), jnp.int32), grad_scale=jnp.zeros((), jnp.float32),
                   stats=jax.tree.map(vectors, params))


def scale_by_eva_s(damping: float = 1e-3, *, damping_mode: str = "relative",
                   relative_damping: float = 0.5, beta2: float = 1.0
                   ) -> optax.GradientTransformationExtraArgs:
  """Eva-s' direction, to compose with momentum and a learning rate.

  Gradient-only: it does not use :func:`~eva_optax.scale_by_kronecker` and needs no captured
  curvature; every tensor of rank ≥ 2 is preconditioned (layer kernels, embeddings, …),
  rank ≤ 1 tensors (biases, norm scales) pass through.

  Args:
    damping: γ > 0 (default 1e-3), in the units of Π‖v_i‖² (gradient-mean units to the power k).
      With β₂ = 1 the vectors are running sums, μ grows with the step count and γ matters only
      for the first steps and for tensors whose mode means vanish.
    damping_mode: ``"relative"`` (default): γ_eff = max(γ, λμ), so at most 1/(1 + λ) of G's
      component along v is removed. ``"absolute"``: γ_eff = γ (the reference); with β₂ = 1,
      μ/γ grows without bound, the component along v is removed entirely and that direction
      stops training (measured: a 2×2 quadratic stalls at |P − P*| = 3 after 30k steps), and
      once γ/μ is below float32 resolution (~1e-7) a G along v (always so for a ``[1, n]``
      kernel) leaves only rounding noise, which the rescale to ‖G‖ amplifies.
    relative_damping: λ ≥ 0 of the relative mode (default 0.5: at most 2/3 removed, as Eva).
    beta2: β₂ ∈ [0, 1] of the vectors: 1 (default, the reference) keeps running sums, otherwise
      v_i ← β₂ v_i + (1 − β₂) · mean (starting from 0).

  Returns:
    ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params=None,
    **extra_args)`` ignores ``params``, ``curvature=`` and any other extra argument. Updates
    have the gradients' dtypes; the vectors are float32. Under ``pmap``/``shard_map`` average
    the gradients over devices first (as for any optimizer). Bad numbers: a tensor whose new
    vectors would not be finite (a NaN/Inf gradient, or sums that overflow) keeps its old
    vectors for that step; its update is NaN for a non-finite gradient (so
    ``optax.apply_if_finite`` skips the step) and finite for every finite gradient, whatever
    its scale. Huge gradients: the step is proportional to ‖G‖, so a finite gradient of
    absurd scale (a bad batch's 1e30) would ruin the parameters. A step whose gradient's
    largest |entry| exceeds ``eva_optax.collectors.MAX_SCALE_JUMP`` (1e6) times a running
    scale of it is skipped — zero updates, the vectors and ``count`` kept — as a curvature
    record with such a jump is (1e6: far above a training run's step-to-step changes, far
    below a bad number's). A first gradient of any scale is accepted, and one that grows
    steadily (10× per step) is followed; the rule is
    :func:`eva_optax.guards.skipping_scale_jumps`. Explicitly sharded params
    (``jax.sharding.AxisType.Explicit``): each v_i is sharded like its param's axis i, from
    ``init`` on, and nothing is gathered.

  Raises:
    ValueError: ``damping <= 0``, unknown ``damping_mode``, negative ``relative_damping`` or
      ``beta2`` outside [0, 1]; at update time, a state that
      does not fit the gradients (stale: see :mod:`eva_optax.guards`).
    TypeError: integer parameters or gradients; a state restored from a checkpoint without a
      target.
  """
  transform.check_positive("damping", damping)
  check_damping_mode(damping_mode, relative_damping)
  transform.check_unit_interval("beta2", beta2)
  direction = functools.partial(eva_s_direction, damping=damping, damping_mode=damping_mode,
                                relative_damping=relative_damping)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args  # gradient-only: curvature= and other extra arguments are ignored
    originals, treedef = jax.tree.flatten(updates)
    out, stats = [], []
    for update, vectors in zip(originals, map(transform.as_sequence,
                                              treedef.flatten_up_to(state.stats))):
      if update.ndim <= 1:
        out.append(update)
        stats.append(vectors)
        continue
      step, vectors = _tensor_step(update.astype(jnp.float32), vectors, beta2, direction)
      out.append(step.astype(update.dtype))
      stats.append(vectors)
    return treedef.unflatten(out), state._replace(count=optax.safe_increment(state.count),
                                                  stats=treedef.unflatten(stats))

  return guards.guarded(optax.GradientTransformationExtraArgs(
      _init, guards.skipping_scale_jumps(update_fn)), "eva_s")


def eva_s(
    learning_rate: optax.ScalarOrSchedule,
    *,
    damping: float = 1e-3,
    damping_mode: str = "relative",
    relative_damping: float = 0.5,
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
    damping, damping_mode, relative_damping, beta2: as in :func:`scale_by_eva_s`.
    momentum: heavy-ball coefficient of ``optax.trace`` (default 0.9, the reference).
    nesterov: Nesterov momentum (default True, the reference).
    weight_decay: L2 coefficient added to the preconditioned direction.

  Returns:
    ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params)`` (extra
    arguments such as ``curvature=`` are ignored). Works in ``optax.chain`` and
    ``optax.inject_hyperparams``. A step that :func:`scale_by_eva_s` skips (a gradient whose
    largest |entry| jumps more than 1e6× above its running scale) is skipped whole: zero
    updates, and the momentum trace kept as well (:func:`eva_optax.guards.skipping_whole_chain`).

  Raises:
    ValueError, TypeError: as :func:`scale_by_eva_s`; ``ValueError`` for a negative or
      non-finite ``learning_rate``.
  """
  return guards.skipping_whole_chain(transform.with_momentum(
      scale_by_eva_s(damping, damping_mode=damping_mode, relative_damping=relative_damping,
                     beta2=beta2),
      learning_rate, momentum, nesterov, weight_decay), index=0)
