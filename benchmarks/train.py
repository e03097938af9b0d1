"""One training run of one optimizer: jitted steps, step timing, divergence, per-epoch evals."""

from __future__ import annotations

import math
import time
from statistics import median
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import eva_optax
from benchmarks import datasets, models


def loss_fn(task: models.Task):
  """``(params, x, y) -> scalar`` training loss of the task's model."""
  return lambda params, x, y: task.loss(task.model.apply({"params": params}, x), y)


def make_step(task: models.Task, tx: optax.GradientTransformation, statistics: Optional[str]):
  """Jitted ``(params, state, x, y) -> (params, state, loss)`` for the task's loss (see
  :func:`loss_step`). A peer that is not an optax transformation (e.g.
  :mod:`benchmarks.kfac_jax_peer`) supplies its own ``make_step``."""
  if hasattr(tx, "make_step"):
    return tx.make_step(task)
  return loss_step(loss_fn(task), tx, statistics)


def loss_step(loss, tx: optax.GradientTransformation, statistics: Optional[str]):
  """Jitted ``(params, state, x, y) -> (params, state, loss)`` for ``loss(params, x, y)``.

  First-order optimizers take plain gradients; second-order ones also get the per-layer
  statistics captured in the same forward/backward pass as ``curvature``.
  """
  if statistics is None:
    grad_fn = jax.value_and_grad(loss)
  else:
    capture = eva_optax.flax.value_and_grad(loss, statistics=statistics)

  @jax.jit
  def step(params, state, x, y):
    if statistics is None:
      value, grads = grad_fn(params, x, y)
      updates, state = tx.update(grads, state, params)
    else:
      (value, grads), curvature = capture(params, x, y)
      # The same statistics at trial parameters on this batch: K-BFGS's second pass calls it,
      # the other optimizers ignore it (so it is never traced for them).
      second_pass = eva_optax.flax.curvature_fn(loss, x, y, statistics=statistics)
      updates, state = tx.update(grads, state, params, curvature=curvature,
                                 curvature_fn=second_pass)
    return optax.apply_updates(params, updates), state, value

  return step


def capture_info(loss, params, x: np.ndarray, y: np.ndarray):
  """``(CaptureInfo, coverage report text)`` of ``loss(params, x, y)`` on one batch: the
  layouts the capture-based optimizers need and which parameters they precondition."""
  capture = eva_optax.flax.value_and_grad(loss, statistics="kronecker_vectors")
  info = capture.describe(params, x, y)
  _, curvature = jax.jit(capture)(params, x, y)
  return info, eva_optax.coverage_report(params, curvature, info)


def init_state(tx, params, x: np.ndarray, y: np.ndarray):
  """The optimizer state; a peer with its own ``make_step`` also sees a batch (kfac-jax traces
  the model on it to find the layers)."""
  if hasattr(tx, "make_step"):
    return tx.init(params, x, y)
  return tx.init(params)


def state_bytes(state) -> int:
  """Bytes held by the optimizer state's arrays."""
  return int(sum(leaf.nbytes for leaf in jax.tree.leaves(state) if hasattr(leaf, "nbytes")))


def train(task: models.Task, data: datasets.Dataset, tx: optax.GradientTransformation,
          statistics: Optional[str], params, orders: Sequence[np.ndarray], batch_size: int,
          total_steps: int, eval_set: tuple[np.ndarray, np.ndarray], first_eval: dict,
          desc: str = ""):
  """Trains ``params`` with ``tx`` for ``total_steps`` minibatches.

  Args:
    orders: one permutation of the training set per epoch (shared by every optimizer at a seed,
      so all see the same batches); the last incomplete batch of an epoch is dropped.
    eval_set: the fixed training subset whose loss is reported per epoch.
    first_eval: ``{"train_loss", "metric"}`` of the initial ``params``.

  Returns:
    ``(result, params, state, step)``: ``result`` has the minibatch curve (``step`` = updates applied
    before the loss was measured, ``wall`` = seconds of step execution before it, the first,
    compiling step excluded), ``evals`` after every epoch and at the end, ``step_times`` (s),
    ``median_step_s``, ``state_bytes``, ``diverged`` and ``diverged_step``.
  """
  step = make_step(task, tx, statistics)
  # A peer may donate its input buffers (kfac-jax does): train on a copy, so the caller's
  # initial parameters stay valid for the next optimizer.
  params = jax.tree.map(jnp.copy, params)
  first = orders[0][:batch_size]
  state = init_state(tx, params, data.x_train[first], data.y_train[first])
  per_epoch = len(orders[0]) // batch_size
  curve = {"step": [], "loss": [], "wall": []}
  evals = [dict(first_eval, step=0, epoch=0.0, wall=0.0)]
  times, wall, diverged_step = [], 0.0, None
  bar = tqdm(total=total_steps, desc=desc, leave=False, mininterval=0.5)
  for k in range(total_steps):
    epoch, i = divmod(k, per_epoch)
    index = orders[epoch][i * batch_size:(i + 1) * batch_size]
    x, y = data.x_train[index], data.y_train[index]
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
    if (k + 1) % per_epoch == 0 or k + 1 == total_steps:
      evals.append({"step": k + 1, "epoch": (k + 1) / per_epoch, "wall": wall,
                    "train_loss": task.eval_loss(params, *eval_set),
                    "metric": task.metric(params, data.x_test, data.y_test)})
  bar.close()
  if diverged_step is None and not math.isfinite(evals[-1]["train_loss"]):
    diverged_step = total_steps
  result = {"curve": curve, "evals": evals, "step_times": times,
            "median_step_s": median(times) if times else None,
            "state_bytes": state_bytes(state), "diverged": diverged_step is not None,
            "diverged_step": diverged_step}
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


def diagnostics(task: models.Task, params, state, x: np.ndarray, y: np.ndarray,
                diagnose, kwargs: dict) -> dict[str, dict[str, float]]:
  """``diagnose(grads, state, kwargs)`` (a registry entry's ``diagnostics``) for the final state,
  with the gradient of the batch ``(x, y)``, as Python floats (the mean over a layer stack's
  slices)."""
  grads = jax.jit(jax.grad(loss_fn(task)))(params, x, y)
  return {layer: {key: float(np.mean(value)) for key, value in values.items()}
          for layer, values in diagnose(grads, state, kwargs).items()}
