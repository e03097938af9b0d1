"""Sharded parameters (FSDP / tensor-parallel layouts, DESIGN §6): every optimizer of
test_common (one configuration each) trains a stock-Flax model whose params are laid out on a 2 × 4 ``data × model`` mesh,
with the batch on ``data``, exactly like one device, in both sharding modes — automatic axes
(``jax.device_put`` with ``NamedSharding``, the compiler propagates layouts) and explicit axes
(``AxisType.Explicit``, layouts in the types) — and its state laid out like the params: every
state leaf shaped like a param has the param's sharding after ``init`` and after each update."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from eva_optax import distributed
from test_common import ROWS, SCALED_ATOL, Net, capture_fn, second_pass

STEPS = 3
# Float32 re-association only: batch- and feature-sharded sums add in another order (test_parallel
# measures ~1e-7 per step); three steps through the KL normalization stay below 1e-5. Entries of a
# factor that nearly cancel move by the rounding of its largest summands, so the absolute
# tolerance is also 1e-6 of each array's largest entry (measured: 2.8e-6 on FOOF's 36 × 36 factor
# of the 2-D sharded kernel, relative 3e-4 on those nearly cancelling entries).
RTOL, ATOL, SCALED = 1e-5, 1e-6, 1e-6
# Net's params: the conv and the first Dense tensor-parallel over their outputs ("model"), the
# first Dense also FSDP-sharded over its inputs ("data"), the head row-parallel: every way a
# kernel's d_in and d_out axes meet the two mesh axes.
SPECS = {"Conv_0": {"kernel": P(None, None, None, "model"), "bias": P("model")},
         "Dense_0": {"kernel": P("data", "model")},
         "Dense_1": {"kernel": P("model", None), "bias": P()}}
# Explicit axes: JAX does not infer a convolution's output layout from a batch on "data" and
# output channels on "model", nor a product whose contracted axis is sharded on both sides (the
# row-parallel head after a column-parallel layer): the model would have to annotate them
# (``out_sharding``), so stock modules run there with the 2-D sharded Dense alone.
# (test_parallel's explicit tests cover the other layouts with records made by hand.)
EXPLICIT_SPECS = {"Conv_0": {"kernel": P(), "bias": P()}, "Dense_0": SPECS["Dense_0"],
                  "Dense_1": {"kernel": P(), "bias": P()}}


def _problem():
  x = jax.random.normal(jax.random.key(0), (16, 6, 6, 2))
  labels = jax.random.randint(jax.random.key(1), (16,), 0, 3)
  return Net().init(jax.random.key(2), x)["params"], x, labels


def _loss(params, x, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      Net().apply({"params": params}, x), labels).mean()


def _step(tx, statistics):
  capture = capture_fn(_loss, statistics)

  def step(params, state, x, labels):
    (_, grads), curvature = capture(params, x, labels)
    updates, state = tx.update(grads, state, params, curvature=curvature,
                               **second_pass(_loss, statistics, x, labels))
    return optax.apply_updates(params, updates), state

  return jax.jit(step)


def _param_shaped(state, params):
  """The state's subtrees with the params' structure (momentum, graft accumulators)."""
  structure = jax.tree.structure(params)
  found = []

  def visit(node):
    if jax.tree.structure(node) == structure:
      found.append(node)
    elif isinstance(node, (tuple, list, dict)) and not isinstance(node, jax.Array):
      for child in (node.values() if isinstance(node, dict) else node):
        visit(child)
  visit(state)
  return found


def _spec(x):
  return tuple(jax.typeof(x).sharding.spec) if isinstance(x, jax.core.Tracer) else tuple(
      x.sharding.spec)


def _check_layout(state, params, mesh):
  parts = _param_shaped(state, params)
  for part in parts:
    for got, want in zip(jax.tree.leaves(part), jax.tree.leaves(params)):
      assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding,
                                                                      want.sharding)
  return len(parts)


def _train(tx, statistics, params, x, labels, place, specs):
  params = place(params, specs)
  x, labels = place(x, P("data")), place(labels, P("data"))
  state = jax.jit(tx.init, out_shardings=distributed.state_shardings(tx, params))(params)
  layouts = [_check_layout(state, params, None)]
  step = _step(tx, statistics)
  for _ in range(STEPS):
    params, state = step(params, state, x, labels)
    layouts.append(_check_layout(state, params, None))
    for got, spec in zip(jax.tree.leaves(params),
                         jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))):
      assert got.sharding.is_equivalent_to(NamedSharding(got.sharding.mesh, spec), got.ndim)
  return params, state, layouts


def _placer(mesh, explicit):
  def place(tree, specs):
    specs = jax.tree.map(lambda _: specs, tree) if isinstance(specs, P) else specs
    put = (lambda x, s: jax.sharding.reshard(x, NamedSharding(mesh, s))) if explicit else (
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)))
    return jax.tree.map(put, tree, specs, is_leaf=lambda s: isinstance(s, P))
  return place


# One row per optimizer: the configuration variants of test_common (Eva's damping modes and
# scalings, K-FAC's eigh) change no array's layout, and the suite has a time budget.
SHARDED_ROWS = [row for row in ROWS if row.id in (
    "eva", "kfac", "foof", "eva_f", "shampoo", "eva_s", "kbfgs", "kbfgs_l")]


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("factory,statistics,hparams", SHARDED_ROWS)
def test_sharded_params_train_like_one_device_with_state_laid_out_alike(
    factory, statistics, hparams, explicit, request):
  assert len(jax.devices()) >= 8, "conftest.py provides 8 fake CPU devices"
  tx = factory(0.05, **hparams)
  params, x, labels = _problem()
  state = tx.init(params)
  step = _step(tx, statistics)
  want_params, want_state = params, state
  for _ in range(STEPS):
    want_params, want_state = step(want_params, want_state, x, labels)

  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(
      AxisType.Explicit if explicit else AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    got_params, got_state, layouts = _train(tx, statistics, params, x, labels,
                                            _placer(mesh, explicit),
                                            EXPLICIT_SPECS if explicit else SPECS)
  assert layouts[0] == layouts[-1]
  scaled = max(SCALED, SCALED_ATOL.get(request.node.callspec.id.rsplit("-", 1)[0], 0.0))
  for a, b in zip(jax.tree.leaves((got_params, got_state)),
                  jax.tree.leaves((want_params, want_state))):
    atol = max(ATOL, scaled * float(np.max(np.abs(np.asarray(b, np.float64)), initial=0.0)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=atol)
