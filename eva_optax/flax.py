"""Flax Linen capture of per-layer curvature statistics, with no change to the model.

:func:`value_and_grad` wraps a loss function the way ``jax.value_and_grad`` does and also
returns the statistics every captured layer contributes (DESIGN §2). It intercepts the
``__call__`` of ``nn.Dense``, single-axis ``nn.DenseGeneral`` and ``nn.Conv`` (any spatial rank,
any padding mode, strides and dilations, with or without bias) with ``nn.intercept_methods``:

* the layer *input* is reduced inside the forward pass (ā or A, never the ``[B, d]``
  activations);
* the layer *output* passes through an identity tap whose custom VJP reduces the output
  cotangent (ḡ or G) and hands it out as the gradient of a small zero "probe" input. Probes are
  built on every call from a ``jax.eval_shape`` pass over the loss, so they follow the batch
  shape and never live in the model's variables.

The input reductions travel out of the differentiated function as auxiliary outputs of the same
trace, so no ``mutable`` collection has to be opened in the user's ``apply`` call.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from eva_optax import collectors, layers

STATISTICS = tuple(collectors.RECORDS)
DISTRIBUTIONS = ("softmax_cross_entropy", "sigmoid_cross_entropy", "squared_error")


def _output_mean(ct: jax.Array, batch_size: int) -> jax.Array:
  """ḡ = mean over rows of the per-example output gradient B·∂L/∂y."""
  return jnp.sum(ct, axis=0) * (batch_size / ct.shape[0])


def _output_factor(ct: jax.Array, batch_size: int) -> jax.Array:
  """G = (1/B) Σ_rows (B·∂L/∂y)(B·∂L/∂y)ᵀ: positions summed, examples averaged."""
  return batch_size * layers.gram(ct)


def _input_mean(module, x, y):
  del y
  return layers.mean_input(module, x)


def _input_factor(module, x, y):
  del y
  return layers.input_covariance(module, x)


def _output_mean_forward(module, x, y):
  """ȳ: the layer output (pre-activation) averaged over rows, float32 ``(d_out,)``."""
  del module, x
  return jnp.mean(y.astype(jnp.float32).reshape(-1, y.shape[-1]), axis=0)


class _Kind(NamedTuple):
  """How one statistics record is reduced: ``forward(module, x, y)`` from the layer input and
  output in the forward pass, ``backward(ct [rows, d_out] float32, batch_size)`` from the output cotangent in
  the backward pass (each ``None`` when the record has no such part)."""

  forward: Optional[Callable]
  backward: Optional[Callable]


_KINDS = {
    "kronecker_vectors": _Kind(_input_mean, _output_mean),
    "kronecker_factors": _Kind(_input_factor, _output_factor),
    "activation_factor": _Kind(_input_factor, None),
    "activation_vector": _Kind(_input_mean, None),
    "output_vectors": _Kind(_output_mean_forward, _output_mean),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tap(reduce, y, probes):
  """Identity on ``y`` whose backward pass hands ``reduce(∂L/∂y)`` to ``probes`` as their
  gradient: the output-gradient statistics are reduced where the cotangent is formed, so no
  ``[rows, d_out]`` array leaves the backward pass."""
  del reduce, probes
  return y


def _tap_fwd(reduce, y, probes):
  del reduce, probes
  return y, None


def _tap_bwd(reduce, _, ct):
  # Reduce in float32 even for low-precision layers.
  return ct, reduce(ct.astype(jnp.float32).reshape(-1, ct.shape[-1]))


_tap.defvjp(_tap_fwd, _tap_bwd)


class _Capture:
  """Interceptor state of one traced call: layer descriptions, forward reductions, taps.

  Args:
    kinds: the statistics names to capture.
    probes: ``{layer: tuple of zeros}``, one per backward reduction; ``None`` for the shape pass
      (no statistics, only layer descriptions).
    forward: whether to reduce layer inputs in this pass.
  """

  def __init__(self, kinds: tuple[str, ...], probes: Optional[dict] = None,
               forward: bool = True):
    self.kinds = kinds
    self.probes = probes
    self.with_forward = forward
    self.infos: dict[str, layers.LayerInfo] = {}
    self.forward: dict[str, dict[str, jax.Array]] = {}

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not layers.is_supported(module):
      return next_fun(*args, **kwargs)
    name = layers.layer_name(tuple(module.path))
    layers.check_supported(module, name)
    if name in self.infos:
      raise ValueError(
          f"eva_optax: layer '{name}' is applied more than once in one loss evaluation; its "
          "statistics would mix several inputs. Use a separate module per application.")
    x = args[0] if args else kwargs["inputs"]
    y = next_fun(*args, **kwargs)
    info = self.infos[name] = layers.describe(module, name, x, y)
    if self.probes is None:
      return y
    if self.with_forward:
      reduced = {}  # kinds sharing a reduction compute it once
      for kind in self.kinds:
        fn = _KINDS[kind].forward
        if fn is not None and fn not in reduced:
          reduced[fn] = fn(module, x, y)
      self.forward[name] = {k: reduced[_KINDS[k].forward] for k in self.kinds
                            if _KINDS[k].forward is not None}
    if self.probes.get(name):
      backward = [_KINDS[k].backward for k in _backward_kinds(self.kinds)]
      y = _tap(lambda ct: tuple(fn(ct, info.batch_size) for fn in backward), y,
               self.probes[name])
    return y


def _backward_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
  return tuple(k for k in kinds if _KINDS[k].backward is not None)


def _zero_probes(kinds: Sequence[str], infos: dict) -> dict:
  """Zeros shaped like each layer's backward reductions (built per call: they follow the batch)."""
  probes = {}
  for name, info in infos.items():
    ct = jax.ShapeDtypeStruct((info.rows, info.output_shape[-1]), jnp.float32)
    probes[name] = tuple(
        jnp.zeros(jax.eval_shape(functools.partial(_KINDS[k].backward,
                                                   batch_size=info.batch_size), ct).shape,
                  jnp.float32)
        for k in _backward_kinds(kinds))
  return probes


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
                      sampled_fisher: Optional[SampledFisher]) -> tuple[str, ...]:
  names = (statistics,) if isinstance(statistics, str) else tuple(dict.fromkeys(statistics))
  unknown = [s for s in names if s not in STATISTICS]
  if unknown or not names:
    raise ValueError(f"eva_optax: unknown statistics {unknown or names}; choose from "
                     f"{STATISTICS}.")
  if sampled_fisher is not None:
    if sampled_fisher.distribution not in DISTRIBUTIONS:
      raise ValueError(f"eva_optax: SampledFisher distribution must be one of {DISTRIBUTIONS}, "
                       f"got {sampled_fisher.distribution!r}.")
    if not _backward_kinds(names):
      raise ValueError(f"eva_optax: statistics {names} use no output gradients, so a "
                       "sampled_fisher has nothing to change; drop it.")
  return names


