"""Shampoo with blocking, grafting and delayed inverse roots (DESIGN §4).

Gupta, Koren, Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", ICML 2018;
Anil, Gupta, Koren, Regan, Singer, "Scalable Second Order Optimization for Deep Learning" (the
blocking, grafting, delayed-root and coupled-Newton machinery of the reference
``distributed_shampoo``; written here from the papers' formulas).

For every parameter tensor, after merging small dimensions (``[3, 3, 128, 128] →
[9, 128, 128]``) and cutting every dimension into blocks of at most ``block_size``, each block
G of rank k keeps one statistic per mode, e.g. for a matrix

    L ← β₂ L + w G Gᵀ,   R ← β₂ R + w Gᵀ G     (w = 1 if β₂ = 1 else 1 − β₂; L₀ = R₀ = εI)

and is preconditioned as L^{-1/2k} G R^{-1/2k} (the mode-i statistic contracted with mode i).
The blocks' directions are reassembled and the tensor's direction is rescaled to the norm of a
first-order *graft* step (SGD, AdaGrad, RMSProp or Adam) — Shampoo picks the direction, the
graft the step length.

Unlike the Kronecker-factored optimizers of this package, Shampoo needs only the gradient: it
does not use :func:`~eva_optax.scale_by_kronecker` and preconditions every tensor of rank ≥ 2
(layer kernels, embeddings, …), not only captured layers.

Blocks of equal shape are stacked, and all statistics of equal size and root order get their
roots in one vmapped computation, so compile time grows with the number of distinct block
sizes, not with the number of blocks or layers. Roots are float64 when ``jax_enable_x64`` is
on, and a root that is not finite or whose residual max |X^p S_ε − I| exceeds 0.1 is discarded
(the previous root is kept).

Bad numbers: a tensor whose gradient is not finite, or whose statistics or graft accumulator
would overflow float32 (entries ≳ 1e18), is skipped for that step — its statistics and graft
state stay as they were and its update is 0 (NaN for a non-finite gradient, so that
``optax.apply_if_finite`` skips the step). Roots are computed from statistics divided by their
largest entry, so finite statistics of any scale keep refreshing.

Explicitly sharded params (``jax.sharding.AxisType.Explicit``): the graft state is sharded like
each param and the statistics and roots are replicated, from ``init`` on; every preconditioned
tensor's gradient is gathered for its blocks (no block-to-shard layout yet), and its update is
resharded like the param.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from eva_optax import collectors, distributed, guards, layers, linalg, transform

_HIGHEST = jax.lax.Precision.HIGHEST
GRAFT_TYPES = ("sgd", "adagrad", "rmsprop", "adam")
ROOT_METHODS = ("newton", "eigh")
# Structural (shape-determining) arguments of `shampoo`/`scale_by_shampoo`: pass them as
# ``optax.inject_hyperparams(eva_optax.shampoo, static_args=SHAMPOO_STATIC_ARGS)``.
SHAMPOO_STATIC_ARGS = ("block_size", "start_preconditioning_step",
                       "preconditioning_compute_steps", "exponent_override",
                       "skip_preconditioning_dim_size_gt", "refresh_mesh")


class ShampooState(NamedTuple):
  """State of :func:`scale_by_shampoo` (arrays only; checkpoints with orbax).

  Fields are in alphabetical order (as :class:`~eva_optax.ScaleByKroneckerState`, which says
  why), so leaves of a checkpoint restored as a dict keep their fields.

  Attributes:
    count: int32 scalar, number of updates so far.
    graft: pytree like the params; per tensor ``()`` (SGD), ``(Σ g²,)`` (AdaGrad),
      ``(EMA g²,)`` (RMSProp) or ``(EMA g, EMA g²)`` (Adam), float32.
    preconditioner: same structure as ``stats``: the float32 inverse roots S^{-1/p} last
      computed (identity before the first refresh).
    stats: pytree like the params; per tensor a tuple of float32 stacks ``[n, b, b]``, one per
      (block shape, mode): the statistics of the n blocks of that shape along that mode. ``()``
      for tensors that get the graft update only.
  """

  count: jax.Array
  graft: Any
  preconditioner: Any
  stats: Any


class _Part(NamedTuple):
  """A regular sub-grid of blocks: along dim d, ``counts[d]`` blocks of size ``block[d]``
  starting at ``starts[d]`` (each dim has a full-block part and possibly one remainder part)."""

  starts: tuple
  counts: tuple
  block: tuple


class _Plan(NamedTuple):
  """Static (trace-time) layout of one tensor; ``merged`` is None for graft-only tensors.
  ``parts`` is the product (last dim fastest) of ``grid[d]`` pieces per dim."""

  merged: Optional[tuple]
  parts: tuple
  p: int
  grid: tuple = ()


def merge_small_dims(shape: Sequence[int], max_dim: int) -> tuple:
  """Merges consecutive dims while their product stays ≤ ``max_dim``; drops dims of size 1.

  ``(3, 3, 128, 128), 128 → (9, 128, 128)``; ``(1, 10) → (10,)``; ``() → (1,)``.
  """
  merged, current = [], 1
  for d in shape:
    if current * d <= max_dim:
      current *= d
    else:
      if current > 1:
        merged.append(current)
      current = d
  if current > 1 or not merged:
    merged.append(current)
  return tuple(merged)


def _plan(shape, block_size, skip_dim_gt, exponent_override) -> _Plan:
  if len(shape) <= 1 or any(d > skip_dim_gt for d in shape):
    return _Plan(None, (), 0)
  merged = merge_small_dims(shape, block_size)
  if len(merged) <= 1:
    return _Plan(None, (), 0)
  pieces = []
  for d in merged:
    full, rest = divmod(d, block_size)
    dim_pieces = [(0, full, block_size)] if full else []
    if rest:
      dim_pieces.append((full * block_size, 1, rest))
    pieces.append(dim_pieces)
  parts = tuple(_Part(*zip(*combo)) for combo in itertools.product(*pieces))
  return _Plan(merged, parts, exponent_override or 2 * len(merged),
               tuple(len(p) for p in pieces))


def _assemble(pieces: list, grid: tuple) -> jax.Array:
  """Concatenates the parts (in ``itertools.product`` order) back into one tensor."""
  for axis in reversed(range(len(grid))):
    n = grid[axis]
    pieces = [pieces[i] if n == 1 else jnp.concatenate(pieces[i:i + n], axis=axis)
              for i in range(0, len(pieces), n)]
  return pieces[0]


def _n_blocks(part: _Part) -> int:
  n = 1
  for c in part.counts:
    n *= c
  return n


def _blocks(x: jax.Array, part: _Part) -> jax.Array:
  """The part's blocks of the merged tensor ``x``, stacked: ``[n, *part.block]``."""
  k = len(part.block)
  x = x[tuple(slice(s, s + n * b) for s, n, b in zip(part.starts, part.counts, part.block))]
  x = x.reshape([v for n, b in zip(part.counts, part.block) for v in (n, b)])
  x = x.transpose([2 * i for i in range(k)] + [2 * i + 1 for i in range(k)])
  return x.reshape((-1,) + tuple(part.block))


