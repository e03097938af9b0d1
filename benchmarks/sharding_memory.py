"""Bytes per device of params + optimizer state with sharded against replicated params.

    python -m benchmarks.sharding_memory --task shakespeare_char --data-dir ../shared/data \\
        --fake-devices 8 --mesh 2,4

The task's model (stock Flax modules) and every optimizer of ``--optimizers`` as the benchmark
builds them (registry defaults, the capture's layouts); params laid out on a ``data × model``
mesh by a simple FSDP + tensor-parallel rule (a kernel's last axis on ``model`` and its
first axis on ``data`` where they divide; everything else replicated), the state by
:func:`eva_optax.distributed.state_shardings`. The counts are exact shard sizes from the
shardings (``jax.eval_shape``: nothing is allocated), so ``--fake-devices`` only provides the
mesh.
"""

from __future__ import annotations

import argparse
import math
import os


def _rule(shape: tuple, mesh_shape: dict):
  """The FSDP + tensor-parallel spec of one param: ("data" on axis 0, "model" on the last
  axis) for kernels (rank ≥ 2) where the sizes divide, else replicated."""
  from jax.sharding import PartitionSpec as P
  if len(shape) < 2:
    return P()
  entries = [None] * len(shape)
  if shape[-1] % mesh_shape["model"] == 0:
    entries[-1] = "model"
  if shape[0] % mesh_shape["data"] == 0 and len(shape) > 1:
    entries[0] = "data"
  return P(*entries)


def per_device_bytes(tree) -> int:
  """Bytes on one device of a pytree of ``jax.ShapeDtypeStruct``s with shardings."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in __import__("jax").tree.leaves(tree))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m benchmarks.sharding_memory",
                              description=__doc__.split("\n")[0])
  p.add_argument("--task", default="shakespeare_char")
  p.add_argument("--data-dir")
  p.add_argument("--optimizers", default="sgd_nesterov,adamw,muon,eva,eva_f,kfac,foof,shampoo,"
                                         "eva_s,kbfgs")
  p.add_argument("--mesh", default="2,4", help="data,model sizes")
  p.add_argument("--fake-devices", type=int)
  args = p.parse_args(argv)
  if args.fake_devices:  # read when JAX starts its backends
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.fake_devices}")
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from benchmarks import models, optimizers, run, train
  from eva_optax import distributed

  task = models.get_task(args.task)
  data = task.prepare(task.load(args.data_dir))
  params, model_state = task.init(jax.random.PRNGKey(0), data.x_train[:1])
  sampler = train.Sampler(data, [np.arange(len(data.x_train))], task.batch_size, 0,
                          task.augment)
  configs = [optimizers.parse_entry(e) for e in args.optimizers.split(",")]
  layouts = run._layouts(task, configs, params, model_state, sampler, False)
  sizes = dict(zip(("data", "model"), map(int, args.mesh.split(","))))
  mesh = jax.make_mesh(tuple(sizes.values()), tuple(sizes), devices=jax.devices()[
      :math.prod(sizes.values())], axis_types=(jax.sharding.AxisType.Auto,) * 2)
  layouts_by_name = {"sharded": lambda x: _rule(x.shape, sizes), "replicated": lambda x: P()}
  results = {}
  print(f"{task.name} on a {sizes['data']} × {sizes['model']} mesh: MB per device "
        "(params + optimizer state)")
  print(f"{'optimizer':14s} {'replicated':>11s} {'sharded':>9s} {'ratio':>6s}")
  for config in configs:
    tx = optimizers.make(config, task.name, 0.1, layouts, params, task.head)
    row = {}
    for layout, rule in layouts_by_name.items():
      placed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=NamedSharding(mesh, rule(x))), params)
      state = jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           distributed.state_shardings(tx, placed),
                           jax.eval_shape(tx.init, params))
      row[layout] = per_device_bytes(placed) + per_device_bytes(state)
    results[config.label] = row
    print(f"{config.label:14s} {row['replicated'] / 1e6:11.3f} {row['sharded'] / 1e6:9.3f} "
          f"{row['sharded'] / row['replicated']:6.2f}", flush=True)
  return results


if __name__ == "__main__":
  main()
