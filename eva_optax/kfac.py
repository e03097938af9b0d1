"""K-FAC: Kronecker-factored approximate curvature.

Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature",
ICML 2015; for convolutions (KFC) Grosse & Martens, "A Kronecker-factored approximate Fisher
matrix for convolution layers", ICML 2016. Math and conventions: DESIGN §4.

Per layer the Fisher block is approximated by A ⊗ G, the Kronecker factors of the layer input
and of the per-example output gradient (:class:`~eva_optax.KroneckerFactors`). With factored
Tikhonov damping (Martens & Grosse §6.3) the direction is

    V = (A + π√γ I)⁻¹ Ĝ (G + √γ/π I)⁻¹,   π = √((tr A / dim A) / (tr G / dim G)),

with both inverses cached in the optimizer state and refreshed every ``inverse_update_period``
steps.
"""

from __future__ import annotations

import functools
from typing import Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from eva_optax import collectors, distributed, layers, transform

_HIGHEST = jax.lax.Precision.HIGHEST
INVERSE_METHODS = ("cholesky", "eigh")


class KFACInverses(NamedTuple):
  """One layer's cached damped inverses (float32).

  Attributes:
    a: ``[d, d]`` (A + π√γ I)⁻¹, d = d_in (+1 with a bias).
    g: ``[d_out, d_out]`` (G + √γ/π I)⁻¹.
  """

  a: jax.Array
  g: jax.Array


def damped_inverse(matrix: jax.Array, damping, method: str = "cholesky") -> jax.Array:
  """(M + damping·I)⁻¹ of a symmetric positive semi-definite float32 ``[n, n]`` matrix.

  ``M`` is symmetrized first (rounding makes running averages slightly asymmetric).
  ``"cholesky"``: Cholesky factor and two triangular solves; not finite when M + damping·I is
  not numerically positive definite. ``"eigh"``: eigendecomposition with negative eigenvalues
  (rounding) clipped to 0, so always finite for a finite M. The result is symmetrized.

  Under ``jax.vmap`` (a layer stack's slices) the CPU computes the slices one after another:
  jaxlib's batched CPU LAPACK kernels spread a batch over XLA's intra-op thread pool, and two of
  them running at once (A's and G's refresh) can each wait on the other's workers forever on a
  2-core machine (seen: a K-FAC refresh of a 4-layer ``nn.scan`` Transformer hung with every
  worker idle). Other platforms, and stacks sharded on an explicit mesh (whose slices live on
  different devices), keep the batched kernels.
  """
  one = functools.partial(_damped_inverse, method=method)
  damping = jnp.asarray(damping, matrix.dtype)
  if layers.explicit_mesh(matrix) is not None:
    return one(matrix, damping)
  return jax.lax.platform_dependent(
      matrix, damping, cpu=jax.custom_batching.sequential_vmap(one), default=one)


def _damped_inverse(matrix: jax.Array, damping, method: str) -> jax.Array:
  sym = 0.5 * (matrix + matrix.T)
  eye = jnp.eye(sym.shape[0], dtype=sym.dtype)
  if method == "cholesky":
    factor = jnp.linalg.cholesky(sym + damping * eye)
    inverse = jax.scipy.linalg.cho_solve((factor, True), eye)
  else:
    values, vectors = jnp.linalg.eigh(sym)
    inverse = jnp.matmul(vectors / (jnp.maximum(values, 0.0) + damping), vectors.T,
                         precision=_HIGHEST)
  return 0.5 * (inverse + inverse.T)


def factored_damping(a: jax.Array, g: jax.Array, damping) -> tuple[jax.Array, jax.Array]:
  """(π√γ, √γ/π) with π = √((tr A/dim A)/(tr G/dim G)); π = 1 when a trace is not positive."""
  mean_a = jnp.trace(a) / a.shape[0]
  mean_g = jnp.trace(g) / g.shape[0]
  valid = (mean_a > 0) & (mean_g > 0)
  pi = jnp.where(valid, jnp.sqrt(jnp.where(valid, mean_a / mean_g, 1.0)), 1.0)
  root = jnp.sqrt(jnp.asarray(damping, jnp.float32))
  return pi * root, root / pi


def refresh_every(period, count: jax.Array, compute, state):
  """``compute()`` on steps 0, T, 2T, … (``lax.cond``), else ``state``; a result with a
  non-finite entry keeps ``state`` (the last good inverses)."""
  def refresh(state):
    new = compute()
    return collectors.keep_unless(~collectors.all_finite(new), new, state)
  return jax.lax.cond(count % period == 0, refresh, lambda state: state, state)


