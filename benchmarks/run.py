"""Benchmark CLI: trains one task with several optimizers and compares them.

    python -m benchmarks.run --task digits_mlp --optimizers sgd,adam,eva --seeds 0,1,2
    python -m benchmarks.run --task mnist_autoencoder --data-dir ../shared/data \\
        --optimizers "sgd,adam,eva,eva:damping_mode=absolute:damping=491.5"

Each ``--optimizers`` entry is ``NAME`` or ``NAME:key=value:...`` (``lr`` or keyword arguments of
the optimizer) and is the run's label. At every seed all optimizers start from the same
parameters and see the same batches. Writes ``<out>/<task>.json`` and ``<out>/<task>.png``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import platform
import sys

import flax
import jax
import numpy as np
import optax

import eva_optax
from benchmarks import models, optimizers, report, train


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
  p.add_argument("--task", default="digits_mlp", choices=sorted(models.TASKS))
  p.add_argument("--optimizers", default="sgd,adam,eva",
                 help="comma list of NAME or NAME:key=value:... (keys: lr, optimizer kwargs)")
  p.add_argument("--epochs", type=int, help="default: the task's")
  p.add_argument("--steps", type=int, help="number of steps; overrides --epochs")
  p.add_argument("--batch-size", type=int, help="default: the task's")
  p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
  p.add_argument("--seeds", default="0", help="comma list; a seed sets the init and data order")
  p.add_argument("--data-dir", help="MNIST directory (default: $EVA_OPTAX_DATA, else the cache)")
  p.add_argument("--out", default="benchmarks/out")
  p.add_argument("--train-subset", type=int, help="use only the first N training examples")
  p.add_argument("--eval-subset", type=int, default=10000,
                 help="training examples whose loss is reported per epoch")
  p.add_argument("--timing-rounds", type=int, default=30,
                 help="after training, rounds of interleaved step timing (one step of each "
                      "optimizer per round) that give the median step times; 0: use the "
                      "training steps' times")
  p.add_argument("--no-plot", action="store_true")
  return p


def _environment() -> dict:
  device = jax.devices()[0]
  return {"jax": jax.__version__, "optax": optax.__version__, "flax": flax.__version__,
          "eva_optax": eva_optax.__version__, "python": platform.python_version(),
          "platform": device.platform, "device_kind": device.device_kind}


def main(argv=None) -> dict:
  """Runs the benchmark for ``argv`` (default ``sys.argv[1:]``); returns the results dict that
  is also written as JSON: ``task``, ``settings``, ``environment`` and per label ``runs``."""
  args = _parser().parse_args(argv)
  task = models.get_task(args.task)
  configs = [optimizers.parse_entry(e) for e in args.optimizers.split(",") if e.strip()]
  labels = [c.label for c in configs]
  if len(set(labels)) != len(labels):
    raise ValueError(f"--optimizers repeats a label: {labels}")
  seeds = [int(s) for s in args.seeds.split(",")]

  data = task.prepare(task.load(args.data_dir))
  if args.train_subset:
    data = data._replace(x_train=data.x_train[:args.train_subset],
                         y_train=data.y_train[:args.train_subset])
  batch_size = args.batch_size or task.batch_size
  per_epoch = len(data.x_train) // batch_size
  if per_epoch == 0:
    raise ValueError(f"{len(data.x_train)} training examples make no batch of {batch_size}.")
  total_steps = args.steps or (args.epochs or task.epochs) * per_epoch
  eval_set = (data.x_train[:args.eval_subset], data.y_train[:args.eval_subset])

  runs = {c.label: {"optimizer": c.name, "lr": optimizers.learning_rate(c, task.name),
                    "kwargs": optimizers.make_kwargs(c, task.name), "seeds": []} for c in configs}
  for seed in seeds:
    params = task.model.init(jax.random.PRNGKey(seed), data.x_train[:1])["params"]
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(len(data.x_train)) for _ in range(math.ceil(total_steps / per_epoch))]
    # The initial parameters are shared, so their evaluation is too.
    first_eval = {"train_loss": task.eval_loss(params, *eval_set),
                  "metric": task.metric(params, data.x_test, data.y_test)}
    finals, layouts = {}, None
    if any(optimizers.OPTIMIZERS[c.name].statistics is not None for c in configs):
      batch = orders[0][:batch_size]
      info, coverage = train.capture_info(train.loss_fn(task), params, data.x_train[batch],
                                          data.y_train[batch])
      layouts = info.layouts
      if seed == seeds[0]:
        print(f"{task.name}: what the capture-based optimizers precondition\n{coverage}\n")
    for config in configs:
      spec, run = optimizers.OPTIMIZERS[config.name], runs[config.label]
      lr = run["lr"]
      schedule = optax.cosine_decay_schedule(lr, total_steps) if args.schedule == "cosine" else lr
      tx = optimizers.make(config, task.name, schedule, layouts)
      result, final_params, state, step = train.train(
          task, data, tx, spec.statistics, params, orders, batch_size, total_steps, eval_set,
          first_eval, desc=f"{config.label} seed {seed}")
      finals[config.label] = (step, final_params, state)
      if spec.diagnostics is not None:
        batch = orders[0][:batch_size]
        result["diagnostics"] = train.diagnostics(
            task, final_params, state, data.x_train[batch], data.y_train[batch],
            spec.diagnostics, {**run["kwargs"], "layouts": layouts})
      run["seeds"].append({"seed": seed, **result})
    if args.timing_rounds and seed == seeds[0]:
      batch = orders[0][:batch_size]
      timed = train.time_interleaved(finals, data.x_train[batch], data.y_train[batch],
                                     args.timing_rounds)
      for label, times in timed.items():
        runs[label]["interleaved_step_times"] = times

  report.summarize(runs)
  settings = {**vars(args), "batch_size": batch_size, "total_steps": total_steps,
              "steps_per_epoch": per_epoch, "seeds": seeds, "train_size": len(data.x_train),
              "eval_size": len(eval_set[0]), "metric_name": task.metric_name}
  results = {"task": task.name, "settings": settings, "environment": _environment(),
             "runs": runs}
  out = pathlib.Path(args.out)
  print(f"\n{task.name}: {total_steps} steps of batch {batch_size}, seeds {seeds}, "
        f"{args.schedule} schedule, {results['environment']['platform']}")
  print(report.table(runs, task.metric_name))
  diagnostics = report.diagnostics_text(runs)
  if diagnostics:
    print("\n" + diagnostics)
  report.write_json(results, out / f"{task.name}.json")
  if not args.no_plot:
    report.plot(runs, out / f"{task.name}.png", f"{task.name} ({batch_size} per batch)",
                task.log_loss)
  print(f"\nwrote {out / (task.name + '.json')}" + ("" if args.no_plot else " and .png"))
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
