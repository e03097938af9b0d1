"""FOOF: first-order optimization with one-sided (activation) curvature.

Benzing, "Gradient Descent on Neurons and its Link to Approximate Second-order Optimization",
ICML 2022. Math: DESIGN §4. Per layer

    V = (A + γI)⁻¹ Ĝ,

A the (bias-augmented) activation factor of K-FAC (:class:`~eva_optax.ActivationFactor`), with
the damped inverse cached and refreshed every ``inverse_update_period`` steps.
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from eva_optax import collectors, distributed, transform
from eva_optax.kfac import (check_inverse_options, damped_inverse, damped_inverses, flat_stack,
                             refresh_all_every, refresh_every)


def scale_by_foof(
    damping: float = 1e-3,
    *,
    stat_decay: float = 0.05,
    inverse_update_period: int = 10,
    inverse: str = "cholesky",
    scaling: Optional[str] = "kl_clip",
    kl_clip: float = 1e-3,
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    layouts: Optional[Mapping] = None,
    refresh_mesh: Optional[jax.sharding.Mesh] = None,
) -> optax.GradientTransformationExtraArgs:
  """FOOF's preconditioned direction (A + γI)⁻¹ Ĝ, to compose with momentum and a learning rate.

  Args:
    damping: γ > 0, added to A (units of squared activations).
    stat_decay, inverse_update_period, inverse, scaling, kl_clip, learning_rate, layouts,
      refresh_mesh: as in :func:`~eva_optax.scale_by_kfac` (the mesh spreads the layers'
      inverses of A over its devices); in particular a record with a non-finite entry, or
      (after the first step) one whose A jumps in scale by more than 1e6×
      (``collectors.MAX_SCALE_JUMP``), leaves the running A unchanged for that step.

  Returns:
    ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params, *, curvature)``
    with :class:`~eva_optax.ActivationFactor` records, from
    ``eva_optax.flax.value_and_grad(loss_fn, statistics="activation_factor")`` (no output-gradient
    statistics are captured). State: running A and its damped inverse, O(d_in²) per layer.

  Raises:
    ValueError, TypeError: as :func:`~eva_optax.scale_by_kfac`.
  """
  check_inverse_options(damping, inverse_update_period, inverse, stat_decay)
  distributed.check_mesh(refresh_mesh, "foof")

  def init(d_in, d_out, has_bias):
    del d_out
    return jnp.eye(d_in + has_bias, dtype=jnp.float32)

  def update(stats, state, count):
    return refresh_every(inverse_update_period, count,
                         lambda: damped_inverse(stats.a, damping, inverse), state)

  def update_all(stats, states, count):
    def compute():
      a = [flat_stack(s.a) for s in stats.values()]
      inverses = damped_inverses(a, [jnp.full(x.shape[:1], damping, x.dtype) for x in a],
                                 inverse, refresh_mesh)
      return {name: inv.reshape(s.a.shape) for inv, (name, s) in zip(inverses, stats.items())}
    return refresh_all_every(inverse_update_period, count, compute, states)

  def apply(stats, state, grad_matrix):
    del stats
    return jnp.matmul(state, grad_matrix, precision=jax.lax.Precision.HIGHEST)

  return transform.scale_by_kronecker(
      collectors.activation_factor(stat_decay),
      transform.Preconditioner(init, update, apply,
                               None if refresh_mesh is None else update_all),
      transform.scaling_by_name(scaling, kl_clip, learning_rate), layouts, name="foof")


def foof(
    learning_rate: optax.ScalarOrSchedule,
    *,
    damping: float = 1e-3,
    stat_decay: float = 0.05,
    inverse_update_period: int = 10,
    inverse: str = "cholesky",
    scaling: Optional[str] = "kl_clip",
    kl_clip: float = 1e-3,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    layouts: Optional[Mapping] = None,
    refresh_mesh: Optional[jax.sharding.Mesh] = None,
) -> optax.GradientTransformationExtraArgs:
  """The complete FOOF optimizer: :func:`scale_by_foof` → ``optax.add_decayed_weights`` →
  ``optax.trace(momentum, nesterov)`` → ``−learning_rate``.

  Args: as :func:`~eva_optax.kfac`. Call ``update(grads, state, params, curvature=curvature)``
  with ``statistics="activation_factor"``.

  Raises: as :func:`~eva_optax.scale_by_kfac`.
  """
  return transform.with_momentum(
      scale_by_foof(damping, stat_decay=stat_decay, inverse_update_period=inverse_update_period,
                    inverse=inverse, scaling=scaling, kl_clip=kl_clip,
                    learning_rate=learning_rate, layouts=layouts, refresh_mesh=refresh_mesh),
      learning_rate, momentum, nesterov, weight_decay)
