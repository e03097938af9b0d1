"""The Flax Linen front end of the capture: finds each layer call with ``nn.intercept_methods``.

Public API: :mod:`eva_optax.flax` (``value_and_grad``, ``curvature_fn``, ``SampledFisher``).
Captured (DESIGN §2, :mod:`eva_optax.layers` for the matrix views):

* ``nn.Dense``; ``nn.DenseGeneral`` with any contracting ``axis`` and any ``features`` (so
  ``nn.MultiHeadDotProductAttention``/``nn.SelfAttention`` projections); ``batch_dims`` raise;
* ``nn.Einsum`` whose equation is a matrix multiply on the kernel: ``<rows><contract>,
  <contract><out>-><rows><out>`` up to the order of the letters within each group (every
  kernel letter is contracted with the input or is an output feature, the output features
  appear in the output in kernel order, the batch letter leads both input and output, no letter
  is shared by input, kernel and output, no ellipsis), e.g. ``"btd,dhk->bthk"`` or
  ``"bthk,hkd->btd"``;
* ``nn.Conv`` of any spatial rank, padding mode, strides and dilations (grouped or masked
  convolutions raise; ``nn.ConvTranspose`` and ``nn.ConvLocal`` raise);
* ``nn.Embed`` (lookup and ``attend``) is passed through on purpose: a lookup's input is a
  one-hot row, so its input factor is the diagonal of token frequencies and the kernel's
  natural preconditioner is per-row (Adam-like), not a Kronecker product; the coverage report
  lists it as such.

Layers inside ``nn.scan``, ``nn.vmap``, ``nn.remat``/``nn.checkpoint``, ``nn.jit`` and
``jax.checkpoint`` are captured: the statistics leave through the probes' gradients
(:mod:`eva_optax.capture.core`). A layer applied several times per loss evaluation (shared
modules, RNN cells, tied weights) accumulates over its applications.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.linen.linear import canonicalize_padding

from eva_optax import collectors, layers
from eva_optax.capture import core

STATISTICS = tuple(collectors.RECORDS)
DISTRIBUTIONS = ("softmax_cross_entropy", "sigmoid_cross_entropy", "squared_error")
EMBEDDING = ("nn.Embed, first-order by design (a lookup's one-hot input makes its input factor "
             "diagonal)")
_UNSUPPORTED_TYPES = (nn.ConvTranspose, nn.ConvLocal)


class CaptureInfo(NamedTuple):
  """What the capture sees in a model, from a shape-only pass (no arrays).

  Attributes:
    layouts: ``{layer: Layout}`` of every captured layer (stack axes, output axes): pass it as
      the optimizers' ``layouts=`` when a kernel is not a plain ``[d_in..., d_out]`` matrix
      (layer stacks, attention q/k/v projections).
    skipped: ``{module path: reason}`` for layers seen but not captured (excluded, embeddings).
    calls: ``{layer: core.LayerCall}``, the static description of each captured layer.
  """

  layouts: dict
  skipped: dict
  calls: dict


def _fail(name: str, module, what: str, fix: str):
  raise NotImplementedError(
      f"eva_optax: layer '{name}' ({type(module).__name__}) uses {what}, which the Kronecker "
      f"statistics do not support. {fix} Or leave it first-order with "
      f"exclude=[{name!r}] in eva_optax.flax.value_and_grad.")


def _tuple(value) -> tuple:
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _spatial(value, rank: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * rank
  return (value,) * rank if isinstance(value, int) else tuple(value)


def _matmul_view(x, contract: Sequence[int], output_axes: int, has_bias: bool,
                 output_perm=None) -> layers.LayerView:
  """Contracting axes ``contract`` of ``x`` (kernel order) moved last; the rest keep order."""
  keep = tuple(a for a in range(x.ndim) if a not in contract)
  perm = keep + tuple(contract)
  return layers.LayerView(None if perm == tuple(range(x.ndim)) else perm, len(contract),
                          output_perm, output_axes, None, has_bias)


def _dense_general_view(module, name, x) -> layers.LayerView:
  if _tuple(module.batch_dims):
    _fail(name, module, f"batch_dims={module.batch_dims}",
          "Move the batch axes into a layer stack (nn.vmap) or use batch_dims=().")
  axis = tuple(sorted(a % x.ndim for a in _tuple(module.axis)))  # Flax's kernel order
  if 0 in axis and x.ndim > len(axis):
    _fail(name, module, f"axis={module.axis} (contracting the leading, batch axis)",
          "Keep the batch on the leading axis.")
  return _matmul_view(x, axis, len(_tuple(module.features)), module.use_bias)


def _einsum_view(module, name, x, equation: str) -> layers.LayerView:
  equation = equation.replace(" ", "")
  lhs, rhs, out = *equation.split("->")[0].split(","), equation.split("->")[1]
  contract = [c for c in rhs if c in lhs and c not in out]
  features = [c for c in rhs if c in out and c not in lhs]
  rows = [c for c in lhs if c in out and c not in rhs]
  ok = ("." not in equation and rhs == "".join(contract + features) and features
            and contract and len(set(lhs)) == len(lhs) == len(rows) + len(contract)
            and len(out) == len(rows) + len(features)
            and [c for c in out if c in features] == features
            and (not rows or lhs[0] == rows[0] == out[0]))
  if not ok:
    _fail(name, module, f"the equation {equation!r}",
          "Supported: '<rows><contract>,<contract><out>-><rows><out>' (letters in any order "
          "within a group, output features in kernel order, the batch letter first in input "
          "and output, no ellipsis).")
  view = _matmul_view(x, tuple(lhs.index(c) for c in contract), len(features), module.use_bias)
  perm = tuple(out.index(c) for c in rows + features)
  return view._replace(output_perm=None if perm == tuple(range(len(out))) else perm)


def _conv_view(module, name, x) -> layers.LayerView:
  if module.feature_group_count != 1:
    _fail(name, module, f"feature_group_count={module.feature_group_count} (grouped "
          "convolution)", "Use feature_group_count=1.")
  if module.mask is not None:
    _fail(name, module, "a kernel mask", "Remove the mask.")
  kernel_size = _tuple(module.kernel_size)
  rank = len(kernel_size)
  spec = layers.ConvSpec(kernel_size, _spatial(module.strides, rank),
                         canonicalize_padding(module.padding, rank),
                         _spatial(module.input_dilation, rank),
                         _spatial(module.kernel_dilation, rank))
  return layers.LayerView(None, 0, None, 1, spec, module.use_bias)


def _view(module, name, args, kwargs) -> Optional[layers.LayerView]:
  """The :class:`~eva_optax.layers.LayerView` of a captured call (raises for unsupported ones)."""
  x = args[0] if args else kwargs["inputs"]
  if isinstance(module, _UNSUPPORTED_TYPES):
    _fail(name, module, "a transposed or unshared (local) convolution",
          "Use nn.Conv.")
  if isinstance(module, nn.Conv):
    return _conv_view(module, name, x)
  if isinstance(module, nn.Dense):
    return _matmul_view(x, (x.ndim - 1,), 1, module.use_bias)
  if isinstance(module, nn.DenseGeneral):
    return _dense_general_view(module, name, x)
  equation = args[1] if len(args) > 1 else kwargs.get("einsum_str") or module.einsum_str
  return _einsum_view(module, name, x, equation)


def _excluder(exclude) -> Callable[[str, nn.Module], bool]:
  if exclude is None:
    return lambda name, module: False
  if callable(exclude):
    return exclude
  patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
  return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


_CAPTURED = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum) + _UNSUPPORTED_TYPES


class _Interceptor:
  """``nn.intercept_methods`` hook. ``calls is not None``: the shape pass, which records each
  captured layer's :class:`~eva_optax.capture.core.LayerCall`; otherwise layers holding probes
  are routed through the tap."""

  def __init__(self, excluded, names: Sequence[str], calls: Optional[dict] = None,
               skipped: Optional[dict] = None):
    self.excluded, self.names, self.calls, self.skipped = excluded, names, calls, skipped

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Embed):
      if self.skipped is not None:
        self.skipped[layers.layer_name(tuple(module.path))] = EMBEDDING
      return next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not isinstance(module, _CAPTURED):
      return next_fun(*args, **kwargs)
    name = layers.layer_name(tuple(module.path))
    if self.excluded(name, module):
      if self.skipped is not None:
        self.skipped[name] = "excluded (exclude=)"
      return next_fun(*args, **kwargs)
    view = _view(module, name, args, kwargs)
    x = args[0] if args else kwargs["inputs"]
    y = next_fun(*args, **kwargs)
    if self.calls is not None:
      kernel = module.get_variable("params", "kernel")
      call = core.describe_call(name, view, layers.Layout(0, view.output_axes), x, y,
                                self.names)
      self.calls.setdefault(name, (call, jnp.shape(kernel)))
      return y
    if not module.has_variable("params", core.PROBES):
      return y
    return core.tap_layer(view, x, y, module.get_variable("params", core.PROBES))
class SampledFisher(NamedTuple):
  """Output-gradient statistics from labels sampled from the model's predictive distribution
  (the true Fisher) instead of the data's labels (the empirical Fisher, the default).

  Attributes:
    predict_fn: ``predict_fn(params, *args, **kwargs) -> output``, the model output (logits or
      predictions) ``[B, ...]`` for the same arguments as the loss function.
    distribution: the loss the output feeds, per example summed over the non-batch axes:
      ``"softmax_cross_entropy"`` (logits, classes on the last axis; labels ~ Categorical),
      ``"sigmoid_cross_entropy"`` (logits; targets ~ Bernoulli(sigmoid)),
      ``"squared_error"`` (½‖output − t‖², t ~ N(output, I)).
  """

  predict_fn: Callable
  distribution: str


def _sampled_loss(distribution: str, output: jax.Array, rng: jax.Array) -> jax.Array:
  """mean_i ℓ_i(output_i, t_i) with targets t drawn from the model at its current output."""
  output = output.astype(jnp.float32)
  fixed = jax.lax.stop_gradient(output)
  if distribution == "softmax_cross_entropy":
    losses = optax.softmax_cross_entropy_with_integer_labels(
        output, jax.random.categorical(rng, fixed))
  elif distribution == "sigmoid_cross_entropy":
    targets = jax.random.bernoulli(rng, jax.nn.sigmoid(fixed)).astype(jnp.float32)
    losses = optax.sigmoid_binary_cross_entropy(output, targets)
  else:
    losses = 0.5 * jnp.square(output - (fixed + jax.random.normal(rng, output.shape)))
  return jnp.mean(jnp.sum(losses.reshape(losses.shape[0], -1), axis=1))


def _manual_axes(tree) -> set:
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


def _check_axis_name(axis_name, mapped: set) -> tuple:
  """The axes to average the statistics over; refuses per-device statistics inside a map."""
  if axis_name is None:
    if mapped:
      raise ValueError(
          f"eva_optax: the statistics are computed inside pmap/shard_map over {sorted(mapped)} "
          "but axis_name is None, so every device would precondition with its own batch's "
          f"statistics. Pass axis_name={sorted(mapped)[0]!r} to eva_optax.flax.value_and_grad.")
    return ()
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  if not set(names) <= mapped:
    raise ValueError(
        f"eva_optax: axis_name={axis_name!r} is not an axis of the enclosing pmap/shard_map "
        f"(mapped axes here: {sorted(mapped) or 'none'}). Pass the axis_name you map over, or "
        "None outside pmap/shard_map (jit with a sharded batch needs none).")
  return names


def _check_statistics(statistics: Union[str, Sequence[str]],
                      sampled_fisher: Optional[SampledFisher],
                      weight_sharing: str) -> tuple[str, ...]:
  if weight_sharing not in core.WEIGHT_SHARING:
    raise ValueError(f"eva_optax: weight_sharing must be one of {core.WEIGHT_SHARING}, got "
                     f"{weight_sharing!r}.")
  names = (statistics,) if isinstance(statistics, str) else tuple(dict.fromkeys(statistics))
  unknown = [s for s in names if s not in STATISTICS]
  if unknown or not names:
    raise ValueError(f"eva_optax: unknown statistics {unknown or names}; choose from "
                     f"{STATISTICS}.")
  if sampled_fisher is not None:
    if sampled_fisher.distribution not in DISTRIBUTIONS:
      raise ValueError(f"eva_optax: SampledFisher distribution must be one of {DISTRIBUTIONS}, "
                       f"got {sampled_fisher.distribution!r}.")
    if not core.uses_output_gradients(names, weight_sharing):
      raise ValueError(f"eva_optax: statistics {names} use no output gradients, so a "
                       "sampled_fisher has nothing to change; drop it.")
  return names


def _path(name: str) -> tuple[str, ...]:
  return tuple(name.split("/")) if name else ()


def _lookup(tree, path: Sequence[str]):
  for key in path:
    tree = tree[key]
  return tree


def _stacked(name: str, call: core.LayerCall, inner: tuple, params) -> core.LayerCall:
  """``call`` with the stack axes of its kernel in ``params`` (leading axes the layer's own
  kernel does not have: ``nn.scan``/``nn.vmap`` over layers)."""
  try:
    outer = jnp.shape(_lookup(params, _path(name) + ("kernel",)))
  except (KeyError, TypeError, IndexError):
    raise ValueError(
        f"eva_optax: layer '{name}' is applied in the loss but params has no "
        f"{'/'.join(_path(name) + ('kernel',))!r}. Pass the params collection itself "
        "(variables['params']) as the first argument of loss_fn.") from None
  n = len(outer) - len(inner)
  if n < 0 or tuple(outer[n:]) != tuple(inner):
    raise NotImplementedError(
        f"eva_optax: layer '{name}' has a kernel of shape {tuple(inner)} stored as "
        f"{tuple(outer)}: a lifted transform stacks it along a non-leading axis. Stack layers "
        f"with variable_axes={{'params': 0}}, or leave it first-order with exclude=[{name!r}].")
  return call._replace(layout=call.layout._replace(stacked_axes=n), stack=tuple(outer[:n]))


def _with_probes(params, probes: dict):
  """``params`` with each layer's probe dict under key ``core.PROBES`` beside its kernel (dicts
  along the path are copied; the arrays are shared)."""
  def insert(node, path, value):
    node = dict(node)
    if path:
      node[path[0]] = insert(node[path[0]], path[1:], value)
    else:
      node[core.PROBES] = value
    return node
  for name, value in probes.items():
    params = insert(params, _path(name), value)
  return params


def _split(grads, params, names) -> tuple:
  """(the gradients shaped like ``params``, ``{layer: probe gradients}``)."""
  sums = {name: dict(_lookup(grads, _path(name))[core.PROBES]) for name in names}
  clean = jax.tree_util.tree_map_with_path(
      lambda path, _: _lookup(grads, layers.key_path_names(path)), params)
  return clean, sums


class Capture:
  """``jax.value_and_grad`` plus per-layer curvature statistics; see :func:`value_and_grad`."""

  def __init__(self, loss_fn, statistics, has_aux, axis_name, sampled_fisher, exclude,
               weight_sharing):
    kinds = _check_statistics(statistics, sampled_fisher, weight_sharing)
    self.single = isinstance(statistics, str)
    self.loss_fn, self.kinds, self.has_aux = loss_fn, kinds, has_aux
    self.axis_name, self.sampled_fisher = axis_name, sampled_fisher
    self.weight_sharing = weight_sharing
    self.excluded = _excluder(exclude)
    self.names = core.reductions(kinds, weight_sharing)

  def _run(self, fn, interceptor, params, args, kwargs):
    with nn.intercept_methods(interceptor):
      return fn(params, *args, **kwargs)

  def describe(self, params, *args, **kwargs) -> CaptureInfo:
    """The layers a call with these arguments captures, their layouts and the skipped ones, from
    a shape-only pass (``jax.eval_shape``; nothing is computed).

    Raises:
      NotImplementedError: an unsupported layer that is not excluded, naming it.
      ValueError: a captured layer whose kernel is not in ``params``.
    """
    calls, skipped = {}, {}
    interceptor = _Interceptor(self.excluded, self.names, calls, skipped)
    jax.eval_shape(lambda p: self._run(self.loss_fn, interceptor, p, args, kwargs), params)
    calls = {name: _stacked(name, call, inner, params) for name, (call, inner) in calls.items()}
    return CaptureInfo({n: c.layout for n, c in calls.items()}, skipped, calls)

  def _sampled_sums(self, params, calls, rng, args, kwargs) -> dict:
    """The backward reductions under labels drawn from the model (true Fisher)."""
    names = tuple(r for r in self.names if r in core.BACKWARD)
    probes = {n: core.zero_probes(c, names) for n, c in calls.items()}
    interceptor = _Interceptor(self.excluded, names)

    def sampled(p):
      output = self._run(self.sampled_fisher.predict_fn, interceptor, p, args, kwargs)
      return _sampled_loss(self.sampled_fisher.distribution, output, rng)

    grads = jax.grad(sampled)(_with_probes(params, probes))
    return _split(grads, params, calls)[1]

  def __call__(self, params, *args, fisher_rng=None, **kwargs):
    if self.sampled_fisher is not None and fisher_rng is None:
      raise ValueError("eva_optax: value_and_grad(..., sampled_fisher=...) needs the keyword "
                       "fisher_rng=<PRNG key> to draw the labels.")
    axes = _check_axis_name(self.axis_name, _manual_axes((params, args, kwargs)))
    calls = self.describe(params, *args, **kwargs).calls
    probes = {name: core.zero_probes(call, self.names) for name, call in calls.items()}
    if axes:
      # Device-varying probes keep their gradients local: shard_map's autodiff would otherwise
      # sum the gradient of a replicated input over the devices.
      probes = jax.lax.pcast(probes, axes, to="varying")
    interceptor = _Interceptor(self.excluded, self.names)
    value, grads = jax.value_and_grad(
        lambda p: self._run(self.loss_fn, interceptor, p, args, kwargs),
        has_aux=self.has_aux)(_with_probes(params, probes))
    grads, sums = _split(grads, params, calls)
    if self.sampled_fisher is not None:
      for name, backward in self._sampled_sums(params, calls, fisher_rng, args, kwargs).items():
        sums[name].update(backward)
    trees = {kind: {name: core.records(kind, call, sums[name], self.weight_sharing)
                    for name, call in calls.items()} for kind in self.kinds}
    if axes:
      trees = jax.lax.pmean(trees, axes)
    trees = {kind: collectors.unflatten_curvature(flat) for kind, flat in trees.items()}
    return (value, grads), (trees[self.kinds[0]] if self.single else trees)
