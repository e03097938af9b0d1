"""Gradient accumulation that also accumulates the captured curvature.

``optax.MultiSteps(tx, k)`` averages the gradients of k micro-batches but hands ``tx`` the
``curvature`` of the last micro-batch only (its extra arguments are those of the k-th call),
and nothing inside ``tx`` can tell. :func:`multi_steps` wraps ``optax.MultiSteps`` and keeps the
running mean of the curvature over the micro-batches as well. The statistics are per-example
means (DESIGN §4), so with equal micro-batches their mean is the statistic of the whole batch:
k micro-batches of size b give the step of one batch of size k·b, up to float32 rounding.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class MultiStepsState(NamedTuple):
  """State of :func:`multi_steps`.

  Attributes:
    inner: the ``optax.MultiStepsState`` (accumulated gradients, the wrapped optimizer's state).
    curvature: the running mean of this cycle's curvature (float32, zeros between cycles).
  """

  inner: optax.MultiStepsState
  curvature: Any


def multi_steps(tx: optax.GradientTransformation, every_k: int,
                curvature_like) -> optax.GradientTransformationExtraArgs:
  """``optax.MultiSteps(tx, every_k)`` with the curvature averaged over the micro-batches too.

  Args:
    tx: a capture-based optimizer (eva, eva_f, foof, kfac or a chain around one).
    every_k: micro-batches per optimizer step, int ≥ 1.
    curvature_like: a curvature of one micro-batch, or its shapes
      (``jax.eval_shape(capture, params, *micro_batch)[1]``): the structure to accumulate.

  Returns:
    A transformation whose ``update(grads, state, params, *, curvature)`` returns zero updates on
    the first ``every_k − 1`` calls of a cycle and on the last one the update of ``tx`` for the
    mean gradient and the mean curvature of the cycle (``optax.MultiSteps`` semantics).

  Raises:
    ValueError: ``every_k`` not a positive int; at update time, a ``curvature_fn`` (K-BFGS's
      second pass measures one batch at the trial point, so it cannot be accumulated).
  """
  if not isinstance(every_k, int) or every_k < 1:
    raise ValueError(f"eva_optax: every_k must be a positive int, got {every_k!r}.")
  inner = optax.MultiSteps(tx, every_k)
  zeros = lambda: jax.tree.map(lambda c: jnp.zeros(jnp.shape(c), jnp.float32), curvature_like)

  def init_fn(params):
    return MultiStepsState(inner.init(params), zeros())

  def update_fn(updates, state, params=None, *, curvature=None, curvature_fn=None, **extra):
    if curvature_fn is not None:
      raise ValueError("eva_optax: multi_steps cannot accumulate K-BFGS's second pass "
                       "(curvature_fn); train K-BFGS on whole batches.")
    if curvature is None:
      raise ValueError("eva_optax: multi_steps(...).update needs curvature=.")
    step = state.inner.mini_step.astype(jnp.float32)
    mean = jax.tree.map(lambda m, c: m + (jnp.asarray(c, jnp.float32) - m) / (step + 1.0),
                        state.curvature, curvature)
    updates, inner_state = inner.update(updates, state.inner, params, curvature=mean, **extra)
    # MultiSteps resets its mini-step to 0 after the k-th call: start the next cycle afresh.
    done = inner_state.mini_step == 0
    mean = jax.tree.map(lambda m: jnp.where(done, jnp.zeros_like(m), m), mean)
    return updates, MultiStepsState(inner_state, mean)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
