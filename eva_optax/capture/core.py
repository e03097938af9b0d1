"""The framework-neutral capture core: reductions, the output tap, probes and record assembly.

A front end (``capture/linen.py``) finds each layer call and describes it with a
:class:`~eva_optax.layers.LayerView`; this module does the rest (DESIGN §2):

* **Probes.** Every captured layer gets a small dict of zero arrays, its *probes*, placed in the
  ``params`` tree beside the layer's own parameters (key :data:`PROBES`). Lifted transforms
  treat them like the layer's parameters: ``nn.scan``/``nn.vmap`` over layers slice them (one
  set of statistics per slice), ``nn.scan`` over time and shared modules broadcast them.
* **The tap.** Each application of a layer passes its output through an identity whose custom
  VJP hands out, as the gradient of the probes, the forward reductions of the layer input
  (computed in the forward pass, kept as the only residual), the backward reductions of the
  output cotangent and a count of 1. Gradients add up over applications, so the statistics
  leave every transform (scan, remat, vmap, jit) through its own outputs: no Python side
  effect carries a tracer, and a layer applied R times yields the sums over its R
  applications and R itself.
* **Records.** :func:`records` turns the summed reductions into the per-layer statistics
  records of :mod:`eva_optax.collectors`.

Weight sharing (a layer applied R times per example, and sequence or conv positions) follows
Eschenhagen et al., "Kronecker-Factored Approximate Curvature for Modern Neural Network
Architectures", NeurIPS 2023, for the Kronecker factors:

* ``"expand"`` (default): every (position, application) is one more row: A = mean over all rows
  of a aᵀ, G = mean over examples of Σ_rows g gᵀ (g = B·∂L/∂y). Exact for the Fisher of a loss
  with one term per row (language models: a loss per token), and KFC for conv layers.
* ``"reduce"``: per example, the input is averaged and the output gradient summed over its rows
  first, then A = mean_n ã_n ã_nᵀ, G = mean_n g̃_n g̃_nᵀ: the natural choice when the loss has one
  term per example (classification after pooling); A and G are Grams over B examples instead
  of over all rows, but the per-example vectors ``[B, d]`` leave the backward pass.

Eva's vectors, Eva-f's ā and K-BFGS's ȳ, ḡ are the means over all applications of the
per-application means (a layer applied R times: ā = (1/R) Σ_r ā_r, ḡ = (1/R) Σ_r ḡ_r): the
rank-one factors of the expand setting's mean input and mean output gradient.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from eva_optax import collectors, layers

STATISTICS = tuple(collectors.RECORDS)
PROBES = "_eva_optax_probes"  # key of the probe dict beside each captured layer's parameters
COUNT = "count"
WEIGHT_SHARING = ("expand", "reduce")


def _output_mean(view, ct, batch_size, examples, probe):
  """ḡ = B × the mean over rows of ∂L/∂y, ``(d_out,)``."""
  rows = view.output_rows(ct)
  return jnp.sum(rows, axis=0) * (batch_size / rows.shape[0])


def _output_factor(view, ct, batch_size, examples, probe):
  """G = (1/k) Σ_rows (B·∂L/∂y)(B·∂L/∂y)ᵀ over the rows of k examples (k = B unless a
  statistics subset is taken): positions summed, examples averaged."""
  return (batch_size * batch_size / examples) * layers.gram(view.output_rows(ct))


def _output_per_example(view, ct, batch_size, examples, probe):
  """g̃_n = Σ over example n's rows of B·∂L/∂y, ``[k, d_out]``."""
  rows = view.output_rows(ct)
  return batch_size * jnp.sum(rows.reshape(examples, -1, rows.shape[-1]), axis=1)


def _output_power(view, ct, batch_size, examples, probe):
  """G v̂ with G the output factor of :func:`_output_factor` and v̂ the probe's unit vector."""
  product, _ = layers.gram_product(view.output_rows(ct), probe)
  return (batch_size * batch_size / examples) * product


# Forward reductions: (view, x, y, probe) -> array; backward: (view, ct, batch_size, examples,
# probe) -> array, ct holding the rows of ``examples`` of the batch's ``batch_size`` examples.
# ``probe`` is the reduction's probe value: zeros, or the power iteration's unit vector.
FORWARD: dict[str, Callable] = {
    "a_mean": lambda view, x, y, probe: view.mean_input(x),
    "a_factor": lambda view, x, y, probe: view.input_covariance(x),
    "a_examples": lambda view, x, y, probe: view.per_example_input(x),
    "y_mean": lambda view, x, y, probe: jnp.mean(view.output_rows(y), axis=0),
    # A û, A the bias-augmented input factor of KroneckerFactors, û the probe's unit vector.
    "a_power": lambda view, x, y, probe: view.input_factor_product(x, probe),
}
BACKWARD: dict[str, Callable] = {
    "g_mean": _output_mean,
    "g_factor": _output_factor,
    "g_examples": _output_per_example,
    "g_power": _output_power,
}


