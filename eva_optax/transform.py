"""The generic collector × preconditioner transform (DESIGN §3) and the global scalings.

Every optimizer in the package is a pairing passed to :func:`scale_by_kronecker`: a
:class:`~eva_optax.collectors.Collector` that keeps running statistics per layer, a
:class:`Preconditioner` that turns one layer's gradient matrix into a direction, and a
:data:`Scaling` applied once over all captured layers (KL normalization, KL clip, none).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from eva_optax import collectors, layers

# (directions, gradient matrices, count) -> scalar factor applied to every direction.
Scaling = Callable[[Mapping[str, jax.Array], Mapping[str, jax.Array], jax.Array], jax.Array]


class Preconditioner(NamedTuple):
  """Per-layer preconditioning of a gradient matrix Ĝ ``[d_in (+1), d_out]``, float32.

  Attributes:
    init: ``(kernel, has_bias) -> state`` — cached per-layer work (inverses, roots); ``()`` if none.
    update: ``(stats, state, count) -> state`` — refresh the cache (``lax.cond`` for periodic work).
    apply: ``(stats, state, grad_matrix) -> direction`` of the same shape as Ĝ.
  """

  init: Callable[[jax.Array, bool], Any]
  update: Callable[[NamedTuple, Any, jax.Array], Any]
  apply: Callable[[NamedTuple, Any, jax.Array], jax.Array]


class ScaleByKroneckerState(NamedTuple):
  """State of :func:`scale_by_kronecker`.

  Attributes:
    count: int32 scalar, number of updates so far.
    stats: ``{layer name: statistics record}`` running statistics of every kernel-bearing layer.
    preconditioner: ``{layer name: preconditioner state}``.
  """

  count: jax.Array
  stats: dict
  preconditioner: dict


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


def _sum_inner(xs: Mapping[str, jax.Array], ys: Mapping[str, jax.Array]) -> jax.Array:
  return sum(jnp.vdot(xs[k], ys[k]) for k in xs)


def kl_normalize() -> Scaling:
  """Journal Eva: scale by 1/√Σ⟨V, Ĝ⟩ (1 when the sum is not positive, i.e. a zero gradient)."""
  def scale(directions, grads, count):
    del count
    total = _sum_inner(directions, grads)
    return jnp.where(total > 0, jax.lax.rsqrt(jnp.where(total > 0, total, 1.0)), 1.0)
  return scale


def kl_clip(kl_clip_value, learning_rate) -> Scaling:
  """ICLR Eva / K-FAC: ν = min(1, √(κ / (η² Σ⟨V, Ĝ⟩))), η the learning rate at this step."""
  check_positive("kl_clip", kl_clip_value)
  if learning_rate is None:
    raise ValueError("eva_optax: scaling='kl_clip' needs the learning_rate (float or schedule).")

  def scale(directions, grads, count):
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    total = jnp.asarray(lr, jnp.float32) ** 2 * _sum_inner(directions, grads)
    safe = jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, jnp.minimum(1.0, jnp.sqrt(kl_clip_value / safe)), 1.0)
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


def _match(curvature, grads: Mapping, stats: Mapping, collector: collectors.Collector) -> dict:
  """Validated ``{layer: new statistics}``; raises naming the layer for every mismatch."""
  if curvature is None:
    raise ValueError(
        "eva_optax: update() needs the captured statistics: call "
        "tx.update(grads, state, params, curvature=curvature), with curvature from "
        "eva_optax.flax.value_and_grad(loss_fn, statistics=...) or built by hand (see "
        "eva_optax.collectors).")
  names = {kind: name for name, kind in collectors.RECORDS.items()}
  if isinstance(curvature, Mapping) and curvature and set(curvature) <= set(names.values()):
    if names.get(collector.kind) not in curvature:
      raise ValueError(
          f"eva_optax: curvature holds {sorted(curvature)} but this optimizer needs "
          f"'{names.get(collector.kind)}': add it to `statistics`.")
    curvature = curvature[names[collector.kind]]
  flat = collectors.flatten_curvature(curvature)
  for name, record in flat.items():
    if name not in grads or name not in stats:
      raise ValueError(
          f"eva_optax: curvature has layer '{name}' but the parameters have no "
          f"'{name}/kernel'. Pass the params collection itself (variables['params']), not the "
          f"whole variables dict; layers with kernels: {sorted(grads)}.")
    if not isinstance(record, collector.kind):
      raise TypeError(
          f"eva_optax: curvature['{name}'] is a {type(record).__name__}, this optimizer needs "
          f"{collector.kind.__name__}: capture with the matching `statistics`.")
    for field, new, old in zip(record._fields, record, stats[name]):
      if jnp.shape(new) != jnp.shape(old):
        raise ValueError(
            f"eva_optax: curvature['{name}'].{field} has shape {jnp.shape(new)}, the layer's "
            f"kernel {jnp.shape(grads[name]['kernel'])} needs {jnp.shape(old)}.")
      if not jnp.issubdtype(jnp.result_type(new), jnp.floating):
        raise TypeError(f"eva_optax: curvature['{name}'].{field} must be floating point, got "
                        f"{jnp.result_type(new)}.")
  return flat


def with_momentum(direction: optax.GradientTransformation,
                  learning_rate: optax.ScalarOrSchedule, momentum: float, nesterov: bool,
                  weight_decay: float) -> optax.GradientTransformationExtraArgs:
  """``direction`` → ``optax.add_decayed_weights(weight_decay)`` → ``optax.trace(momentum,
  nesterov)`` → ``−learning_rate``: the tail every complete optimizer of the package shares
  (K-BFGS excepted: the paper applies momentum before its preconditioner)."""
  return optax.chain(
      direction,
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_learning_rate(learning_rate),
  )


def scale_by_kronecker(collector: collectors.Collector, preconditioner: Preconditioner,
                       scaling: Scaling) -> optax.GradientTransformationExtraArgs:
  """Preconditions each captured layer's gradient with its running statistics.

  Args:
    collector: which statistics are averaged per layer, and how.
    preconditioner: how one layer's float32 gradient matrix Ĝ becomes a direction.
    scaling: one factor for all captured directions (e.g. :func:`kl_normalize`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params=None, *,
    curvature)`` needs the step's statistics as the keyword ``curvature`` (a nested dict keyed by
    module path, see :mod:`eva_optax.collectors`). Parameters of layers absent from
    ``curvature`` and non-kernel parameters pass through unchanged. Directions are computed in
    float32 and returned in each parameter's dtype.

  Raises:
    ValueError / TypeError at trace time: ``curvature`` missing, naming a layer without kernel,
    of the wrong record type, shape or dtype.
  """

  def init_fn(params):
    found = layers.find_layers(params)
    return ScaleByKroneckerState(
        count=jnp.zeros((), jnp.int32),
        stats={k: collector.init(v["kernel"], "bias" in v) for k, v in found.items()},
        preconditioner={k: preconditioner.init(v["kernel"], "bias" in v) for k, v in found.items()})

  def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
    del params, extra_args
    grads = layers.find_layers(updates)
    captured = _match(curvature, grads, state.stats, collector)
    stats, pstates = dict(state.stats), dict(state.preconditioner)
    directions, matrices = {}, {}
    for name, record in captured.items():
      stats[name] = collector.update(state.stats[name], record, state.count)
      layer_stats = collector.with_bias(stats[name]) if "bias" in grads[name] else stats[name]
      pstates[name] = preconditioner.update(layer_stats, pstates[name], state.count)
      matrices[name] = layers.to_matrix(grads[name])
      directions[name] = preconditioner.apply(layer_stats, pstates[name], matrices[name])
    factor = scaling(directions, matrices, state.count) if directions else 1.0
    new_leaves = {}
    for name, direction in directions.items():
      for leaf, value in layers.from_matrix(factor * direction, grads[name]).items():
        new_leaves[layers.layer_name(tuple(filter(None, (name, leaf))))] = value

    def replace(path, leaf):
      return new_leaves.get(layers.layer_name(layers.key_path_names(path)), leaf)

    updates = jax.tree_util.tree_map_with_path(replace, updates)
    return updates, ScaleByKroneckerState(optax.safe_increment(state.count), stats, pstates)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