def value_and_grad(loss_fn: Callable, *, statistics: Union[str, Sequence[str]],
                   has_aux: bool = False, axis_name: Optional[str] = None,
                   sampled_fisher: Optional[SampledFisher] = None) -> Callable:
  """Like ``jax.value_and_grad(loss_fn, has_aux=has_aux)``, plus per-layer curvature statistics.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` that applies a Flax Linen model inside (e.g.
      ``model.apply({"params": params}, x)``) and returns a scalar loss, or ``(loss, aux)`` with
      ``has_aux``. The loss must be a **mean over the batch** (L = mean_i ℓ_i, as in kfac-jax): the
      statistics are rescaled by the batch size B (the leading axis of each layer's input) into
      per-example units.
    statistics: one name or a tuple of names; each gives one record per layer (float32; rows
      are the (example, sequence position, conv output position) triples of the layer's matrix
      multiply, conv inputs are im2col patches in ``[*kernel_size, c_in]`` order, zero padding
      included):

      * ``"kronecker_vectors"`` (Eva): :class:`~eva_optax.KroneckerVectors` ā ``(d_in,)``, the
        mean input, and ḡ ``(d_out,)`` = B × mean over rows of ∂L/∂y;
      * ``"kronecker_factors"`` (K-FAC): :class:`~eva_optax.KroneckerFactors` A = mean over rows
        of a aᵀ (bias-augmented), G = B × Σ_rows ∂L/∂y ∂L/∂yᵀ — positions averaged in A, summed
        in G (KFC);
      * ``"activation_factor"`` (FOOF): :class:`~eva_optax.ActivationFactor`, A only;
      * ``"activation_vector"`` (Eva-f): :class:`~eva_optax.ActivationVector`, ā only;
      * ``"output_vectors"`` (K-BFGS): :class:`~eva_optax.OutputVectors` ȳ ``(d_out,)``, the
        mean layer output (pre-activation), and ḡ as in ``"kronecker_vectors"``.

      Input statistics are reduced in the forward pass and output-gradient statistics in the
      backward pass (a custom-VJP tap on the layer output), so no ``[B, d]`` array is returned.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    axis_name: under ``pmap``/``shard_map``, the data-parallel axis (required there): the
      statistics are ``lax.pmean``-ed over it, and per-example units make that the global-batch
      statistic, so every replica holds the same optimizer state and N devices match one device
      on the global batch (equal shards). Gradients are returned as ``jax.value_and_grad``
      returns them: per device under ``pmap`` (average them, ``lax.pmean(grads, axis_name)``);
      under ``shard_map``, gradients of replicated parameters come back already *summed* over
      the axis (its autodiff inserts the psum), so divide them by ``lax.axis_size(axis_name)``.
      Under ``jit`` with a sharded batch leave it ``None``: the means are global already.
    sampled_fisher: ``None`` (default): output gradients of ``loss_fn`` itself (empirical
      Fisher). A :class:`SampledFisher`: output gradients of the model's own predictive
      distribution at labels drawn with the key ``fisher_rng`` (true Fisher); this costs a second
      forward and backward pass through ``predict_fn``.

  Returns:
    ``fn(params, *args, **kwargs) -> ((value, grads), curvature)`` (with ``sampled_fisher``:
    ``fn(params, *args, fisher_rng, **kwargs)``, ``fisher_rng`` a keyword-only PRNG key);
    ``value`` the loss or ``(loss, aux)``, ``grads`` like ``params``, and ``curvature`` a nested
    dict keyed by module path like ``params`` (``{"Dense_0": KroneckerVectors(...)}``) — for a
    tuple of ``statistics``, a dict of such trees keyed by statistics name.

  Raises:
    ValueError: unknown ``statistics`` or distribution, a ``sampled_fisher`` with statistics that
      use no output gradients or called without ``fisher_rng``; a layer applied more than once
      per call; inside ``pmap``/``shard_map`` without ``axis_name``, or with one that is not
      mapped there.
    NotImplementedError: an unsupported layer configuration (grouped or masked conv,
      DenseGeneral with several contracting axes, batch dims or output axes), naming the layer.

  Layers inside lifted transforms (``nn.scan``, ``nn.remat``, ``nn.vmap``) are not supported.
  """
  kinds = _check_statistics(statistics, sampled_fisher)
  empirical = sampled_fisher is None

  def intercepted(capture, fn, params, args, kwargs):
    with nn.intercept_methods(capture):
      return fn(params, *args, **kwargs)

  def sampled_output_stats(params, probes, rng, args, kwargs):
    def sampled(probes):
      capture = _Capture(kinds, probes, forward=False)
      output = intercepted(capture, sampled_fisher.predict_fn, params, args, kwargs)
      return _sampled_loss(sampled_fisher.distribution, output, rng)
    return jax.grad(sampled)(probes)

  def wrapped(params, *args, fisher_rng=None, **kwargs):
    if not empirical and fisher_rng is None:
      raise ValueError("eva_optax: value_and_grad(..., sampled_fisher=...) needs the keyword "
                       "fisher_rng=<PRNG key> to draw the labels.")
    axes = _check_axis_name(axis_name, _manual_axes((params, args, kwargs)))
    shapes = _Capture(kinds)
    jax.eval_shape(lambda p: intercepted(shapes, loss_fn, p, args, kwargs), params)
    infos = shapes.infos
    probes = _zero_probes(kinds, infos)
    if axes:
      # Device-varying probes keep their gradients local: shard_map's autodiff would otherwise
      # sum the gradient of a replicated input over the devices.
      probes = jax.lax.pcast(probes, axes, to="varying")

    def loss_with_stats(params, probes):
      capture = _Capture(kinds, probes if empirical else {})
      out = intercepted(capture, loss_fn, params, args, kwargs)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, capture.forward)

    (loss, (aux, forward)), (grads, backward) = jax.value_and_grad(
        loss_with_stats, argnums=(0, 1), has_aux=True)(params, probes)
    if not empirical:
      backward = sampled_output_stats(params, probes, fisher_rng, args, kwargs)
    trees = {}
    for kind in kinds:
      position = _backward_kinds(kinds).index(kind) if _KINDS[kind].backward else None
      flat = {}
      for name in infos:
        parts = [forward[name][kind]] if _KINDS[kind].forward else []
        parts += [backward[name][position]] if position is not None else []
        flat[name] = collectors.RECORDS[kind](*parts)
      trees[kind] = flat
    if axes:
      trees = jax.lax.pmean(trees, axes)
    trees = {kind: collectors.unflatten_curvature(flat) for kind, flat in trees.items()}
    value = (loss, aux) if has_aux else loss
    curvature = trees[statistics] if isinstance(statistics, str) else trees
    return (value, grads), curvature

  return wrapped


