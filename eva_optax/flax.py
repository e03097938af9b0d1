"""Flax Linen capture of per-layer curvature statistics, with no change to the model.

:func:`value_and_grad` wraps a loss function the way ``jax.value_and_grad`` does and also
returns the statistics every captured layer contributes (DESIGN §2). It intercepts the
``__call__`` of ``nn.Dense``, single-axis ``nn.DenseGeneral`` and ``nn.Conv`` (any spatial rank,
any padding mode, strides and dilations, with or without bias) with ``nn.intercept_methods``:

* the layer *input* is reduced inside the forward pass (ā, never the ``[B, d]`` activations);
* the layer *output* gets a zero perturbation whose gradient is the summed output gradient.
  Perturbations are built on every call from a ``jax.eval_shape`` pass over the loss, so they
  follow the batch shape and never live in the model's variables.

The reductions travel out of the differentiated function as auxiliary outputs of the same trace,
so no ``mutable`` collection has to be opened in the user's ``apply`` call.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from eva_optax import collectors, layers

STATISTICS = ("kronecker_vectors",)


class _Capture:
  """Interceptor state of one traced call: layer descriptions, input reductions, perturbations."""

  def __init__(self, perturbations: Optional[dict] = None):
    self.perturbations = perturbations
    self.infos: dict[str, layers.LayerInfo] = {}
    self.inputs: dict[str, jax.Array] = {}

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
    self.infos[name] = layers.describe(module, name, x, y)
    if self.perturbations is None:
      return y
    self.inputs[name] = layers.mean_input(module, x)
    # Broadcast before the cast so the cotangent is summed in float32 for low-precision layers.
    eps = self.perturbations[name]
    return y + jnp.broadcast_to(eps, y.shape).astype(y.dtype)


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


def _check_statistics(statistics: Union[str, Sequence[str]]) -> tuple[str, ...]:
  names = (statistics,) if isinstance(statistics, str) else tuple(statistics)
  unknown = [s for s in names if s not in STATISTICS]
  if unknown or not names:
    raise ValueError(f"eva_optax: unknown statistics {unknown or names}; choose from "
                     f"{STATISTICS}.")
  return names


def value_and_grad(loss_fn: Callable, *, statistics: Union[str, Sequence[str]],
                   has_aux: bool = False, axis_name: Optional[str] = None) -> Callable:
  """Like ``jax.value_and_grad(loss_fn, has_aux=has_aux)``, plus per-layer curvature statistics.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` that applies a Flax Linen model inside (e.g.
      ``model.apply({"params": params}, x)``) and returns a scalar loss, or ``(loss, aux)`` with
      ``has_aux``. The loss must be a **mean over the batch** (L = mean_i ℓ_i, as in kfac-jax): the
      statistics are rescaled by the batch size B (the leading axis of each layer's input) into
      per-example units.
    statistics: ``"kronecker_vectors"`` (Eva): per layer
      :class:`~eva_optax.KroneckerVectors` ``(a, g)``, ā ``(d_in,)`` the mean layer input (conv:
      mean im2col patch in ``[*kernel_size, c_in]`` order, zero padding included) and ḡ
      ``(d_out,)`` = B × mean of ∂L/∂y over batch, sequence and output positions, float32.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    axis_name: under ``pmap``/``shard_map``, the data-parallel axis (required there): the
      statistics are ``lax.pmean``-ed over it, and per-example units make that the global-batch
      statistic, so every replica holds the same optimizer state and N devices match one device
      on the global batch (equal shards). Gradients are returned as ``jax.value_and_grad``
      returns them: per device under ``pmap`` (average them, ``lax.pmean(grads, axis_name)``);
      under ``shard_map``, gradients of replicated parameters come back already *summed* over
      the axis (its autodiff inserts the psum), so divide them by ``lax.axis_size(axis_name)``.
      Under ``jit`` with a sharded batch leave it ``None``: the means are global already.

  Returns:
    ``fn(params, *args, **kwargs) -> ((value, grads), curvature)`` with ``value`` the loss or
    ``(loss, aux)``, ``grads`` like ``params``, and ``curvature`` a nested dict keyed by module
    path like ``params`` (``{"Dense_0": KroneckerVectors(...)}``).

  Raises:
    ValueError: unknown ``statistics``; a layer applied more than once per call; inside
      ``pmap``/``shard_map`` without ``axis_name``, or with one that is not mapped there.
    NotImplementedError: an unsupported layer configuration (grouped or masked conv,
      DenseGeneral with several contracting axes, batch dims or output axes), naming the layer.

  Layers inside lifted transforms (``nn.scan``, ``nn.remat``, ``nn.vmap``) are not supported.
  """
  _check_statistics(statistics)

  def intercepted(capture, params, args, kwargs):
    with nn.intercept_methods(capture):
      return loss_fn(params, *args, **kwargs)

  def wrapped(params, *args, **kwargs):
    axes = _check_axis_name(axis_name, _manual_axes((params, args, kwargs)))
    shapes = _Capture()
    jax.eval_shape(lambda p: intercepted(shapes, p, args, kwargs), params)
    infos = shapes.infos
    zeros = {name: jnp.zeros(info.output_shape[-1:], jnp.float32) for name, info in infos.items()}
    if axes:
      # Device-varying perturbations keep their gradients local: shard_map's autodiff would
      # otherwise sum the gradient of a replicated input over the devices.
      zeros = jax.lax.pcast(zeros, axes, to="varying")

    def loss_with_stats(params, perturbations):
      capture = _Capture(perturbations)
      out = intercepted(capture, params, args, kwargs)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, capture.inputs)

    (loss, (aux, inputs)), (grads, output_grads) = jax.value_and_grad(
        loss_with_stats, argnums=(0, 1), has_aux=True)(params, zeros)
    flat = {
        name: collectors.KroneckerVectors(
            a=inputs[name], g=output_grads[name] * (info.batch_size / info.rows))
        for name, info in infos.items()
    }
    if axes:
      flat = jax.lax.pmean(flat, axes)
    value = (loss, aux) if has_aux else loss
    return (value, grads), collectors.unflatten_curvature(flat)

  return wrapped
