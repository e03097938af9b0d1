"""The Flax NNX front end of the capture.

Public API: :mod:`eva_optax.nnx`. NNX has no method interception, so for the duration of one
capture call the ``__call__`` of ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``,
``nnx.Einsum`` and ``nnx.Embed`` is wrapped (and restored afterwards); the wrapper acts only on
module instances the capture has marked with their path in the model. Each captured layer
gets its probes as :class:`Probe` variables (an ``nnx.Param`` subclass, so NNX's transforms
treat them like the layer's parameters: ``nnx.vmap``/``nnx.scan`` layer stacks slice them,
``nnx.grad`` differentiates them); they are removed before the call returns. The rest — the
tap, the reductions, the records — is :mod:`eva_optax.capture.core`, shared with Linen.

Captured as in Linen (:mod:`eva_optax.capture.linen`): ``nnx.Linear``; ``nnx.LinearGeneral``
with any ``axis`` and ``out_features`` (so ``nnx.MultiHeadAttention``); ``nnx.Einsum`` matrix
multiplies; ``nnx.Conv`` (grouped or masked ones raise); ``nnx.Embed`` passes through on
purpose; ``nnx.ConvTranspose`` raises. A Linen model held through ``nnx.bridge.ToNNX`` is
captured by the Linen front end inside it (its probes go into the bridge's parameter dicts).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import flax.linen as nn
import jax
from flax import nnx
from flax.nnx import bridge

from eva_optax import layers
from eva_optax.capture import core, linen, views
from eva_optax.capture.linen import EMBEDDING, CaptureInfo

NAME = "_eva_optax_name"      # attribute marking a captured module with its path
# The same on an nnx.bridge.ToNNX node, which hands every attribute not prefixed "to_nnx__"
# to its Linen module as a variable.
BRIDGE_NAME = "to_nnx__eva_optax_name"
PREFIX = "_eva_optax_probe_"  # attribute prefix of the probe variables
_CAPTURED = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum, nnx.ConvTranspose)
EMBED = EMBEDDING.replace("nn.Embed", "nnx.Embed")


class Probe(nnx.Param):
  """A zero statistics probe of the capture (never part of a model outside a capture call)."""


def _view(module, name, args, kwargs) -> layers.LayerView:
  x = args[0] if args else kwargs["inputs"]
  has_bias = getattr(module, "bias", None) is not None
  if isinstance(module, nnx.ConvTranspose):
    views.fail(name, module, "a transposed convolution", "Use nnx.Conv.")
  if isinstance(module, nnx.Conv):
    return views.flax_conv(name, module, has_bias)
  if isinstance(module, nnx.Linear):
    return views.matmul(x, (x.ndim - 1,), 1, has_bias)
  if isinstance(module, nnx.LinearGeneral):
    if module.batch_axis:
      views.fail(name, module, f"batch_axis={dict(module.batch_axis)}",
                 "Move the batch axes into a layer stack (nnx.vmap) or use no batch_axis.")
    return views.general(name, module, x, module.axis,
                         len(views.as_tuple(module.out_features)), has_bias)
  equation = args[1] if len(args) > 1 else kwargs.get("einsum_str") or module.einsum_str
  return views.einsum(name, module, x, equation, has_bias)


class _Hook:
  """What the wrapped ``__call__`` does for a marked module: record its call (shape pass,
  ``calls`` given) or route its output through the tap with its probes."""

  def __init__(self, excluded, names: Sequence[str], calls: Optional[dict] = None,
               skipped: Optional[dict] = None, subset: Optional[int] = None):
    self.excluded, self.names, self.calls, self.skipped = excluded, names, calls, skipped
    self.subset = subset

  def __call__(self, module, name, original, args, kwargs):
    if isinstance(module, bridge.ToNNX):
      prefix = tuple(name.split("/")) if name else ()
      with nn.intercept_methods(linen._Interceptor(self.excluded, self.names, self.calls,
                                                   self.skipped, prefix, self.subset)):
        return original(module, *args, **kwargs)
    if isinstance(module, nnx.Embed):
      if self.skipped is not None:
        self.skipped[name] = EMBED
      return original(module, *args, **kwargs)
    view = _view(module, name, args, kwargs)
    x = args[0] if args else kwargs["inputs"]
    y = original(module, *args, **kwargs)
    if self.calls is not None:
      call = core.describe_call(name, view, layers.Layout(0, view.output_axes), x, y, self.names,
                                self.subset)
      self.calls.setdefault(name, (call, tuple(module.kernel.shape)))
      return y
    probes = {r: getattr(module, PREFIX + r)[...] for r in self.probe_names(module)}
    return core.tap_layer(view, x, y, probes, self.subset) if probes else y

  @staticmethod
  def probe_names(module) -> list[str]:
    return [k[len(PREFIX):] for k in vars(module) if k.startswith(PREFIX)]


@contextlib.contextmanager
def _hooked(hook: _Hook):
  """Wraps the captured classes' ``__call__`` (and ``nnx.Embed.attend``) for the duration."""
  originals = [(cls, "__call__", cls.__call__)
               for cls in _CAPTURED + (nnx.Embed, bridge.ToNNX)]
  originals.append((nnx.Embed, "attend", nnx.Embed.attend))

  def wrap(original):
    def wrapped(self, *args, **kwargs):
      name = vars(self).get(NAME, vars(self).get(BRIDGE_NAME))
      if name is None:
        return original(self, *args, **kwargs)
      return hook(self, name, original, args, kwargs)
    return wrapped

  try:
    for cls, method, original in originals:
      setattr(cls, method, wrap(original))
    yield
  finally:
    for cls, method, original in originals:
      setattr(cls, method, original)


