"""The optimizers a benchmark can run, and the ``NAME:key=value`` syntax that configures them.

Registering an optimizer is one entry in :data:`OPTIMIZERS`.
"""

from __future__ import annotations

import ast
import functools
import inspect
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

import eva_optax
from benchmarks import kfac_jax_peer
from eva_optax.eva import layer_vectors as eva_layer_vectors


class OptimizerSpec(NamedTuple):
  """How to build one optimizer.

  Attributes:
    make: ``make(learning_rate, **kwargs) -> optax.GradientTransformation``.
    statistics: ``None`` for first-order optimizers (``jax.value_and_grad``), else the
      ``statistics`` argument of ``eva_optax.flax.value_and_grad`` whose output the update needs
      as ``curvature``.
    default_lr: learning rate per task name.
    defaults: keyword arguments passed to ``make`` unless the command line overrides them.
    task_defaults: per task name, keyword arguments that replace ``defaults`` on that task.
    diagnostics: optional ``(grads, opt_state, kwargs) -> {layer: {name: scalar}}`` reported
      for the final state (``kwargs``: every keyword argument ``make`` received).
    needs_model: ``make`` also takes ``params``, ``layouts`` and ``head`` (the task's output
      layer) to decide which parameters get which update (Muon).
    capture: further keyword arguments of ``eva_optax.flax.value_and_grad`` (e.g.
      ``statistics_batch_size``).
  """

  make: Callable[..., optax.GradientTransformation]
  statistics: Optional[str] = None
  default_lr: Mapping[str, float] = {}
  defaults: Mapping[str, Any] = {}
  task_defaults: Mapping[str, Mapping[str, Any]] = {}
  diagnostics: Optional[Callable[..., Mapping]] = None
  needs_model: bool = False
  capture: Mapping[str, Any] = {}


def _eva_diagnostics(grads, opt_state, kwargs):
  """``eva_optax.eva_diagnostics`` plus ``g_norm``, the norm of the output-side Kronecker
  vector (per slice): ‖ḡ‖ for the means, √λ_g for the eigenvectors."""
  stats = optax.tree_utils.tree_get(opt_state, "stats")
  out = eva_optax.eva_diagnostics(
      grads, stats, damping=kwargs["damping"], damping_mode=kwargs["damping_mode"],
      relative_damping=kwargs["relative_damping"], layouts=kwargs.get("layouts"))
  return {name: {**values, "g_norm": jnp.linalg.norm(
      eva_layer_vectors(stats[name], False).g, axis=-1)}
          for name, values in out.items()}


def _per_task(digits_mlp, mnist_autoencoder, mnist_mlp, mnist_cnn, cifar10_resnet=None,
              shakespeare_char=None) -> dict[str, float]:
  lrs = dict(digits_mlp=digits_mlp, mnist_autoencoder=mnist_autoencoder, mnist_mlp=mnist_mlp,
             mnist_cnn=mnist_cnn, cifar10_resnet=cifar10_resnet,
             shakespeare_char=shakespeare_char)
  return {task: lr for task, lr in lrs.items() if lr is not None}


# Eva's learning rates per task (issue 2's and 13's tuning).
_EVA_LRS = _per_task(0.3, 0.5, 0.1, 0.1, cifar10_resnet=0.1, shakespeare_char=0.1)


def _eva_variant(statistics: str, **capture) -> OptimizerSpec:
  """Eva with other ``statistics`` (issue 14's arms) at Eva's learning rates."""
  return OptimizerSpec(functools.partial(eva_optax.eva, statistics=statistics), statistics,
                       _EVA_LRS, diagnostics=_eva_diagnostics, capture=capture)


def sgd_nesterov(learning_rate, *, momentum: float = 0.9, weight_decay: float = 5e-4):
  """The standard CIFAR recipe: SGD with Nesterov momentum and L2 weight decay added to the
  gradient (``optax.add_decayed_weights`` before ``optax.sgd``)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum, nesterov=True))


def adamw(learning_rate, *, b2: float = 0.99, weight_decay: float = 0.1):
  """``optax.adamw`` with the character-level Transformer recipe's β₂ and weight decay."""
  return optax.adamw(learning_rate, b2=b2, weight_decay=weight_decay)


def muon_dimension_numbers(params, layouts, head: Optional[str]):
  """Muon's per-parameter matrix view: every kernel the capture sees (``layouts`` from
  ``CaptureInfo``: stacked axes are Muon's batch axes, the output axes its output axes, the rest
  its reduction axes) except the ``head`` layer; ``None`` (Adam) for embeddings, norms, biases
  and the head, as optax's Muon documentation recommends."""
  layouts = eva_optax.transform.flat_layouts(layouts)
  kernels = eva_optax.layers.find_layers(params, layouts)

  def spec(path, leaf):
    keys = eva_optax.layers.dict_path(path)
    name = eva_optax.layers.layer_name(keys[:-1])
    layout = layouts.get(name, eva_optax.Layout())
    if name not in kernels or name == head or keys[-1] != layout.kernel:
      return None
    outputs = leaf.ndim - layout.output_axes
    return optax.contrib.MuonDimensionNumbers(tuple(range(layout.stacked_axes, outputs)),
                                              tuple(range(outputs, leaf.ndim)))

  return jax.tree_util.tree_map_with_path(spec, params)