def _unblock(blocks: jax.Array, part: _Part) -> jax.Array:
  """Inverse of :func:`_blocks`: ``[n, *block] → [n₁b₁, …, n_kb_k]``."""
  k = len(part.block)
  x = blocks.reshape(tuple(part.counts) + tuple(part.block))
  x = x.transpose([v for i in range(k) for v in (i, k + i)])
  return x.reshape([n * b for n, b in zip(part.counts, part.block)])


def _mode_gram(blocks: jax.Array, mode: int) -> jax.Array:
  """``[n, b₁..b_k] → [n, b_mode, b_mode]``: the mode unfolding times its transpose."""
  x = jnp.moveaxis(blocks, mode + 1, 1)
  x = x.reshape(x.shape[0], x.shape[1], -1)
  return jnp.einsum("nij,nkj->nik", x, x, precision=_HIGHEST)


def _mode_product(blocks: jax.Array, matrices: jax.Array, mode: int) -> jax.Array:
  """Contracts ``matrices [n, b, b]`` (symmetric) with mode ``mode`` of ``blocks``."""
  x = jnp.moveaxis(blocks, mode + 1, 1)
  shape = x.shape
  x = jnp.einsum("nab,nbj->naj", matrices, x.reshape(shape[0], shape[1], -1),
                 precision=_HIGHEST)
  return jnp.moveaxis(x.reshape(shape), 1, mode + 1)


