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
  p.add_argument("--schedule", choices=("cosine", "constant", "warmup_cosine"),
                 help="default: the task's (warmup_cosine: linear warmup, cosine to lr/10)")
  p.add_argument("--warmup", type=int, help="warmup steps of warmup_cosine (default: the task's)")
  p.add_argument("--seeds", default="0", help="comma list; a seed sets the init and data order")
  p.add_argument("--data-dir", help="data directory (default: $EVA_OPTAX_DATA, else the cache "
                                    "for MNIST, ../shared/data for CIFAR-10 and Shakespeare)")
  p.add_argument("--out", default="benchmarks/out")
  p.add_argument("--train-subset", type=int, help="use only the first N training examples")
  p.add_argument("--test-subset", type=int, help="evaluate the metric on the first N test "
                                                 "examples only (quick checks)")
  p.add_argument("--eval-subset", type=int,
                 help="training examples (evenly spaced) whose loss is reported at each eval "
                      "(default: the task's)")
  p.add_argument("--eval-every", type=int, help="steps between evaluations (default: the "
                                                 "task's, else once per epoch)")
  p.add_argument("--targets", help="comma list of metric values for the time-to-target table "
                                   "(default: the task's)")
  p.add_argument("--timing-rounds", type=int, default=30,
                 help="after training, rounds of interleaved step timing (one step of each "
                      "optimizer per round) that give the median step times; 0: use the "
                      "training steps' times")
  p.add_argument("--stall-timeout", type=float, default=0,
                 help="exit with status 3 when no training step finishes for this many "
                      "seconds (0: wait forever); for protocol scripts that retry a run")
  p.add_argument("--no-plot", action="store_true")
  return p


def _environment() -> dict:
  device = jax.devices()[0]
  return {"jax": jax.__version__, "optax": optax.__version__, "flax": flax.__version__,
          "eva_optax": eva_optax.__version__, "python": platform.python_version(),
          "platform": device.platform, "device_kind": device.device_kind}


def _schedule(name: str, lr: float, total_steps: int, warmup: int):
  if name == "cosine":
    return optax.cosine_decay_schedule(lr, total_steps)
  if name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, total_steps - 1),
                                              total_steps, end_value=lr / 10)
  return lr


def _settings(args, task: models.Task, data) -> dict:
  """The run's resolved settings: the command line over the task's defaults."""
  batch_size = args.batch_size or task.batch_size
  per_epoch = len(data.x_train) // batch_size
  if per_epoch == 0:
    raise ValueError(f"{len(data.x_train)} training examples make no batch of {batch_size}.")
  total_steps = args.steps or (task.steps if not args.epochs and task.steps else
                               (args.epochs or task.epochs) * per_epoch)
  targets = ([float(t) for t in args.targets.split(",")] if args.targets else
             list(task.targets))
  return {**vars(args), "batch_size": batch_size, "total_steps": total_steps,
          "steps_per_epoch": per_epoch, "schedule": args.schedule or task.schedule,
          "warmup": task.warmup if args.warmup is None else args.warmup,
          "eval_every": args.eval_every or task.eval_every or per_epoch, "targets": targets,
          "metric_name": task.metric_name, "goal": task.goal, "baseline": task.baseline}


def _layouts(task, configs, params, model_state, sampler, announce: bool):
  """The capture's layouts for the capture-based optimizers and Muon (``None`` if none runs);
  prints the coverage report once."""
  if not any(optimizers.OPTIMIZERS[c.name].statistics is not None or
             optimizers.OPTIMIZERS[c.name].needs_model for c in configs):
    return None
  batch = train.task_batch(task, model_state, *sampler.batch(0))
  info, coverage = train.capture_info(train.loss_fn(task), params, *batch,
                                      has_aux=bool(task.mutable))
  if announce:
    print(f"{task.name}: what the capture-based optimizers precondition\n{coverage}\n")
  return info.layouts


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
  if args.test_subset:
    data = data._replace(x_test=data.x_test[:args.test_subset],
                         y_test=data.y_test[:args.test_subset])
  settings = _settings(args, task, data)
  total_steps, batch_size = settings["total_steps"], settings["batch_size"]
  spread = np.linspace(0, len(data.x_train) - 1,
                       min(args.eval_subset or task.eval_subset, len(data.x_train)))
  eval_set = (data.x_train[spread.astype(int)], data.y_train[spread.astype(int)])
  test_set = (data.x_test, data.y_test)

  runs = {c.label: {"optimizer": c.name, "lr": optimizers.learning_rate(c, task.name),
                    "kwargs": optimizers.make_kwargs(c, task.name), "seeds": []} for c in configs}
  for seed in seeds:
    params, model_state = task.init(jax.random.PRNGKey(seed), data.x_train[:1])
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(len(data.x_train))
              for _ in range(math.ceil(total_steps / settings["steps_per_epoch"]))]
    sampler = train.Sampler(data, orders, batch_size, seed, task.augment)
    # The initial parameters are shared, so their evaluation is too.
    first_eval = train.evaluate(task, params, model_state, eval_set, test_set)
    layouts = _layouts(task, configs, params, model_state, sampler, seed == seeds[0])
    finals = {}
    for config in configs:
      spec, run = optimizers.OPTIMIZERS[config.name], runs[config.label]
      schedule = _schedule(settings["schedule"], run["lr"], total_steps, settings["warmup"])
      tx = optimizers.make(config, task.name, schedule, layouts, params, task.head)
      result, final_params, state, step = train.train(
          task, tx, spec.statistics, params, model_state, sampler, total_steps,
          settings["eval_every"], eval_set, test_set, first_eval,
          desc=f"{config.label} seed {seed}", stall_timeout=args.stall_timeout,
          capture_kwargs=spec.capture)
      finals[config.label] = (step, final_params, state)
      if spec.diagnostics is not None and not result["diverged"]:
        opt_state = train.optimizer_state(state, model_state)
        result["diagnostics"] = train.diagnostics(
            task, final_params, opt_state, state[1] if model_state else None,
            *sampler.batch(0), spec.diagnostics, {**run["kwargs"], "layouts": layouts})
      run["seeds"].append({"seed": seed, **result})
      print(f"{config.label} seed {seed}: {report.run_line(result, settings)}", flush=True)
      # What has finished survives an interrupted benchmark.
      report.write_json({"task": task.name, "settings": settings, "runs": runs},
                        pathlib.Path(args.out) / f"{task.name}.partial.json")
    if args.timing_rounds and seed == seeds[0]:
      timed = train.time_interleaved(finals, *sampler.batch(0), args.timing_rounds)
      for label, times in timed.items():
        runs[label]["interleaved_step_times"] = times

  settings.update(seeds=seeds, train_size=len(data.x_train), eval_size=len(eval_set[0]))
  results = {"task": task.name, "settings": settings, "environment": _environment(),
             "runs": runs}
  report.finish(results, pathlib.Path(args.out), with_plot=not args.no_plot,
                log_loss=task.log_loss)
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
