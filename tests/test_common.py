"""Behaviour every optimizer shares, one row per optimizer (optax's `_common_test` pattern).

A new optimizer joins by adding a row to OPTIMIZERS: (name, factory(learning_rate, **kw),
the `statistics` its curvature needs — None for gradient-only optimizers —, extra
hyperparameters for inject_hyperparams). Optimizers with statistics also get a `curvature_fn`
(the same statistics at trial parameters, same batch): K-BFGS needs it, the others ignore it.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax

OPTIMIZERS = [
    ("eva", eva_optax.eva, "kronecker_vectors", {"damping": 1.0}),
    ("eva_absolute_kl_clip",
     functools.partial(eva_optax.eva, damping_mode="absolute", scaling="kl_clip"),
     "kronecker_vectors", {"damping": 10.0}),
    ("eva_unscaled_nesterov",
     functools.partial(eva_optax.eva, scaling=None, nesterov=True, weight_decay=1e-4),
     "kronecker_vectors", {"damping": 1.0}),
    # A KL clip that binds at both learning rates makes the update independent of the rate
    # (tested in test_kfac); here it is loose so inject_hyperparams' rate shows.
    ("kfac", functools.partial(eva_optax.kfac, inverse_update_period=2), "kronecker_factors",
     {"damping": 1e-2, "kl_clip": 10.0}),
    ("kfac_eigh_unscaled", functools.partial(eva_optax.kfac, inverse="eigh", scaling=None),
     "kronecker_factors", {"damping": 1.0}),
    ("foof", functools.partial(eva_optax.foof, inverse_update_period=2), "activation_factor",
     {"damping": 1e-1, "kl_clip": 10.0}),
    ("eva_f", eva_optax.eva_f, "activation_vector", {"damping": 1.0}),
    # Gradient-only. Shampoo's structural ints stay Python ints (inject_hyperparams would trace
    # them); block 4 and roots every 2 steps from update 1 exercise blocks and the root path.
    ("shampoo", lambda learning_rate, matrix_epsilon, momentum=0.9: eva_optax.shampoo(
        learning_rate, block_size=4, start_preconditioning_step=1,
        preconditioning_compute_steps=2, matrix_epsilon=matrix_epsilon, momentum=momentum), None,
     {"matrix_epsilon": 1e-2}),
    ("eva_s", eva_optax.eva_s, None, {"damping": 1e-3}),
    ("kbfgs", eva_optax.kbfgs, eva_optax.KBFGS_STATISTICS, {"damping": 0.3}),
    ("kbfgs_l", functools.partial(eva_optax.kbfgs_l, memory_size=4), eva_optax.KBFGS_STATISTICS,
     {"damping": 0.3}),
]
ROWS = [pytest.param(*row[1:], id=row[0]) for row in OPTIMIZERS]
# Rows whose state comparisons need an absolute tolerance relative to each array's largest entry:
# K-BFGS's pair s = ȳ − ȳ⁺ is the difference of two nearby float32 means, so another summation
# order (eager vs jit, one device vs a pmean) moves s, and H^g with it, by up to ~3e-5 of their
# scale (measured: 2.5e-5 on s, 1.6e-5 on H^g after three steps).
SCALED_ATOL = {"kbfgs": 1e-4, "kbfgs_l": 1e-4}


def scaled_atol(request) -> float:
  """The row's :data:`SCALED_ATOL` (0 for the others), from the test's parameter id."""
  return SCALED_ATOL.get(request.node.callspec.id, 0.0)


class Net(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    x = nn.relu(nn.Conv(4, (3, 3), strides=2, **kw)(x))
    x = nn.relu(nn.Dense(8, use_bias=False, **kw)(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, **kw)(x)


def _problem(dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(0), (32, 6, 6, 2)).astype(dtype)
  labels = jax.random.randint(jax.random.key(1), (32,), 0, 3)
  model = Net(dtype)
  # Initialise in float32 and cast, so both dtypes start from the same point.
  params = jax.tree.map(lambda p: p.astype(dtype),
                        Net().init(jax.random.key(2), x.astype(jnp.float32))["params"])

  def loss_fn(p):
    logits = model.apply({"params": p}, x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return params, loss_fn


def capture_fn(loss_fn, statistics, axis_name=None):
  """``(params, *args) -> ((loss, grads), curvature)``; ``curvature`` is None without statistics."""
  if statistics is None:
    grad_fn = jax.value_and_grad(loss_fn)
    return lambda params, *args: (grad_fn(params, *args), None)
  return eva_optax.flax.value_and_grad(loss_fn, statistics=statistics, axis_name=axis_name)


def second_pass(loss_fn, statistics, *args, axis_name=None):
  """``{"curvature_fn": trial_params -> curvature}`` on the batch ``args`` ({} without
  statistics), for ``tx.update``: K-BFGS re-measures at its trial point, the others ignore it."""
  if statistics is None:
    return {}
  return {"curvature_fn": eva_optax.flax.curvature_fn(loss_fn, *args, statistics=statistics,
                                                      axis_name=axis_name)}


def _step(tx, statistics, loss_fn):
  capture = capture_fn(loss_fn, statistics)

  def step(params, state):
    (loss, grads), curvature = capture(params)
    updates, state = tx.update(grads, state, params, curvature=curvature,
                               **second_pass(loss_fn, statistics))
    return optax.apply_updates(params, updates), state, loss

  return step


def _close(a, b, rtol=1e-5, atol=1e-6, scaled=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    scale = float(np.max(np.abs(np.asarray(y, np.float64)), initial=0.0))
    np.testing.assert_allclose(x, y, rtol=rtol, atol=max(atol, scaled * scale))


@pytest.mark.parametrize("factory,statistics,hparams", ROWS)
def test_jit_matches_eager_and_training_lowers_the_loss(factory, statistics, hparams, request):
  params, loss_fn = _problem()
  tx = factory(0.05, **hparams)
  step = _step(tx, statistics, loss_fn)
  eager = jitted = (params, tx.init(params))
  losses = []
  for _ in range(3):
    eager = step(*eager)[:2]
    p, s, loss = jax.jit(step)(*jitted)
    jitted = (p, s)
    losses.append(float(loss))
  _close(eager, jitted, rtol=1e-4, atol=1e-6, scaled=scaled_atol(request))
  for _ in range(30):
    p, s, loss = jax.jit(step)(*jitted)
    jitted = (p, s)
  assert float(loss) < 0.8 * losses[0]


@pytest.mark.parametrize("factory,statistics,hparams", ROWS)
def test_works_inside_optax_chain(factory, statistics, hparams):
  params, loss_fn = _problem()
  tx = optax.chain(optax.clip_by_global_norm(1.0), factory(0.05, **hparams),
                   optax.scale(1.0))
  p, state, loss = jax.jit(_step(tx, statistics, loss_fn))(params, tx.init(params))
  assert jnp.isfinite(loss) and all(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p))


@pytest.mark.parametrize("factory,statistics,hparams", ROWS)
def test_inject_hyperparams_learning_rate_scales_the_update(factory, statistics, hparams):
  params, loss_fn = _problem()
  tx = optax.inject_hyperparams(factory)(learning_rate=0.05, **hparams)
  (_, grads), curvature = capture_fn(loss_fn, statistics)(params)
  update = jax.jit(lambda state: tx.update(grads, state, params, curvature=curvature,
                                           **second_pass(loss_fn, statistics))[0])
  state = tx.init(params)
  small = update(state)
  state.hyperparams["learning_rate"] = jnp.asarray(0.1)
  large = update(state)
  # kl_clip may clip harder at the larger rate; the others scale linearly with it.
  ratios = [float(jnp.vdot(l, s) / jnp.vdot(s, s))
            for l, s in zip(jax.tree.leaves(large), jax.tree.leaves(small))]
  assert all(1.0 < r <= 2.0 + 1e-4 for r in ratios), ratios


@pytest.mark.parametrize("factory,statistics,hparams", ROWS)
def test_bf16_params_keep_float32_statistics_and_param_dtype_updates(factory, statistics,
                                                                     hparams):
  params32, loss32 = _problem(jnp.float32)
  params16, loss16 = _problem(jnp.bfloat16)
  tx = factory(0.05, **hparams)
  updates = {}
  for name, params, loss_fn in (("f32", params32, loss32), ("bf16", params16, loss16)):
    (_, grads), curvature = capture_fn(loss_fn, statistics)(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(curvature))
    upd, state = jax.jit(lambda g, s, p, c, loss_fn=loss_fn: tx.update(
        g, s, p, curvature=c, **second_pass(loss_fn, statistics)))(
            grads, tx.init(params), params, curvature)
    # Statistics, inverses and roots stay float32 (DESIGN §5); momentum may follow the params.
    for field in ("stats", "preconditioner"):
      held = optax.tree_utils.tree_get(state, field)
      assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(held)), field
    for u, p in zip(jax.tree.leaves(upd), jax.tree.leaves(params)):
      assert u.dtype == p.dtype
    updates[name] = upd
  # Same direction up to bf16 rounding of the forward/backward pass (8 bits of mantissa).
  flat = {k: jnp.concatenate([x.astype(jnp.float32).ravel() for x in jax.tree.leaves(v)])
          for k, v in updates.items()}
  cosine = jnp.vdot(flat["f32"], flat["bf16"]) / (
      jnp.linalg.norm(flat["f32"]) * jnp.linalg.norm(flat["bf16"]))
  assert cosine > 0.98


@pytest.mark.parametrize("factory,statistics,hparams", ROWS[:1])
def test_state_round_trips_through_an_orbax_checkpoint(factory, statistics, hparams, tmp_path):
  import orbax.checkpoint as ocp
  params, loss_fn = _problem()
  tx = factory(0.05, **hparams)
  _, state, _ = jax.jit(_step(tx, statistics, loss_fn))(params, tx.init(params))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  # The documented route: the abstract state as target (no arrays allocated to restore into).
  restored = checkpointer.restore(tmp_path / "state", jax.eval_shape(tx.init, params))
  _close(state, restored, rtol=0, atol=0)


# --- models people train: every capture-based row on a Transformer LM and an LSTM --------------

CAPTURE_ROWS = [pytest.param(*row[1:], id=row[0]) for row in OPTIMIZERS if row[2] is not None]


def _sequence_problem(kind):
  """A tiny causal Transformer LM (Embed, MHA with causal mask, LayerNorm, MLP, blocks in
  nn.scan under nn.remat) or an nn.RNN(nn.LSTMCell) classifier, with a mean loss."""
  from benchmarks.models import LSTMClassifier, TransformerLM
  if kind == "transformer":
    model = TransformerLM(vocab=11, width=16, depth=2, heads=2, context=8)
    tokens = jax.random.randint(jax.random.key(0), (8, 9), 0, 11)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
  else:
    model = LSTMClassifier(hidden=8, classes=3)
    inputs = jax.random.normal(jax.random.key(0), (16, 5, 4))
    targets = (inputs[:, :, 0].sum(axis=1) > 0).astype(jnp.int32) + (inputs[:, 0, 1] > 1)
  params = model.init(jax.random.key(1), inputs)["params"]

  def loss_fn(p):
    logits = model.apply({"params": p}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  return params, loss_fn


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
@pytest.mark.parametrize("factory,statistics,hparams", CAPTURE_ROWS)
def test_transformer_and_lstm_train_with_every_kernel_preconditioned(kind, factory, statistics,
                                                                     hparams):
  params, loss_fn = _sequence_problem(kind)
  capture = eva_optax.flax.value_and_grad(loss_fn, statistics=statistics)
  info = capture.describe(params)
  tx = optax.chain(optax.clip_by_global_norm(10.0), optax.inject_hyperparams(factory)(
      learning_rate=0.05, layouts=info.layouts, **hparams))
  step = jax.jit(_step(tx, statistics, loss_fn))
  state = tx.init(params)
  p, state, first = step(params, state)
  for _ in range(40):
    p, state, loss = step(p, state)
  assert float(loss) < 0.9 * float(first)
  (_, _), curvature = capture(params)
  rows = eva_optax.coverage(params, curvature, info)
  kernels = [r for r in rows if r.parameter.endswith("kernel")]
  assert kernels and all(r.preconditioned for r in kernels), [r for r in kernels
                                                               if not r.preconditioned]
  others = [r for r in rows if not r.parameter.endswith("kernel")]
  assert all("nn.Embed" in r.detail for r in others), others
  if kind == "transformer":
    assert {info.layouts[n] for n in info.layouts if n.endswith("query")} == {
        eva_optax.Layout(stacked_axes=1, output_axes=2)}