def _static_int(name: str, value, minimum: int) -> int:
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"eva_optax: {name} sets array shapes and cannot be a traced hyperparameter; use "
        f"optax.inject_hyperparams(..., static_args=eva_optax.SHAMPOO_STATIC_ARGS).")
  if hasattr(value, "shape") and not value.shape and hasattr(value, "item"):
    value = value.item()  # a concrete 0-d array (inject_hyperparams' init)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"eva_optax: {name} must be an int >= {minimum}, got {value!r}.")
  return value


def _graft_init(graft_type, param):
  zeros = jnp.zeros_like(param, dtype=jnp.float32)  # sharded like the param, as its updates
  return {"sgd": (), "adagrad": (zeros,), "rmsprop": (zeros,), "adam": (zeros, zeros)}[graft_type]


def _graft_update(graft_type, grad, state, count, beta1, beta2, epsilon):
  """One graft step: (direction, new state), float32."""
  if graft_type == "sgd":
    return grad, state
  if graft_type == "adagrad":
    (acc,) = state
    acc = acc + grad * grad
    return grad / (jnp.sqrt(acc) + epsilon), (acc,)
  if graft_type == "rmsprop":
    (acc,) = state
    acc = beta2 * acc + (1 - beta2) * grad * grad
    return grad / (jnp.sqrt(acc) + epsilon), (acc,)
  mu, nu = state
  mu = beta1 * mu + (1 - beta1) * grad
  nu = beta2 * nu + (1 - beta2) * grad * grad
  t = (count + 1).astype(jnp.float32)
  mu_hat = mu / (1 - jnp.power(beta1, t))
  nu_hat = nu / (1 - jnp.power(beta2, t))
  return mu_hat / (jnp.sqrt(nu_hat) + epsilon), (mu, nu)


def _check_options(beta2, matrix_epsilon, graft_type, graft_beta1, graft_beta2, graft_epsilon,
                   root_method) -> None:
  """The ``ValueError``s of :func:`scale_by_shampoo`'s float and string options."""
  transform.check_positive("matrix_epsilon", matrix_epsilon)
  transform.check_positive("graft_epsilon", graft_epsilon)
  transform.check_unit_interval("beta2", beta2)
  transform.check_unit_interval("graft_beta1", graft_beta1, closed_right=False)
  transform.check_unit_interval("graft_beta2", graft_beta2, closed_right=False)
  if graft_type not in GRAFT_TYPES:
    raise ValueError(f"eva_optax: graft_type must be one of {GRAFT_TYPES}, got {graft_type!r}.")
  if root_method not in ROOT_METHODS:
    raise ValueError(f"eva_optax: root_method must be one of {ROOT_METHODS}, "
                     f"got {root_method!r}.")


def _grafted_direction(grad, whole, plan, roots, graft_step, taken, preconditioning):
  """One tensor's direction: the Shampoo step rescaled to the graft step's norm once
  ``preconditioning`` (else, and for unpreconditioned tensors, the graft step); a tensor
  whose statistics step was not ``taken`` does not move — 0·G is 0, or NaN for a non-finite
  G, so that ``optax.apply_if_finite`` skips the step."""
  if plan.merged is None:
    direction = graft_step
  else:
    shampoo_step = linalg.rescale_to_norm(
        layers.sharded_like(_precondition(whole, plan, roots), grad), graft_step)
    direction = jnp.where(preconditioning, shampoo_step, graft_step)
  return jnp.where(taken, direction, 0 * grad)


