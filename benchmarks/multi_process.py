"""Multi-process data parallelism: N JAX processes train exactly like one process.

    python -m benchmarks.multi_process --processes 2 --devices-per-process 2 --steps 3

The launcher starts ``--processes`` workers of this module on localhost, each with its own
``--devices-per-process`` fake CPU devices. Every worker calls ``jax.distributed.initialize``
(the launcher's free localhost port as coordinator), builds one ``"data"`` mesh over the devices
of all processes, and trains a small CNN of stock Flax Linen layers (Conv, Dense, Dense) with
Eva and with K-FAC (inverses refreshed every 2 steps) under ``jax.jit``: the synthetic global
batches are built identically everywhere, each process hands over only its own rows
(``jax.make_array_from_process_local_data``), and parameters and optimizer state are replicated.
The launcher then trains the same model on the whole global batches in a single process on one
device and prints, per optimizer, the largest parameter difference between the two.

This is the code path of a multi-host TPU/GPU job: there each host runs the worker on its real
devices, and only ``initialize``'s arguments change (the cluster's coordinator, or none where JAX
detects the cluster itself).

CPU caveats: the fake devices (``--xla_force_host_platform_device_count``) and the processes
share the machine's cores, so this checks the code path, not a speed-up. Cross-process
collectives on CPU go over TCP with gloo, JAX's default ``jax_cpu_collectives_implementation``.
When the workers cannot start the distributed runtime (no TCP on localhost, say), the launcher
exits with status :data:`UNAVAILABLE`; any other failure is an ordinary error.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import eva_optax

UNAVAILABLE = 3  # the launcher's exit status when the platform cannot start the runtime
STARTING, STARTED = "starting the distributed runtime", "distributed runtime started"
CLASSES = 4
OPTIMIZERS = {  # name: (factory(learning_rate), captured statistics)
    "eva": (eva_optax.eva, "kronecker_vectors"),
    "kfac": (lambda lr: eva_optax.kfac(lr, inverse_update_period=2), "kronecker_factors"),
}


class DistributedUnavailable(RuntimeError):
  """A worker could not start ``jax.distributed`` (no localhost TCP, no CPU collectives)."""


class _Net(nn.Module):
  """Stock Linen layers: Conv (8 filters, 3x3, stride 2), Dense 16, Dense :data:`CLASSES`
  (logits); input ``[batch, 8, 8, 3]``."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
    x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(CLASSES)(x)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m benchmarks.multi_process",
                              description=__doc__.split("\n")[0])
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--devices-per-process", type=int, default=2)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--batch-size", type=int, default=64, help="global batch")
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--timeout", type=float, default=240.0, help="seconds for all workers")
  p.add_argument("--workdir", help="where workers write process_<i>.npz/.log and the launcher "
                 "single.npz (default: a temporary directory, removed afterwards)")
  p.add_argument("--out", help="write the results as JSON here")
  p.add_argument("--process-id", type=int, help=argparse.SUPPRESS)  # set by the launcher
  p.add_argument("--coordinator", help=argparse.SUPPRESS)
  return p


