"""The generic collector × preconditioner transform (DESIGN §3) and the global scalings.

Every optimizer in the package is a pairing passed to :func:`scale_by_kronecker`: a
:class:`~eva_optax.collectors.Collector` that keeps running statistics per layer, a
:class:`Preconditioner` that turns one layer's gradient matrix into a direction, and a
:data:`Scaling` applied once over all captured layers (KL normalization, KL clip, none).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from eva_optax import collectors, guards, layers, linalg

# (directions, gradient matrices, count) -> scalar factor applied to every direction.
Scaling = Callable[[Mapping[str, jax.Array], Mapping[str, jax.Array], jax.Array], jax.Array]


class Preconditioner(NamedTuple):
  """Per-layer preconditioning of a gradient matrix Ĝ ``[d_in (+1), d_out]``, float32.

  Attributes:
    init: ``(d_in, d_out, has_bias) -> state`` — cached per-layer work (inverses, roots) for
      one ``[d_in (+1), d_out]`` matrix; ``()`` if none.
    update: ``(stats, state, count) -> state`` — refresh the cache (``lax.cond`` for periodic work).
    apply: ``(stats, state, grad_matrix) -> direction`` of the same shape as Ĝ.
    update_all: optional ``(stats, states, count) -> states`` over every captured layer at
      once (``{layer: ...}``, a stack's slices leading, bias-augmented statistics); replaces
      ``update`` where a refresh is shared between layers (spread over devices: K-FAC, FOOF).
  """

  init: Callable[[int, int, bool], Any]
  update: Callable[[NamedTuple, Any, jax.Array], Any]
  apply: Callable[[NamedTuple, Any, jax.Array], jax.Array]
  update_all: Optional[Callable[[dict, dict, jax.Array], dict]] = None


class ScaleByKroneckerState(NamedTuple):
  """State of :func:`scale_by_kronecker`.

  Fields are in alphabetical order, like every state record of the package: a checkpoint
  restored without a target holds them as a dict, whose leaves come out sorted by key, so
  ``jax.tree.unflatten(jax.tree.structure(tx.init(params)), jax.tree.leaves(restored))`` cannot
  swap the statistics and the preconditioner. (Restore with a target all the same:
  ``checkpointer.restore(path, jax.eval_shape(tx.init, params))``.)

  Attributes:
    count: int32 scalar, number of updates so far.
    preconditioner: ``{layer name: preconditioner state}`` of every kernel-bearing layer (a
      layer stack's with its stack axes leading).
    stats: ``{layer name: statistics record}``, the running statistics (likewise).
  """

  count: jax.Array
  preconditioner: dict
  stats: dict


def as_sequence(leaf) -> tuple:
  """A tensor's tuple of state arrays (Shampoo's, Eva-s') as a tuple: ``nnx.Optimizer`` hands
  the state back with every tuple turned into an int-keyed mapping ``{0: …, 1: …}``."""
  return tuple(leaf[i] for i in range(len(leaf)))


def concrete(value) -> Optional[float]:
  """A hyperparameter as a float, or None when it is traced (``inject_hyperparams`` under
  ``jit``) or a schedule. No ``jnp.asarray``: inside another trace it would return a tracer."""
  if isinstance(value, jax.core.Tracer) or callable(value):
    return None
  return float(value)


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
  """Raises ``ValueError`` when a concrete hyperparameter is not > 0 (≥ 0 with ``allow_zero``).

  Traced values (``inject_hyperparams`` under ``jit``) and schedules are not checked.
  """
  number = concrete(value)
  if number is None:
    return
  if not (number >= 0 if allow_zero else number > 0):
    raise ValueError(f"eva_optax: {name} must be {'>=' if allow_zero else '>'} 0, "
                     f"got {value!r}.")


def check_unit_interval(name: str, value, *, closed_right: bool = True) -> None:
  """Raises ``ValueError`` when a concrete hyperparameter lies outside [0, 1] ([0, 1) unless
  ``closed_right``); NaN fails too. Traced values and schedules are not checked."""
  number = concrete(value)
  if number is None:
    return
  if not (0 <= number <= 1 if closed_right else 0 <= number < 1):
    interval = "[0, 1]" if closed_right else "[0, 1)"
    raise ValueError(f"eva_optax: {name} must lie in {interval}, got {value!r}.")


def check_learning_rate(learning_rate) -> None:
  """Raises ``ValueError`` for a concrete learning rate that is negative or not finite (a
  negative rate ascends the loss, a NaN one poisons every parameter on the first step).
  Schedules and traced rates (``inject_hyperparams`` under ``jit``) are not checked."""
  number = concrete(learning_rate)
  if number is not None and not (math.isfinite(number) and number >= 0):
    raise ValueError(f"eva_optax: learning_rate must be a finite float >= 0 (or an optax "
                     f"schedule), got {learning_rate!r}.")


def _inverse_root_of_sum_inner(xs: Mapping[str, jax.Array],
                               ys: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """``(positive, 1/√Σ⟨x, y⟩)`` without forming the sum from the raw entries.

  The arrays are divided by their largest |entry| (over all layers) first and the scales are
  put back after the square root, so gradients or curvature of 1e20 (whose products overflow
  float32: inf − inf = NaN) or 1e-25 (whose products underflow to 0) get the exact factor.
  ``positive`` is false when the sum is not > 0 (a zero gradient) or not a number; the factor is
  then 1.
  """
  top_x = linalg.max_abs(xs)
  top_y = linalg.max_abs(ys)
  safe_x = jnp.where(top_x > 0, top_x, 1.0)
  safe_y = jnp.where(top_y > 0, top_y, 1.0)
  # Products and sums rather than vdot, which flattens (not possible for an explicitly
  # sharded matrix) and contracts sharded axes.
  total = sum(jnp.sum((xs[k] / safe_x) * (ys[k] / safe_y)) for k in xs)
  positive = total > 0
  factor = (jax.lax.rsqrt(jnp.where(positive, total, 1.0)) * jax.lax.rsqrt(safe_x)
            * jax.lax.rsqrt(safe_y))
  return positive, jnp.where(positive, factor, 1.0)


def kl_normalize() -> Scaling:
  """Journal Eva: scale by 1/√Σ⟨V, Ĝ⟩ (1 when the sum is not positive, i.e. a zero gradient).
  Overflow-safe: finite directions and gradients of any scale give a finite factor."""
  def scale(directions, grads, count):
    del count
    return _inverse_root_of_sum_inner(directions, grads)[1]
  return scale


def kl_clip(kl_clip_value, learning_rate) -> Scaling:
  """ICLR Eva / K-FAC: ν = min(1, √(κ / (η² Σ⟨V, Ĝ⟩))), η the learning rate at this step (1
  when the sum is not positive). Overflow-safe like :func:`kl_normalize`."""
  check_positive("kl_clip", kl_clip_value)
  if learning_rate is None:
    raise ValueError("eva_optax: scaling='kl_clip' needs the learning_rate (float or schedule).")
  check_learning_rate(learning_rate)

  def scale(directions, grads, count):
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    positive, inverse_root = _inverse_root_of_sum_inner(directions, grads)
    # √κ/|η| · 1/√Σ: never forms η²Σ, which overflows with the sum (η = 0 gives ν = 1).
    nu = jnp.sqrt(jnp.asarray(kl_clip_value, jnp.float32)) / jnp.abs(
        jnp.asarray(lr, jnp.float32)) * inverse_root
    return jnp.where(positive, jnp.minimum(1.0, nu), 1.0)
  return scale


def no_scaling() -> Scaling:
  return lambda directions, grads, count: jnp.ones((), jnp.float32)


SCALINGS = ("kl_normalize", "kl_clip", None)


def scaling_by_name(scaling: Optional[str], kl_clip_value=1e-3,
                    learning_rate: Optional[optax.ScalarOrSchedule] = None) -> Scaling:
  """The :data:`Scaling` named ``scaling`` (one of :data:`SCALINGS`).

  Raises:
    ValueError: an unknown name; ``"kl_clip"`` with ``kl_clip_value <= 0`` or without
      ``learning_rate``.
  """
  if scaling == "kl_normalize":
    return kl_normalize()
  if scaling == "kl_clip":
    return kl_clip(kl_clip_value, learning_rate)
  if scaling is None:
    return no_scaling()
  raise ValueError(f"eva_optax: scaling must be one of {SCALINGS}, got {scaling!r}.")


class PerLayer:
  """Stands for the per-layer state in ``init``'s answer to an opaque ``params`` (see
  :func:`opaque`): a single leaf, so the real per-layer dicts are not taken for params."""

  def __repr__(self):
    return "PerLayer()"


def opaque(params) -> bool:
  """Whether ``params`` is an opaque node without arrays rather than a parameter tree:
  ``optax.tree_utils.tree_map_params`` calls ``init`` with such a placeholder to find which
  parts of the state are shaped like the params. The per-layer statistics are keyed by layer,
  not shaped like the params, so ``init`` answers :class:`PerLayer` for them (``map_params``
  then leaves them to ``transform_non_params``)."""
  return not isinstance(params, Mapping) and not jax.tree.leaves(params)


def flat_layouts(layouts) -> dict[str, layers.Layout]:
  """``{layer: Layout}`` from a flat or nested (params-like) mapping; ``{}`` for ``None``."""
  return {} if layouts is None else collectors.flatten_curvature(layouts)


def layer_shapes(layer: Mapping[str, jax.Array], name: str,
                 layout: layers.Layout) -> tuple[tuple[int, ...], int, int, bool]:
  """``(stack, d_in, d_out, has_bias)`` of a layer under ``layout`` (checked)."""
  layers.check_layout(name, layer, layout)
  d, d_out = layers.matrix_shape(layer, layout)
  return layers.stack_shape(layer, layout), d - ("bias" in layer), d_out, "bias" in layer


def stacked_init(init: Callable, stack: tuple[int, ...], *args, kernel=None):
  """``init(*args)`` for one slice, repeated over the stack axes ``stack``. On an explicit mesh
  the stack axes take the sharding of ``kernel``'s (the update vmaps over the slices of both
  together, which needs equal sharding there); the per-slice axes are replicated."""
  stacked = jax.tree.map(lambda z: jnp.broadcast_to(z, stack + jnp.shape(z)), init(*args))
  if kernel is None or not stack or layers.explicit_mesh(kernel) is None:
    return stacked
  head = layers.spec(kernel)[:len(stack)]
  return jax.tree.map(lambda z: layers.sharded_as(z, head + (None,) * (z.ndim - len(head)),
                                                  layers.explicit_mesh(kernel)), stacked)


def select_curvature(curvature, kind: type, who: str):
  """The tree of ``kind`` records from a capture's output (one tree, or a dict of trees keyed
  by statistics name); raises when ``curvature`` is missing or lacks ``kind``."""
  if curvature is None:
    raise ValueError(
        f"eva_optax: {who}'s update() needs the captured statistics: call "
        "tx.update(grads, state, params, curvature=curvature), with curvature from "
        "eva_optax.flax.value_and_grad(loss_fn, statistics=...) or built by hand (see "
        "eva_optax.collectors).")
  names = {kind: name for name, kind in collectors.RECORDS.items()}
  if isinstance(curvature, Mapping) and curvature and set(curvature) <= set(names.values()):
    if names.get(kind) not in curvature:
      raise ValueError(
          f"eva_optax: curvature holds {sorted(curvature)} but {who} needs "
          f"'{names.get(kind)}': add it to `statistics`.")
    curvature = curvature[names[kind]]
  return curvature


def match_layers(curvature, grads: Mapping, kind: type, who: str,
                 masked: frozenset = frozenset()) -> dict:
  """``{layer: record}`` of ``kind`` from ``curvature``, validated against the kernel-bearing
  layers ``grads``: raises for an empty curvature, a layer without kernel, a wrong record.
  Layers in ``masked`` (another partition's, see :func:`layers.masked_layers`) are dropped."""
  flat = collectors.flatten_curvature(select_curvature(curvature, kind, who))
  flat = {name: record for name, record in flat.items() if name not in masked}
  if not flat:
    raise ValueError(
        f"eva_optax: curvature covers none of the parameters' kernels ({len(grads)} layers "
        f"with kernels: {sorted(grads)[:8]}), so {who} would silently be first-order. Check "
        "that the capture sees the model's layers (eva_optax.flax.value_and_grad(...).describe"
        "(params, *batch)) and that `statistics` matches.")
  for name, record in flat.items():
    if name not in grads:
      raise ValueError(
          f"eva_optax: curvature has layer '{name}' but the parameters have no "
          f"'{name}/kernel'. Pass the params collection itself (variables['params']), not the "
          f"whole variables dict; for parameters under other names pass "
          f"layouts={{{name!r}: eva_optax.Layout(kernel=..., bias=...)}}; layers with kernels: "
          f"{sorted(grads)}.")
    if not isinstance(record, kind):
      raise TypeError(
          f"eva_optax: curvature['{name}'] is a {type(record).__name__}, {who} needs "
          f"{kind.__name__}: capture with the matching `statistics`.")
  return flat


def check_record(name: str, record, expected, kernel_shape) -> None:
  """Raises when ``record``'s fields do not have the shapes of ``expected`` (the state's), or
  are not floating point; the message points to ``layouts`` for multi-axis or stacked kernels."""
  for field, new, old in zip(record._fields, record, expected):
    if jnp.shape(new) != jnp.shape(old):
      raise ValueError(
          f"eva_optax: curvature['{name}'].{field} has shape {jnp.shape(new)}, the optimizer "
          f"state for kernel {tuple(kernel_shape)} has {jnp.shape(old)}. For a layer stack or "
          "a kernel with several output axes, build the optimizer with the capture's layouts: "
          "eva_optax.eva(..., layouts=capture.describe(params, *batch).layouts).")
    if not jnp.issubdtype(jnp.result_type(new), jnp.floating):
      raise TypeError(f"eva_optax: curvature['{name}'].{field} must be floating point, got "
                      f"{jnp.result_type(new)}.")


def with_momentum(direction: optax.GradientTransformation,
                  learning_rate: optax.ScalarOrSchedule, momentum: float, nesterov: bool,
                  weight_decay: float) -> optax.GradientTransformationExtraArgs:
  """``direction`` → ``optax.add_decayed_weights(weight_decay)`` → ``optax.trace(momentum,
  nesterov)`` → ``−learning_rate``: the tail every complete optimizer of the package shares
  (K-BFGS excepted: the paper applies momentum before its preconditioner).

  Raises:
    ValueError: a concrete ``learning_rate`` that is negative or not finite.
  """
  check_learning_rate(learning_rate)
  return optax.chain(
      direction,
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_learning_rate(learning_rate),
  )


def scale_by_kronecker(collector: collectors.Collector, preconditioner: Preconditioner,
                       scaling: Scaling, layouts: Optional[Mapping] = None, *,
                       name: str = "scale_by_kronecker") -> optax.GradientTransformationExtraArgs:
  """Preconditions each captured layer's gradient with its running statistics.

  Args:
    collector: which statistics are averaged per layer, and how.
    preconditioner: how one layer's float32 gradient matrix Ĝ becomes a direction.
    scaling: one factor for all captured directions (e.g. :func:`kl_normalize`).
    layouts: ``{layer: eva_optax.layers.Layout}`` (flat ``"A/B"`` names or nested like params)
      for kernels that are not one ``[d_in..., d_out]`` matrix: layer stacks (one matrix per
      slice of the leading stack axes, statistics and preconditioner state stacked alike,
      preconditioned with ``jax.vmap``) and several output axes. Layers not listed have
      ``Layout()``: no stack, the last kernel axis is d_out. The capture reports them:
      ``eva_optax.flax.value_and_grad(...).describe(params, *batch).layouts``.
    name: the optimizer's name in error messages.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params=None, *,
    curvature)`` needs the step's statistics as the keyword ``curvature`` (a nested dict keyed by
    module path, see :mod:`eva_optax.collectors`). Parameters of layers absent from
    ``curvature`` and non-kernel parameters pass through unchanged. Directions are computed in
    float32 and returned in each parameter's dtype. On explicitly sharded params
    (``jax.sharding.AxisType.Explicit``) statistics and preconditioner state are replicated
    (from ``init`` on, whatever the records' sharding), Ĝ keeps the kernel's output-axis
    sharding (:func:`~eva_optax.layers.to_matrix`) and updates come back sharded like the
    params.

  Raises:
    ValueError / TypeError at ``init``: a layout that does not fit its kernel, integer
    parameters; at trace time: integer gradients or parameters, a state that does not fit the
    parameters (stale, or restored without a target: see :mod:`eva_optax.guards`),
    ``curvature`` missing, empty, naming a layer without kernel, of the wrong record type,
    shape or dtype.
  """
  layouts = flat_layouts(layouts)

  def per_slice(name, fn, in_axes=0):
    return layers.over_stack(fn, layouts.get(name, layers.Layout()).stacked_axes, in_axes)

  def init_fn(params):
    if opaque(params):
      return ScaleByKroneckerState(count=jnp.zeros((), jnp.int32), preconditioner=PerLayer(),
                                   stats=PerLayer())
    stats, pstates = {}, {}
    for name, layer in layers.find_layers(params, layouts).items():
      stack, *shapes = layer_shapes(layer, name, layouts.get(name, layers.Layout()))
      stats[name] = stacked_init(collector.init, stack, *shapes, kernel=layer["kernel"])
      pstates[name] = stacked_init(preconditioner.init, stack, *shapes, kernel=layer["kernel"])
    return ScaleByKroneckerState(count=jnp.zeros((), jnp.int32), preconditioner=pstates,
                                 stats=stats)

  def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
    del params, extra_args
    grads = layers.find_layers(updates, layouts)
    captured = match_layers(curvature, grads, collector.kind, "this optimizer",
                            layers.masked_layers(updates, layouts))
    stats, pstates = dict(state.stats), dict(state.preconditioner)
    layer_stats = {}
    for name, record in captured.items():
      check_record(name, record, state.stats[name], jnp.shape(grads[name]["kernel"]))
      stats[name] = collector.update(state.stats[name], record, state.count)
      layer_stats[name] = (per_slice(name, collector.with_bias)(stats[name])
                           if "bias" in grads[name] else stats[name])
    pstates.update(_refreshed(preconditioner, layer_stats, pstates, state.count, per_slice))
    directions, matrices = {}, {}
    for name in captured:
      matrices[name] = layers.to_matrix(grads[name], layouts.get(name, layers.Layout()))
      directions[name] = per_slice(name, preconditioner.apply)(layer_stats[name], pstates[name],
                                                               matrices[name])
    factor = scaling(directions, matrices, state.count)
    updates = replace_layers(updates, {
        name: layers.from_matrix(factor * direction, grads[name],
                                 layouts.get(name, layers.Layout()))
        for name, direction in directions.items()}, layouts)
    return updates, ScaleByKroneckerState(count=optax.safe_increment(state.count),
                                          preconditioner=pstates, stats=stats)

  return guards.guarded(optax.GradientTransformationExtraArgs(init_fn, update_fn), name)


def _refreshed(preconditioner: Preconditioner, layer_stats: dict, pstates: dict, count,
               per_slice: Callable) -> dict:
  """The captured layers' new preconditioner states: one ``update_all`` over every layer when
  the preconditioner has it, else each layer's ``update`` (mapped over a stack's slices)."""
  if preconditioner.update_all is not None:
    return preconditioner.update_all(layer_stats, {n: pstates[n] for n in layer_stats}, count)
  return {name: per_slice(name, preconditioner.update, (0, 0, None))(stats, pstates[name], count)
          for name, stats in layer_stats.items()}


def replace_layers(updates, new: Mapping[str, Mapping[str, jax.Array]],
                   layouts: Mapping[str, layers.Layout]):
  """``updates`` with the leaves ``new[layer][leaf]`` (``"kernel"``, ``"bias"``, stored under
  the layer's ``layouts`` keys) replaced."""
  def key(name, leaf):
    return getattr(layouts.get(name, layers.Layout()), leaf)
  leaves = {layers.layer_name(tuple(filter(None, (name, key(name, leaf))))): value
            for name, layer in new.items() for leaf, value in layer.items()}

  def replace(path, leaf):
    names = layers.dict_path(path)
    return leaf if names is None else leaves.get(layers.layer_name(names), leaf)

  return jax.tree_util.tree_map_with_path(replace, updates)