def muon(learning_rate, *, adam_lr_ratio: float = 0.05, beta: float = 0.95,
         adam_b2: float = 0.99, params=None, layouts=None, head=None):
  """``optax.contrib.muon`` on the hidden matrices (:func:`muon_dimension_numbers`) with Adam on
  the rest at ``adam_lr_ratio`` × the learning rate (the same schedule)."""
  adam_lr = (lambda t: adam_lr_ratio * learning_rate(t)) if callable(learning_rate) else (
      adam_lr_ratio * learning_rate)
  return optax.contrib.muon(
      learning_rate, beta=beta, adam_b2=adam_b2, adam_learning_rate=adam_lr,
      muon_weight_dimension_numbers=muon_dimension_numbers(params, layouts, head))


# Shakespeare: γ = 1 as in the Transformer step benchmark (RESULTS.md, issue 11; damping not
# tuned, the learning rate tuned like every optimizer's: RESULTS.md, issue 13).
_KFAC_AUTOENCODER = {"mnist_autoencoder": {"damping": 10.0, "kl_clip": 3.0},
                     "shakespeare_char": {"damping": 1.0}}

# Learning rates: the best final training loss of the grids in benchmarks/RESULTS.md (mnist_mlp:
# DESIGN §4's prototype values, not re-tuned).
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(optax.sgd, None, _per_task(0.3, 0.003, 0.05, 0.1), {"momentum": 0.9}),
    "adam": OptimizerSpec(optax.adam, None, _per_task(3e-2, 1e-3, 1e-3, 1e-3)),
    # The peers of the real workloads. cifar10_resnet: the standard recipes, not tuned (CPU
    # budget); shakespeare_char: AdamW the published recipe, the others the best final training
    # loss of a 3-4 point grid at a 200-step proxy (benchmarks/RESULTS.md, issue 13).
    "sgd_nesterov": OptimizerSpec(sgd_nesterov, None, _per_task(
        None, None, None, None, cifar10_resnet=0.1, shakespeare_char=0.3)),
    "adamw": OptimizerSpec(adamw, None, _per_task(
        None, None, None, None, cifar10_resnet=1e-3, shakespeare_char=1e-3)),
    "muon": OptimizerSpec(muon, None, _per_task(
        None, None, None, None, cifar10_resnet=0.02, shakespeare_char=0.02), needs_model=True),
    "eva": OptimizerSpec(eva_optax.eva, "kronecker_vectors", _EVA_LRS,
                         diagnostics=_eva_diagnostics),
    # Issue 14's variants (benchmarks/RESULTS.md): the leading eigenvectors of the Kronecker
    # factors instead of the means; the empirical Fisher's leading Kronecker-product
    # eigenvector (a, g coupled per row); the reference's statistics on the first 16 examples
    # of each batch (its kfac_batch_size). Eva's learning rates, not re-tuned.
    "eva_eigen": _eva_variant("kronecker_eigenvectors"),
    "eva_fisher": _eva_variant("fisher_eigenvectors"),
    "eva_gradient": _eva_variant("gradient_singular_vectors"),
    "eva_subset": _eva_variant("kronecker_vectors", statistics_batch_size=16),
    # Autoencoder: the KL clip binds at lr 300, so the step is √κ-normalized (capped by the cosine
    # schedule's lr); γ = 10, κ = 3 sit in the region of the grid (RESULTS.md, issue 3) where
    # every neighbour also trained.
    "kfac": OptimizerSpec(eva_optax.kfac, "kronecker_factors", _per_task(
        0.3, 300.0, 0.1, 0.1, cifar10_resnet=0.1, shakespeare_char=0.3),
                          task_defaults=_KFAC_AUTOENCODER),
    # The same lrs and keyword defaults as kfac: an equal-settings peer (benchmarks/RESULTS.md).
    "kfac_jax": OptimizerSpec(kfac_jax_peer.kfac_jax_peer, None, _per_task(
        0.3, 300.0, 0.1, 0.1, cifar10_resnet=0.1, shakespeare_char=0.1),
                              task_defaults=_KFAC_AUTOENCODER),
    # shakespeare_char: the grid's pick 0.3 diverged in the full 2,000-step run (RESULTS.md).
    "foof": OptimizerSpec(eva_optax.foof, "activation_factor", _per_task(
        0.3, 0.3, 0.1, 0.1, cifar10_resnet=0.1, shakespeare_char=0.1)),
    "eva_f": OptimizerSpec(eva_optax.eva_f, "activation_vector", _per_task(
        0.3, 0.5, 0.1, 0.1, cifar10_resnet=0.1, shakespeare_char=0.3)),
    # λ 0.3 (the paper's) is the default. Autoencoder lr 0.1: the paper's 0.3 diverged here
    # (benchmarks/RESULTS.md, issue 6); the classifier lrs are K-FAC's, not tuned for K-BFGS.
    # The second pass gets `curvature_fn` from train.make_step.
    "kbfgs": OptimizerSpec(eva_optax.kbfgs, eva_optax.KBFGS_STATISTICS,
                           _per_task(0.3, 0.1, 0.1, 0.1, cifar10_resnet=0.1,
                                     shakespeare_char=0.3)),
    "kbfgs_l": OptimizerSpec(eva_optax.kbfgs_l, eva_optax.KBFGS_STATISTICS,
                             _per_task(0.3, 0.1, 0.1, 0.1, cifar10_resnet=0.1,
                                       shakespeare_char=0.01)),
    # Gradient-only (statistics None); lrs: best of the grids in benchmarks/RESULTS.md (issue 4;
    # mnist_cnn: 20k-example subset). Shampoo's roots every 10 steps: on 2 CPU cores a refresh of
    # the autoencoder's ~400 blocks costs seconds.
    "shampoo": OptimizerSpec(eva_optax.shampoo, None, _per_task(
        0.03, 0.003, 0.003, 0.003, cifar10_resnet=0.003, shakespeare_char=0.003),
                             {"preconditioning_compute_steps": 10}),
    "eva_s": OptimizerSpec(eva_optax.eva_s, None, _per_task(
        0.5, 0.003, 0.2, 0.1, cifar10_resnet=0.1, shakespeare_char=0.1)),
}