def scale_by_shampoo(
    block_size: int = 128,
    *,
    beta2: float = 1.0,
    matrix_epsilon: float = 1e-6,
    start_preconditioning_step: int = 1,
    preconditioning_compute_steps: int = 1,
    exponent_override: int = 0,
    skip_preconditioning_dim_size_gt: int = 4096,
    graft_type: str = "adagrad",
    graft_beta1: float = 0.9,
    graft_beta2: float = 0.999,
    graft_epsilon: float = 1e-8,
    root_method: str = "newton",
    refresh_mesh: Optional[jax.sharding.Mesh] = None,
) -> optax.GradientTransformationExtraArgs:
  """Shampoo's grafted direction, to compose with momentum and a learning rate.

  Args:
    block_size: int ≥ 1 (default 128). Every dimension (after merging consecutive dims whose
      product is ≤ ``block_size``) is cut into blocks of this size plus one remainder block;
      each block has its own statistics (stacking and compile time: module docstring).
    beta2: β₂ ∈ [0, 1] of the statistics, S ← β₂S + w·G_(i)G_(i)ᵀ with w = 1 if β₂ = 1 (plain
      sums, the original Shampoo; default) else 1 − β₂ (exponential moving average).
    matrix_epsilon: ε > 0: statistics start at εI, and the roots use the ridge ε·λ_max(S)·I
      (λ_max by power iteration; relative, so the direction is invariant to gradient scale).
    start_preconditioning_step: int ≥ 0 (default 1). Updates 0 … start−1 (0-based update count)
      are the graft step alone; statistics accumulate from update 0.
    preconditioning_compute_steps: int ≥ 1, T (default 1). Roots are recomputed (``lax.cond``)
      at updates start, start + T, start + 2T, …, from the statistics including that update's
      gradient; in between the last roots are reused.
    exponent_override: int p ≥ 1 to use S^{-1/p} for every statistic; 0 (default) uses
      p = 2k for a block of rank k (−1/4 for matrices, −1/6 for merged rank-3 tensors).
    skip_preconditioning_dim_size_gt: tensors with a dimension larger than this (default 4096)
      get the graft update only, as do tensors of rank ≤ 1 (also after merging: ``(1, 10)``).
    graft_type: ``"sgd"`` (the gradient), ``"adagrad"`` (g/(√Σg² + ε), default), ``"rmsprop"``
      (g/(√EMA_{β₂'}(g²) + ε)) or ``"adam"`` (bias-corrected m̂/(√v̂ + ε)). Per tensor, the
      Shampoo direction is rescaled to the Frobenius norm of this step.
    graft_beta1, graft_beta2: decays of the Adam/RMSProp graft (defaults 0.9, 0.999).
    graft_epsilon: ε > 0 of the AdaGrad/RMSProp/Adam graft denominators.
    root_method: ``"newton"`` (coupled Newton iteration, default; matmuls only) or ``"eigh"``
      (root precision and rejection: module docstring).
    refresh_mesh: ``None`` (default): every device computes every root of a refresh. A
      ``jax.sharding.Mesh``: each group of equal-sized statistics (the stack that gets one
      vmapped root computation) is divided among the mesh's devices and the roots gathered
      (:func:`eva_optax.distributed.vmap_over_devices`): the same roots for ~1/devices of the
      work, under ``jax.jit`` (not inside ``pmap``/``shard_map``).

  Returns:
    ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params=None,
    **extra_args)`` ignores ``params``, ``curvature=`` and any other extra argument, so it
    drops into the same training step as :func:`~eva_optax.eva`. Updates have the gradients'
    dtypes; statistics and roots are float32. Under ``pmap``/``shard_map`` average the
    gradients over devices first (as for any optimizer): every replica then computes
    identical roots. Bad numbers and explicitly sharded params: module docstring.

  Raises:
    ValueError: a non-positive ``block_size``/``preconditioning_compute_steps``/``matrix_epsilon``
      /``graft_epsilon``, a negative ``start_preconditioning_step``/``exponent_override``,
      ``beta2`` outside [0, 1], graft decays outside [0, 1), an unknown ``graft_type`` or
      ``root_method``, or a structural int traced by ``optax.inject_hyperparams`` (pass
      ``static_args=eva_optax.SHAMPOO_STATIC_ARGS``); at update time, a state that does not
      fit the gradients (stale: see :mod:`eva_optax.guards`).
    TypeError: integer parameters or gradients; a state restored from a checkpoint without a
      target; a ``refresh_mesh`` that is not a Mesh.
  """
  distributed.check_mesh(refresh_mesh, "shampoo")
  _check_options(beta2, matrix_epsilon, graft_type, graft_beta1, graft_beta2, graft_epsilon,
                 root_method)
  config = _Config(
      _static_int("block_size", block_size, 1),
      _static_int("start_preconditioning_step", start_preconditioning_step, 0),
      _static_int("preconditioning_compute_steps", preconditioning_compute_steps, 1),
      _static_int("exponent_override", exponent_override, 0),
      _static_int("skip_preconditioning_dim_size_gt", skip_preconditioning_dim_size_gt, 1),
      beta2, matrix_epsilon, graft_type, graft_beta1, graft_beta2, graft_epsilon, root_method,
      refresh_mesh)
  # Gradient-only: params, curvature= and other extra arguments of update are ignored.
  update_fn = lambda updates, state, params=None, **_: _update(config, updates, state)
  return guards.guarded(optax.GradientTransformationExtraArgs(
      functools.partial(_init, config), update_fn), "shampoo")


