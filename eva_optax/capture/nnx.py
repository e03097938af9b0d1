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
purpose; ``nnx.ConvTranspose`` raises.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import jax
from flax import nnx

from eva_optax import layers
from eva_optax.capture import core, views
from eva_optax.capture.linen import EMBEDDING, CaptureInfo

NAME = "_eva_optax_name"      # attribute marking a captured module with its path
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

  def __init__(self, names: Sequence[str], calls: Optional[dict] = None,
               skipped: Optional[dict] = None):
    self.names, self.calls, self.skipped = names, calls, skipped

  def __call__(self, module, name, original, args, kwargs):
    if isinstance(module, nnx.Embed):
      if self.skipped is not None:
        self.skipped[name] = EMBED
      return original(module, *args, **kwargs)
    view = _view(module, name, args, kwargs)
    x = args[0] if args else kwargs["inputs"]
    y = original(module, *args, **kwargs)
    if self.calls is not None:
      call = core.describe_call(name, view, layers.Layout(0, view.output_axes), x, y, self.names)
      self.calls.setdefault(name, (call, tuple(module.kernel.shape)))
      return y
    probes = {r: getattr(module, PREFIX + r)[...] for r in self.probe_names(module)}
    return core.tap_layer(view, x, y, probes) if probes else y

  @staticmethod
  def probe_names(module) -> list[str]:
    return [k[len(PREFIX):] for k in vars(module) if k.startswith(PREFIX)]


@contextlib.contextmanager
def _hooked(hook: _Hook):
  """Wraps the captured classes' ``__call__`` (and ``nnx.Embed.attend``) for the duration."""
  originals = [(cls, "__call__", cls.__call__) for cls in _CAPTURED + (nnx.Embed,)]
  originals.append((nnx.Embed, "attend", nnx.Embed.attend))

  def wrap(original):
    def wrapped(self, *args, **kwargs):
      name = vars(self).get(NAME)
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
    if isinstance(node, _CAPTURED + (nnx.Embed,)):
      name = layers.layer_name(tuple(str(p) for p in path))
      if isinstance(node, _CAPTURED) and excluded(name, node):
        skipped[name] = "excluded (exclude=)"
        continue
      found[name] = node
  return found


@contextlib.contextmanager
def _marked(modules: dict, probes: Optional[dict] = None):
  """Marks each module with its path (and gives it its probe variables) for the duration."""
  try:
    for name, module in modules.items():
      setattr(module, NAME, name)
      for r, value in (probes or {}).get(name, {}).items():
        setattr(module, PREFIX + r, Probe(value))
    yield
  finally:
    for module in modules.values():
      for key in [k for k in vars(module) if k == NAME or k.startswith(PREFIX)]:
        delattr(module, key)


class Capture:
  """``nnx.value_and_grad`` plus per-layer curvature statistics; see
  :func:`eva_optax.nnx.value_and_grad`."""

  def __init__(self, loss_fn, statistics, has_aux, axis_name, exclude, weight_sharing):
    self.kinds = core.check_kinds(statistics, weight_sharing)
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
    with _marked(modules), _hooked(_Hook(self.names, calls, skipped)):
      nnx.eval_shape(lambda m: self.loss_fn(m, *args, **kwargs), model)
    calls = {name: core.stacked(call, inner, tuple(modules[name].kernel.shape),
                                "nnx.vmap over layers with in_axes=0, then nnx.scan")
             for name, (call, inner) in calls.items()}
    return CaptureInfo({n: c.layout for n, c in calls.items()}, skipped, calls)

  def __call__(self, model, *args, **kwargs):
    params = nnx.state(model, nnx.Param)
    axes = core.check_axis_name(self.axis_name, core.manual_axes((params, args, kwargs)))
    calls = self.describe(model, *args, **kwargs).calls
    probes = {name: core.zero_probes(call, self.names) for name, call in calls.items()}
    if axes:
      probes = jax.lax.pcast(probes, axes, to="varying")
    modules = _modules(model, self.excluded, {})
    with _marked(modules, probes), _hooked(_Hook(self.names)):
      value, grads = nnx.value_and_grad(
          lambda m: self.loss_fn(m, *args, **kwargs), has_aux=self.has_aux)(model)
    sums = {name: {} for name in calls}
    for path, leaf in nnx.to_flat_state(nnx.filter_state(grads, Probe)):
      name, key = layers.layer_name(tuple(str(p) for p in path[:-1])), str(path[-1])
      sums[name][key[len(PREFIX):]] = leaf[...] if isinstance(leaf, nnx.Variable) else leaf
    trees = core.curvature(self.kinds, calls, sums, self.weight_sharing, axes)
    grads = nnx.filter_state(grads, nnx.Not(Probe))
    return (value, grads), (trees[self.kinds[0]] if self.single else trees)
