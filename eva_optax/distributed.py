"""Spreading the preconditioners' refresh over devices (DESIGN §6).

Under data parallelism every device holds the same averaged statistics, so by default each one
computes every inverse (K-FAC, FOOF) and inverse root (Shampoo) of a refresh: redundant work
whose cost does not fall as devices are added. :func:`vmap_over_devices` instead stacks equal-
sized matrices, gives each device of a mesh a contiguous slice of the stack (``jax.shard_map``)
and gathers the results, so a refresh costs each device about ``1/devices`` of the work plus one
all-gather of the results. The results are identical to the local computation: every matrix is
processed by the same function, only on another device.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec


def check_mesh(refresh_mesh, who: str) -> None:
  """Raises ``TypeError`` unless ``refresh_mesh`` is ``None`` or a ``jax.sharding.Mesh``."""
  if refresh_mesh is not None and not isinstance(refresh_mesh, jax.sharding.Mesh):
    # A Mesh is callable, so optax.inject_hyperparams takes it for a schedule unless static.
    hint = (" Under optax.inject_hyperparams pass static_args=('refresh_mesh',) (a Mesh is "
            "callable and would be taken for a schedule)." if callable(refresh_mesh) else "")
    raise TypeError(f"eva_optax: {who}'s refresh_mesh must be a jax.sharding.Mesh (e.g. "
                    f"jax.make_mesh((8,), ('data',))) or None, got "
                    f"{type(refresh_mesh).__name__}.{hint}")


def vmap_over_devices(fn: Callable, *stacks, mesh: Optional[jax.sharding.Mesh]):
  """``jax.vmap(fn)(*stacks)``, with the stack's slices divided among ``mesh``'s devices.

  Args:
    fn: the per-slice computation (arrays in, a pytree of arrays out).
    *stacks: arrays with a common leading axis of length k.
    mesh: the devices to spread over (all of its axes); ``None`` computes locally.

  Returns:
    ``jax.vmap(fn)(*stacks)``, replicated over ``mesh``. The stack is padded to a multiple of
    the device count with copies of its first slice (a valid input; the copies' results are
    dropped), each device maps ``fn`` over its own contiguous slice inside ``jax.shard_map``,
    and the results are gathered. Works under ``jax.jit`` with automatic and with explicit
    (``AxisType.Explicit``) mesh axes; not inside ``pmap``/``shard_map`` (their axes are
    manual).
  """
  if mesh is None:
    return jax.vmap(fn)(*stacks)
  k = stacks[0].shape[0]
  padded = math.ceil(k / mesh.size) * mesh.size
  spread = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
  stacks = [_placed(jnp.concatenate([x, jnp.broadcast_to(x[:1], (padded - k, *x.shape[1:]))])
                    if padded > k else x, spread) for x in stacks]
  out = jax.shard_map(jax.vmap(fn), mesh=mesh, in_specs=spread.spec, out_specs=spread.spec,
                      check_vma=False)(*stacks)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda y: _placed(y, replicated)[:k], out)


def _placed(x: jax.Array, sharding: NamedSharding) -> jax.Array:
  """``x`` laid out as ``sharding``: ``reshard`` on explicit mesh axes (where the layout is
  part of the type), a sharding constraint on automatic ones."""
  explicit = all(t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types)
  if explicit:
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def state_shardings(tx, params):
  """``NamedSharding``s for ``tx.init(params)`` that lay the state out like the params.

  The layout is the one ``tx.init`` gives under explicit mesh axes (``AxisType.Explicit``),
  where every array's sharding is part of its type: state shaped like a param (momentum,
  Shampoo's graft accumulators) is sharded like it, Eva-s' per-mode vectors like the param's
  axes, and the per-layer statistics, Kronecker factors, inverses and roots are replicated
  (each device's shard of a direction is a product with the whole factor, as kfac-jax keeps
  its factors whole).

  Under automatic mesh axes ``jax.jit(tx.init)`` cannot infer this (zeros are not computed
  from the params), so pass it: ``jax.jit(tx.init, out_shardings=state_shardings(tx,
  params))``; the training step then keeps the layout. Under explicit axes ``tx.init``
  already returns it.

  Args:
    tx: any optax ``GradientTransformation``.
    params: the parameters as placed (arrays with ``NamedSharding``s, or
      ``jax.ShapeDtypeStruct``s with ``sharding``), all on one mesh.

  Returns:
    A pytree of ``NamedSharding`` on the params' mesh with the structure of
    ``tx.init(params)``.

  Raises:
    ValueError: no param has a ``NamedSharding``, or the params use several meshes.
  """
  leaves = jax.tree.leaves(params)
  meshes = {x.sharding.mesh for x in leaves
            if isinstance(getattr(x, "sharding", None), NamedSharding)}
  if len(meshes) != 1:
    raise ValueError("eva_optax: state_shardings needs params placed with NamedShardings on one "
                     f"mesh (found {len(meshes)} meshes); place them with jax.device_put(params, "
                     "NamedSharding(mesh, spec)) first.")
  mesh = meshes.pop()
  explicit = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                               axis_types=(jax.sharding.AxisType.Explicit,) * mesh.devices.ndim)
  typed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(explicit, x.sharding.spec)), params)
  with jax.set_mesh(explicit):
    state = jax.eval_shape(tx.init, typed)
  # Constants (a step count made by jnp.zeros) come back without a sharding: replicated.
  return jax.tree.map(lambda x: NamedSharding(
      mesh, PartitionSpec() if x.sharding is None else x.sharding.spec), state)