class _Config(NamedTuple):
  """:func:`scale_by_shampoo`'s validated settings."""

  block_size: int
  start: int
  period: int
  exponent_override: int
  skip_dim_gt: int
  beta2: float
  matrix_epsilon: float
  graft_type: str
  graft_beta1: float
  graft_beta2: float
  graft_epsilon: float
  root_method: str
  refresh_mesh: Optional[jax.sharding.Mesh]

  def plan(self, x) -> "_Plan":
    return _plan(x.shape, self.block_size, self.skip_dim_gt, self.exponent_override)

  def root(self, matrix, p):
    if self.root_method == "newton":
      return linalg.inverse_pth_root(matrix, p, ridge_epsilon=self.matrix_epsilon)
    return linalg.inverse_pth_root_eigh(matrix, p, ridge_epsilon=self.matrix_epsilon)


def _init(config: _Config, params) -> ShampooState:
  return ShampooState(
      count=jnp.zeros((), jnp.int32),
      stats=jax.tree.map(lambda p: _identities(config.plan(p), config.matrix_epsilon), params),
      preconditioner=jax.tree.map(lambda p: _identities(config.plan(p), 1.0), params),
      graft=jax.tree.map(lambda p: _graft_init(config.graft_type, p), params))


def _update(config: _Config, updates, state: ShampooState):
  """:func:`scale_by_shampoo`'s update: statistics and graft step per tensor, the roots'
  refresh, the grafted directions."""
  count = state.count
  originals, treedef = jax.tree.flatten(updates)
  grads = [g.astype(jnp.float32) for g in originals]
  plans = [config.plan(g) for g in grads]
  # The block statistics and roots are replicated: on an explicit mesh the preconditioned
  # tensors are gathered (a block-to-shard layout is not implemented), the graft stays sharded.
  full = [g if plan.merged is None else layers.sharded_as(g, (None,) * g.ndim)
          for g, plan in zip(grads, plans)]
  graft_fn = lambda g, s: _graft_update(config.graft_type, g, s, count, config.graft_beta1,
                                        config.graft_beta2, config.graft_epsilon)
  stats, graft_steps, graft, taken = map(list, zip(*[
      _statistics_step(config.beta2, graft_fn, g, f, plan, transform.as_sequence(s),
                       transform.as_sequence(a))
      for g, f, plan, s, a in zip(grads, full, plans, treedef.flatten_up_to(state.stats),
                                  treedef.flatten_up_to(state.graft))]))
  old_roots = [transform.as_sequence(r) for r in treedef.flatten_up_to(state.preconditioner)]
  start = config.start
  refresh = (count >= start) & ((count - start) % config.period == 0)
  roots = _refreshed(config, refresh, stats, old_roots, [plan.p for plan in plans])
  out = [_grafted_direction(*leaf, count >= start).astype(original.dtype)
         for *leaf, original in zip(grads, full, plans, roots, graft_steps, taken, originals)]
  return treedef.unflatten(out), ShampooState(
      count=count + 1, stats=treedef.unflatten(stats), preconditioner=treedef.unflatten(roots),
      graft=treedef.unflatten(graft))


