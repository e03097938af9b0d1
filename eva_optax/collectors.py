"""Collectors: the per-layer statistics a preconditioner needs and their running averages.

A *collector* owns the statistics part of the optimizer state (DESIGN §3). The captured
statistics of one step (the ``curvature`` pytree) enter the running averages here; the
preconditioner only ever sees the averaged values.

The curvature pytree
--------------------
``curvature`` is a nested dict keyed by module path exactly like the ``params`` tree of the
layers it describes, with one statistics record per layer in place of the layer's parameter
dict. For ``params = {"Encoder_0": {"Dense_0": {"kernel": K, "bias": b}}}`` it is
``{"Encoder_0": {"Dense_0": KroneckerVectors(a=..., g=...)}}``. Users of other frameworks can
build it by hand from these records. Capturing several kinds at once gives a dict keyed by the
statistics name (``{"kronecker_vectors": tree, "kronecker_factors": tree}``); every optimizer
picks its own kind from such a dict.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from eva_optax import layers, linalg


class KroneckerVectors(NamedTuple):
  """Eva's per-layer statistics (DESIGN §4), float32, in per-example units.

  Attributes:
    a: ``(d_in,)`` mean layer input ā over batch, sequence and (conv) output positions; for a
      conv the mean im2col patch ordered like the ``[*kernel_size, c_in]`` kernel rows. No bias
      entry: the 1 is appended by the optimizer when the layer has a bias.
    g: ``(d_out,)`` mean per-example output gradient ḡ = B · mean(∂L/∂y) over the same rows, for
      a loss L = mean_i ℓ_i over B examples. For a Dense layer with bias, ḡ is the bias gradient.
  """

  a: jax.Array
  g: jax.Array


class KroneckerFactors(NamedTuple):
  """K-FAC's per-layer Kronecker factors (DESIGN §4), float32, in per-example units.

  The Fisher block of the layer is approximated by A ⊗ G. Rows are the (example, sequence
  position, conv output position) triples of the layer's matrix multiply; B examples.

  Attributes:
    a: ``[d, d]`` A = mean over rows of a aᵀ, d = d_in + 1 with a bias (the input gets a constant
      1 appended, so the last row/column is [ā, 1]), conv rows being im2col patches (KFC).
    g: ``[d_out, d_out]`` G = mean over examples of Σ_positions g gᵀ, g = B·∂L/∂y the
      per-example output gradient. Positions are *averaged* in A and *summed* in G, so that
      A ⊗ G is KFC's approximation of the per-example Fisher (spatially uncorrelated
      derivatives) and a Dense layer on [B, d_in] inputs is the case of one position.
  """

  a: jax.Array
  g: jax.Array


class ActivationFactor(NamedTuple):
  """FOOF's per-layer statistics: ``a``, the bias-augmented ``[d, d]`` A of
  :class:`KroneckerFactors`, float32."""

  a: jax.Array


class ActivationVector(NamedTuple):
  """Eva-f's per-layer statistics: ``a``, the ``(d_in,)`` ā of :class:`KroneckerVectors`
  (no bias entry), float32."""

  a: jax.Array


class OutputVectors(NamedTuple):
  """K-BFGS's per-layer output-side statistics (DESIGN §4), float32, in per-example units.

  Rows are the (example, sequence position, conv output position) triples of the layer's matrix
  multiply, as in :class:`KroneckerVectors`; B examples.

  Attributes:
    y: ``(d_out,)`` ȳ, the mean over rows of the layer output (the pre-activation, bias
      included).
    g: ``(d_out,)`` ḡ = B · mean(∂L/∂y) over the same rows, exactly the ``g`` of
      :class:`KroneckerVectors`. For a Dense layer on ``[B, d_in]`` inputs this is the mean of
      the per-example output gradients ∂ℓ_i/∂y_i, which is what the K-BFGS paper's code uses
      (it multiplies the mean loss's output gradient by the batch size), so its damping λ keeps
      its meaning here.
  """

  y: jax.Array
  g: jax.Array


class KroneckerEigenvectors(NamedTuple):
  """Statistics of Eva's leading-eigenvector variant (:func:`eva_optax.eva` with
  ``statistics="kronecker_eigenvectors"``), float32, in per-example units.

  One step of a power iteration on each Kronecker factor of :class:`KroneckerFactors`
  (expand setting), without forming it: with û, v̂ the unit vectors of the running estimates
  before this step (the capture's ``eigenvector_estimates``),

  Attributes:
    a: ``(d_in [+1],)`` A û, A = mean over rows of [a; 1][a; 1]ᵀ (the 1 only with a bias).
    g: ``(d_out,)`` G v̂, G = mean over examples of Σ_rows (B·∂L/∂y)(B·∂L/∂y)ᵀ.

  Their running averages m_a, m_g converge to λ_a u, λ_g v, the leading eigenpairs of the
  averaged factors, so (m_a m_aᵀ/‖m_a‖) ⊗ (m_g m_gᵀ/‖m_g‖) → (λ_a u uᵀ) ⊗ (λ_g v vᵀ), the best
  rank-one approximation (Eckart–Young) of each factor.
  """

  a: jax.Array
  g: jax.Array


class FisherEigenvectors(NamedTuple):
  """Statistics of Eva's Fisher-eigenvector variant (:func:`eva_optax.eva` with
  ``statistics="fisher_eigenvectors"``), float32, in per-example units.

  One step of an alternating power iteration toward the leading Kronecker-product eigenvector
  u ⊗ v of the layer's empirical Fisher in the expand setting, F = mean over examples of
  Σ_rows vec(a gᵀ) vec(a gᵀ)ᵀ (a the input row, [a; 1] with a bias; g = B·∂L/∂y), without
  forming F: with û, v̂ the unit vectors of the running estimates before this step (the
  capture's ``eigenvector_estimates``),

  Attributes:
    a: ``(d_in [+1],)`` (I ⊗ v̂ᵀ) F (û ⊗ v̂) = mean over examples of Σ_rows a (aᵀû)(gᵀv̂)².
    g: ``(d_out,)`` (ûᵀ ⊗ I) F (û ⊗ v̂) = mean over examples of Σ_rows g (gᵀv̂)(aᵀû)².

  At a fixed point both running averages are λ times their unit vectors, λ = (u ⊗ v)ᵀ F (u ⊗ v),
  a local maximum of the Rayleigh quotient over Kronecker products u ⊗ v reached by alternating
  maximisation (not always the global one), and F̃ = λ (u uᵀ) ⊗ (v vᵀ). Unlike
  :class:`KroneckerEigenvectors`, a and g are coupled row by row, so u ⊗ v is a direction of
  large per-row gradient energy vec(a gᵀ), not a product of two factors' separate directions.
  """

  a: jax.Array
  g: jax.Array


class GradientSingularVectors(NamedTuple):
  """Statistics of Eva's gradient-singular-vector variant (:func:`eva_optax.eva` with
  ``statistics="gradient_singular_vectors"``), float32, in per-example units.

  Eva's rank-one curvature is vec(C) vec(C)ᵀ for the per-example kernel gradient averaged over
  rows, C = E[a gᵀ] (a the input row, [a; 1] with a bias; g = B·∂L/∂y), with the paper's
  approximation E[a gᵀ] ≈ ā ḡᵀ (a and g uncorrelated). That approximation is what vanishes
  behind BatchNorm and on attention keys, where C = Cov(a, g) ≠ 0 but ḡ = 0. This record drops
  it: one step of a power iteration toward C's leading singular pair, without forming C, with
  û, v̂ the unit vectors of the running estimates before this step (the capture's
  ``eigenvector_estimates``),

  Attributes:
    a: ``(d_in [+1],)`` C v̂ = mean over rows of a (gᵀv̂).
    g: ``(d_out,)`` Cᵀ û = mean over rows of g (aᵀû).

  Their running averages converge to σ u, σ v, the leading singular triple of the averaged C,
  so F̃ = σ² (u uᵀ) ⊗ (v vᵀ), the best Kronecker-product approximation of vec(C) vec(C)ᵀ
  (Eckart–Young on C). Where a and g are uncorrelated, C = ā ḡᵀ and this is Eva's
  (ā āᵀ) ⊗ (ḡ ḡᵀ) exactly. A layer applied R times averages its applications, as ā and ḡ.
  """

  a: jax.Array
  g: jax.Array


# The `statistics` names of eva_optax.flax.value_and_grad and the records they produce.
RECORDS: dict[str, type] = {
    "kronecker_vectors": KroneckerVectors,
    "kronecker_factors": KroneckerFactors,
    "activation_factor": ActivationFactor,
    "activation_vector": ActivationVector,
    "output_vectors": OutputVectors,
    "kronecker_eigenvectors": KroneckerEigenvectors,
    "fisher_eigenvectors": FisherEigenvectors,
    "gradient_singular_vectors": GradientSingularVectors,
}


class Collector(NamedTuple):
  """Running statistics of one kind, per layer.

  Attributes:
    kind: the statistics record type expected in ``curvature`` (a value of :data:`RECORDS`).
    init: ``(d_in, d_out, has_bias) -> record`` of zeros for one ``[d_in, d_out]`` matrix.
    update: ``(old, new, count) -> record``, the running average.
    with_bias: ``record -> record`` augmented for a layer with a bias (the bias row of Ĝ).
  """

  kind: type
  init: Callable[[int, int, bool], NamedTuple]
  update: Callable[[NamedTuple, NamedTuple, jax.Array], NamedTuple]
  with_bias: Callable[[NamedTuple], NamedTuple]


def all_finite(tree) -> jax.Array:
  """Boolean scalar: every entry of every array leaf of ``tree`` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def keep_unless(reject: jax.Array, new, old):
  """``old`` where the boolean scalar ``reject`` is true, else ``new`` (pytrees alike): the one
  way a bad record, gradient or inverse is kept out of an optimizer's state."""
  return jax.tree.map(lambda n, o: jnp.where(reject, o, n), new, old)


