"""Flax Linen capture of per-layer curvature statistics, with no change to the model.

:func:`value_and_grad` wraps a loss function the way ``jax.value_and_grad`` does and also
returns the statistics every captured layer contributes (DESIGN §2). Which layers are captured
and how: :mod:`eva_optax.capture.linen`; the mechanism (probes beside the parameters, an
output tap whose VJP hands out the reductions): :mod:`eva_optax.capture.core`.

Statistics (``statistics=`` of :func:`value_and_grad`), each one float32 record per layer
(definitions: the record classes, e.g. :class:`~eva_optax.KroneckerVectors`; a layer stack's
fields get the stack axes in front, e.g. ā ``[L, d_in]``):

* ``"kronecker_vectors"`` (Eva: ā, ḡ = B × mean ∂L/∂y), ``"kronecker_factors"`` (K-FAC: A, G),
  ``"activation_factor"`` (FOOF: A), ``"activation_vector"`` (Eva-f: ā), ``"output_vectors"``
  (K-BFGS: ȳ, ḡ);
* Eva's power-iteration variants, whose call needs ``eigenvector_estimates`` (expand setting
  only; at most one per call), each O(rows·d) like the means: ``"kronecker_eigenvectors"``
  (one product A û, G v̂ per Kronecker factor), ``"fisher_eigenvectors"`` (one alternating
  step toward the empirical Fisher's leading Kronecker-product eigenvector, a and g coupled
  per row), ``"gradient_singular_vectors"`` (one step toward the leading singular pair of
  C = E[a gᵀ], Eva's curvature without E[a gᵀ] ≈ ā ḡᵀ).

A layer applied R times per loss evaluation (shared module, RNN cell, scan over time)
contributes the means over its applications of ā, ḡ and ȳ (the rank-one factors of the mean
input and mean per-example output gradient; an approximation that ignores how the applications
correlate) and its Kronecker factors as ``weight_sharing`` says. Inputs are reduced in the
forward pass and output gradients in the backward pass, so no ``[B, d]`` array is returned.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import optax
from flax.training import train_state

from eva_optax.capture.linen import (DISTRIBUTIONS, STATISTICS, Capture, CaptureInfo,
                                     SampledFisher)

__all__ = ["DISTRIBUTIONS", "STATISTICS", "Capture", "CaptureInfo", "SampledFisher",
           "TrainState", "curvature_fn", "value_and_grad"]


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` whose ``apply_gradients`` also hands the captured
  statistics to the optimizer.

  ``state.apply_gradients(grads=grads, curvature=curvature)`` calls
  ``tx.update(grads, opt_state, params, curvature=curvature)`` (and ``curvature_fn=`` for
  K-BFGS), then ``optax.apply_updates``, increments ``step`` and ``.replace``-es the remaining
  keyword arguments (e.g. ``batch_stats``), as Flax's does. Build it with
  ``TrainState.create(apply_fn=model.apply, params=params, tx=tx)``.
  """

  def apply_gradients(self, *, grads, curvature=None, curvature_fn=None, **kwargs):
    """Args: ``grads`` shaped like ``params``; ``curvature``, ``curvature_fn``: passed to
    ``tx.update`` when given; ``kwargs``: fields to replace. Returns the updated state."""
    if train_state.OVERWRITE_WITH_GRADIENT in grads:
      raise NotImplementedError(
          "eva_optax.flax.TrainState: params with an overwrite-with-gradient collection (fp8 "
          "training) are not supported; optimize the 'params' collection alone.")
    extra = {k: v for k, v in (("curvature", curvature), ("curvature_fn", curvature_fn))
             if v is not None}
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)


