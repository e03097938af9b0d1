"""Data-parallel Eva on `mnist_mlp`: one device, `pmap`, and `jit` with a sharded batch.

    python -m benchmarks.data_parallel --fake-devices 4 --data-dir ../shared/data

Trains the same model from the same start on the same global batches in three ways, checks
that they end at the same parameters (DESIGN §6), and prints the median step time of each.
``--fake-devices N`` splits the CPU into N XLA devices (a sanity check of the code path, not a
speed-up: the fake devices share the same cores). On a GPU/TPU host leave it out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m benchmarks.data_parallel",
                              description=__doc__.split("\n")[0])
  p.add_argument("--fake-devices", type=int, help="split the CPU into this many XLA devices")
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--batch-size", type=int, default=256, help="global batch")
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--data-dir", help="MNIST directory (default: $EVA_OPTAX_DATA, else the cache)")
  return p


def main(argv=None) -> dict:
  """Runs the three modes; returns ``{mode: {"median_step_s", "final_loss", "max_param_diff"}}``."""
  args = _parser().parse_args(argv)
  if args.fake_devices:  # must happen before JAX initialises its backends
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.fake_devices}")
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  import eva_optax
  from benchmarks import models, train

  task = models.get_task("mnist_mlp")
  data = task.prepare(task.load(args.data_dir))
  devices = jax.device_count()
  if args.batch_size % devices:
    raise ValueError(f"--batch-size {args.batch_size} must divide over {devices} devices.")
  order = np.random.default_rng(0).permutation(len(data.x_train))
  batches = [order[k * args.batch_size % len(order):][:args.batch_size] for k in range(args.steps)]
  params = task.model.init(jax.random.key(0), data.x_train[:1])["params"]
  tx = eva_optax.eva(optax.cosine_decay_schedule(args.lr, args.steps))
  loss_fn = train.loss_fn(task)

  def make_step(axis_name=None):
    capture = eva_optax.flax.value_and_grad(loss_fn, statistics="kronecker_vectors",
                                            axis_name=axis_name)

    def step(params, state, x, y):
      (loss, grads), curvature = capture(params, x, y)
      if axis_name:
        grads, loss = jax.lax.pmean((grads, loss), axis_name)
      updates, state = tx.update(grads, state, params, curvature=curvature)
      return optax.apply_updates(params, updates), state, loss

    return step

  mesh = jax.make_mesh((devices,), ("data",))
  sharded = lambda v: jax.device_put(v, NamedSharding(mesh, P("data")))
  replicated = lambda tree: jax.device_put(tree, NamedSharding(mesh, P()))
  stack = lambda tree: jax.tree.map(lambda v: jnp.stack([v] * devices), tree)
  split = lambda v: v.reshape(devices, -1, *v.shape[1:])
  modes = {
      "one device": (jax.jit(make_step()), lambda t: t, lambda v: v, lambda t: t),
      f"pmap x{devices}": (jax.pmap(make_step("data"), axis_name="data"), stack, split,
                           lambda t: jax.tree.map(lambda v: v[0], t)),
      f"jit + sharding x{devices}": (jax.jit(make_step()), replicated, sharded, lambda t: t),
  }
  results, finals = {}, {}
  for mode, (step, put_state, put_batch, first) in modes.items():
    p, s = put_state(params), put_state(tx.init(params))
    times = []
    for index in batches:
      x, y = put_batch(data.x_train[index]), put_batch(data.y_train[index])
      start = time.perf_counter()
      p, s, loss = step(p, s, x, y)
      jax.block_until_ready((p, s, loss))
      times.append(time.perf_counter() - start)
    finals[mode] = first(p)
    results[mode] = {"median_step_s": float(np.median(times[1:])),
                     "final_loss": float(np.mean(loss))}
  reference = finals["one device"]
  for mode in modes:
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), finals[mode], reference)
    results[mode]["max_param_diff"] = max(jax.tree.leaves(diffs))
  print(f"mnist_mlp, Eva, {args.steps} steps of global batch {args.batch_size}, "
        f"{devices} {jax.devices()[0].platform} device(s)")
  print(f"{'mode':<24} {'step ms':>8} {'final loss':>11} {'max |Δparam| vs one device':>27}")
  for mode, r in results.items():
    print(f"{mode:<24} {1e3 * r['median_step_s']:8.2f} {r['final_loss']:11.4f} "
          f"{r['max_param_diff']:27.2e}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