# A record whose largest |entry| exceeds the running average's by more than this factor is
# treated like a non-finite one (see running_average's max_jump).
MAX_SCALE_JUMP = 1e6


def scale_jumped(old, new, max_jump: float) -> jax.Array:
  """Boolean scalar: some field of ``new`` has a largest |entry| above ``max_jump`` times that
  of the same field of ``old`` (a field of ``old`` that is all zero accepts any scale)."""
  jumps = []
  for o, n in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
    top = jnp.max(jnp.abs(o))
    jumps.append((top > 0) & (jnp.max(jnp.abs(n)) > max_jump * top))
  return jnp.any(jnp.stack(jumps))


def running_average(old, new, count: jax.Array, stat_decay: float,
                    max_jump: Optional[float] = None):
  """The reference's convention: ``m = new`` on the first step (count 0), then
  ``m ← stat_decay · new + (1 − stat_decay) · m`` — ``stat_decay`` weights the *new* value.

  A record with a non-finite entry (a bad batch) leaves ``old`` as it was, so one bad step
  cannot poison the statistics for good (the step is preconditioned with ``old``; a bad
  batch's gradient is usually non-finite too, and ``optax.apply_if_finite`` skips it). With
  ``max_jump``, so does a finite record after the first whose scale (largest |entry| of a
  field) exceeds ``max_jump`` times the running average's: a single 1e30 record weighted 0.05
  would otherwise dominate the average for hundreds of steps. The first record is always
  taken (unless non-finite).
  """
  first = count == 0
  reject = ~all_finite(new)
  if max_jump is not None:
    reject |= ~first & scale_jumped(old, new, max_jump)
  averaged = jax.tree.map(
      lambda o, n: jnp.where(first, n, stat_decay * n + (1.0 - stat_decay) * o), old, new)
  return keep_unless(reject, averaged, old)