def _identities(plan: _Plan, scale) -> tuple:
  """``scale · I`` for every statistic of a tensor (its ``[n, b, b]`` stacks)."""
  return tuple(jnp.broadcast_to(scale * jnp.eye(b, dtype=jnp.float32), (_n_blocks(part), b, b))
               for part in plan.parts for b in part.block)


def _accumulate(beta2, grad, plan: _Plan, stats: tuple) -> tuple:
  """S ← β₂S + w·(mode Gram of each block), w = 1 if β₂ = 1 else 1 − β₂."""
  if plan.merged is None:
    return stats
  g = grad.reshape(plan.merged)
  weight = jnp.where(beta2 == 1, 1.0, 1.0 - beta2)
  new, index = [], 0
  for part in plan.parts:
    blocks = _blocks(g, part)
    for mode in range(len(part.block)):
      new.append((beta2 * stats[index] + weight * _mode_gram(blocks, mode)).astype(jnp.float32))
      index += 1
  return tuple(new)


def _statistics_step(beta2, graft_fn, grad, full_grad, plan: _Plan, stats: tuple,
                     graft_state: tuple):
  """One tensor's ``(stats, graft step, graft state, taken)``; ``full_grad`` is ``grad``
  replicated (on an explicit mesh) for the block statistics. The new statistics and graft
  state are taken only when they and the gradient are finite: a NaN/Inf gradient, or a huge one
  whose squares overflow float32, would otherwise make them NaN/Inf for good (and, with Inf
  statistics, stop every later root refresh)."""
  new_stats = _accumulate(beta2, full_grad, plan, stats)
  graft_step, new_graft = graft_fn(grad, graft_state)
  taken = collectors.all_finite((grad, new_stats, new_graft))
  return (collectors.keep_unless(~taken, new_stats, stats), graft_step,
          collectors.keep_unless(~taken, new_graft, graft_state), taken)


def _refreshed(config: _Config, refresh, stats: list, roots: list, orders: list) -> list:
  """Per tensor, its roots: recomputed from ``stats`` (``lax.cond`` on ``refresh``) or kept.
  ``orders``: each tensor's root order p."""
  # Flat lists over every statistic of every tensor, and the root order of each.
  flat_stats = [s for leaf in stats for s in leaf]
  flat_orders = [p for p, leaf in zip(orders, stats) for _ in leaf]
  flat = jax.lax.cond(refresh, lambda s, r: _compute_roots(config, s, r, flat_orders),
                      lambda s, r: list(r), flat_stats, [r for leaf in roots for r in leaf])
  out, position = [], 0
  for leaf in stats:
    out.append(tuple(flat[position:position + len(leaf)]))
    position += len(leaf)
  return out