def _batches(steps: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic synthetic data: images ``[steps, batch, 8, 8, 3]`` float32 and labels
  ``[steps, batch]`` int32 from a fixed linear teacher, identical in every process."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(steps, batch_size, 8, 8, 3)).astype(np.float32)
  teacher = rng.normal(size=(8 * 8 * 3, CLASSES)).astype(np.float32)
  return x, np.argmax(x.reshape(steps, batch_size, -1) @ teacher, -1).astype(np.int32)


def _loss(params, x, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      _Net().apply({"params": params}, x), labels).mean()


def _step_fn(tx, statistics):
  capture = eva_optax.flax.value_and_grad(_loss, statistics=statistics)

  def step(params, state, x, labels):
    # No axis_name: under jit the batch is one global array and the capture's means are global.
    (loss, grads), curvature = capture(params, x, labels)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state, loss

  return jax.jit(step)


def _train(args, put_tree, put_batch, init_state) -> dict:
  """Trains every optimizer of :data:`OPTIMIZERS` from the same start; returns flat numpy
  ``{"<optimizer>/<param path>": local copy of the final value, "loss/<optimizer>": last loss,
  "init/<param path>": start}``."""
  x, labels = _batches(args.steps, args.batch_size)
  init = jax.tree.map(np.asarray, _Net().init(jax.random.key(0), x[0, :1])["params"])
  flat = _flatten("init", init)
  for name, (factory, statistics) in OPTIMIZERS.items():
    tx = factory(args.lr)
    step = _step_fn(tx, statistics)
    params = put_tree(init)
    state = init_state(tx, params)
    for k in range(args.steps):
      params, state, loss = step(params, state, put_batch(x[k]), put_batch(labels[k]))
    flat.update(_flatten(name, params))
    flat[f"loss/{name}"] = np.asarray(loss.addressable_data(0))
  return flat


def _flatten(prefix: str, tree) -> dict:
  """``{"<prefix>/<path>": numpy copy of this process's first shard}``."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {prefix + "/" + jax.tree_util.keystr(path, simple=True, separator="/"):
          np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
          for path, leaf in leaves}


def _worker(args) -> dict:
  """One process of the distributed run: writes ``process_<id>.npz`` (see :func:`_train`)."""
  # The launcher tells "cannot start the runtime" from other failures by these two lines (a
  # failing coordination service aborts the process, so there is no exception to catch).
  print(STARTING, flush=True)
  jax.distributed.initialize(args.coordinator, args.processes, args.process_id,
                             initialization_timeout=60)
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))  # starts the backend
  print(STARTED, flush=True)
  expected = args.processes * args.devices_per_process
  if len(devices) != expected:
    raise RuntimeError(f"{len(devices)} global devices, expected {expected}")
  # Devices ordered by process, so process i's rows are the i-th contiguous block of the batch.
  mesh = Mesh(np.array(devices), ("data",))
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  rows = args.batch_size // args.processes
  local = slice(args.process_id * rows, (args.process_id + 1) * rows)
  flat = _train(
      args, lambda tree: jax.device_put(tree, replicated),
      lambda v: jax.make_array_from_process_local_data(sharded, v[local], v.shape),
      lambda tx, params: jax.jit(tx.init, out_shardings=replicated)(params))
  np.savez(pathlib.Path(args.workdir) / f"process_{args.process_id}.npz", **flat)
  jax.distributed.shutdown()
  return {key: float(value) for key, value in flat.items() if key.startswith("loss/")}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker_env(devices: int) -> dict:
  """This environment with JAX on CPU split into ``devices`` devices (any inherited device
  count, e.g. the test suite's, replaced)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 os.environ.get("XLA_FLAGS", ""))
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())


def _launch(args, workdir: pathlib.Path) -> None:
  """Runs the workers to completion.

  Raises:
    DistributedUnavailable: a worker could not start the distributed runtime.
    RuntimeError: a worker failed otherwise (its log's tail attached), or ran past --timeout.
  """
  common = ["--processes", str(args.processes), "--devices-per-process",
            str(args.devices_per_process), "--steps", str(args.steps), "--batch-size",
            str(args.batch_size), "--lr", str(args.lr), "--workdir", str(workdir),
            "--coordinator", f"127.0.0.1:{_free_port()}"]
  workers = []
  for i in range(args.processes):
    with open(workdir / f"process_{i}.log", "w") as log:
      workers.append(subprocess.Popen(
          [sys.executable, "-m", "benchmarks.multi_process", *common, "--process-id", str(i)],
          cwd=pathlib.Path(__file__).resolve().parents[1], env=_worker_env(
              args.devices_per_process), stdout=log, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + args.timeout
  try:
    while (any(w.poll() is None for w in workers) and not any(w.returncode for w in workers)
           and time.monotonic() < deadline):
      time.sleep(0.2)
  finally:  # a failed worker leaves the others waiting in a collective
    killed = [w for w in workers if w.poll() is None]
    for w in killed:
      w.kill()
      w.wait()
  failed = [i for i, w in enumerate(workers) if w.returncode and w not in killed]
  if failed or killed:
    logs = [(workdir / f"process_{i}.log").read_text() for i in range(args.processes)]
    # Unavailable: some worker got as far as initialize but none got past it.
    unavailable = any(STARTING in log for log in logs) and not any(STARTED in log
                                                                   for log in logs)
    i = failed[0] if failed else 0
    why = (f"worker {i} exited with {workers[i].returncode}" if failed else
           f"the workers ran past --timeout {args.timeout} s")
    raise (DistributedUnavailable if unavailable else RuntimeError)(
        f"{why}; the log of worker {i} ends:\n{logs[i][-3000:]}")


def _compare(args, workdir: pathlib.Path) -> dict:
  """Per optimizer: the largest |param difference| of process 0 to the single-process run and
  between processes, the largest |change| from the start, and both final losses."""
  runs = [dict(np.load(workdir / f"process_{i}.npz")) for i in range(args.processes)]
  single = dict(np.load(workdir / "single.npz"))
  largest = lambda pairs: max(float(np.max(np.abs(a - b))) for a, b in pairs)
  results = {}
  for name in OPTIMIZERS:
    keys = [k for k in single if k.startswith(name + "/")]
    results[name] = {
        "max_param_diff": largest((runs[0][k], single[k]) for k in keys),
        "max_diff_between_processes": largest((r[k], runs[0][k]) for r in runs for k in keys),
        "max_param_change": largest((single[k], single["init" + k[len(name):]]) for k in keys),
        "final_loss": float(runs[0][f"loss/{name}"]),
        "final_loss_single": float(single[f"loss/{name}"]),
    }
  return results


def _single_process(args, workdir: pathlib.Path) -> None:
  """The reference: the same training on the whole global batches, one CPU device."""
  device = jax.devices("cpu")[0]
  put = lambda tree: jax.device_put(tree, device)
  flat = _train(args, put, put, lambda tx, params: put(tx.init(params)))
  np.savez(workdir / "single.npz", **flat)


def main(argv=None) -> dict:
  """Launches the run (or, with ``--process-id``, is one worker); returns ``{optimizer:
  {"max_param_diff", "max_diff_between_processes", "max_param_change", "final_loss",
  "final_loss_single"}}`` (a worker: its final losses).

  Raises:
    ValueError: the global batch does not divide over all devices.
    DistributedUnavailable, RuntimeError: as :func:`_launch`.
  """
  args = _parser().parse_args(argv)
  if args.batch_size % (args.processes * args.devices_per_process):
    raise ValueError(f"--batch-size {args.batch_size} must divide over "
                     f"{args.processes} x {args.devices_per_process} devices.")
  if args.process_id is not None:
    return _worker(args)
  with tempfile.TemporaryDirectory() as scratch:
    workdir = pathlib.Path(args.workdir or scratch)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _launch(args, workdir)
    seconds = time.perf_counter() - start
    _single_process(args, workdir)
    results = _compare(args, workdir)
  print(f"{args.processes} processes x {args.devices_per_process} CPU devices against 1 "
        f"process on 1 device: {args.steps} steps of global batch {args.batch_size} "
        f"(distributed run {seconds:.1f} s with start-up)")
  print(f"{'optimizer':<10} {'max |Δparam|':>13} {'between procs':>14} {'max |change|':>13} "
        f"{'final loss':>11}")
  for name, r in results.items():
    print(f"{name:<10} {r['max_param_diff']:13.2e} {r['max_diff_between_processes']:14.2e} "
          f"{r['max_param_change']:13.2e} {r['final_loss']:11.4f}")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(
        {"processes": args.processes, "devices_per_process": args.devices_per_process,
         "steps": args.steps, "batch_size": args.batch_size, "results": results}, indent=2))
  return results


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except DistributedUnavailable as error:
    print(error, file=sys.stderr)
    sys.exit(UNAVAILABLE)
