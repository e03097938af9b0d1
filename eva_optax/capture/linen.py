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

from typing import Callable, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from eva_optax import layers
from eva_optax.capture import core, views

STATISTICS = core.STATISTICS
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


def _view(module, name, args, kwargs) -> layers.LayerView:
  """The :class:`~eva_optax.layers.LayerView` of a captured call (raises for unsupported ones)."""
  x = args[0] if args else kwargs["inputs"]
  if isinstance(module, _UNSUPPORTED_TYPES):
    views.fail(name, module, "a transposed or unshared (local) convolution", "Use nn.Conv.")
  if isinstance(module, nn.Conv):
    return views.flax_conv(name, module, module.use_bias)
  if isinstance(module, nn.Dense):
    return views.matmul(x, (x.ndim - 1,), 1, module.use_bias)
  if isinstance(module, nn.DenseGeneral):
    if views.as_tuple(module.batch_dims):
      views.fail(name, module, f"batch_dims={module.batch_dims}",
                 "Move the batch axes into a layer stack (nn.vmap) or use batch_dims=().")
    return views.general(name, module, x, module.axis, len(views.as_tuple(module.features)),
                         module.use_bias)
  equation = args[1] if len(args) > 1 else kwargs.get("einsum_str") or module.einsum_str
  return views.einsum(name, module, x, equation, module.use_bias)


_CAPTURED = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum) + _UNSUPPORTED_TYPES


class _Interceptor:
  """``nn.intercept_methods`` hook. ``calls is not None``: the shape pass, which records each
  captured layer's :class:`~eva_optax.capture.core.LayerCall`; otherwise layers holding probes
  are routed through the tap. ``prefix``: the path of the Linen model inside a larger one
  (an NNX model holding it through ``nnx.bridge.ToNNX``)."""

  def __init__(self, excluded, names: Sequence[str], calls: Optional[dict] = None,
               skipped: Optional[dict] = None, prefix: tuple = (), subset: Optional[int] = None):
    self.excluded, self.names, self.calls, self.skipped = excluded, names, calls, skipped
    self.prefix, self.subset = prefix, subset

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    name = layers.layer_name(self.prefix + tuple(module.path))
    if isinstance(module, nn.Embed):
      if self.skipped is not None:
        self.skipped[name] = EMBEDDING
      return next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not isinstance(module, _CAPTURED):
      return next_fun(*args, **kwargs)
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
                                self.names, self.subset)
      self.calls.setdefault(name, (call, jnp.shape(kernel)))
      return y
    if not module.has_variable("params", core.PROBES):
      return y
    return core.tap_layer(view, x, y, module.get_variable("params", core.PROBES), self.subset)
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


def _check_statistics(statistics: Union[str, Sequence[str]],
                      sampled_fisher: Optional[SampledFisher],
                      weight_sharing: str) -> tuple[str, ...]:
  names = core.check_kinds(statistics, weight_sharing)
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
  """``call`` with the stack axes of its kernel in ``params``."""
  try:
    outer = jnp.shape(_lookup(params, _path(name) + ("kernel",)))
  except (KeyError, TypeError, IndexError):
    raise ValueError(
        f"eva_optax: layer '{name}' is applied in the loss but params has no "
        f"{'/'.join(_path(name) + ('kernel',))!r}. Pass the params collection itself "
        "(variables['params']) as the first argument of loss_fn.") from None
  return core.stacked(call, inner, outer, "variable_axes={'params': 0}")


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
               weight_sharing, statistics_batch_size=None):
    kinds = _check_statistics(statistics, sampled_fisher, weight_sharing)
    core.check_subset(statistics_batch_size)
    self.subset = statistics_batch_size
    self.single = isinstance(statistics, str)
    self.loss_fn, self.kinds, self.has_aux = loss_fn, kinds, has_aux
    self.axis_name, self.sampled_fisher = axis_name, sampled_fisher
    self.weight_sharing = weight_sharing
    self.excluded = views.excluder(exclude)
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
    interceptor = _Interceptor(self.excluded, self.names, calls, skipped, subset=self.subset)
    jax.eval_shape(lambda p: self._run(self.loss_fn, interceptor, p, args, kwargs), params)
    calls = {name: _stacked(name, call, inner, params) for name, (call, inner) in calls.items()}
    return CaptureInfo({n: c.layout for n, c in calls.items()}, skipped, calls)

  def _sampled_sums(self, params, calls, estimates, rng, args, kwargs) -> dict:
    """The backward reductions under labels drawn from the model (true Fisher)."""
    names = tuple(r for r in self.names if r in core.BACKWARD)
    probes = {n: core.make_probes(c, names, estimates.get(n)) for n, c in calls.items()}
    interceptor = _Interceptor(self.excluded, names, subset=self.subset)

    def sampled(p):
      output = self._run(self.sampled_fisher.predict_fn, interceptor, p, args, kwargs)
      return _sampled_loss(self.sampled_fisher.distribution, output, rng)

    grads = jax.grad(sampled)(_with_probes(params, probes))
    return _split(grads, params, calls)[1]

  def __call__(self, params, *args, fisher_rng=None, eigenvector_estimates=None, **kwargs):
    if self.sampled_fisher is not None and fisher_rng is None:
      raise ValueError("eva_optax: value_and_grad(..., sampled_fisher=...) needs the keyword "
                       "fisher_rng=<PRNG key> to draw the labels.")
    axes = core.check_axis_name(self.axis_name, core.manual_axes((params, args, kwargs)))
    calls = self.describe(params, *args, **kwargs).calls
    estimates = core.probe_estimates(self.kinds, calls, eigenvector_estimates)
    probes = {name: core.make_probes(call, self.names, estimates.get(name))
              for name, call in calls.items()}
    if axes:
      # Device-varying probes keep their gradients local: shard_map's autodiff would otherwise
      # sum the gradient of a replicated input over the devices.
      probes = jax.lax.pcast(probes, axes, to="varying")
    interceptor = _Interceptor(self.excluded, self.names, subset=self.subset)
    value, grads = jax.value_and_grad(
        lambda p: self._run(self.loss_fn, interceptor, p, args, kwargs),
        has_aux=self.has_aux)(_with_probes(params, probes))
    grads, sums = _split(grads, params, calls)
    if self.sampled_fisher is not None:
      for name, backward in self._sampled_sums(params, calls, estimates, fisher_rng, args,
                                               kwargs).items():
        sums[name].update(backward)
    trees = core.curvature(self.kinds, calls, sums, self.weight_sharing, axes)
    return (value, grads), (trees[self.kinds[0]] if self.single else trees)