def curvature_fn(loss_fn: Callable, *args, statistics: Union[str, Sequence[str]] = "output_vectors",
                 has_aux: bool = False, axis_name: Optional[str] = None,
                 **kwargs) -> Callable:
  """The second pass of K-BFGS: a function from trial parameters to captured statistics.

  Optimizers that measure curvature along their own step (:func:`eva_optax.kbfgs`,
  :func:`eva_optax.kbfgs_l`) evaluate the statistics again at the trial point W + αp on the
  *same* batch; they take this function as the keyword ``curvature_fn`` of ``update``.

  Args:
    loss_fn: the loss function given to :func:`value_and_grad` (mean over the batch).
    *args, **kwargs: the step's batch arguments of ``loss_fn`` after ``params``, bound here.
    statistics, has_aux, axis_name: as in :func:`value_and_grad` (under ``pmap``/``shard_map``
      pass the same ``axis_name``, so every replica sees the global-batch statistics).

  Returns:
    ``trial_params -> curvature`` (the third output of :func:`value_and_grad`; the parameter
    gradients it also computes are dropped, and ``jit`` removes their computation).

  Example, a Flax training step with K-BFGS::

    tx = eva_optax.kbfgs(0.3)
    capture = eva_optax.flax.value_and_grad(loss_fn, statistics=eva_optax.KBFGS_STATISTICS)

    @jax.jit
    def train_step(params, opt_state, x, y):
      (loss, grads), curvature = capture(params, x, y)
      updates, opt_state = tx.update(
          grads, opt_state, params, curvature=curvature,
          curvature_fn=eva_optax.flax.curvature_fn(loss_fn, x, y))
      return optax.apply_updates(params, updates), opt_state, loss
  """
  capture = value_and_grad(loss_fn, statistics=statistics, has_aux=has_aux, axis_name=axis_name)
  return lambda trial_params: capture(trial_params, *args, **kwargs)[1]
