"""Flax NNX capture of per-layer curvature statistics, with no change to the model.

:func:`value_and_grad` mirrors ``nnx.value_and_grad(loss_fn)(model, *args)`` and also returns
the statistics of every captured layer, for the same optimizers as :mod:`eva_optax.flax`.
Which layers and how: :mod:`eva_optax.capture.nnx`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

from flax import nnx

from eva_optax.capture.nnx import Capture

__all__ = ["Capture", "curvature_fn", "value_and_grad"]


def value_and_grad(loss_fn: Callable, *, statistics: Union[str, Sequence[str]],
                   has_aux: bool = False, axis_name: Optional[str] = None,
                   exclude: Union[None, str, Sequence[str], Callable] = None,
                   weight_sharing: str = "expand",
                   statistics_batch_size: Optional[int] = None) -> Capture:
  """Like ``nnx.value_and_grad(loss_fn, has_aux=has_aux)``, plus per-layer curvature statistics.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs)`` with an NNX module first, returning a scalar
      loss that is a **mean over the batch**, or ``(loss, aux)`` with ``has_aux``.
    statistics, has_aux, axis_name, exclude, weight_sharing, statistics_batch_size: as in
      :func:`eva_optax.flax.value_and_grad` (module paths are the model's attribute paths,
      e.g. ``"blocks/attn/query"``).

  Returns:
    A :class:`Capture`: ``fn(model, *args, **kwargs) -> ((value, grads), curvature)`` (with
    a power-iteration ``statistics`` such as ``"kronecker_eigenvectors"`` also the keyword ``eigenvector_estimates``) with
    ``grads`` an ``nnx.State`` of the ``nnx.Param`` gradients (as ``nnx.value_and_grad``
    returns it) and ``curvature`` keyed by module path like ``nnx.state(model, nnx.Param)``.
    ``fn.describe(model, *args)`` gives the layouts for the optimizers (``layouts=``) and the
    skipped layers. Use it with ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and
    ``optimizer.update(model, grads, curvature=curvature)``.

  Raises:
    As :func:`eva_optax.flax.value_and_grad` (no ``sampled_fisher`` for NNX yet).
  """
  return Capture(loss_fn, statistics, has_aux, axis_name, exclude, weight_sharing,
                 statistics_batch_size)


def curvature_fn(loss_fn: Callable, model, *args,
                 statistics: Union[str, Sequence[str]] = "output_vectors",
                 has_aux: bool = False, axis_name: Optional[str] = None,
                 exclude: Union[None, str, Sequence[str], Callable] = None,
                 weight_sharing: str = "expand", **kwargs) -> Callable:
  """K-BFGS's second pass for an NNX model: ``trial_params -> curvature`` on the batch
  ``args`` (see :func:`eva_optax.flax.curvature_fn`).

  ``trial_params`` is the parameter state the optimizer sees (``nnx.Optimizer`` passes the
  pure ``nnx.Param`` arrays); it is merged into a copy of ``model``, which stays unchanged.

  Example::

    (loss, grads), curvature = capture(model, x, y)
    optimizer.update(model, grads, curvature=curvature,
                     curvature_fn=eva_optax.nnx.curvature_fn(loss_fn, model, x, y))
  """
  capture = value_and_grad(loss_fn, statistics=statistics, has_aux=has_aux, axis_name=axis_name,
                           exclude=exclude, weight_sharing=weight_sharing)
  graphdef, state = nnx.split(model)

  def fn(trial_params):
    trial = nnx.merge(graphdef, state)
    nnx.update(trial, trial_params)
    return capture(trial, *args, **kwargs)[1]

  return fn