def damped_inverses(matrices: list, dampings: list, method: str, mesh) -> list:
  """:func:`damped_inverse` of every ``[k_i, n_i, n_i]`` stack with its ``[k_i]`` dampings,
  the matrices of equal size in one computation spread over ``mesh``'s devices
  (:func:`eva_optax.distributed.vmap_over_devices`; ``None``: computed locally)."""
  groups = {}
  for i, m in enumerate(matrices):
    groups.setdefault(m.shape[-1], []).append(i)
  out = [None] * len(matrices)
  for members in groups.values():
    inverses = distributed.vmap_over_devices(
        functools.partial(damped_inverse, method=method),
        jnp.concatenate([matrices[i] for i in members]),
        jnp.concatenate([dampings[i] for i in members]), mesh=mesh)
    stop = 0
    for i in members:
      start, stop = stop, stop + matrices[i].shape[0]
      out[i] = inverses[start:stop]
  return out


def refresh_all_every(period, count: jax.Array, compute, states: dict) -> dict:
  """Every layer's refresh at once: ``compute()`` (``{layer: new state}``) on steps 0, T, 2T, …
  (``lax.cond``), else ``states``; per matrix (a stack's slices apart), a result with a
  non-finite entry keeps the previous one."""
  def keep_finite(new, old):
    ok = jnp.all(jnp.isfinite(new), axis=(-2, -1))
    return jnp.where(ok[..., None, None], new, old)

  def refresh(states):
    return jax.tree.map(keep_finite, compute(), states)
  return jax.lax.cond(count % period == 0, refresh, lambda states: states, states)


def flat_stack(x: jax.Array) -> jax.Array:
  """A stack of ``[n, n]`` matrices (any leading axes) as ``[k, n, n]``."""
  return x.reshape(-1, *x.shape[-2:])


def check_inverse_options(damping, inverse_update_period, inverse: str, stat_decay) -> None:
  transform.check_positive("damping", damping)
  # Outside [0, 1] the running average extrapolates instead of averaging.
  transform.check_unit_interval("stat_decay", stat_decay)
  transform.check_positive("inverse_update_period", inverse_update_period)
  if inverse not in INVERSE_METHODS:
    raise ValueError(f"eva_optax: inverse must be one of {INVERSE_METHODS}, got {inverse!r}.")


def _identity_inverses(d_in, d_out, has_bias) -> KFACInverses:
  return KFACInverses(jnp.eye(d_in + has_bias, dtype=jnp.float32),
                      jnp.eye(d_out, dtype=jnp.float32))


def _kfac_preconditioner(damping, inverse_update_period, inverse: str,
                         refresh_mesh) -> transform.Preconditioner:
  """K-FAC's per-layer inverses (A + π√γ I)⁻¹, (G + √γ/π I)⁻¹, refreshed every period (all
  layers at once, spread over ``refresh_mesh``, when given), and its direction A⁻¹ Ĝ G⁻¹."""
  def update(stats, state, count):
    def compute():
      damp_a, damp_g = factored_damping(stats.a, stats.g, damping)
      return KFACInverses(damped_inverse(stats.a, damp_a, inverse),
                          damped_inverse(stats.g, damp_g, inverse))
    return refresh_every(inverse_update_period, count, compute, state)

  def update_all(stats, states, count):
    def compute():
      a = [flat_stack(s.a) for s in stats.values()]
      g = [flat_stack(s.g) for s in stats.values()]
      damp_a, damp_g = zip(*[jax.vmap(factored_damping, (0, 0, None))(x, y, damping)
                             for x, y in zip(a, g)])
      inverses = damped_inverses(a + g, list(damp_a + damp_g), inverse, refresh_mesh)
      return {name: KFACInverses(inverses[i].reshape(s.a.shape),
                                 inverses[len(a) + i].reshape(s.g.shape))
              for i, (name, s) in enumerate(stats.items())}
    return refresh_all_every(inverse_update_period, count, compute, states)

  def apply(stats, state, grad_matrix):
    del stats
    # On an explicit mesh Ĝ's columns may be sharded (layers.matrix_spec): the right factor
    # contracts them, so the product's sharding (Ĝ's) is spelled out.
    mesh = layers.explicit_mesh(grad_matrix)
    out = None if mesh is None else jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*layers.spec(grad_matrix)))
    return jnp.matmul(jnp.matmul(state.a, grad_matrix, precision=_HIGHEST), state.g,
                      precision=_HIGHEST, out_sharding=out)

  return transform.Preconditioner(_identity_inverses, update, apply,
                                  None if refresh_mesh is None else update_all)