def _joint(view, x, ct, batch_size, examples, probes) -> dict:
  """The joint reductions named in ``probes``, on the rows of ``examples`` examples (g =
  B·∂L/∂y, û, v̂ the probes' unit vectors), one step of a power iteration each:

  * ``a_gradient``, ``g_gradient``: C v̂ and Cᵀ û for C = mean over rows of a gᵀ, the
    per-example gradient of the kernel averaged over rows (ā ḡᵀ where a and g are uncorrelated);
  * ``a_fisher``, ``g_fisher``: (I ⊗ v̂ᵀ) F (û ⊗ v̂) and (ûᵀ ⊗ I) F (û ⊗ v̂) for the expand
    setting's empirical Fisher F = (1/k) Σ_rows vec(a gᵀ) vec(a gᵀ)ᵀ.
  """
  out = {}
  g_rows = batch_size * view.output_rows(ct)
  for kind, (a_name, g_name) in _JOINT_PAIRS.items():
    if a_name in probes:
      a, g = view.joint_products(x, g_rows, probes[a_name], probes[g_name], _JOINT_WEIGHTS[kind])
      scale = g_rows.shape[0] if kind == "gradient" else examples
      out[a_name], out[g_name] = a / scale, g / scale
  return out


# The joint reductions (input and output-gradient rows together, in the backward pass, with
# the layer input as residual): their pairs and per-row weights (aᵀû, gᵀv̂) ↦ (w_a, w_g).
_JOINT_PAIRS = {"gradient": ("a_gradient", "g_gradient"), "fisher": ("a_fisher", "g_fisher")}
_JOINT_WEIGHTS = {"gradient": lambda p, r: (r, p),
                  "fisher": lambda p, r: (p * r * r, r * p * p)}
JOINT = ("a_gradient", "g_gradient", "a_fisher", "g_fisher")
_INPUT = "input"  # the residual key of the layer input the joint reductions need
# Reductions that are sums over applications (the others are means: divided by the count).
_SUMMED = ("g_factor", "g_examples", "g_power", "a_fisher", "g_fisher")
# Reductions whose probe carries the power iteration's current unit vector.
POWER = ("a_power", "g_power") + JOINT


# The record fields of each statistics kind, by the reduction that gives them ("a_factor" and
# "g_factor" come from the per-example reductions in the reduce setting).
_FIELDS = {"kronecker_vectors": ("a_mean", "g_mean"),
           "kronecker_factors": ("a_factor", "g_factor"),
           "activation_factor": ("a_factor",), "activation_vector": ("a_mean",),
           "output_vectors": ("y_mean", "g_mean"),
           "kronecker_eigenvectors": ("a_power", "g_power"),
           "fisher_eigenvectors": ("a_fisher", "g_fisher"),
           "gradient_singular_vectors": ("a_gradient", "g_gradient")}
# The statistics kinds that continue a power iteration (their probes carry its unit vectors).
ITERATED = ("kronecker_eigenvectors", "fisher_eigenvectors", "gradient_singular_vectors")
_PER_EXAMPLE = {"a_factor": "a_examples", "g_factor": "g_examples"}


def reductions(kinds: Sequence[str], weight_sharing: str) -> tuple[str, ...]:
  """The reductions the statistics ``kinds`` need, each once."""
  names = (f for kind in kinds for f in _FIELDS[kind])
  if weight_sharing == "reduce":
    names = (_PER_EXAMPLE.get(f, f) for f in names)
  return tuple(dict.fromkeys(names))


def uses_output_gradients(kinds: Sequence[str], weight_sharing: str = "expand") -> bool:
  return any(r in BACKWARD for r in reductions(kinds, weight_sharing))


class LayerCall(NamedTuple):
  """Static description of a captured layer (shapes only), from the capture's shape pass.

  Attributes:
    name: module path joined with ``/``.
    view: how its input and output map to matrix rows.
    layout: how its kernel splits into ``[d_in, d_out]`` slices (stack axes included).
    batch_size: the leading axis of its input (1 for an unbatched input).
    shapes: ``{reduction: shape}`` of one application's reductions (no stack axes).
    stack: the stack axes' sizes (``()`` for a plain layer).
  """

  name: layers.LayerName
  view: layers.LayerView
  layout: layers.Layout
  batch_size: int
  shapes: dict
  stack: tuple = ()