def _collector(kind: type, shapes: Callable, stat_decay: float,
               with_bias: Callable = lambda stats: stats,
               max_jump: Optional[float] = None) -> Collector:
  """A collector of float32 running averages of ``kind`` records with ``shapes(d_in, d_aug,
  d_out)`` (``d_aug`` = d_in + 1 with a bias), rejecting records as :func:`running_average`
  does with ``max_jump``."""
  def init(d_in, d_out, has_bias):
    return kind(*(jnp.zeros(s, jnp.float32) for s in shapes(d_in, d_in + has_bias, d_out)))

  def update(old, new, count):
    # On an explicit mesh the state keeps init's sharding (replicated) whatever the record's.
    new = kind(*(layers.sharded_like(jnp.asarray(v, jnp.float32), o) for v, o in zip(new, old)))
    return running_average(old, new, count, stat_decay, max_jump)

  return Collector(kind, init, update, with_bias)


def vectors_with_bias(stats):
  """ā with the bias input 1 appended (its mean is 1)."""
  # ones_like of an entry, not a constant: under vmap over an explicitly sharded layer stack
  # the appended 1 must be batched (and sharded) like ā.
  return stats._replace(a=jnp.concatenate([stats.a, jnp.ones_like(stats.a[:1])]))


def kronecker_vectors(stat_decay: float) -> Collector:
  """Eva's ā, ḡ (O(d_in + d_out) state per layer)."""
  return _collector(KroneckerVectors, lambda d_in, d_aug, d_out: ((d_in,), (d_out,)), stat_decay,
                    vectors_with_bias)


def kronecker_eigenvectors(stat_decay: float) -> Collector:
  """The power iteration's A û, G v̂ (O(d_in + d_out) state per layer; ``a`` bias-augmented
  already). No scale-jump rejection: a rejected record would leave û, and so the next record,
  unchanged, and the estimate would never move again."""
  return _collector(KroneckerEigenvectors, lambda d_in, d_aug, d_out: ((d_aug,), (d_out,)),
                    stat_decay)