class RunConfig(NamedTuple):
  """One ``--optimizers`` entry: its label (the entry itself), registry name, lr and kwargs."""

  label: str
  name: str
  lr: Optional[float]
  kwargs: dict[str, Any]


def _value(text: str) -> Any:
  if text.lower() == "none":
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word such as kl_clip or absolute


def parse_entry(entry: str) -> RunConfig:
  """Parses ``NAME`` or ``NAME:key=value:...``; ``lr`` sets the learning rate, the other keys
  are keyword arguments of the optimizer's ``make``. Values are Python literals, ``none`` or
  bare strings.

  Raises:
    ValueError: an unknown optimizer, a malformed ``key=value`` or a key ``make`` does not take.
  """
  name, *pairs = entry.strip().split(":")
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r} in {entry!r}; choose from {sorted(OPTIMIZERS)}.")
  params = inspect.signature(OPTIMIZERS[name].make).parameters
  first = next(iter(params))  # the learning rate, set through `lr`
  accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
  lr, kwargs = None, {}
  for pair in pairs:
    key, sep, text = pair.partition("=")
    if not sep or not key:
      raise ValueError(f"expected key=value, got {pair!r} in {entry!r}.")
    if key == "lr":
      lr = _value(text)
    elif (key in params and key != first) or accepts_any:
      kwargs[key] = _value(text)
    else:
      known = sorted(k for k in params if k != first)
      raise ValueError(f"{name} takes no argument {key!r} (in {entry!r}); use lr or {known}.")
  return RunConfig(entry.strip(), name, lr, kwargs)


def _given_kwargs(config: RunConfig, task: str) -> dict[str, Any]:
  spec = OPTIMIZERS[config.name]
  return {**spec.defaults, **spec.task_defaults.get(task, {}), **config.kwargs}


def make_kwargs(config: RunConfig, task: str) -> dict[str, Any]:
  """Every keyword argument the run's ``make`` receives or defaults on ``task``: signature
  defaults, then the registry's ``defaults`` and ``task_defaults``, then the command line's."""
  params = inspect.signature(OPTIMIZERS[config.name].make).parameters.values()
  signature = {p.name: p.default for p in params if p.default is not p.empty}
  return {**signature, **_given_kwargs(config, task)}


def make(config: RunConfig, task: str, learning_rate, layouts=None, params=None,
         head: Optional[str] = None):
  """The run's optimizer on ``task`` with ``learning_rate`` (a float or an optax schedule);
  capture-based optimizers also get the model's ``layouts`` (``CaptureInfo.layouts``), and one
  that ``needs_model`` the initial ``params``, ``layouts`` and the output layer's name ``head``."""
  spec = OPTIMIZERS[config.name]
  extra = {"layouts": layouts} if spec.statistics is not None and layouts else {}
  if spec.needs_model:
    extra = {"params": params, "layouts": layouts, "head": head}
  return spec.make(learning_rate, **_given_kwargs(config, task), **extra)


def learning_rate(config: RunConfig, task: str) -> float:
  """The run's ``lr``, else the registry's default for ``task``."""
  if config.lr is not None:
    return config.lr
  lrs = OPTIMIZERS[config.name].default_lr
  if task not in lrs:
    raise ValueError(f"{config.name} has no default learning rate for {task}; pass "
                     f"{config.name}:lr=VALUE.")
  return lrs[task]
