"""Eva-f: the vectorized FOOF of the Eva journal extension.

Zhang, Shi, Li, "Eva: A General Vectorized Approximation Framework for Second-order
Optimization" (journal extension of the ICLR 2023 Eva). Math: DESIGN §4. FOOF's activation
factor A is replaced by the rank-one ā āᵀ of the running mean input, whose damped inverse is
closed-form (Sherman–Morrison):

    V = γ (ā āᵀ + γI)⁻¹ Ĝ = Ĝ − ā (āᵀ Ĝ) / (‖ā‖² + γ).

Only ā is captured (no output gradients, no backward-pass statistics), so it costs less than
Eva: O(d_in) state and O(d_in·d_out) time per layer.
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from eva_optax import collectors, linalg, transform
from eva_optax.eva import EvaLayerTerms, check_damping, effective_damping, removed_fraction

_HIGHEST = jax.lax.Precision.HIGHEST


def eva_f_layer(stats: collectors.ActivationVector, grad_matrix: jax.Array, damping,
                damping_mode: str = "relative", relative_damping=0.5) -> EvaLayerTerms:
  """Sherman–Morrison direction of one layer.

  Args:
    stats: ā ``(d_in[+1],)`` (bias-augmented when Ĝ has a bias row), float32.
    grad_matrix: Ĝ ``[d_in[+1], d_out]`` float32.
    damping, damping_mode, relative_damping: as :func:`~eva_optax.eva_layer`, with the signal
      ‖ā‖² (γ_eff = max(γ, λ‖ā‖²) in relative mode bounds the removed fraction of Ĝ's component
      along ā by 1/(1+λ)).

  Returns:
    :class:`~eva_optax.EvaLayerTerms` (direction, γ_eff, ‖ā‖²).
  """
  # With the unit vector â and r = ‖ā‖²/(‖ā‖² + γ_eff) from log‖ā‖²: no overflow of ‖ā‖² for
  # huge activations (as eva_layer).
  unit, log_norm = linalg.unit_vector(stats.a)
  fraction = removed_fraction(2 * log_norm, damping, damping_mode, relative_damping)
  projection = jnp.matmul(unit, grad_matrix, precision=_HIGHEST)
  # Scale the d_out-vector, not the [d_in, d_out] outer product: one product per column.
  direction = grad_matrix - jnp.outer(unit, fraction * projection)
  signal = jnp.exp(2 * log_norm)
  return EvaLayerTerms(direction, effective_damping(signal, damping, damping_mode,
                                                    relative_damping), signal)


def scale_by_eva_f(
    damping: float = 1e-3,
    *,
    damping_mode: str = "relative",
    relative_damping: float = 0.5,
    stat_decay: float = 0.95,
    scaling: Optional[str] = "kl_normalize",
    layouts: Optional[Mapping] = None,
) -> optax.GradientTransformationExtraArgs:
  """Eva-f's preconditioned direction, to compose with momentum and a learning rate.

  Args:
    damping: γ > 0 (units of squared activations); a floor in ``"relative"`` mode.
    damping_mode: ``"relative"`` (default, γ_eff = max(γ, λ‖ā‖²)) or ``"absolute"``.
    relative_damping: λ ≥ 0 of the relative mode.
    stat_decay: weight of the new ā in its running average (as :func:`~eva_optax.scale_by_eva`).
    scaling: ``"kl_normalize"`` (journal, default) or ``None``.
    layouts: ``{layer: Layout}`` for layer stacks and multi-axis kernels, as in
      :func:`~eva_optax.scale_by_kronecker` (from the capture's ``describe(...).layouts``).

  Returns:
    ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params, *, curvature)``
    with :class:`~eva_optax.ActivationVector` records, from
    ``eva_optax.flax.value_and_grad(loss_fn, statistics="activation_vector")``.

  Raises:
    ValueError: ``damping <= 0``, negative ``relative_damping``, ``stat_decay`` outside
      [0, 1], unknown ``damping_mode`` or ``scaling`` (``"kl_clip"`` and ``"trust_region"`` are
      not offered: Eva-f has no reference clip); at update time missing or mismatched ``curvature``, a stale state.
    TypeError: as :func:`~eva_optax.scale_by_eva`.
  """
  if scaling in ("kl_clip", "trust_region"):
    raise ValueError("eva_optax: Eva-f takes scaling='kl_normalize' or None.")
  check_damping(damping, damping_mode, relative_damping, scaling, stat_decay)

  def apply(stats, state, grad_matrix):
    del state
    return eva_f_layer(stats, grad_matrix, damping, damping_mode, relative_damping).direction

  preconditioner = transform.Preconditioner(
      init=lambda d_in, d_out, has_bias: (), update=lambda stats, state, count: state,
      apply=apply)
  return transform.scale_by_kronecker(collectors.activation_vector(stat_decay), preconditioner,
                                      transform.scaling_by_name(scaling), layouts, name="eva_f")


def eva_f(
    learning_rate: optax.ScalarOrSchedule,
    *,
    damping: float = 1e-3,
    damping_mode: str = "relative",
    relative_damping: float = 0.5,
    stat_decay: float = 0.95,
    scaling: Optional[str] = "kl_normalize",
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    layouts: Optional[Mapping] = None,
) -> optax.GradientTransformationExtraArgs:
  """The complete Eva-f optimizer: :func:`scale_by_eva_f` → ``optax.add_decayed_weights`` →
  ``optax.trace(momentum, nesterov)`` → ``−learning_rate`` (the order of :func:`eva`).

  Args: as :func:`~eva_optax.eva` and :func:`scale_by_eva_f`. Call ``update(grads, state,
  params, curvature=curvature)`` with ``statistics="activation_vector"``.

  Raises: as :func:`scale_by_eva_f`, and ``ValueError`` for a negative or non-finite
  ``learning_rate``.
  """
  return transform.with_momentum(
      scale_by_eva_f(damping, damping_mode=damping_mode, relative_damping=relative_damping,
                     stat_decay=stat_decay, scaling=scaling, layouts=layouts),
      learning_rate, momentum, nesterov, weight_decay)