def subset_size(view: layers.LayerView, x, subset: Optional[int]) -> int:
  """The number of examples the statistics see: the first ``subset`` of the batch (all of it
  when ``subset`` is None or larger)."""
  batch_size = view.batch_size(x)
  return batch_size if subset is None else min(subset, batch_size)


def _reduce(name: str, view, x, y, ct, batch_size: int, examples: int, probe):
  """Reduction ``name`` of one application on the rows of its first ``examples`` examples
  (``x``, ``y`` for a forward reduction, ``ct`` for a backward one)."""
  def first(array):
    return array if array is None or examples == batch_size else array[:examples]
  if name in FORWARD:
    return FORWARD[name](view, first(x), first(y), probe)
  return BACKWARD[name](view, first(ct), batch_size, examples, probe)


def describe_call(name, view, layout, x, y, names: Sequence[str],
                  subset: Optional[int] = None) -> LayerCall:
  """The :class:`LayerCall` of one application (inside a trace; only shapes are kept)."""
  batch_size, examples = view.batch_size(x), subset_size(view, x, subset)
  d_in = jax.eval_shape(view.mean_input, x).shape[0] + view.has_bias
  d_out = jax.eval_shape(lambda out: view.output_rows(out), y).shape[-1]
  shapes = {r: (d_in if r.startswith("a_") else d_out,) for r in names if r in JOINT}
  for r in (r for r in names if r not in JOINT):
    probe = jax.ShapeDtypeStruct((d_in if r == "a_power" else d_out,), jnp.float32)
    ct = jax.ShapeDtypeStruct(y.shape, jnp.float32)
    shapes[r] = jax.eval_shape(
        lambda x, y, ct, probe, r=r: _reduce(r, view, x, y, ct, batch_size, examples, probe),
        x, y, ct, probe).shape
  return LayerCall(name, view, layout, batch_size, shapes)


def _start_vector(shape) -> jax.Array:
  """The power iteration's fixed start where no estimate exists yet (a fixed pseudo-random
  vector: a structured one such as all ones can be orthogonal to the leading eigenvector)."""
  return jax.random.normal(jax.random.key(0), shape, jnp.float32)


def power_vector(estimate: Optional[jax.Array], shape) -> jax.Array:
  """The unit vector û = m/‖m‖ the power iteration multiplies by this step, from the running
  estimate m (last axis; stack axes leading); the fixed start where m = 0 or is absent."""
  start = _start_vector(shape)
  if estimate is None:
    estimate = jnp.zeros(shape, jnp.float32)
  estimate = jnp.asarray(estimate, jnp.float32)
  norm = jnp.linalg.norm(estimate, axis=-1, keepdims=True)
  vector = jnp.where(norm > 0, estimate, start)
  return vector / jnp.linalg.norm(vector, axis=-1, keepdims=True)


def make_probes(call: LayerCall, names: Sequence[str], estimates: Optional[Mapping] = None
                ) -> dict:
  """The probe dict of one layer, stack axes leading: zeros for ``names`` (and the count when
  a forward reduction is among them), except the power iteration's reductions, whose probe
  holds the unit vector to multiply by (from ``estimates``: ``{reduction: running estimate}``
  of this layer, or the fixed start)."""
  estimates = estimates or {}
  probes = {}
  for r in names:
    shape = call.stack + call.shapes[r]
    probes[r] = (power_vector(estimates.get(r), shape) if r in POWER
                 else jnp.zeros(shape, jnp.float32))
  if any(r not in _SUMMED for r in names):  # some reduction is a mean over applications
    probes[COUNT] = jnp.zeros(call.stack, jnp.float32)
  return probes


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tap(spec, y, forward, probes):
  """Identity on ``y``. ``spec = (backward, names)``: its VJP gives ``probes`` (a dict with
  keys ``names``) the gradient ``{count: 1, **forward, **backward(∂L/∂y, probes)}``."""
  del spec, forward, probes
  return y


def _tap_fwd(spec, y, forward, probes):
  del spec
  return y, (forward, probes)


def _tap_bwd(spec, residual, ct):
  backward, names = spec
  forward, probes = residual
  out = dict(forward)
  out.update(backward(ct, forward, probes))
  if COUNT in probes:
    # 0·probe + 1 rather than a constant: under shard_map the cotangent must be device-varying
    # like the probe itself.
    out[COUNT] = probes[COUNT] * 0.0 + 1.0
  # A cotangent must have its probe's type: on an explicit mesh a reduction of a sharded input
  # or output (tensor-parallel features) comes out sharded, the (replicated) probe does not.
  return ct, jax.tree.map(jnp.zeros_like, forward), {
      n: layers.sharded_like(out[n], probes[n]) for n in names}


