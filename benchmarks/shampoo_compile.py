"""Compile time and state size of Shampoo's and Eva-s' update against the number of layers.

    python -m benchmarks.shampoo_compile --layers 1,2,4,8,16 --width 256

Each model is a stack of ``width × width`` Dense kernels plus biases (block 128: four 128×128
blocks per kernel). Shampoo stacks all equal blocks and runs one vmapped root per (block size,
root order), so its compile time should stay flat as layers are added; the table prints the
seconds to lower+compile ``jax.jit(tx.update)`` (fresh each time), the number of while loops
in the lowered program, and the state bytes.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import eva_optax


def _params(layers: int, width: int) -> dict:
  return {f"dense_{i}": {"kernel": jnp.zeros((width, width)), "bias": jnp.zeros((width,))}
          for i in range(layers)}


def measure(tx: optax.GradientTransformation, params) -> dict:
  """Lower+compile seconds, while loops and state bytes of ``tx.update`` for ``params``."""
  state = tx.init(params)
  start = time.perf_counter()
  lowered = jax.jit(tx.update).lower(params, state, params)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  del compiled
  return {"compile_s": seconds, "while_loops": lowered.as_text().count("stablehlo.while"),
          "state_bytes": sum(x.nbytes for x in jax.tree.leaves(state))}


def main(argv=None) -> list:
  p = argparse.ArgumentParser(prog="python -m benchmarks.shampoo_compile",
                              description=__doc__.split("\n")[0])
  p.add_argument("--layers", default="1,2,4,8,16")
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--block-size", type=int, default=128)
  args = p.parse_args(argv)
  makers = {
      "sgd": lambda: optax.sgd(0.1, momentum=0.9),
      "eva_s": lambda: eva_optax.eva_s(0.1),
      "shampoo": lambda: eva_optax.shampoo(0.1, block_size=args.block_size),
  }
  rows = []
  print(f"Dense {args.width}x{args.width} layers, block {args.block_size}, {jax.devices()[0]}")
  print("layers  optimizer  compile s  while loops  state bytes")
  for layers in [int(n) for n in args.layers.split(",")]:
    params = _params(layers, args.width)
    for name, make in makers.items():
      row = {"layers": layers, "optimizer": name, **measure(make(), params)}
      rows.append(row)
      print(f"{layers:6d}  {name:9s}  {row['compile_s']:9.2f}  {row['while_loops']:11d}  "
            f"{row['state_bytes']:11,d}")
  return rows


if __name__ == "__main__":
  main()
