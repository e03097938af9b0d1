"""One training run of one optimizer: jitted steps, step timing, divergence, per-epoch evals."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from statistics import median
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import eva_optax
from eva_optax.capture import core
from benchmarks import datasets, models


def loss_fn(task: models.Task):
  """The task's training loss: ``(params, x, y) -> scalar``; for a task with ``mutable``
  collections (BatchNorm) ``(params, model_state, x, y) -> (scalar, new_model_state)``, the
  ``has_aux`` form Flax users write."""
  if task.mutable:
    def stateful(params, model_state, x, y):
      output, model_state = task.apply(params, model_state, x, train=True)
      return task.loss(output, y), model_state
    return stateful
  return lambda params, x, y: task.loss(task.apply(params, None, x, train=True), y)


def make_step(task: models.Task, tx: optax.GradientTransformation, statistics: Optional[str],
              capture_kwargs: Optional[Mapping[str, Any]] = None):
  """Jitted ``(params, state, x, y) -> (params, state, loss)`` for the task's loss (see
  :func:`loss_step`). A peer that is not an optax transformation (e.g.
  :mod:`benchmarks.kfac_jax_peer`) supplies its own ``make_step``."""
  if hasattr(tx, "make_step"):
    return tx.make_step(task)
  return loss_step(loss_fn(task), tx, statistics, has_aux=bool(task.mutable),
                   capture_kwargs=capture_kwargs)


def loss_step(loss, tx: optax.GradientTransformation, statistics: Optional[str],
              has_aux: bool = False, capture_kwargs: Optional[Mapping[str, Any]] = None):
  """Jitted ``(params, state, x, y) -> (params, state, loss)`` for ``loss(params, x, y)``.

  First-order optimizers take plain gradients; second-order ones also get the per-layer
  statistics captured in the same forward/backward pass as ``curvature`` (``capture_kwargs``:
  further keywords of ``eva_optax.flax.value_and_grad``, e.g. ``statistics_batch_size``;
  Eva's power-iteration statistics get their running estimates from the optimizer state). With
  ``has_aux`` the loss is ``(params, model_state, x, y) -> (loss, model_state)`` and ``state``
  is the pair ``(opt_state, model_state)``.
  """
  if statistics is None:
    grad_fn = jax.value_and_grad(loss, has_aux=has_aux)
  else:
    capture = eva_optax.flax.value_and_grad(loss, statistics=statistics, has_aux=has_aux,
                                            **(capture_kwargs or {}))

  @jax.jit
  def step(params, state, x, y):
    opt_state, model_state = state if has_aux else (state, None)
    batch = (model_state, x, y) if has_aux else (x, y)
    extra = {}
    if statistics is None:
      value, grads = grad_fn(params, *batch)
    else:
      estimates = ({"eigenvector_estimates": eva_optax.eigenvector_estimates(opt_state)}
                   if statistics in core.ITERATED else {})
      (value, grads), extra["curvature"] = capture(params, *batch, **estimates)
      # The same statistics at trial parameters on this batch: K-BFGS's second pass calls it,
      # the other optimizers ignore it (so it is never traced for them).
      extra["curvature_fn"] = eva_optax.flax.curvature_fn(loss, *batch, statistics=statistics,
                                                         has_aux=has_aux)
    if has_aux:
      value, model_state = value
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    state = (opt_state, model_state) if has_aux else opt_state
    return optax.apply_updates(params, updates), state, value

  return step


def capture_info(loss, params, *batch, has_aux: bool = False):
  """``(CaptureInfo, coverage report text)`` of ``loss(params, *batch)`` on one batch: the
  layouts the capture-based optimizers need and which parameters they precondition."""
  capture = eva_optax.flax.value_and_grad(loss, statistics="kronecker_vectors", has_aux=has_aux)
  info = capture.describe(params, *batch)
  _, curvature = jax.jit(capture)(params, *batch)
  return info, eva_optax.coverage_report(params, curvature, info)


def task_batch(task: models.Task, model_state, x: np.ndarray, y: np.ndarray) -> tuple:
  """The arguments after ``params`` of the task's :func:`loss_fn` for the batch ``(x, y)``."""
  return (model_state, x, y) if task.mutable else (x, y)


def init_state(tx, params, x: np.ndarray, y: np.ndarray, model_state=None):
  """The step's state: the optimizer state, paired with ``model_state`` when the task has one;
  a peer with its own ``make_step`` also sees a batch (kfac-jax traces the model on it)."""
  if hasattr(tx, "make_step"):
    return tx.init(params, x, y)
  return (tx.init(params), model_state) if model_state else tx.init(params)


def optimizer_state(state, model_state) -> object:
  """The optimizer's part of a step state built by :func:`init_state`."""
  return state[0] if model_state else state


def state_bytes(state) -> int:
  """Bytes held by the optimizer state's arrays."""
  return int(sum(leaf.nbytes for leaf in jax.tree.leaves(state) if hasattr(leaf, "nbytes")))


class Watchdog:
  """Ends the process with exit status 3 when ``feed`` is not called for ``seconds``.

  XLA's CPU runtime hung (every worker idle, the host waiting on the step's result forever) in a
  few K-FAC refreshes on the busy 2-core box; a protocol script restarts such a run instead of
  waiting on it. ``seconds = 0`` disables it.
  """

  def __init__(self, seconds: float, what: str):
    self.seconds, self.what, self.timer = seconds, what, None
    self.feed()

  def feed(self) -> None:
    self.close()
    if self.seconds:
      self.timer = threading.Timer(self.seconds, self._expire)
      self.timer.daemon = True
      self.timer.start()

  def close(self) -> None:
    if self.timer is not None:
      self.timer.cancel()

  def _expire(self) -> None:
    print(f"\n{self.what}: no step finished in {self.seconds:.0f} s; exiting (status 3).",
          file=sys.stderr, flush=True)
    os._exit(3)


class Sampler(NamedTuple):
  """The minibatches of one seed, identical for every optimizer: step ``k`` reads
  ``orders[k // per_epoch]`` (a permutation of the training set per epoch, the last incomplete
  batch dropped) and, when the task augments, its augmentation is seeded by ``(seed, k)``."""

  data: datasets.Dataset
  orders: Sequence[np.ndarray]
  batch_size: int
  seed: int
  augment: Optional[Callable] = None

  @property
  def per_epoch(self) -> int:
    return len(self.orders[0]) // self.batch_size

  def batch(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    epoch, i = divmod(k, self.per_epoch)
    index = self.orders[epoch][i * self.batch_size:(i + 1) * self.batch_size]
    x, y = self.data.x_train[index], self.data.y_train[index]
    if self.augment is not None:
      x = self.augment(np.random.default_rng((self.seed, k)), x)
    return x, y


def evaluate(task: models.Task, params, model_state, eval_set, test_set) -> dict:
  """``train_loss`` on ``eval_set``, ``metric`` (and ``test_loss`` where the task has one) on
  ``test_set``, the model in evaluation mode."""
  out = {"train_loss": task.eval_loss(params, *eval_set, model_state),
         "metric": task.metric(params, *test_set, model_state)}
  if task.test_loss is not None:
    out["test_loss"] = task.test_loss(params, *test_set, model_state)
  return out


def train(task: models.Task, tx: optax.GradientTransformation, statistics: Optional[str],
          params, model_state, sampler: Sampler, total_steps: int, eval_every: int,
          eval_set, test_set, first_eval: dict, desc: str = "", stall_timeout: float = 0,
          capture_kwargs: Optional[Mapping[str, Any]] = None):
  """Trains ``params`` with ``tx`` for ``total_steps`` minibatches of ``sampler``.

  Args:
    model_state: the model's mutable collections (``{}`` for none), carried through the steps.
    eval_every: steps between evaluations (and one at the end).
    eval_set: the fixed training subset whose loss is reported; ``test_set`` gives the metric.
    first_eval: :func:`evaluate` of the initial ``params``.
    stall_timeout: seconds without a finished step (or evaluation) after which the process
      exits (:class:`Watchdog`); 0 waits forever.
    capture_kwargs: further keywords of the capture (:func:`loss_step`).

  Returns:
    ``(result, params, state, step)``: ``result`` has the minibatch curve (``step`` = updates
    applied before the loss was measured, ``wall`` = seconds of step execution before it, the
    first, compiling step excluded), ``evals`` every ``eval_every`` steps and at the end (with
    ``step``, ``epoch``, ``wall``), ``step_times`` (s), ``median_step_s``, ``state_bytes`` (the
    optimizer's), ``diverged`` and ``diverged_step``.
  """
  step = make_step(task, tx, statistics, capture_kwargs)
  # A peer may donate its input buffers (kfac-jax does): train on a copy, so the caller's
  # initial parameters stay valid for the next optimizer.
  params = jax.tree.map(jnp.copy, params)
  state = init_state(tx, params, *sampler.batch(0), jax.tree.map(jnp.copy, model_state))
  curve = {"step": [], "loss": [], "wall": []}
  evals = [dict(first_eval, step=0, epoch=0.0, wall=0.0)]
  times, wall, diverged_step = [], 0.0, None
  bar = tqdm(total=total_steps, desc=desc, leave=False, mininterval=0.5)
  watchdog = Watchdog(stall_timeout, desc)
  for k in range(total_steps):
    watchdog.feed()
    x, y = sampler.batch(k)
    start = time.perf_counter()
    params, state, loss = step(params, state, x, y)
    jax.block_until_ready((params, state, loss))
    elapsed = time.perf_counter() - start
    loss = float(loss)
    if not math.isfinite(loss):
      diverged_step = k
      break
    curve["step"].append(k)
    curve["loss"].append(loss)
    curve["wall"].append(wall)
    if k > 0:  # the first call compiles
      times.append(elapsed)
      wall += elapsed
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
    if (k + 1) % eval_every == 0 or k + 1 == total_steps:
      current = state[1] if model_state else None
      evals.append({"step": k + 1, "epoch": (k + 1) / sampler.per_epoch, "wall": wall,
                    **evaluate(task, params, current, eval_set, test_set)})
  bar.close()
  watchdog.close()
  if diverged_step is None and not math.isfinite(evals[-1]["train_loss"]):
    diverged_step = total_steps
  result = {"curve": curve, "evals": evals, "step_times": times,
            "median_step_s": median(times) if times else None,
            "state_bytes": state_bytes(optimizer_state(state, model_state)),
            "diverged": diverged_step is not None, "diverged_step": diverged_step}
  return result, params, state, step


def time_interleaved(runs: dict, x: np.ndarray, y: np.ndarray, rounds: int) -> dict:
  """Step times (s) of already compiled steps, one step of each run in turn per round.

  Interleaving puts every optimizer under the same machine load, so ratios between them hold
  even when the load drifts during a benchmark (a shared 2-core box drifts by 2x).

  Args:
    runs: ``{label: (step, params, state)}``.
    x, y: one batch, transferred to the device once so only the step itself is timed.
  """
  x, y = jax.device_put(x), jax.device_put(y)
  carry = {label: (params, state) for label, (_, params, state) in runs.items()}
  times = {label: [] for label in runs}
  for _ in range(rounds):
    for label, (step, _, _) in runs.items():
      start = time.perf_counter()
      params, state, loss = step(*carry[label], x, y)
      jax.block_until_ready((params, state, loss))
      times[label].append(time.perf_counter() - start)
      carry[label] = (params, state)
  return times


def diagnostics(task: models.Task, params, opt_state, model_state, x: np.ndarray,
                y: np.ndarray, diagnose, kwargs: dict) -> dict[str, dict[str, float]]:
  """``diagnose(grads, opt_state, kwargs)`` (a registry entry's ``diagnostics``) for the final
  state, with the gradient of the batch ``(x, y)``, as Python floats (the mean over a layer
  stack's slices, except ``g_norm``: the smallest slice's)."""
  has_aux = bool(task.mutable)
  batch = task_batch(task, model_state, x, y)
  grads = jax.jit(jax.grad(loss_fn(task), has_aux=has_aux))(params, *batch)
  grads = grads[0] if has_aux else grads
  reduce = lambda key: np.min if key == "g_norm" else np.mean
  return {layer: {key: float(reduce(key)(value)) for key, value in values.items()}
          for layer, values in diagnose(grads, opt_state, kwargs).items()}