def _modules(model, excluded, skipped: dict) -> dict:
  """``{path: module}`` of the capturable modules of ``model`` (excluded ones go to
  ``skipped``)."""
  found = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, _CAPTURED + (nnx.Embed, bridge.ToNNX)):
      name = layers.layer_name(tuple(str(p) for p in path))
      if isinstance(node, _CAPTURED) and excluded(name, node):
        skipped[name] = "excluded (exclude=)"
        continue
      found[name] = node
  return found


@contextlib.contextmanager
def _marked(modules: dict, probes: Optional[dict] = None):
  """Marks each module with its path and gives each captured layer its probe variables (an NNX
  layer as attributes, a Linen layer inside ``nnx.bridge.ToNNX`` as an entry of the bridge's
  parameter dicts) for the duration."""
  bridged = []  # (bridge node, keys of the layer's parameter dict inside it)

  def layer_dict(owner, keys):
    node = vars(owner)
    for key in keys:
      node = node[key]
    return node

  try:
    for name, module in modules.items():
      setattr(module, BRIDGE_NAME if isinstance(module, bridge.ToNNX) else NAME, name)
    for name, values in (probes or {}).items():
      if name in modules:
        for r, value in values.items():
          setattr(modules[name], PREFIX + r, Probe(value))
        continue
      owner = max((n for n in modules if isinstance(modules[n], bridge.ToNNX)
                   and name.startswith(n + "/" if n else "")), key=len)
      keys = tuple(name[len(owner):].strip("/").split("/"))
      layer_dict(modules[owner], keys)[core.PROBES] = {r: nnx.Param(value)
                                                        for r, value in values.items()}
      bridged.append((modules[owner], keys))
    yield
  finally:
    for module in modules.values():
      for key in [k for k in vars(module)
                  if k in (NAME, BRIDGE_NAME) or k.startswith(PREFIX)]:
        delattr(module, key)
    # Looked up afresh: NNX transforms may have replaced the dicts while the probes were in.
    for owner, keys in bridged:
      layer_dict(owner, keys).pop(core.PROBES, None)


def _is_probe(path, _=None) -> bool:
  return any(str(p) == core.PROBES or str(p).startswith(PREFIX) for p in path)


class Capture:
  """``nnx.value_and_grad`` plus per-layer curvature statistics; see
  :func:`eva_optax.nnx.value_and_grad`."""

  def __init__(self, loss_fn, statistics, has_aux, axis_name, exclude, weight_sharing,
               statistics_batch_size=None):
    self.kinds = core.check_kinds(statistics, weight_sharing)
    core.check_subset(statistics_batch_size)
    self.subset = statistics_batch_size
    self.single = isinstance(statistics, str)
    self.loss_fn, self.has_aux, self.axis_name = loss_fn, has_aux, axis_name
    self.weight_sharing = weight_sharing
    self.excluded = views.excluder(exclude)
    self.names = core.reductions(self.kinds, weight_sharing)

  def describe(self, model, *args, **kwargs) -> CaptureInfo:
    """The captured layers, their layouts and the skipped ones, from a shape-only pass
    (``nnx.eval_shape``); see :meth:`eva_optax.flax.Capture.describe`."""
    skipped, calls = {}, {}
    modules = _modules(model, self.excluded, skipped)
    with _marked(modules), _hooked(_Hook(self.excluded, self.names, calls, skipped,
                                         self.subset)):
      nnx.eval_shape(lambda m: self.loss_fn(m, *args, **kwargs), model)
    kernels = {layers.layer_name(tuple(str(p) for p in path[:-1])): tuple(jax.numpy.shape(v))
               for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
               if str(path[-1]) == "kernel"}
    calls = {name: core.stacked(call, inner, kernels[name],
                                "nnx.vmap over layers with in_axes=0, then nnx.scan")
             for name, (call, inner) in calls.items()}
    return CaptureInfo({n: c.layout for n, c in calls.items()}, skipped, calls)

  def __call__(self, model, *args, eigenvector_estimates=None, **kwargs):
    params = nnx.state(model, nnx.Param)
    axes = core.check_axis_name(self.axis_name, core.manual_axes((params, args, kwargs)))
    calls = self.describe(model, *args, **kwargs).calls
    estimates = core.probe_estimates(self.kinds, calls, eigenvector_estimates)
    probes = {name: core.make_probes(call, self.names, estimates.get(name))
              for name, call in calls.items()}
    if axes:
      probes = jax.lax.pcast(probes, axes, to="varying")
    modules = _modules(model, self.excluded, {})
    with _marked(modules, probes), _hooked(_Hook(self.excluded, self.names,
                                                 subset=self.subset)):
      value, grads = nnx.value_and_grad(
          lambda m: self.loss_fn(m, *args, **kwargs), has_aux=self.has_aux)(model)
    sums = {name: {} for name in calls}
    for path, leaf in nnx.to_flat_state(nnx.filter_state(grads, _is_probe)):
      path = tuple(str(p) for p in path)
      bridged = core.PROBES in path
      name = layers.layer_name(path[:path.index(core.PROBES)] if bridged else path[:-1])
      key = path[-1] if bridged else path[-1][len(PREFIX):]
      sums[name][key] = leaf[...] if isinstance(leaf, nnx.Variable) else leaf
    trees = core.curvature(self.kinds, calls, sums, self.weight_sharing, axes)
    grads = nnx.filter_state(grads, lambda path, value: not _is_probe(path))
    return (value, grads), (trees[self.kinds[0]] if self.single else trees)