def scale_by_kfac(
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
  """K-FAC's preconditioned direction, to compose with momentum and a learning rate.

  Args:
    damping: γ > 0, Tikhonov damping of the Fisher A ⊗ G in per-example units, split over the
      factors as π√γ and √γ/π. kfac-jax's empirical-Fisher damping at batch size B is γ/B (its
      G is ours / B): its 1e-3 at B = 1000 is γ = 1 here.
    stat_decay: weight of the *new* factors in the running averages (the package-wide
      convention, see :func:`~eva_optax.running_average`): default 0.05, i.e. the old factors
      weigh 0.95 (kfac-jax's ``curvature_ema=0.95``). Bad records are rejected, i.e. leave the
      running factors as they were for that step (the step's gradient is still preconditioned
      with them): a record with a non-finite entry, and, after the first step, one whose A or
      G has a largest |entry| above ``collectors.MAX_SCALE_JUMP`` (1e6) times the running
      factor's — at this stat_decay a single 1e30 record would otherwise dominate the factors
      for ~200 steps. A genuine change of scale passes when spread over several steps.
    inverse_update_period: T ≥ 1; the inverses are recomputed on steps 0, T, 2T, … with
      ``lax.cond`` and reused in between (reference: 10 on CIFAR, 50 on ImageNet).
    inverse: ``"cholesky"`` (default) or ``"eigh"``. A refresh that is not finite keeps the
      previous inverses (identity before the first good one: the plain gradient).
    scaling: applied once over all captured layers. ``"kl_clip"`` (default, as in K-FAC and
      the ICLR Eva reference): ν = min(1, √(κ / (η² Σ⟨V, Ĝ⟩))) with η = ``learning_rate`` at
      this step; ``"kl_normalize"``: V / √Σ⟨V, Ĝ⟩; ``None``: V itself.
    kl_clip: κ > 0 of ``"kl_clip"``.
    learning_rate: η for ``"kl_clip"`` (float or optax schedule).
    layouts: ``{layer: Layout}`` for layer stacks and multi-axis kernels, as in
      :func:`~eva_optax.scale_by_kronecker` (from the capture's ``describe(...).layouts``).
    refresh_mesh: ``None`` (default): every device computes every inverse of a refresh. A
      ``jax.sharding.Mesh``: the inverses of all layers (A's and G's alike) are grouped by
      size and each device of the mesh computes a slice of each group, then the results are
      gathered (:func:`eva_optax.distributed.vmap_over_devices`): the same inverses for
      ~1/devices of the work, under ``jax.jit`` (not inside ``pmap``/``shard_map``). With
      ``optax.inject_hyperparams`` list it in ``static_args`` (a Mesh is callable).

  Returns:
    ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params, *, curvature)``
    with :class:`~eva_optax.KroneckerFactors` records, from
    ``eva_optax.flax.value_and_grad(loss_fn, statistics="kronecker_factors")``. State: running
    A, G per layer (``stats``) and :class:`KFACInverses` (``preconditioner``), float32:
    O(d_in² + d_out²) per layer.

  Raises:
    ValueError: ``damping``, ``inverse_update_period`` or ``kl_clip`` not positive,
      ``stat_decay`` outside [0, 1], unknown ``inverse`` or ``scaling``, ``"kl_clip"`` without
      ``learning_rate``, a negative or non-finite ``learning_rate``; at update time (trace time
      under jit) missing or mismatched ``curvature``, a stale state (see
      :mod:`eva_optax.guards`).
    TypeError: integer parameters or gradients, curvature of the wrong kind or dtype, a state
      restored from a checkpoint without a target, a ``refresh_mesh`` that is not a Mesh.
  """
  check_inverse_options(damping, inverse_update_period, inverse, stat_decay)
  distributed.check_mesh(refresh_mesh, "kfac")

  return transform.scale_by_kronecker(
      collectors.kronecker_factors(stat_decay),
      _kfac_preconditioner(damping, inverse_update_period, inverse, refresh_mesh),
      transform.scaling_by_name(scaling, kl_clip, learning_rate), layouts, name="kfac")


def kfac(
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
  """The complete K-FAC optimizer: :func:`scale_by_kfac` → ``optax.add_decayed_weights`` →
  ``optax.trace(momentum, nesterov)`` → ``−learning_rate`` (the order of :func:`eva`).

  Args:
    learning_rate: η, float or optax schedule.
    momentum, nesterov, weight_decay: as in :func:`~eva_optax.eva`.
    damping, stat_decay, inverse_update_period, inverse, scaling, kl_clip, layouts,
      refresh_mesh: as in :func:`scale_by_kfac`.

  Returns:
    ``optax.GradientTransformationExtraArgs``; call ``update(grads, state, params,
    curvature=curvature)`` with ``statistics="kronecker_factors"``.

  Raises:
    ValueError, TypeError: as :func:`scale_by_kfac`.
  """
  return transform.with_momentum(
      scale_by_kfac(damping, stat_decay=stat_decay, inverse_update_period=inverse_update_period,
                    inverse=inverse, scaling=scaling, kl_clip=kl_clip,
                    learning_rate=learning_rate, layouts=layouts, refresh_mesh=refresh_mesh),
      learning_rate, momentum, nesterov, weight_decay)
