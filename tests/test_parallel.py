"""Data parallelism (DESIGN §6): pmap, shard_map and jit with a sharded batch on 4 CPU devices
train exactly like one device on the global batch, for one optimizer of test_common per kind of
captured statistics (and one gradient-only optimizer)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import eva_optax
from test_common import ROWS, Net, capture_fn, scaled_atol, second_pass

DEVICES, LOCAL, STEPS = 4, 8, 3
# Float32 re-association only: per-device means and a pmean instead of one global mean change
# the rounding of every statistic and gradient by ~1e-7 relative; three steps through the KL
# normalization's global sum keep the drift below 1e-5.
RTOL, ATOL = 1e-5, 1e-6
# What parallelism can break is the capture and the averaging of statistics across devices; the
# preconditioners' math is device-local. So one row per captured kind (and Shampoo for the
# gradient-only path with roots under lax.cond) covers it: the variants (eigh, K-BFGS(L), Eva's
# damping modes, Eva-s) are left to test_common, which keeps the suite within its time budget.
PARALLEL_ROWS = [row for row in ROWS
                 if row.id in ("eva", "kfac", "foof", "eva_f", "shampoo", "kbfgs")]


def _data():
  x = jax.random.normal(jax.random.key(0), (DEVICES * LOCAL, 6, 6, 2))
  labels = jax.random.randint(jax.random.key(1), (DEVICES * LOCAL,), 0, 3)
  params = Net().init(jax.random.key(2), x)["params"]
  return params, x, labels


def _loss(params, x, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      Net().apply({"params": params}, x), labels).mean()


def _step_fn(tx, statistics, axis_name=None, mapper=None):
  capture = capture_fn(_loss, statistics, axis_name)

  def step(params, state, x, labels):
    (loss, grads), curvature = capture(params, x, labels)
    # The usual data-parallel gradient average; the capture already averaged the statistics.
    if mapper == "pmap":
      grads, loss = jax.lax.pmean((grads, loss), axis_name)
    elif mapper == "shard_map":  # gradients of replicated params arrive summed over devices
      grads = jax.tree.map(lambda g: g / jax.lax.axis_size(axis_name), grads)
      loss = jax.lax.pmean(loss, axis_name)
    updates, state = tx.update(grads, state, params, curvature=curvature,
                               **second_pass(_loss, statistics, x, labels, axis_name=axis_name))
    return optax.apply_updates(params, updates), state, loss

  return step


def _run(step, params, state, batches):
  for x, labels in batches:
    params, state, _ = step(params, state, x, labels)
  return params, state


def _single_device(tx, statistics):
  params, x, labels = _data()
  return _run(jax.jit(_step_fn(tx, statistics)), params, tx.init(params),
              [(x, labels)] * STEPS)


def _assert_close(got, want, scaled=0.0):
  """``scaled``: extra absolute tolerance relative to each array's largest entry (test_common's
  SCALED_ATOL rows)."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    atol = max(ATOL, scaled * float(np.max(np.abs(np.asarray(b, np.float64)), initial=0.0)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=atol)


@pytest.mark.parametrize("factory,statistics,hparams", PARALLEL_ROWS)
def test_pmap_equals_one_device_on_the_global_batch(factory, statistics, hparams, request):
  tx = factory(0.05, **hparams)
  params, x, labels = _data()
  replicate = lambda tree: jax.tree.map(lambda v: jnp.stack([v] * DEVICES), tree)
  step = jax.pmap(_step_fn(tx, statistics, "data", "pmap"), axis_name="data")
  shards = (x.reshape(DEVICES, LOCAL, *x.shape[1:]), labels.reshape(DEVICES, LOCAL))
  p, s = _run(step, replicate(params), replicate(tx.init(params)), [shards] * STEPS)
  # Every replica holds the same parameters and optimizer state, equal to one device's.
  for leaf in jax.tree.leaves((p, s)):
    for replica in leaf[1:]:
      np.testing.assert_array_equal(replica, leaf[0])
  _assert_close(jax.tree.map(lambda v: v[0], (p, s)), _single_device(tx, statistics),
                scaled_atol(request))


