"""Cost of one preconditioner refresh against the layer width: K-FAC's damped inverses and
Shampoo's inverse 4th roots of a stack of ``layers`` symmetric positive definite ``n × n``
matrices (one per layer, as the optimizers stack equal-sized factors).

    python -m benchmarks.refresh_cost --widths 128,256,512,1024,2048 --layers 4
    python -m benchmarks.refresh_cost --devices 1,2,4,8 --fake-devices 8 --layers 8

Each entry is the median of ``--repeats`` timed calls of the jitted, vmapped computation
(compilation excluded, ``block_until_ready``), in milliseconds per refresh of the whole stack.
The matrices are Gram matrices of Gaussian rows with a decaying column scale (condition number
about 1e4), the regime of real Kronecker factors; damping 1e-3 × their mean eigenvalue.

``--devices``: for each device count n, the refresh on a mesh of the first n devices computed
redundantly (the stack replicated: every device computes every matrix, the default) and spread
(``refresh_mesh``: :func:`eva_optax.distributed.vmap_over_devices`). ``--fake-devices N``
splits the CPU into N XLA devices first: they share the same cores, so CPU figures check the
code path (spread work is divided, redundant work multiplied), not a speed-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from eva_optax import distributed, linalg
from eva_optax.kfac import damped_inverse

METHODS = {
    "kfac_cholesky": lambda m, d: jax.vmap(functools.partial(damped_inverse, method="cholesky"))(
        m, d),
    "kfac_eigh": lambda m, d: jax.vmap(functools.partial(damped_inverse, method="eigh"))(m, d),
    "shampoo_newton": lambda m, d: linalg.batched_inverse_pth_root(m, 4, method="newton").root,
    "shampoo_eigh": lambda m, d: linalg.batched_inverse_pth_root(m, 4, method="eigh").root,
}


def factors(layers: int, width: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """``[layers, width, width]`` Gram matrices of 2·width Gaussian rows whose columns are scaled
  by 10^(−2 k / width) (condition number ~1e4), and each one's damping (1e-3 × mean
  eigenvalue)."""
  rows = jax.random.normal(jax.random.key(seed), (layers, 2 * width, width))
  rows = rows * jnp.logspace(0.0, -2.0, width)
  gram = jnp.einsum("lri,lrj->lij", rows, rows) / (2 * width)
  return gram, 1e-3 * jnp.trace(gram, axis1=1, axis2=2) / width


def time_ms(fn, *args, repeats: int) -> float:
  """Median wall milliseconds of ``fn(*args)`` after one compiling call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(1e3 * (time.perf_counter() - start))
  return statistics.median(times)


def by_devices(method: str, width: int, layers: int, counts: list, repeats: int) -> list:
  """Per device count n: ms of the refresh computed redundantly and spread over n devices."""
  gram, damping = factors(layers, width)
  rows = []
  for n in counts:
    mesh = jax.make_mesh((n,), ("d",), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = jax.device_put((gram, damping), replicated)
    one = lambda m, d: METHODS[method](m[None], d[None])[0]
    spread = jax.jit(lambda m, d: distributed.vmap_over_devices(one, m, d, mesh=mesh))
    rows.append({"devices": n, "redundant": time_ms(jax.jit(METHODS[method]), *args,
                                                     repeats=repeats),
                 "spread": time_ms(spread, *args, repeats=repeats)})
    print(f"{n:7d} {rows[-1]['redundant']:12.2f} {rows[-1]['spread']:12.2f}", flush=True)
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m benchmarks.refresh_cost", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--widths", default="128,256,512,1024,2048")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--out", help="write the table as JSON here")
  p.add_argument("--devices", help="comma list of device counts: redundant vs spread refresh")
  p.add_argument("--fake-devices", type=int, help="split the CPU into this many XLA devices")
  args = p.parse_args(argv)
  if args.fake_devices:  # read when JAX starts its backends, i.e. before jax.devices()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.fake_devices}")
  methods = args.methods.split(",")
  if args.devices:
    counts = [int(n) for n in args.devices.split(",")]
    table = {}
    for method in methods:
      for width in map(int, args.widths.split(",")):
        print(f"{method}, width {width}, {args.layers} matrices: ms per refresh (median)\n"
              "devices    redundant       spread")
        table[f"{method}/{width}"] = by_devices(method, width, args.layers, counts,
                                                args.repeats)
    if args.out:
      with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "layers": args.layers,
                   "by_devices": table}, f, indent=1)
    return
  print(f"device: {jax.devices()[0].device_kind}; {args.layers} matrices per refresh; "
        "ms per refresh (median)")
  print("width " + " ".join(f"{m:>15}" for m in methods))
  rows = []
  for width in map(int, args.widths.split(",")):
    gram, damping = factors(args.layers, width)
    row = {"width": width, **{m: time_ms(jax.jit(METHODS[m]), gram, damping,
                                         repeats=args.repeats) for m in methods}}
    rows.append(row)
    print(f"{width:5d} " + " ".join(f"{row[m]:15.2f}" for m in methods), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "layers": args.layers, "rows": rows},
                f, indent=1)


if __name__ == "__main__":
  main()
