"""K-BFGS and K-BFGS(L): Kronecker-factored quasi-Newton methods.

Goldfarb, Ren, Bahamou, "Practical Quasi-Newton Methods for Training Deep Neural Networks",
NeurIPS 2020 (its Algorithm for K-BFGS / K-BFGS(L) and its double damping). Math: DESIGN §4.

Per layer the inverse Hessian block is approximated by a Kronecker product H^a ⊗ H^g, and the
step (Flax layout, Ĝ = [∇K; ∇b] ``[d_in (+1), d_out]``) is

    p = −H^a Ĝ H^g.

* **Activation side.** A ← β A + (1 − β) mean(a aᵀ) (bias-augmented; the first step takes the
  first batch's A), and H^a tracks (A + √λ I)⁻¹ by *Hessian-action* BFGS: the pair
  s_a = H^a ā, y_a = (A + √λ I) s_a updates H^a every step; the only explicit inverse is the
  one at the first step.
* **Output side.** H^g approximates the inverse Hessian of the loss with respect to the layer's
  pre-activation, by BFGS (K-BFGS, a dense ``[d_out, d_out]`` matrix) or L-BFGS with ``m``
  pairs (K-BFGS(L)), from the pair of a *second pass* on the same batch at the trial point
  W + αp (the next iterate): s = ȳ − ȳ⁺, y = ḡ − ḡ⁺ (ȳ the mean pre-activation, ḡ the mean
  per-example output gradient), averaged s ← β s + (1 − β) s_new (from zero, as the paper), then
  double damping (Powell μ₁ = 0.2 in the H form, then Levenberg–Marquardt μ₂ = √λ) and skipped
  when sᵀy is not safely positive (sᵀy ≤ 10⁻⁴·sᵀs·‖ḡ‖) or not finite.
* **Gradient.** Ĝ is the L2-regularized gradient (τ = 10⁻⁵) averaged with momentum
  m ← 0.9 m + 0.1 Ĝ (from zero, no bias correction), as the paper.

Units: the statistics are per-example means (ḡ = B·mean ∂L/∂y for a loss that is a mean over B
examples); the paper's code scales its output gradients by the batch size in exactly the same
way, so its defaults (lr 0.3, λ 0.3 on the MNIST autoencoder at batch 1000) mean the same here.

Deviations from the paper's public code, all minor: A starts from the first batch's A instead of
an average over one pass of the training set before training; the bias entry of ā in the
Hessian-action pair is 1 (the mean of the constant bias input) where that code uses the mean of
ā; layers without a bias and convolutions (im2col rows, KFC-style) are supported.

Huge gradients: the direction is linear in Ĝ, so a finite gradient of absurd scale (a bad
batch's 1e30) would ruin the parameters. A step whose incoming gradient's largest |entry|
exceeds ``eva_optax.collectors.MAX_SCALE_JUMP`` (1e6) times a running scale of it is skipped —
zero updates, every statistic, factor and ``count`` kept, no second pass learned from — as a
curvature record with such a jump is (1e6: far above a training run's step-to-step changes, far
below a bad number's). A first gradient of any scale is accepted, and one that grows steadily
(10× per step) is followed; the rule is :func:`eva_optax.guards.skipping_scale_jumps`.
Non-finite gradients are left to ``optax.apply_if_finite``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from eva_optax import bfgs, collectors, guards, layers, transform

_HIGHEST = jax.lax.Precision.HIGHEST
# What eva_optax.flax.value_and_grad must capture for K-BFGS (first pass), and for the second.
KBFGS_STATISTICS = ("activation_factor", "activation_vector", "output_vectors")
SECOND_PASS_STATISTICS = "output_vectors"


class KBFGSStatistics(NamedTuple):
  """Running statistics of one layer (float32).

  Attributes:
    a: ``[d, d]`` A, running average of mean(a aᵀ), d = d_in (+1 with a bias).
    s: ``(d_out,)`` running average of the pre-activation change s = ȳ − ȳ⁺.
    y: ``(d_out,)`` running average of the output-gradient change y = ḡ − ḡ⁺.
  """

  a: jax.Array
  s: jax.Array
  y: jax.Array


class KBFGSFactors(NamedTuple):
  """The two inverse factors of one layer.

  Fields are in alphabetical order (as :class:`~eva_optax.ScaleByKroneckerState`, which says
  why); construct it by keyword.

  Attributes:
    accepted: int32 scalar, number of pairs that updated H^g so far (the rest were skipped).
    h_a: ``[d, d]`` float32, H^a ≈ (A + √λ I)⁻¹.
    h_g: ``[d_out, d_out]`` float32 H^g (K-BFGS), or a :class:`~eva_optax.bfgs.LBFGSMemory` of
      ``memory_size`` pairs of length d_out (K-BFGS(L)).
  """

  accepted: jax.Array
  h_a: jax.Array
  h_g: Any


class ScaleByKBFGSState(NamedTuple):
  """State of :func:`scale_by_kbfgs` (fields in alphabetical order, as
  :class:`~eva_optax.ScaleByKroneckerState`).

  Attributes:
    count: int32 scalar, number of updates so far (skipped steps not counted).
    grad_scale: float32 scalar, running scale of the incoming gradient's largest |entry|
      (:func:`eva_optax.guards.skipping_scale_jumps`).
    preconditioner: ``{layer name: KBFGSFactors}``.
    stats: ``{layer name: KBFGSStatistics}`` for every kernel-bearing layer.
  """

  count: jax.Array
  grad_scale: jax.Array
  preconditioner: dict
  stats: dict


def _check(damping, powell_damping, stat_decay, pair_decay, memory_size) -> None:
  transform.check_positive("damping", damping)
  transform.check_positive("powell_damping", powell_damping)
  if (transform.concrete(damping) or 0.0) >= 1.0:
    raise ValueError(f"eva_optax: K-BFGS needs damping λ < 1 (the Levenberg–Marquardt step "
                     f"mixes y with s by θ ∈ [0, 1) only when √λ < 1), got {damping!r}.")
  if (transform.concrete(powell_damping) or 0.0) >= 1.0:
    raise ValueError(f"eva_optax: powell_damping μ₁ must be in (0, 1), got {powell_damping!r}.")
  transform.check_unit_interval("stat_decay", stat_decay, closed_right=False)
  transform.check_unit_interval("pair_decay", pair_decay, closed_right=False)
  size = None if memory_size is None else transform.concrete(memory_size)
  if size is not None and (size != int(size) or size < 1):
    raise ValueError(f"eva_optax: memory_size must be a positive int or None, got "
                     f"{memory_size!r}.")


def _cholesky_inverse(matrix: jax.Array) -> jax.Array:
  """The inverse of a symmetric positive definite float32 matrix (Cholesky)."""
  factor = jax.scipy.linalg.cho_factor(0.5 * (matrix + matrix.T), lower=True)
  return jax.scipy.linalg.cho_solve(factor, jnp.eye(matrix.shape[0], dtype=matrix.dtype))


def _bfgs_or_keep(h, s, y, accept):
  """``h`` updated with the pair when ``accept`` and the result is finite, else ``h``."""
  new = bfgs.bfgs_inverse_update(h, s, jnp.where(accept, y, s))  # y = s keeps ρ finite
  return jnp.where(accept & jnp.all(jnp.isfinite(new)), new, h)


def _precondition_layers(settings: _Settings, layouts, captured, grads, first, state):
  """Every captured layer's first-pass step (:func:`_precondition`, per stack slice): the
  updated ``stats`` and ``factors`` dicts, the directions in the kernels' shapes, and per layer
  the Levenberg–Marquardt A and ā that :func:`_learn` needs after the second pass."""
  stats, factors = dict(state.stats), dict(state.preconditioner)
  directions, lm_a, a_bar = {}, {}, {}
  for name in captured:
    layout = layouts.get(name, layers.Layout())
    stats[name], factors[name], direction, lm_a[name], a_bar[name] = layers.over_stack(
        functools.partial(_precondition, settings, count=state.count,
                          has_bias="bias" in grads[name]), layout.stacked_axes)(
            state.stats[name], state.preconditioner[name],
            first["activation_factor"][name].a, first["activation_vector"][name].a,
            layers.to_matrix(grads[name], layout))
    directions[name] = layers.from_matrix(direction, grads[name], layout)
  return stats, factors, directions, lm_a, a_bar


def _learn_layers(settings, layouts, captured, grads, first, second, stats, factors, lm_a,
                  a_bar) -> None:
  """The BFGS updates of every captured layer from the two passes' statistics (``stats`` and
  ``factors`` updated in place), each layer stack slice by slice."""
  for name in captured:
    now = first["output_vectors"][name]
    transform.check_record(name, second[name], now, jnp.shape(grads[name]["kernel"]))
    stats[name], factors[name] = layers.over_stack(
        functools.partial(_learn, settings), layouts.get(name, layers.Layout()).stacked_axes)(
            stats[name], factors[name], now, second[name], lm_a[name], a_bar[name])


def scale_by_kbfgs(
    learning_rate: optax.ScalarOrSchedule,
    damping: float = 0.3,
    *,
    memory_size: Optional[int] = None,
    stat_decay: float = 0.9,
    pair_decay: float = 0.9,
    powell_damping: float = 0.2,
    initial_scale: float = 1.0,
    layouts: Optional[Mapping] = None,
) -> optax.GradientTransformationExtraArgs:
  """K-BFGS's preconditioned direction H^a Ĝ H^g per layer (the negative step before −lr).

  Args:
    learning_rate: α, float or optax schedule (evaluated at this transform's step count): the
      second pass runs at the trial point ``params − α · (this transform's output)``, i.e. the
      next iterate when only ``−α`` follows in the chain (as in :func:`kbfgs`).
    damping: λ ∈ (0, 1): √λ is added to A (H^a ≈ (A + √λ I)⁻¹) and is the Levenberg–Marquardt
      μ₂ of the double damping. Paper: 0.3.
    memory_size: ``None`` for dense BFGS on H^g (K-BFGS); an int m for L-BFGS with the last m
      accepted pairs (K-BFGS(L), paper: 100).
    stat_decay: β of the running average of A (weight of the *old* value; paper 0.9).
    pair_decay: decay of the running averages of the pair (s, y) (paper 0.9), from zero.
    powell_damping: μ₁ of Powell's damping (paper 0.2).
    initial_scale: H^g starts as ``initial_scale · I`` (and is L-BFGS's fixed initial matrix);
      paper 1.
    layouts: ``{layer: Layout}`` for layer stacks and multi-axis kernels, as in
      :func:`~eva_optax.scale_by_kronecker` (stacked layers are updated slice by slice with
      ``jax.vmap``).

  Returns:
    ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params, *,
    curvature, curvature_fn)`` needs ``params``, the step's statistics ``curvature`` captured
    with ``eva_optax.flax.value_and_grad(loss_fn, statistics=eva_optax.KBFGS_STATISTICS)`` and
    ``curvature_fn = eva_optax.flax.curvature_fn(loss_fn, *batch)`` (trial parameters →
    ``"output_vectors"`` statistics on the same batch). Parameters of layers absent from
    ``curvature`` pass through unchanged (but still move to the trial point). Directions are
    float32, returned in each parameter's dtype; the state is float32 (and int32 counters).
    Huge and non-finite gradients: module docstring.

  Raises:
    ValueError: λ ∉ (0, 1), μ₁ ∉ (0, 1), a decay ∉ [0, 1), a bad ``memory_size``, a negative
      or non-finite ``learning_rate``; at update time (trace time under jit) missing
      ``params``, ``curvature`` or ``curvature_fn``, statistics of the wrong kind or shape, a
      state that does not fit the parameters (stale: see :mod:`eva_optax.guards`).
    TypeError: integer parameters or gradients, statistics of an integer dtype, a state
      restored from a checkpoint without a target.
  """
  _check(damping, powell_damping, stat_decay, pair_decay, memory_size)
  transform.check_learning_rate(learning_rate)
  settings = _Settings(damping, memory_size is not None, stat_decay, pair_decay, powell_damping,
                       initial_scale)
  # optax.inject_hyperparams passes every numeric argument as an array (a tracer under jit);
  # the memory size is a shape, needed concretely by init only.
  size = None if memory_size is None else transform.concrete(memory_size)
  layouts = transform.flat_layouts(layouts)

  def update_fn(updates, state, params=None, *, curvature=None, curvature_fn=None,
                **extra_args):
    del extra_args
    _check_update_arguments(params, curvature, curvature_fn)
    grads = layers.find_layers(updates, layouts)
    count = state.count
    masked = layers.masked_layers(updates, layouts)
    first, captured = _first_pass(curvature, grads, state, masked)
    stats, factors, directions, lm_a, a_bar = _precondition_layers(
        settings, layouts, captured, grads, first, state)
    updates = transform.replace_layers(updates, directions, layouts)

    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    second = _second_pass(curvature_fn, params, updates, lr, grads, masked, captured)
    _learn_layers(settings, layouts, captured, grads, first, second, stats, factors, lm_a,
                  a_bar)

    updates = jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params)
    return updates, state._replace(count=optax.safe_increment(count), preconditioner=factors,
                                   stats=stats)

  return guards.guarded(optax.GradientTransformationExtraArgs(
      functools.partial(_init, settings, size, layouts),
      guards.skipping_scale_jumps(update_fn)), "K-BFGS")


class _Settings(NamedTuple):
  """The hyperparameters the per-slice steps need (see :func:`scale_by_kbfgs`)."""

  damping: Any
  limited: bool  # L-BFGS on H^g (K-BFGS(L)) instead of dense BFGS
  stat_decay: Any
  pair_decay: Any
  powell_damping: Any
  initial_scale: Any


def _init(settings: _Settings, size, layouts: Mapping, params) -> ScaleByKBFGSState:
  if settings.limited and size is None:
    raise guards.TracedStructure("eva_optax: memory_size is traced; with "
                                 "optax.inject_hyperparams pass static_args=('memory_size',).")
  if transform.opaque(params):
    return ScaleByKBFGSState(count=jnp.zeros((), jnp.int32),
                             grad_scale=jnp.zeros((), jnp.float32),
                             preconditioner=transform.PerLayer(), stats=transform.PerLayer())
  stats, factors = {}, {}
  for name, layer in layers.find_layers(params, layouts).items():
    stack, d_in, d_out, has_bias = transform.layer_shapes(
        layer, name, layouts.get(name, layers.Layout()))
    stats[name], factors[name] = transform.stacked_init(
        _init_layer, stack, settings, size, d_in + has_bias, d_out, kernel=layer["kernel"])
  return ScaleByKBFGSState(count=jnp.zeros((), jnp.int32),
                           grad_scale=jnp.zeros((), jnp.float32), preconditioner=factors,
                           stats=stats)


def _init_layer(settings: _Settings, size, d: int, d_out: int):
  """(KBFGSStatistics, KBFGSFactors) of one ``[d, d_out]`` slice."""
  h_g = (bfgs.lbfgs_init(d_out, int(size)) if settings.limited
         else settings.initial_scale * jnp.eye(d_out, dtype=jnp.float32))
  # A fresh zeros array per field: a buffer shared by s and y cannot be donated to jit.
  return (KBFGSStatistics(jnp.zeros((d, d), jnp.float32), jnp.zeros((d_out,), jnp.float32),
                          jnp.zeros((d_out,), jnp.float32)),
          KBFGSFactors(accepted=jnp.zeros((), jnp.int32), h_a=jnp.eye(d, dtype=jnp.float32),
                       h_g=h_g))


def _check_update_arguments(params, curvature, curvature_fn) -> None:
  if params is None or curvature is None or curvature_fn is None:
    raise ValueError(
        "eva_optax: K-BFGS's update needs params, curvature and curvature_fn: "
        "tx.update(grads, state, params, curvature=curvature, "
        "curvature_fn=eva_optax.flax.curvature_fn(loss_fn, *batch)), with curvature from "
        "eva_optax.flax.value_and_grad(loss_fn, statistics=eva_optax.KBFGS_STATISTICS).")
  if any(isinstance(leaf, optax.MaskedNode) for leaf in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))):
    raise NotImplementedError(
        "eva_optax: K-BFGS's second pass evaluates the model at trial parameters, so it needs "
        "all of them; it cannot run inside optax.multi_transform/partition/masked. Use it on "
        "the whole model (other optimizers can be partitioned).")


def _first_pass(curvature, grads, state, masked):
  """``({kind: {layer: record}}, sorted layers)`` of the first pass, validated."""
  first = {kind: transform.match_layers(curvature, grads, collectors.RECORDS[kind], "K-BFGS",
                                        masked) for kind in KBFGS_STATISTICS}
  captured = sorted(first["activation_factor"])
  for kind in KBFGS_STATISTICS[1:]:
    if sorted(first[kind]) != captured:
      raise ValueError(f"eva_optax: the captured statistics cover different layers: "
                       f"{captured} vs {sorted(first[kind])} ('{kind}').")
  for name in captured:
    old = state.stats[name]
    mean_input = old.a[..., 0, :-1] if "bias" in grads[name] else old.a[..., 0, :]
    expected = {"activation_factor": (old.a,), "activation_vector": (mean_input,),
                "output_vectors": (old.s, old.s)}
    for kind in KBFGS_STATISTICS:
      transform.check_record(name, first[kind][name], expected[kind],
                             jnp.shape(grads[name]["kernel"]))
  return first, captured


def _second_pass(curvature_fn, params, updates, lr, grads, masked, captured) -> dict:
  """``{layer: OutputVectors}`` on the same batch at the trial point W + αp (α = ``lr``)."""
  trial = jax.tree.map(lambda p, u: (p - jnp.asarray(lr, jnp.float32) * u).astype(p.dtype),
                       params, updates)
  second = transform.match_layers(curvature_fn(trial), grads,
                                  collectors.RECORDS[SECOND_PASS_STATISTICS], "K-BFGS", masked)
  if sorted(second) != captured:
    raise ValueError(f"eva_optax: curvature_fn's statistics cover layers {sorted(second)}, "
                     f"the first pass {captured}.")
  return second


def _h_g_product(settings: _Settings, h_g, v):
  if settings.limited:
    return bfgs.lbfgs_product(h_g, v, settings.initial_scale)
  return jnp.matmul(h_g, v, precision=_HIGHEST)


def _precondition(settings: _Settings, old, fac, new_a, mean_in, matrix, count, has_bias):
  """One slice: running A, H^a (explicit inverse on the first step), direction H^a Ĝ H^g."""
  new_a = jnp.asarray(new_a, jnp.float32)
  averaged = jnp.where(count == 0, new_a,
                       settings.stat_decay * old.a + (1.0 - settings.stat_decay) * new_a)
  a = jnp.where(jnp.all(jnp.isfinite(new_a)), averaged, old.a)
  lm_a = a + jnp.sqrt(jnp.asarray(settings.damping, jnp.float32)) * jnp.eye(
      a.shape[0], dtype=jnp.float32)
  h_a = jax.lax.cond(count == 0, _cholesky_inverse, lambda _: fac.h_a, lm_a)
  h_a = jnp.where(jnp.all(jnp.isfinite(h_a)), h_a, fac.h_a)
  mean_in = jnp.asarray(mean_in, jnp.float32)
  a_bar = jnp.append(mean_in, 1.0) if has_bias else mean_in
  left = jnp.matmul(h_a, matrix, precision=_HIGHEST)
  return (old._replace(a=a), fac._replace(h_a=h_a),
          _h_g_product(settings, fac.h_g, left.T).T, lm_a, a_bar)


def _learn(settings: _Settings, old, fac, now, then, lm_a, a_bar):
  """One slice: the averaged, doubly damped pair updates H^g; Hessian-action BFGS on H^a."""
  s_new = jnp.asarray(now.y, jnp.float32) - jnp.asarray(then.y, jnp.float32)
  y_new = jnp.asarray(now.g, jnp.float32) - jnp.asarray(then.g, jnp.float32)
  finite = collectors.all_finite((s_new, y_new))
  decay = settings.pair_decay
  s = jnp.where(finite, decay * old.s + (1.0 - decay) * s_new, old.s)
  y = jnp.where(finite, decay * old.y + (1.0 - decay) * y_new, old.y)
  s_d, y_d = bfgs.double_damping(s, y, lambda v: _h_g_product(settings, fac.h_g, v),
                                 settings.powell_damping,
                                 jnp.sqrt(jnp.asarray(settings.damping, jnp.float32)))
  g_norm = jnp.linalg.norm(jnp.asarray(now.g, jnp.float32))
  accept = finite & bfgs.safely_positive(s_d, y_d, g_norm)
  h_g = (bfgs.lbfgs_push(fac.h_g, s_d, y_d, accept) if settings.limited
         else _bfgs_or_keep(fac.h_g, s_d, y_d, accept))
  s_a = jnp.matmul(fac.h_a, a_bar, precision=_HIGHEST)
  y_a = jnp.matmul(lm_a, s_a, precision=_HIGHEST)
  accept_a = bfgs.safely_positive(s_a, y_a, jnp.linalg.norm(a_bar))
  h_a = _bfgs_or_keep(fac.h_a, s_a, y_a, accept_a)
  return (old._replace(s=s, y=y),
          KBFGSFactors(accepted=fac.accepted + accept.astype(jnp.int32), h_a=h_a, h_g=h_g))


def _kbfgs_chain(learning_rate, damping, memory_size, momentum, weight_decay, stat_decay,
                 pair_decay, powell_damping, initial_scale, layouts):
  # Guarded as a whole too: optax.ema runs before scale_by_kbfgs and would meet a stale or
  # restored-as-dict state first, with optax's own error.
  return guards.guarded(guards.skipping_whole_chain(optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.ema(momentum, debias=False),
      scale_by_kbfgs(learning_rate, damping, memory_size=memory_size, stat_decay=stat_decay,
                     pair_decay=pair_decay, powell_damping=powell_damping,
                     initial_scale=initial_scale, layouts=layouts),
      optax.scale_by_learning_rate(learning_rate),
  ), index=2), "K-BFGS")  # index of scale_by_kbfgs, whose skip the whole chain follows


def kbfgs(
    learning_rate: optax.ScalarOrSchedule,
    *,
    damping: float = 0.3,
    momentum: float = 0.9,
    weight_decay: float = 1e-5,
    stat_decay: float = 0.9,
    pair_decay: float = 0.9,
    powell_damping: float = 0.2,
    initial_scale: float = 1.0,
    layouts: Optional[Mapping] = None,
) -> optax.GradientTransformationExtraArgs:
  """The complete K-BFGS optimizer (dense BFGS on H^g), in the paper's order:
  ``optax.add_decayed_weights(weight_decay)`` (L2 on the gradient) →
  ``optax.ema(momentum, debias=False)`` (m ← μ m + (1 − μ) g) → :func:`scale_by_kbfgs` →
  ``−learning_rate``.

  Args:
    learning_rate: α, float or optax schedule (paper: 0.3 on the MNIST autoencoder).
    damping: λ ∈ (0, 1) (paper 0.3).
    momentum: μ of the gradient's running average (paper 0.9).
    weight_decay: τ of the L2 term τ·W added to the gradient, biases included (paper 1e-5).
    stat_decay, pair_decay, powell_damping, initial_scale, layouts: as in
      :func:`scale_by_kbfgs`.

  Returns:
    ``optax.GradientTransformationExtraArgs``; call ``update(grads, state, params,
    curvature=curvature, curvature_fn=curvature_fn)`` (see :func:`eva_optax.flax.curvature_fn`
    for a training step). State: per layer O(d_in² + d_out²) floats. Works in ``optax.chain``
    and ``optax.inject_hyperparams``. A step that :func:`scale_by_kbfgs` skips (its input, the
    momentum of the gradient, jumps more than 1e6× above its running scale) is skipped whole:
    zero updates, and the momentum kept as well — it has taken the huge gradient in, and would
    carry it for hundreds of steps (:func:`eva_optax.guards.skipping_whole_chain`).

  Raises:
    ValueError, TypeError: as :func:`scale_by_kbfgs`.
  """
  return _kbfgs_chain(learning_rate, damping, None, momentum, weight_decay, stat_decay,
                      pair_decay, powell_damping, initial_scale, layouts)


def kbfgs_l(
    learning_rate: optax.ScalarOrSchedule,
    *,
    damping: float = 0.3,
    memory_size: int = 100,
    momentum: float = 0.9,
    weight_decay: float = 1e-5,
    stat_decay: float = 0.9,
    pair_decay: float = 0.9,
    powell_damping: float = 0.2,
    initial_scale: float = 1.0,
    layouts: Optional[Mapping] = None,
) -> optax.GradientTransformationExtraArgs:
  """The complete K-BFGS(L) optimizer: :func:`kbfgs` with L-BFGS on H^g (the last
  ``memory_size`` accepted pairs, compact representation, fixed initial matrix
  ``initial_scale · I``). State per layer: O(d_in² + 2·m·d_out) floats. Huge gradients are
  skipped as in :func:`kbfgs` (policy: :func:`scale_by_kbfgs`).

  Args: as in :func:`kbfgs`, plus ``memory_size`` m (paper 100).

  Raises:
    ValueError, TypeError: as :func:`scale_by_kbfgs`.
  """
  return _kbfgs_chain(learning_rate, damping, memory_size, momentum, weight_decay, stat_decay,
                      pair_decay, powell_damping, initial_scale, layouts)