_tap.defvjp(_tap_fwd, _tap_bwd)


def tap_layer(view: layers.LayerView, x: jax.Array, y: jax.Array, probes: Mapping,
              subset: Optional[int] = None) -> jax.Array:
  """``y`` routed through the tap: the reductions named in ``probes`` flow out as their
  gradient, taken on the first ``subset`` examples of the batch (all when None). The forward
  reductions run here, in the forward pass (so no ``[B, d]`` input is kept for the backward
  pass); the backward ones where the cotangent is formed."""
  batch_size, examples = view.batch_size(x), subset_size(view, x, subset)
  forward = {r: jax.lax.stop_gradient(_reduce(r, view, x, y, None, batch_size, examples,
                                              probes[r]))
             for r in probes if r in FORWARD}
  backward_names = tuple(r for r in probes if r in BACKWARD)
  joint = any(r in JOINT for r in probes)
  if joint:  # the layer's own VJP keeps its input too: the same buffer
    forward[_INPUT] = jax.lax.stop_gradient(x if examples == batch_size else x[:examples])

  def backward(ct, forward, probes):
    out = {r: _reduce(r, view, None, None, ct, batch_size, examples, probes[r])
           for r in backward_names}
    if joint:
      rows = ct if examples == batch_size else ct[:examples]
      out.update(_joint(view, forward[_INPUT], rows, batch_size, examples, probes))
    return out

  return _tap((backward, tuple(sorted(probes))), y, forward, dict(probes))


def _assemble(kind: str, sums: Mapping, has_bias: bool, weight_sharing: str):
  """One application-averaged record from one slice's reduction sums."""
  count = jnp.maximum(sums[COUNT], 1.0) if COUNT in sums else 1.0
  value = {r: v if r in _SUMMED else v / count for r, v in sums.items() if r != COUNT}
  if weight_sharing == "reduce" and "a_examples" in value:
    value["a_factor"] = layers.augmented_gram(value["a_examples"], has_bias)
  if weight_sharing == "reduce" and "g_examples" in value:
    value["g_factor"] = layers.gram(value["g_examples"]) / value["g_examples"].shape[0]
  return collectors.RECORDS[kind](*(value[f] for f in _FIELDS[kind]))


def records(kind: str, call: LayerCall, sums: Mapping, weight_sharing: str):
  """The statistics record of ``kind`` for one layer from its summed reductions (the probes'
  gradients, stack axes leading), mapped over the stack axes."""
  def one(slice_sums):
    return _assemble(kind, slice_sums, call.view.has_bias, weight_sharing)
  return layers.over_stack(one, call.layout.stacked_axes)(dict(sums))


def stacked(call: LayerCall, inner: tuple, outer: tuple, fix: str) -> LayerCall:
  """``call`` with the stack axes of its kernel: the leading axes of the stored kernel
  ``outer`` that the kernel the layer sees, ``inner``, does not have (a layer stack built by a
  lifted transform). ``fix``: how to stack along the leading axis in this framework."""
  n = len(outer) - len(inner)
  if n < 0 or tuple(outer[n:]) != tuple(inner):
    raise NotImplementedError(
        f"eva_optax: layer '{call.name}' has a kernel of shape {tuple(inner)} stored as "
        f"{tuple(outer)}: a lifted transform stacks it along a non-leading axis. Stack layers "
        f"along axis 0 ({fix}), or leave it first-order with exclude=[{call.name!r}].")
  return call._replace(layout=call.layout._replace(stacked_axes=n), stack=tuple(outer[:n]))


def check_kinds(statistics, weight_sharing: str) -> tuple[str, ...]:
  """The statistics names as a tuple; raises ``ValueError`` for unknown names or an unknown
  ``weight_sharing``."""
  if weight_sharing not in WEIGHT_SHARING:
    raise ValueError(f"eva_optax: weight_sharing must be one of {WEIGHT_SHARING}, got "
                     f"{weight_sharing!r}.")
  names = (statistics,) if isinstance(statistics, str) else tuple(dict.fromkeys(statistics))
  unknown = [s for s in names if s not in STATISTICS]
  if unknown or not names:
    raise ValueError(f"eva_optax: unknown statistics {unknown or names}; choose from "
                     f"{STATISTICS}.")
  iterated = [s for s in names if s in ITERATED]
  if weight_sharing == "reduce" and iterated:
    raise ValueError(f"eva_optax: statistics={iterated[0]!r} tracks the expand setting's "
                     "curvature; use weight_sharing='expand'.")
  if len(iterated) > 1:
    raise ValueError(f"eva_optax: statistics {iterated} each continue a power iteration from "
                     "one eigenvector_estimates; capture one of them.")
  return names


