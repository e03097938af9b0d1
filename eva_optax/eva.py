"""Eva: Kronecker-vectorized second-order optimization by Sherman–Morrison.

Zhang, Shi, Li, "Eva: Practical Second-order Optimization with Kronecker-vectorized
Approximation", ICLR 2023; journal extension "Eva: A General Vectorized Approximation Framework
for Second-order Optimization". Math and conventions: DESIGN §4.

Per layer the Fisher is approximated by the rank-one Kronecker product F̃ = (ā āᵀ) ⊗ (ḡ ḡᵀ) of
two running vectors, and the damped inverse applies in closed form (Sherman–Morrison):

    V = γ (F̃ + γI)⁻¹ vec(Ĝ) = Ĝ − [āᵀ Ĝ ḡ / (‖ā‖²‖ḡ‖² + γ)] · ā ḡᵀ

in O(d_in·d_out) time and O(d_in + d_out) state.

Statistics (``statistics=`` of :func:`scale_by_eva`, the keys of :data:`STATISTICS`), the
rank-one Kronecker vectors by the capture's statistics name:

``"kronecker_vectors"`` (default): the paper's running means ā, ḡ.

``"kronecker_eigenvectors"``: the leading eigenvectors of the Kronecker factors A, G,
tracked by a streaming power iteration (:class:`~eva_optax.KroneckerEigenvectors`), so
F̃ = (λ_a u uᵀ) ⊗ (λ_g v vᵀ), the Eckart–Young-optimal rank-one factors, which do not
vanish where ḡ does (BatchNorm convs, attention keys). The capture call needs
``eigenvector_estimates=eva_optax.eigenvector_estimates(opt_state)``. Approximation: one
power step per step on the current batch, averaged like the other statistics (the noisy
power method, Hardt & Price, NeurIPS 2014), converging like (λ₂/λ₁)ᵗ. Cost: two
matrix–vector passes per layer in the capture (a conv: two one-channel convolutions).
Measured (benchmarks/RESULTS.md, issue 14): it engages the correction there but does not
beat the means.

``"fisher_eigenvectors"``: the leading Kronecker-product eigenvector u ⊗ v of the
layer's empirical Fisher F = mean over examples of Σ_rows vec(a gᵀ)vec(a gᵀ)ᵀ (expand
setting), by an alternating power iteration (:class:`~eva_optax.FisherEigenvectors`),
so F̃ = λ (u uᵀ) ⊗ (v vᵀ): a and g are coupled per row, so the direction is one of large
per-row gradient energy, which the Fisher keeps where the batch means cancel. Same
``eigenvector_estimates`` plumbing, approximation and convergence as the previous;
cost: one projection of the input and one of the output gradient per row and their
weighted sums (a conv: one one-channel convolution and its kernel gradient), in the
backward pass, with the layer input as residual. Measured (same place): it engages the
correction too and does not beat the means either.

``"gradient_singular_vectors"``: Eva's own curvature vec(C) vec(C)ᵀ, C = E[a gᵀ] the
per-example kernel gradient averaged over rows, without the paper's E[a gᵀ] ≈ ā ḡᵀ:
F̃ = σ² (u uᵀ) ⊗ (v vᵀ) from C's leading singular triple, tracked by a power iteration
(:class:`~eva_optax.GradientSingularVectors`; one C v̂ and one Cᵀ û per step, the same
cost and plumbing as the previous). It is the means' curvature where a and g are
uncorrelated, and does not vanish where ḡ does (C = Cov(a, g) there). σ² is in the
means' units, so a conv's is below the default floor: pass ``damping=1e-8`` to engage
it there. Measured (same place): with that floor it beats the correction switched off
on a BatchNorm ResNet-20 and ties the means there, but not on a Transformer LM or MNIST.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from eva_optax import collectors, layers, linalg, transform

_HIGHEST = jax.lax.Precision.HIGHEST
DAMPING_MODES = ("absolute", "relative")
# Eva's statistics: the mean vectors ā, ḡ (the paper's), the leading eigenvectors of the
# Kronecker factors or the Fisher's leading Kronecker-product eigenvector (power iterations),
# by the capture's statistics name.
STATISTICS = {"kronecker_vectors": collectors.kronecker_vectors,
              "kronecker_eigenvectors": collectors.kronecker_eigenvectors,
              "fisher_eigenvectors": collectors.fisher_eigenvectors,
              "gradient_singular_vectors": collectors.gradient_singular_vectors}
_ITERATED = (collectors.KroneckerEigenvectors, collectors.FisherEigenvectors,
             collectors.GradientSingularVectors)
# The package's global scalings plus Eva's trust region (kl_clip's formula on V itself).
SCALINGS = transform.SCALINGS + ("trust_region",)


class EvaLayerTerms(NamedTuple):
  """One layer's Sherman–Morrison terms (all float32).

  Attributes:
    direction: V = γ_eff (F̃ + γ_eff I)⁻¹ Ĝ, shape of Ĝ.
    damping: γ_eff, scalar.
    signal: ‖ā‖²‖ḡ‖², scalar — the one nonzero eigenvalue of F̃.
  """

  direction: jax.Array
  damping: jax.Array
  signal: jax.Array


def effective_damping(signal: jax.Array, damping, damping_mode: str, relative_damping):
  """γ_eff: ``damping`` (``"absolute"``) or max(``damping``, λ·signal) (``"relative"``), with
  signal the nonzero eigenvalue of the rank-one curvature, float32 scalar."""
  gamma = jnp.asarray(damping, jnp.float32)
  if damping_mode == "relative":
    gamma = jnp.maximum(gamma, jnp.asarray(relative_damping, jnp.float32) * signal)
  return gamma


def removed_fraction(log_signal: jax.Array, damping, damping_mode: str,
                     relative_damping) -> jax.Array:
  """r = μ/(μ + γ_eff), the fraction of the gradient's component along the rank-one curvature
  direction that Sherman–Morrison removes, from log μ (μ itself overflows float32 for
  statistics ≳ 1e10 per vector entry): 1/(1 + γ/μ) (``"absolute"``), at most 1/(1 + λ)
  (``"relative"``, γ_eff = max(γ, λμ)). μ = 0 (log μ = −∞) gives 0."""
  log_gamma = jnp.log(jnp.asarray(damping, jnp.float32))
  fraction = jax.nn.sigmoid(log_signal - log_gamma)
  if damping_mode == "relative":
    fraction = jnp.minimum(fraction, 1.0 / (1.0 + jnp.asarray(relative_damping, jnp.float32)))
  return fraction


def remove_rank_one(grad: jax.Array, units, fraction: jax.Array) -> jax.Array:
  """G − r ⟨G, u⟩ u with u = u₁∘…∘u_k the outer product of the unit vectors ``units`` (one per
  axis of G): the Sherman–Morrison direction γ_eff (μ u uᵀ + γ_eff I)⁻¹ vec(G) for
  r = :func:`removed_fraction`. With unit vectors every term is bounded by ‖G‖ (no overflow),
  and with r ≤ 1/(1 + λ) the kept part (1 − r)⟨G, u⟩u dominates the float32 rounding of the
  subtraction even when G lies along u."""
  letters = "abcdefghijklmnopqrstuvwxyz"[:grad.ndim]
  outer = jnp.einsum(",".join(letters) + "->" + letters, *units, precision=_HIGHEST)
  # ⟨G, u⟩ as a product and a sum, not a contraction: G may be explicitly sharded.
  return grad - (fraction * jnp.sum(grad * outer)) * outer


def eva_layer(stats: collectors.KroneckerVectors, grad_matrix: jax.Array, damping,
              damping_mode: str = "relative", relative_damping=0.5) -> EvaLayerTerms:
  """Sherman–Morrison direction of one layer (DESIGN §4).

  Args:
    stats: ā ``(d_in[+1],)`` (bias-augmented when Ĝ has a bias row) and ḡ ``(d_out,)``, float32.
    grad_matrix: Ĝ ``[d_in[+1], d_out]`` float32.
    damping: γ > 0 in per-example units.
    damping_mode: ``"absolute"``: γ_eff = γ; ``"relative"``: γ_eff = max(γ, λ‖ā‖²‖ḡ‖²), which
      bounds the fraction of Ĝ's ā ḡᵀ component the correction removes by 1/(1+λ).
    relative_damping: λ ≥ 0 of the relative mode.
  """
  (unit_a, log_a), (unit_g, log_g) = linalg.unit_vector(stats.a), linalg.unit_vector(stats.g)
  # ‖ā‖²‖ḡ‖² overflows float32 for entries ≳ 1e10: the direction uses its logarithm only.
  log_signal = 2 * (log_a + log_g)
  fraction = removed_fraction(log_signal, damping, damping_mode, relative_damping)
  direction = remove_rank_one(grad_matrix, (unit_a, unit_g), fraction)
  signal = jnp.exp(log_signal)  # reported (diagnostics, kl_clip's γ_eff); inf if it overflows
  return EvaLayerTerms(direction, effective_damping(signal, damping, damping_mode,
                                                    relative_damping), signal)


def check_damping_mode(damping_mode, relative_damping) -> None:
  """Raises ``ValueError`` for an unknown ``damping_mode`` or a negative ``relative_damping``."""
  if damping_mode not in DAMPING_MODES:
    raise ValueError(f"eva_optax: damping_mode must be one of {DAMPING_MODES}, "
                     f"got {damping_mode!r}.")
  if damping_mode == "relative":
    transform.check_positive("relative_damping", relative_damping, allow_zero=True)


def check_statistics(statistics) -> None:
  """Raises ``ValueError`` unless ``statistics`` is one of :data:`STATISTICS`."""
  if statistics not in STATISTICS:
    raise ValueError(f"eva_optax: Eva's statistics must be one of {tuple(STATISTICS)}, got "
                     f"{statistics!r}.")


def layer_vectors(stats, has_bias: bool) -> collectors.KroneckerVectors:
  """The rank-one vectors Sherman–Morrison uses, bias-augmented: ā, ḡ (with 1 appended to ā
  for a bias), or √λ u, √λ v from the power-iteration estimates (augmented already)."""
  if isinstance(stats, (collectors.KroneckerEigenvectors, collectors.GradientSingularVectors)):
    return collectors.rank_one_vectors(stats)
  if isinstance(stats, collectors.FisherEigenvectors):
    return collectors.fisher_rank_one_vectors(stats)
  return collectors.vectors_with_bias(stats) if has_bias else stats


def check_damping(damping, damping_mode, relative_damping, scaling, stat_decay) -> None:
  transform.check_positive("damping", damping)
  # Outside [0, 1] the running average extrapolates: −0.5 grows the statistics 1.5× a step.
  transform.check_unit_interval("stat_decay", stat_decay)
  check_damping_mode(damping_mode, relative_damping)
  if scaling not in SCALINGS:
    raise ValueError(f"eva_optax: scaling must be one of {SCALINGS}, got {scaling!r}.")
  if scaling == "kl_clip" and damping_mode != "absolute":
    # Measured (benchmarks/RESULTS.md): Ṽ = B²V/γ_eff with γ_eff ∝ ‖ā‖²‖ḡ‖² makes the clipped
    # step a fixed-length jump that diverged on every task and learning rate tried.
    raise ValueError("eva_optax: scaling='kl_clip' is the ICLR reference's step and needs "
                     "damping_mode='absolute' with the reference's damping (γ_ref·B²) and "
                     "batch_size=B; use scaling='kl_normalize' with relative damping.")


def scale_by_eva(
    damping: float = 1e-3,
    *,
    damping_mode: str = "relative",
    relative_damping: float = 0.5,
    stat_decay: float = 0.95,
    scaling: Optional[str] = "kl_normalize",
    kl_clip: float = 1e-3,
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    batch_size: int = 1,
    layouts: Optional[Mapping] = None,
    statistics: str = "kronecker_vectors",
) -> optax.GradientTransformationExtraArgs:
  """Eva's preconditioned direction, to compose with momentum and a learning rate.

  Args:
    damping: γ > 0, float, in per-example units (statistics are per-example means, so γ means the
      same at every batch size and device count). In ``"relative"`` mode it is only a floor;
      note that a conv layer's ‖ā‖²‖ḡ‖² (per-position units) is typically below 1e-3, so the
      default floor leaves conv corrections off (1e-8 switches them on; no measurable change on
      ``mnist_cnn``, see benchmarks/RESULTS.md). The reference's γ_ref at batch B converts to
      γ = γ_ref·B² (absolute mode).
    damping_mode: ``"relative"`` (default; γ_eff = max(γ, λ‖ā‖²‖ḡ‖²)) or ``"absolute"``
      (γ_eff = γ, the reference).
    relative_damping: λ ≥ 0 of the relative mode (default 0.5: at most 2/3 of the gradient's
      ā ḡᵀ component is removed).
    stat_decay: weight of the *new* statistics in the running averages (reference convention):
      m ← stat_decay·new + (1 − stat_decay)·m, and m = new on the first step.
    scaling: applied once over all captured layers.
      ``"kl_normalize"`` (journal, default): V / √Σ⟨V, Ĝ⟩.
      ``"kl_clip"`` (ICLR): on the reference's direction Ṽ = B²(F̃ + γI)⁻¹Ĝ, the factor
      ν = min(1, √(κ / (η² Σ⟨Ṽ, Ĝ⟩))) with η = ``learning_rate`` at this step; absolute
      damping only.
      ``"trust_region"``: ν = min(1, √(κ / (η² Σ⟨V, Ĝ⟩))) on V itself (any damping mode): the
      SGD step η·V cut to the KL radius √κ only when longer, so near a minimum steps shrink
      as SGD's do (for constant learning rates; η is then in SGD's units).
      ``None``: the update is exactly V = γ_eff (F̃ + γ_eff I)⁻¹ Ĝ.
    kl_clip: κ > 0 of ``"kl_clip"`` (reference 0.001) and ``"trust_region"``.
    learning_rate: η for ``"kl_clip"`` and ``"trust_region"`` (float or optax schedule,
      evaluated at the step count; :func:`eva` passes its own).
    batch_size: per-device batch size B, used only by ``"kl_clip"`` to express the direction in
      the reference's mean-loss units (its ḡ is ḡ/B, its γ is γ/B²); 1 keeps per-example units.
    layouts: ``{layer: Layout}`` for layer stacks and multi-axis kernels, as in
      :func:`~eva_optax.scale_by_kronecker` (from the capture's ``describe(...).layouts``).
    statistics: the rank-one Kronecker vectors, by the capture's statistics name: one of
      :data:`STATISTICS` (default ``"kronecker_vectors"``, the paper's means ā, ḡ); the
      module docstring's "Statistics" gives each one's approximation, cost, source and measured
      effect. The power-iteration kinds need the capture's
      ``eigenvector_estimates=eva_optax.eigenvector_estimates(opt_state)``.

  Returns:
    ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params, *, curvature)``
    with ``curvature`` of :class:`~eva_optax.KroneckerVectors` (or
    :class:`~eva_optax.KroneckerEigenvectors`) records (capture them with
    ``eva_optax.flax.value_and_grad(loss_fn, statistics=statistics)``).

  Raises:
    ValueError: ``damping <= 0``, ``kl_clip <= 0``, a negative ``relative_damping``,
      ``stat_decay`` outside [0, 1], unknown ``damping_mode`` or ``scaling``, ``"kl_clip"`` or
      ``"trust_region"`` without ``learning_rate``, ``"kl_clip"`` with relative damping, a
      negative or non-finite ``learning_rate``; at update time (trace time under jit) missing or mismatched
      ``curvature``, a stale state (see :mod:`eva_optax.guards`).
    TypeError: integer parameters or gradients, curvature of the wrong kind or dtype, a state
      restored from a checkpoint without a target.
  """
  check_damping(damping, damping_mode, relative_damping, scaling, stat_decay)
  check_statistics(statistics)
  preconditioner = _preconditioner(damping, damping_mode, relative_damping,
                                   scaling == "kl_clip", batch_size)
  return transform.scale_by_kronecker(
      STATISTICS[statistics](stat_decay), preconditioner,
      _step_scaling(scaling, kl_clip, learning_rate), layouts, name="eva")


def _preconditioner(damping, damping_mode, relative_damping, natural: bool,
                    batch_size: int) -> transform.Preconditioner:
  """Eva's stateless per-layer Sherman–Morrison step; ``natural``: in the ICLR reference's
  units Ṽ = B²V/γ_eff (its ``kl_clip`` acts on those)."""
  def apply(stats, state, grad_matrix):
    del state
    terms = eva_layer(layer_vectors(stats, False), grad_matrix, damping, damping_mode,
                      relative_damping)
    if natural:
      return terms.direction * (batch_size ** 2 / terms.damping)
    return terms.direction

  return transform.Preconditioner(
      init=lambda d_in, d_out, has_bias: (), update=lambda stats, state, count: state,
      apply=apply)


def _step_scaling(scaling, kl_clip, learning_rate) -> transform.Scaling:
  """The global scaling of :data:`SCALINGS`: ``"trust_region"`` is kl_clip's factor on V."""
  if scaling == "trust_region":
    return transform.kl_clip(kl_clip, learning_rate)
  return transform.scaling_by_name(scaling, kl_clip, learning_rate)


def eva(
    learning_rate: optax.ScalarOrSchedule,
    *,
    damping: float = 1e-3,
    damping_mode: str = "relative",
    relative_damping: float = 0.5,
    stat_decay: float = 0.95,
    scaling: Optional[str] = "kl_normalize",
    kl_clip: float = 1e-3,
    batch_size: int = 1,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    layouts: Optional[Mapping] = None,
    statistics: str = "kronecker_vectors",
) -> optax.GradientTransformationExtraArgs:
  """The complete Eva optimizer, in the reference's order:
  precondition (:func:`scale_by_eva`) → ``optax.add_decayed_weights(weight_decay)`` →
  ``optax.trace(momentum, nesterov)`` → ``−learning_rate``.

  Args:
    learning_rate: η, float or optax schedule.
    momentum: heavy-ball coefficient of ``optax.trace`` (default 0.9).
    nesterov: Nesterov momentum.
    weight_decay: L2 coefficient added to the *preconditioned* direction (reference order).
    damping, damping_mode, relative_damping, stat_decay, scaling, kl_clip, batch_size, layouts,
      statistics: as in :func:`scale_by_eva`.

  Returns:
    ``optax.GradientTransformationExtraArgs``; call ``update(grads, state, params,
    curvature=curvature)``. Works in ``optax.chain`` and ``optax.inject_hyperparams``.

  Raises:
    ValueError, TypeError: as :func:`scale_by_eva`.
  """
  return transform.with_momentum(
      scale_by_eva(damping, damping_mode=damping_mode, relative_damping=relative_damping,
                   stat_decay=stat_decay, scaling=scaling, kl_clip=kl_clip,
                   learning_rate=learning_rate, batch_size=batch_size, layouts=layouts,
                   statistics=statistics),
      learning_rate, momentum, nesterov, weight_decay)


def eva_diagnostics(grads, stats: Mapping[str, collectors.KroneckerVectors], *,
                    damping: float = 1e-3, damping_mode: str = "relative",
                    relative_damping: float = 0.5,
                    layouts: Optional[Mapping] = None) -> dict[str, dict[str, jax.Array]]:
  """Whether the second-order correction does anything, per layer.

  Args:
    grads: gradient pytree (as passed to ``update``).
    stats: the running statistics, ``ScaleByKroneckerState.stats`` (e.g.
      ``optax.tree_utils.tree_get(opt_state, "stats")``), of either ``statistics``.
    damping, damping_mode, relative_damping, layouts: as given to :func:`scale_by_eva`.

  Returns:
    ``{layer: {"signal_to_damping": ‖ā‖²‖ḡ‖²/γ_eff, "removed_fraction": 1 − ⟨V,Ĝ⟩/⟨Ĝ,Ĝ⟩}}``
    (float32; scalars, or one per slice ``[*stack]`` for a layer stack) for every layer with
    statistics.
  """
  layouts = transform.flat_layouts(layouts)
  out = {}
  for name, layer in layers.find_layers(grads, layouts).items():
    if name not in stats:
      continue
    layout = layouts.get(name, layers.Layout())

    def one(layer_stats, matrix, has_bias="bias" in layer):
      terms = eva_layer(layer_vectors(layer_stats, has_bias), matrix, damping, damping_mode,
                        relative_damping)
      return {
          "signal_to_damping": terms.signal / terms.damping,
          "removed_fraction": 1.0 - jnp.vdot(terms.direction, matrix) / jnp.vdot(matrix, matrix),
      }

    out[name] = layers.over_stack(one, layout.stacked_axes)(stats[name],
                                                             layers.to_matrix(layer, layout))
  return out


def eigenvector_estimates(opt_state) -> dict:
  """The running power-iteration estimates of an Eva optimizer state built with
  ``statistics`` ``"kronecker_eigenvectors"``, ``"fisher_eigenvectors"`` or
  ``"gradient_singular_vectors"``, for the next capture call's ``eigenvector_estimates=``
  (``{layer: record}``, stack axes leading).

  Raises:
    ValueError: ``opt_state`` holds no such Eva state (or several).
  """
  records = [stats for _, stats in optax.tree_utils.tree_get_all_with_path(opt_state, "stats")
             if isinstance(stats, Mapping) and stats and all(
                 isinstance(r, _ITERATED) for r in stats.values())]
  if len(records) != 1:
    raise ValueError(
        "eva_optax: eigenvector_estimates needs the state of one Eva optimizer built with "
        "statistics='kronecker_eigenvectors', 'fisher_eigenvectors' or "
        "'gradient_singular_vectors'; found "
        f"{len(records)} such statistics in opt_state.")
  return dict(records[0])