@pytest.mark.parametrize("factory,statistics,hparams", PARALLEL_ROWS)
def test_shard_map_equals_one_device_on_the_global_batch(factory, statistics, hparams, request):
  tx = factory(0.05, **hparams)
  params, x, labels = _data()
  mesh = jax.make_mesh((DEVICES,), ("data",))
  step = jax.jit(jax.shard_map(_step_fn(tx, statistics, "data", "shard_map"), mesh=mesh,
                               in_specs=(P(), P(), P("data"), P("data")),
                               out_specs=(P(), P(), P())))
  shard = lambda v: jax.device_put(v, NamedSharding(mesh, P("data")))
  replicated = lambda tree: jax.device_put(tree, NamedSharding(mesh, P()))
  got = _run(step, replicated(params), replicated(tx.init(params)),
             [(shard(x), shard(labels))] * STEPS)
  _assert_close(got, _single_device(tx, statistics), scaled_atol(request))


@pytest.mark.parametrize("factory,statistics,hparams", PARALLEL_ROWS)
def test_jit_with_a_sharded_batch_needs_no_axis_name_and_stays_replicated(factory, statistics,
                                                                         hparams, request):
  tx = factory(0.05, **hparams)
  params, x, labels = _data()
  mesh = jax.make_mesh((DEVICES,), ("data",))
  shard = lambda v: jax.device_put(v, NamedSharding(mesh, P("data")))
  replicated = lambda tree: jax.device_put(tree, NamedSharding(mesh, P()))
  step = jax.jit(_step_fn(tx, statistics))
  p, s = _run(step, replicated(params), replicated(tx.init(params)),
              [(shard(x), shard(labels))] * STEPS)
  for leaf in jax.tree.leaves((p, s)):
    assert leaf.sharding.is_fully_replicated, leaf.sharding
  _assert_close((p, s), _single_device(tx, statistics), scaled_atol(request))


def test_statistics_are_averaged_so_replicas_agree_on_different_data():
  params, x, labels = _data()
  capture = eva_optax.flax.value_and_grad(_loss, statistics="kronecker_vectors",
                                          axis_name="data")
  _, curvature = jax.pmap(capture, axis_name="data", in_axes=(None, 0, 0))(
      params, x.reshape(DEVICES, LOCAL, *x.shape[1:]), labels.reshape(DEVICES, LOCAL))
  assert not np.allclose(x[:LOCAL].mean(), x[LOCAL:2 * LOCAL].mean())  # the shards differ
  for leaf in jax.tree.leaves(curvature):
    for replica in leaf[1:]:
      np.testing.assert_array_equal(replica, leaf[0])


@pytest.mark.parametrize("axis_name,match", [
    (None, r"axis_name is None.*Pass axis_name='data'"),
    ("batch", r"axis_name='batch' is not an axis.*\['data'\]"),
])
@pytest.mark.parametrize("mapper", ["pmap", "shard_map"])
def test_missing_or_mismatched_axis_name_is_an_error(axis_name, match, mapper):
  params, x, labels = _data()
  capture = eva_optax.flax.value_and_grad(_loss, statistics="kronecker_vectors",
                                          axis_name=axis_name)
  with pytest.raises(ValueError, match=match):
    if mapper == "pmap":
      jax.pmap(capture, axis_name="data", in_axes=(None, 0, 0))(
          params, x.reshape(DEVICES, LOCAL, *x.shape[1:]), labels.reshape(DEVICES, LOCAL))
    else:
      mesh = jax.make_mesh((DEVICES,), ("data",))
      shard = lambda v: jax.device_put(v, NamedSharding(mesh, P("data")))
      jax.jit(jax.shard_map(lambda *a: capture(*a)[1], mesh=mesh,
                            in_specs=(P(), P("data"), P("data")), out_specs=P()))(
          jax.device_put(params, NamedSharding(mesh, P())), shard(x), shard(labels))


@pytest.mark.data
def test_data_parallel_example_agrees_across_modes(mnist_dir):
  from benchmarks import data_parallel
  results = data_parallel.main(["--steps", "5", "--data-dir", mnist_dir])
  assert len(results) == 3
  for mode, result in results.items():
    assert result["max_param_diff"] < 1e-5, (mode, result)
    assert np.isfinite(result["final_loss"])
