"""kfac-jax (PyPI ``kfac-jax``) as a benchmark peer of our K-FAC, with comparable settings.

The peer is configured like :func:`eva_optax.kfac`: fixed damping (no adaptation), the same
inverse period and curvature running average (our ``stat_decay`` weighs the new factors, its
``curvature_ema`` the old ones: ``curvature_ema = 1 − stat_decay``), the empirical Fisher, the
same KL clip (its ``norm_constraint``), constant momentum, no adaptive learning rate or momentum,
no burn-in steps.

Units: kfac-jax's ``"fisher_empirical"`` mode divides its output-gradient factor by the batch
size B once more than ours (documented in its ``BlockDiagonalCurvature``): its G is our
per-example G / B. Its direction is then B × ours at damping B·γ_kfac_jax, so our
``(learning_rate, damping, kl_clip)`` are passed to it as ``(η/B, γ/B, κ/B)``. With these the
first step of both is the same update (``tests/test_benchmarks.py``). The running averages still
differ after the first step: kfac-jax's is bias-corrected (weights ∝ (1 − ξ)^age over the steps
seen so far), ours starts from the first value (DESIGN §5); and under a learning-rate schedule
the momentum forms differ: kfac-jax's velocity accumulates η_t-scaled steps, optax's
``trace`` accumulates directions and scales the sum by the current η_t.

Compatibility: kfac-jax 0.0.8 fails on JAX ≥ 0.10 at its first step, because its graph matcher
unpacks ``Primitive.get_bind_params`` into ``(subfuns, params)`` while JAX now returns only the
params. :func:`_patch_graph_matcher` replaces that one evaluation helper in-process; nothing of
kfac-jax is copied.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax

from benchmarks import models

_REGISTRATIONS = {
    # task loss -> name of the kfac-jax registration of the same loss on the model output
    models.cross_entropy: "register_softmax_cross_entropy_loss",
    models.reconstruction_error: "register_sigmoid_cross_entropy_loss",
}


def _import():
  try:
    import kfac_jax
  except ImportError as error:
    raise ImportError("the kfac_jax peer needs kfac-jax: pip install -e '.[bench]'") from error
  _patch_graph_matcher()
  return kfac_jax


@functools.cache
def _patch_graph_matcher() -> None:
  from kfac_jax._src import tag_graph_matcher

  def eval_jaxpr_eqn(eqn, in_values):
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(params, tuple):  # JAX < 0.10 returned (subfuns, params)
      subfuns, params = params
    with jax.extend.source_info_util.user_context(eqn.source_info.traceback):
      out = eqn.primitive.bind(*subfuns, *in_values, **params)
    return out if isinstance(out, list) else [out]

  tag_graph_matcher.eval_jaxpr_eqn = eval_jaxpr_eqn


class KfacJaxPeer:
  """A kfac-jax optimizer behind the benchmark's ``make_step`` / ``init`` interface.

  ``make_step(task)`` registers the task's loss on the model output (kfac-jax needs it) and must
  be called before ``init(params, x, y)``, which builds the optimizer for the batch size of ``x``
  (the unit conversion above depends on it).
  """

  def __init__(self, learning_rate, kwargs: dict):
    self.learning_rate = learning_rate
    self.kwargs = kwargs
    self.loss_fn = None
    self.optimizer = None

  def make_step(self, task: models.Task):
    kfac_jax = _import()
    if task.mutable:
      raise ValueError(f"the kfac_jax peer does not carry model state ({task.mutable} of task "
                       f"{task.name}); run it on tasks without BatchNorm.")
    if task.loss not in _REGISTRATIONS:
      raise ValueError(f"the kfac_jax peer has no loss registration for task {task.name}.")
    register = getattr(kfac_jax, _REGISTRATIONS[task.loss])

    def loss_fn(params, batch):
      x, y = batch
      output = task.model.apply({"params": params}, x)
      register(output, y)
      return task.loss(output, y)

    self.loss_fn = loss_fn
    rng = jax.random.key(0)

    def step(params, state, x, y):
      params, state, stats = self.optimizer.step(params, state, rng, batch=(x, y))
      return params, state, stats["loss"]

    return step

  def init(self, params, x, y):
    kfac_jax = _import()
    kw, lr, size = self.kwargs, self.learning_rate, len(x)
    self.optimizer = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(self.loss_fn),
        l2_reg=kw["weight_decay"],
        use_adaptive_learning_rate=False,
        learning_rate_schedule=lambda step: (lr(step) if callable(lr) else lr) / size,
        use_adaptive_momentum=False,
        momentum_schedule=lambda step: kw["momentum"],
        use_adaptive_damping=False,
        damping_schedule=lambda step: kw["damping"] / size,
        norm_constraint=kw["kl_clip"] / size if kw["scaling"] == "kl_clip" else None,
        estimation_mode="fisher_empirical",
        curvature_ema=1.0 - kw["stat_decay"],
        inverse_update_period=kw["inverse_update_period"],
        num_burnin_steps=0,
        multi_device=False,
    )
    return self.optimizer.init(params, jax.random.key(0), (x, y))


def kfac_jax_peer(learning_rate, *, damping: float = 1e-3, stat_decay: float = 0.05,
                  inverse_update_period: int = 10, scaling: Optional[str] = "kl_clip",
                  kl_clip: float = 1e-3, momentum: float = 0.9,
                  weight_decay: float = 0.0) -> KfacJaxPeer:
  """kfac-jax with the settings of ``eva_optax.kfac(learning_rate, ...)`` of the same names (in
  our units; converted for kfac-jax as the module docstring says)."""
  if scaling not in ("kl_clip", None):
    raise ValueError("the kfac_jax peer supports scaling='kl_clip' (norm_constraint) or None.")
  return KfacJaxPeer(learning_rate, dict(
      damping=damping, stat_decay=stat_decay, inverse_update_period=inverse_update_period,
      scaling=scaling, kl_clip=kl_clip, momentum=momentum, weight_decay=weight_decay))