def value_and_grad(loss_fn: Callable, *, statistics: Union[str, Sequence[str]],
                   has_aux: bool = False, axis_name: Optional[str] = None,
                   sampled_fisher: Optional[SampledFisher] = None,
                   exclude: Union[None, str, Sequence[str], Callable] = None,
                   weight_sharing: str = "expand",
                   statistics_batch_size: Optional[int] = None) -> Capture:
  """Like ``jax.value_and_grad(loss_fn, has_aux=has_aux)``, plus per-layer curvature statistics.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` that applies a Flax Linen model inside (e.g.
      ``model.apply({"params": params}, x)``) and returns a scalar loss, or ``(loss, aux)`` with
      ``has_aux``. The loss must be a **mean over the batch** (L = mean_i ℓ_i, as in kfac-jax): the
      statistics are rescaled by the batch size B (the leading axis of each layer's input) into
      per-example units. ``params`` reaches ``loss_fn`` with one extra entry per captured layer
      (key ``"_eva_optax_probes"``, zeros, beside the layer's kernel): pass it on to
      ``model.apply`` as it is.
    statistics: one name of :data:`STATISTICS` or a tuple of them, each giving one float32
      record per layer (the module docstring's "Statistics" lists them and how a reused layer
      and positions count).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    axis_name: under ``pmap``/``shard_map``, the data-parallel axis (required there): the
      statistics are ``lax.pmean``-ed over it, and per-example units make that the global-batch
      statistic, so every replica holds the same optimizer state and N devices match one device
      on the global batch (equal shards). Gradients are returned as ``jax.value_and_grad``
      returns them: per device under ``pmap`` (average them, ``lax.pmean(grads, axis_name)``);
      under ``shard_map``, gradients of replicated parameters come back already *summed* over
      the axis (its autodiff inserts the psum), so divide them by ``lax.axis_size(axis_name)``.
      Under ``jit`` with a sharded batch leave it ``None``: the means are global already.
    sampled_fisher: ``None`` (default): output gradients of ``loss_fn`` itself (empirical
      Fisher). A :class:`SampledFisher`: output gradients of the model's own predictive
      distribution at labels drawn with the key ``fisher_rng`` (true Fisher); this costs a second
      forward and backward pass through ``predict_fn``.
    exclude: layers to leave first-order: a module-path pattern (``fnmatch``, e.g.
      ``"Decoder_0/*"``), a sequence of them, or a predicate ``(path, module) -> bool``. The
      coverage report lists them as excluded.
    weight_sharing: how the Kronecker factors (K-FAC, FOOF, K-BFGS's A) treat the rows of one
      example (positions, applications), after Eschenhagen et al., NeurIPS 2023:
      ``"expand"`` (default): every row is one more sample, A averaged and G summed over an
      example's rows. It is exact for a loss with one term per row (a language model's loss
      per token), it is KFC for convolutions, and it keeps no per-example array.
      ``"reduce"``: per example the input is averaged and the output gradient summed over its
      rows before the outer products; suited to one loss term per example (classification
      after pooling), at the cost of ``[B, d]`` per-example vectors in the backward pass.
    statistics_batch_size: ``None`` (default): statistics over the whole (local) batch. An int
      k ≥ 1: over its first k examples only (all of them when the batch is smaller), in the
      same per-example units — the reference Eva/K-FAC implementation's ``kfac_batch_size``
      (16 in its CIFAR runs), for reproducing its results. Cheaper, and noisier: behind a
      BatchNorm layer ḡ, which is exactly zero over the whole batch, is then the mean of k
      examples' output gradients, i.e. sampling noise.

  Returns:
    A :class:`Capture`: ``fn(params, *args, **kwargs) -> ((value, grads), curvature)`` (with
    ``sampled_fisher``: ``fn(params, *args, fisher_rng, **kwargs)``, ``fisher_rng`` a keyword-only
    PRNG key; with a power-iteration kind (``"kronecker_eigenvectors"``,
    ``"fisher_eigenvectors"``, ``"gradient_singular_vectors"``), the keyword-only ``eigenvector_estimates``:
    ``eva_optax.eigenvector_estimates(opt_state)``, the running estimates the power iteration
    continues from); ``value`` the loss or ``(loss, aux)``, ``grads`` like ``params``, and
    ``curvature`` a nested dict keyed by module path like ``params``
    (``{"Dense_0": KroneckerVectors(...)}``) — for a tuple of ``statistics``, a dict of such
    trees keyed by statistics name. ``fn.describe(params, *args, **kwargs)`` returns a
    :class:`CaptureInfo` (captured layers and their ``layouts``, skipped layers and why) from a
    shape-only pass; pass ``info.layouts`` to the optimizer (``eva_optax.eva(lr,
    layouts=info.layouts)``) when the model has layer stacks or attention projections.

  Raises:
    ValueError: unknown ``statistics``, distribution or ``weight_sharing``, a ``sampled_fisher``
      with statistics that use no output gradients or called without ``fisher_rng``; a
      ``statistics_batch_size`` that is not a positive int; a power-iteration kind with
      ``weight_sharing="reduce"`` or two of them at once, or called without ``eigenvector_estimates`` or with ones of
      another model (and ``eigenvector_estimates`` without that kind); inside
      ``pmap``/``shard_map`` without ``axis_name``, or with one that is not mapped there; a
      captured layer whose kernel is not in ``params``.
    NotImplementedError: an unsupported layer (grouped or masked conv, ``nn.ConvTranspose``,
      ``nn.ConvLocal``, DenseGeneral with ``batch_dims``, an Einsum that is not a matrix
      multiply on its kernel, a stack along a non-leading axis), naming the layer and
      ``exclude`` as the way to leave it first-order.
  """
  return Capture(loss_fn, statistics, has_aux, axis_name, sampled_fisher, exclude,
                 weight_sharing, statistics_batch_size)