def check_subset(statistics_batch_size) -> None:
  """Raises ``ValueError`` unless ``statistics_batch_size`` is None or a positive int."""
  if statistics_batch_size is not None and (
      isinstance(statistics_batch_size, bool) or not isinstance(statistics_batch_size, int)
      or statistics_batch_size < 1):
    raise ValueError("eva_optax: statistics_batch_size must be None (the whole batch) or a "
                     f"positive int, got {statistics_batch_size!r}.")


def probe_estimates(kinds: Sequence[str], calls: Mapping[str, LayerCall],
                    eigenvector_estimates) -> dict:
  """``{layer: {reduction: running estimate}}`` for the power iteration of the one
  :data:`ITERATED` kind among ``kinds`` (empty when there is none).

  Raises:
    ValueError: such a kind is captured but ``eigenvector_estimates`` is missing, lacks a
      captured layer, holds records of another kind or has a mismatched shape; or it is given
      without such a kind.
  """
  kind = next((k for k in kinds if k in ITERATED), None)
  if kind is None:
    if eigenvector_estimates is not None:
      raise ValueError(f"eva_optax: eigenvector_estimates is only used with statistics in "
                       f"{ITERATED}; drop it.")
    return {}
  if eigenvector_estimates is None:
    raise ValueError(
        f"eva_optax: statistics={kind!r} continues a power iteration across steps and needs "
        "this step's estimates: pass "
        "eigenvector_estimates=eva_optax.eigenvector_estimates(opt_state).")
  flat = collectors.flatten_curvature(eigenvector_estimates)
  record_type = collectors.RECORDS[kind]
  out = {}
  for name, call in calls.items():
    record = flat.get(name)
    if not isinstance(record, record_type):
      raise ValueError(f"eva_optax: eigenvector_estimates has no {record_type.__name__} for "
                       f"layer '{name}'; pass eva_optax.eigenvector_estimates(opt_state) of "
                       f"an optimizer initialised for this model with statistics={kind!r}.")
    out[name] = dict(zip(_FIELDS[kind], record))
    for r, value in out[name].items():
      if tuple(jnp.shape(value)) != call.stack + call.shapes[r]:
        raise ValueError(
            f"eva_optax: eigenvector_estimates['{name}'] has shape {tuple(jnp.shape(value))} "
            f"for {r}, the layer needs {call.stack + call.shapes[r]}: the optimizer state "
            "belongs to another model; re-init it.")
  return out


def curvature(kinds: Sequence[str], calls: Mapping[str, LayerCall], sums: Mapping[str, Mapping],
              weight_sharing: str, axes: tuple) -> dict:
  """``{kind: nested curvature tree}`` from every layer's summed reductions, ``pmean``-ed over
  ``axes`` (the data-parallel axes of pmap/shard_map; per-example units make the mean the
  global-batch statistic)."""
  trees = {kind: {name: records(kind, call, sums[name], weight_sharing)
                  for name, call in calls.items()} for kind in kinds}
  if axes:
    trees = jax.lax.pmean(trees, axes)
  return {kind: collectors.unflatten_curvature(flat) for kind, flat in trees.items()}


def manual_axes(tree) -> set:
  """Mesh axes that ``pmap``/``shard_map`` map over where ``tree`` was computed (empty outside)."""
  names = set()
  for leaf in jax.tree.leaves(tree):
    if not isinstance(leaf, jax.Array):  # e.g. a string or flag argument of the loss
      continue
    mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
    for name, kind in zip(getattr(mesh, "axis_names", ()), getattr(mesh, "axis_types", ())):
      if kind == jax.sharding.AxisType.Manual:
        names.add(name)
  return names


def check_axis_name(axis_name, mapped: set) -> tuple:
  """The axes to average the statistics over; refuses per-device statistics inside a map."""
  if axis_name is None:
    if mapped:
      raise ValueError(
          f"eva_optax: the statistics are computed inside pmap/shard_map over {sorted(mapped)} "
          "but axis_name is None, so every device would precondition with its own batch's "
          f"statistics. Pass axis_name={sorted(mapped)[0]!r} to the capture's value_and_grad.")
    return ()
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  if not set(names) <= mapped:
    raise ValueError(
        f"eva_optax: axis_name={axis_name!r} is not an axis of the enclosing pmap/shard_map "
        f"(mapped axes here: {sorted(mapped) or 'none'}). Pass the axis_name you map over, or "
        "None outside pmap/shard_map (jit with a sharded batch needs none).")
  return names