def _compute_roots(config: _Config, stats, roots, orders):
  """New roots of every statistic: one vmapped ``config.root(matrix, p)`` per (size, p) over
  all tensors (spread over ``config.refresh_mesh``'s devices when given), keeping the previous
  root where the new one fails (``linalg.select_root``)."""
  groups = {}
  for i, (s, p) in enumerate(zip(stats, orders)):
    groups.setdefault((s.shape[-1], p), []).append(i)
  new = list(roots)
  for (_, p), members in groups.items():
    result = distributed.vmap_over_devices(
        lambda m, p=p: config.root(m, p), jnp.concatenate([stats[i] for i in members]),
        mesh=config.refresh_mesh)
    chosen = linalg.select_root(result, jnp.concatenate([roots[i] for i in members]))
    stop = 0
    for i in members:
      start_row, stop = stop, stop + stats[i].shape[0]
      new[i] = chosen[start_row:stop]
  return new


def _precondition(grad, plan: _Plan, roots) -> jax.Array:
  """L^{-1/p} … G … R^{-1/p}: every block multiplied by its mode roots, reassembled."""
  g = grad.reshape(plan.merged)
  pieces, index = [], 0
  for part in plan.parts:
    blocks = _blocks(g, part)
    for mode in range(len(part.block)):
      blocks = _mode_product(blocks, roots[index], mode)
      index += 1
    pieces.append(_unblock(blocks, part))
  return _assemble(pieces, plan.grid).reshape(grad.shape)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    *,
    block_size: int = 128,
    beta2: float = 1.0,
    matrix_epsilon: float = 1e-6,
    start_preconditioning_step: int = 1,
    preconditioning_compute_steps: int = 1,
    exponent_override: int = 0,
    skip_preconditioning_dim_size_gt: int = 4096,
    graft_type: str = "adagrad",
    graft_beta1: float = 0.9,
    graft_beta2: float = 0.999,
    graft_epsilon: float = 1e-8,
    root_method: str = "newton",
    refresh_mesh: Optional[jax.sharding.Mesh] = None,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
  """The complete Shampoo optimizer: :func:`scale_by_shampoo` →
  ``optax.add_decayed_weights(weight_decay)`` → ``optax.trace(momentum, nesterov)`` →
  ``−learning_rate``.

  Args:
    learning_rate: η, float or optax schedule.
    momentum: heavy-ball coefficient of ``optax.trace`` (default 0.9).
    nesterov: Nesterov momentum (default True, as the reference).
    weight_decay: L2 coefficient added to the grafted direction.
    block_size, beta2, matrix_epsilon, start_preconditioning_step,
    preconditioning_compute_steps, exponent_override, skip_preconditioning_dim_size_gt,
    graft_type, graft_beta1, graft_beta2, graft_epsilon, root_method, refresh_mesh: as in
      :func:`scale_by_shampoo`.

  Returns:
    ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params)`` (extra
    arguments such as ``curvature=`` are ignored). With ``optax.inject_hyperparams`` pass
    ``static_args=eva_optax.SHAMPOO_STATIC_ARGS`` (the structural ints cannot be traced).

  Raises:
    ValueError, TypeError: as :func:`scale_by_shampoo`; ``ValueError`` for a negative or
      non-finite ``learning_rate``.
  """
  return transform.with_momentum(
      scale_by_shampoo(
          block_size, beta2=beta2, matrix_epsilon=matrix_epsilon,
          start_preconditioning_step=start_preconditioning_step,
          preconditioning_compute_steps=preconditioning_compute_steps,
          exponent_override=exponent_override,
          skip_preconditioning_dim_size_gt=skip_preconditioning_dim_size_gt,
          graft_type=graft_type, graft_beta1=graft_beta1, graft_beta2=graft_beta2,
          graft_epsilon=graft_epsilon, root_method=root_method,
          refresh_mesh=refresh_mesh),
      learning_rate, momentum, nesterov, weight_decay)