def gradient_singular_vectors(stat_decay: float) -> Collector:
  """The power iteration's C v̂, Cᵀ û (O(d_in + d_out) state per layer; ``a`` bias-augmented
  already); no scale-jump rejection, as :func:`kronecker_eigenvectors`.

  Each new pair is oriented so that ûᵀ C v̂ ≥ 0 (û, per slice, from the running ``a``): C v̂
  carries v̂'s sign and Cᵀ û carries û's, so a start with û, v̂ oriented against C's singular
  pair swaps the two signs every step and the running average shrinks towards 0.905 σ instead
  of σ (measured). The curvature σ² (u uᵀ) ⊗ (v vᵀ) does not depend on the signs."""
  base = _collector(GradientSingularVectors, lambda d_in, d_aug, d_out: ((d_aug,), (d_out,)),
                    stat_decay)

  def update(old, new, count):
    # ⟨running a, C v̂⟩ has the sign of ûᵀ C v̂ (û is the running a's unit vector); after pmean,
    # so every device orients alike.
    flip = jnp.sum(old.a * jnp.asarray(new.a, jnp.float32), axis=-1, keepdims=True) < 0
    sign = jnp.where(flip, -1.0, 1.0)
    return base.update(old, GradientSingularVectors(new.a * sign, new.g * sign), count)

  return base._replace(update=update)


def fisher_eigenvectors(stat_decay: float) -> Collector:
  """The alternating power iteration's (I ⊗ v̂ᵀ)F(û ⊗ v̂), (ûᵀ ⊗ I)F(û ⊗ v̂) (O(d_in + d_out)
  state per layer; ``a`` bias-augmented already); no scale-jump rejection, as
  :func:`kronecker_eigenvectors`."""
  return _collector(FisherEigenvectors, lambda d_in, d_aug, d_out: ((d_aug,), (d_out,)),
                    stat_decay)


def fisher_rank_one_vectors(stats: FisherEigenvectors) -> KroneckerVectors:
  """Vectors (λ^½ u, v) with u, v the unit running estimates and λ = √(‖m_a‖‖m_g‖) (both norms
  estimate the same eigenvalue), so that Eva's signal ‖a‖²‖g‖² is λ and its rank-one curvature
  λ (u uᵀ) ⊗ (v vᵀ). Overflow-safe (logarithms of the norms)."""
  (unit_a, log_a), (unit_g, log_g) = linalg.unit_vector(stats.a), linalg.unit_vector(stats.g)
  return KroneckerVectors(unit_a * jnp.exp(0.25 * (log_a + log_g)), unit_g)


def rank_one_vectors(stats) -> KroneckerVectors:
  """Vectors (√λ_a u, √λ_g v) whose outer products are the rank-one factors λ u uᵀ of the
  running power-iteration estimates m = λu (λ = ‖m‖), so that Eva's Sherman–Morrison direction
  applies unchanged (its signal ‖ā‖²‖ḡ‖² becomes λ_a λ_g): for
  :class:`KroneckerEigenvectors`, and for :class:`GradientSingularVectors` (both norms estimate
  σ, so the signal is σ²). Overflow-safe."""
  def root(m):
    unit, log_norm = linalg.unit_vector(m)
    return unit * jnp.exp(0.5 * log_norm)
  return KroneckerVectors(root(stats.a), root(stats.g))


def kronecker_factors(stat_decay: float) -> Collector:
  """K-FAC's A, G (O(d_in² + d_out²) state per layer). A record whose A or G jumps in scale by
  more than :data:`MAX_SCALE_JUMP` is rejected: K-FAC's small stat_decay (0.05) would keep it
  for hundreds of steps."""
  return _collector(KroneckerFactors,
                    lambda d_in, d_aug, d_out: ((d_aug, d_aug), (d_out, d_out)), stat_decay,
                    max_jump=MAX_SCALE_JUMP)


def activation_factor(stat_decay: float) -> Collector:
  """FOOF's A (O(d_in²) state per layer); scale jumps rejected as in :func:`kronecker_factors`."""
  return _collector(ActivationFactor, lambda d_in, d_aug, d_out: ((d_aug, d_aug),), stat_decay,
                    max_jump=MAX_SCALE_JUMP)


def activation_vector(stat_decay: float) -> Collector:
  """Eva-f's ā (O(d_in) state per layer)."""
  return _collector(ActivationVector, lambda d_in, d_aug, d_out: ((d_in,),), stat_decay,
                    vectors_with_bias)


def flatten_curvature(curvature) -> dict[layers.LayerName, NamedTuple]:
  """``{"A/B": record}`` from the nested curvature dict (records are the non-mapping nodes)."""
  flat = {}

  def walk(node, path):
    if isinstance(node, Mapping):
      for key, child in node.items():
        walk(child, path + (str(key),))
    else:
      flat[layers.layer_name(path)] = node

  walk(curvature, ())
  return flat


def unflatten_curvature(flat: Mapping[layers.LayerName, NamedTuple]) -> dict:
  """Inverse of :func:`flatten_curvature` (a model that is a single layer maps to its record)."""
  if "" in flat:
    return flat[""]
  nested: dict = {}
  for name, record in flat.items():
    *parents, leaf = name.split("/")
    node = nested
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = record
  return nested
