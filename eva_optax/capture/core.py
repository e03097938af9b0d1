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
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from eva_optax import collectors, layers

STATISTICS = tuple(collectors.RECORDS)
PROBES = "_eva_optax_probes"  # key of the probe dict beside each captured layer's parameters
COUNT = "count"
WEIGHT_SHARING = ("expand", "reduce")


def _output_mean(view, ct, batch_size):
  """ḡ = B × the mean over rows of ∂L/∂y, ``(d_out,)``."""
  rows = view.output_rows(ct)
  return jnp.sum(rows, axis=0) * (batch_size / rows.shape[0])


def _output_factor(view, ct, batch_size):
  """G = (1/B) Σ_rows (B·∂L/∂y)(B·∂L/∂y)ᵀ: positions summed, examples averaged."""
  return batch_size * layers.gram(view.output_rows(ct))


def _output_per_example(view, ct, batch_size):
  """g̃_n = Σ over example n's rows of B·∂L/∂y, ``[B, d_out]``."""
  rows = view.output_rows(ct)
  return batch_size * jnp.sum(rows.reshape(batch_size, -1, rows.shape[-1]), axis=1)


# Forward reductions: (view, x, y) -> array; backward: (view, ct, batch_size) -> array.
FORWARD: dict[str, Callable] = {
    "a_mean": lambda view, x, y: view.mean_input(x),
    "a_factor": lambda view, x, y: view.input_covariance(x),
    "a_examples": lambda view, x, y: view.per_example_input(x),
    "y_mean": lambda view, x, y: jnp.mean(view.output_rows(y), axis=0),
}
BACKWARD: dict[str, Callable] = {
    "g_mean": _output_mean,
    "g_factor": _output_factor,
    "g_examples": _output_per_example,
}
# Reductions that are sums over applications (the others are means: divided by the count).
_SUMMED = ("g_factor", "g_examples")


# The record fields of each statistics kind, by the reduction that gives them ("a_factor" and
# "g_factor" come from the per-example reductions in the reduce setting).
_FIELDS = {"kronecker_vectors": ("a_mean", "g_mean"),
           "kronecker_factors": ("a_factor", "g_factor"),
           "activation_factor": ("a_factor",), "activation_vector": ("a_mean",),
           "output_vectors": ("y_mean", "g_mean")}
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


def describe_call(name, view, layout, x, y, names: Sequence[str]) -> LayerCall:
  """The :class:`LayerCall` of one application (inside a trace; only shapes are kept)."""
  batch_size = view.batch_size(x)
  shapes = {}
  for r in names:
    if r in FORWARD:
      shapes[r] = jax.eval_shape(functools.partial(FORWARD[r], view), x, y).shape
    else:
      ct = jax.ShapeDtypeStruct(y.shape, jnp.float32)
      shapes[r] = jax.eval_shape(
          functools.partial(BACKWARD[r], view, batch_size=batch_size), ct).shape
  return LayerCall(name, view, layout, batch_size, shapes)


def zero_probes(call: LayerCall, names: Sequence[str]) -> dict:
  """The probe dict of one layer: zeros for ``names`` (and the count when a forward reduction
  is among them), with the stack axes leading."""
  probes = {r: jnp.zeros(call.stack + call.shapes[r], jnp.float32) for r in names}
  if any(r in FORWARD for r in names):
    probes[COUNT] = jnp.zeros(call.stack, jnp.float32)
  return probes


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tap(spec, y, forward, probes):
  """Identity on ``y``. ``spec = (backward, names)``: its VJP gives ``probes`` (a dict with
  keys ``names``) the gradient ``{count: 1, **forward, **backward(∂L/∂y)}``."""
  del spec, forward, probes
  return y


def _tap_fwd(spec, y, forward, probes):
  del spec
  return y, (forward, probes)


def _tap_bwd(spec, residual, ct):
  backward, names = spec
  forward, probes = residual
  out = dict(forward)
  out.update(backward(ct))
  if COUNT in probes:
    # 0·probe + 1 rather than a constant: under shard_map the cotangent must be device-varying
    # like the probe itself.
    out[COUNT] = probes[COUNT] * 0.0 + 1.0
  # A cotangent must have its probe's type: on an explicit mesh a reduction of a sharded input
  # or output (tensor-parallel features) comes out sharded, the (replicated) probe does not.
  return ct, jax.tree.map(jnp.zeros_like, forward), {
      n: layers.sharded_like(out[n], probes[n]) for n in names}


_tap.defvjp(_tap_fwd, _tap_bwd)


def tap_layer(view: layers.LayerView, x: jax.Array, y: jax.Array, probes: Mapping) -> jax.Array:
  """``y`` routed through the tap: the reductions named in ``probes`` flow out as their
  gradient. The forward reductions run here, in the forward pass (so no ``[B, d]`` input is
  kept for the backward pass); the backward ones where the cotangent is formed."""
  batch_size = view.batch_size(x)
  forward = {r: jax.lax.stop_gradient(FORWARD[r](view, x, y)) for r in probes if r in FORWARD}
  backward_names = tuple(r for r in probes if r in BACKWARD)

  def backward(ct):
    return {r: BACKWARD[r](view, ct, batch_size) for r in backward_names}

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
  return names


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