def curvature_fn(loss_fn: Callable, *args, statistics: Union[str, Sequence[str]] = "output_vectors",
                 has_aux: bool = False, axis_name: Optional[str] = None,
                 exclude: Union[None, str, Sequence[str], Callable] = None,
                 weight_sharing: str = "expand", **kwargs) -> Callable:
  """The second pass of K-BFGS: a function from trial parameters to captured statistics.

  Optimizers that measure curvature along their own step (:func:`eva_optax.kbfgs`,
  :func:`eva_optax.kbfgs_l`) evaluate the statistics again at the trial point W + αp on the
  *same* batch; they take this function as the keyword ``curvature_fn`` of ``update``.

  Args:
    loss_fn: the loss function given to :func:`value_and_grad` (mean over the batch).
    *args, **kwargs: the step's batch arguments of ``loss_fn`` after ``params``, bound here.
    statistics, has_aux, axis_name, exclude, weight_sharing: as in :func:`value_and_grad`
      (pass the first pass's ``axis_name`` and ``exclude``, so both passes see the same
      layers and, under ``pmap``/``shard_map``, the global-batch statistics).

  Returns:
    ``trial_params -> curvature`` (the third output of :func:`value_and_grad`; the parameter
    gradients it also computes are dropped, and ``jit`` removes their computation).

  Example, a Flax training step with K-BFGS::

    tx = eva_optax.kbfgs(0.3)
    capture = eva_optax.flax.value_and_grad(loss_fn, statistics=eva_optax.KBFGS_STATISTICS)

    @jax.jit
    def train_step(params, opt_state, x, y):
      (loss, grads), curvature = capture(params, x, y)
      updates, opt_state = tx.update(
          grads, opt_state, params, curvature=curvature,
          curvature_fn=eva_optax.flax.curvature_fn(loss_fn, x, y))
      return optax.apply_updates(params, updates), opt_state, loss
  """
  capture = value_and_grad(loss_fn, statistics=statistics, has_aux=has_aux, axis_name=axis_name,
                           exclude=exclude, weight_sharing=weight_sharing)
  return lambda trial_params: capture(trial_params, *args, **kwargs)[1]
