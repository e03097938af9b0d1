"""Cost of one preconditioner refresh against the layer width: K-FAC's damped inverses and
Shampoo's inverse 4th roots of a stack of ``layers`` symmetric positive definite ``n × n``
matrices (one per layer, as the optimizers stack equal-sized factors).

    python -m benchmarks.refresh_cost --widths 128,256,512,1024,2048 --layers 4

Each entry is the median of ``--repeats`` timed calls of the jitted, vmapped computation
(compilation excluded, ``block_until_ready``), in milliseconds per refresh of the whole stack.
The matrices are Gram matrices of Gaussian rows with a decaying column scale (condition number
about 1e4), the regime of real Kronecker factors; damping 1e-3 × their mean eigenvalue.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp

from eva_optax import linalg
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


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m benchmarks.refresh_cost", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--widths", default="128,256,512,1024,2048")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--out", help="write the table as JSON here")
  args = p.parse_args(argv)
  methods = args.methods.split(",")
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
