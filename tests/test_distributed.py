"""The preconditioners' refresh spread over devices (``refresh_mesh``, DESIGN §6): each device
computes a slice of the stacked inverses / inverse roots and the results are gathered; training
equals the local computation, on automatic and on explicit mesh axes, on the 4 fake CPU devices
of conftest.py."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

import eva_optax
from eva_optax import distributed
from eva_optax.kfac import damped_inverse

# Each matrix goes through the same function on another device; only the CPU's batched vs
# one-at-a-time LAPACK kernels and XLA's fusion of the gathered results differ, a few float32
# ulps per refresh (measured ≤ 5e-7 after three steps of every row).
RTOL, ATOL = 1e-5, 1e-6


def _mesh(axis_type):
  return jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type,) * 2)


def _spd_stack(key, k, n):
  rows = jax.random.normal(key, (k, 2 * n, n)) * jnp.logspace(0.0, -2.0, n)
  return jnp.einsum("kri,krj->kij", rows, rows) / (2 * n)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("k", [1, 5])
def test_vmap_over_devices_equals_vmap_and_splits_the_stack(axis_type, k):
  # k = 1 and 5 need padding to a multiple of the 4 mesh devices; the padded slices are dropped.
  stack = _spd_stack(jax.random.key(k), k, 6)
  mesh = _mesh(axis_type)
  fn = functools.partial(damped_inverse, damping=1e-3)
  spread = jax.jit(lambda x: distributed.vmap_over_devices(fn, x, mesh=mesh))
  with jax.set_mesh(mesh):
    got = spread(stack)
    compiled = spread.lower(stack).compile().as_text()
  np.testing.assert_allclose(got, jax.vmap(fn)(stack), rtol=RTOL, atol=ATOL)
  assert got.sharding.is_fully_replicated
  # Each device holds ceil(k / 4) matrices of the padded stack, and the results are gathered.
  per_device = -(-k // 4)
  assert f"f32[{per_device},6,6]" in compiled
  assert "all-gather" in compiled


def test_refresh_mesh_must_be_a_mesh():
  with pytest.raises(TypeError, match="refresh_mesh must be a jax.sharding.Mesh"):
    eva_optax.kfac(0.1, refresh_mesh=("data",))


def test_refresh_mesh_under_inject_hyperparams_is_a_static_arg():
  params = {"Dense_0": {"kernel": jnp.ones((3, 2))}}
  mesh = _mesh(AxisType.Auto)
  # A Mesh is callable: without static_args inject_hyperparams wraps it as a schedule.
  with pytest.raises(TypeError, match=r"static_args=\('refresh_mesh',\)"):
    optax.inject_hyperparams(eva_optax.foof)(0.1, refresh_mesh=mesh).init(params)
  optax.inject_hyperparams(eva_optax.foof, static_args=("refresh_mesh",))(
      0.1, refresh_mesh=mesh).init(params)
  optax.inject_hyperparams(eva_optax.shampoo, static_args=eva_optax.SHAMPOO_STATIC_ARGS)(
      0.1, refresh_mesh=mesh).init(params)


# Dense layers of two sizes and a 3-layer stack (nn.scan style): groups of equal-sized matrices
# across layers and a stack's slices, with and without a bias column in A.
_PARAMS = {"a": {"kernel": (6, 5), "bias": (5,)}, "b": {"kernel": (5, 5)},
           "stack": {"kernel": (3, 6, 5)}}
_LAYOUTS = {"stack": eva_optax.Layout(stacked_axes=1)}


def _params():
  leaves, treedef = jax.tree.flatten(_PARAMS, is_leaf=lambda t: isinstance(t, tuple))
  keys = jax.random.split(jax.random.key(0), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def _records(key, kind):
  out = {}
  for i, (name, stack, d_in, d_out) in enumerate(
      [("a", (), 7, 5), ("b", (), 5, 5), ("stack", (3,), 6, 5)]):
    ka, kg = jax.random.split(jax.random.fold_in(key, i))
    a = _spd_stack(ka, int(np.prod(stack)), d_in).reshape(*stack, d_in, d_in)
    g = _spd_stack(kg, int(np.prod(stack)), d_out).reshape(*stack, d_out, d_out)
    out[name] = (eva_optax.KroneckerFactors(a, g) if kind == "kronecker_factors" else
                 eva_optax.ActivationFactor(a))
  return out


def _train(tx, kind):
  def step(carry, key):
    params, state = carry
    grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)
    extra = {} if kind is None else {"curvature": _records(key, kind)}
    updates, state = tx.update(grads, state, params, **extra)
    return (optax.apply_updates(params, updates), state), None

  params = _params()
  keys = jax.random.split(jax.random.key(1), 3)
  return jax.jit(lambda c: jax.lax.scan(step, c, keys)[0])((params, tx.init(params)))


ROWS = [
    pytest.param(functools.partial(eva_optax.kfac, inverse_update_period=2, layouts=_LAYOUTS),
                 "kronecker_factors", id="kfac"),
    pytest.param(functools.partial(eva_optax.foof, inverse_update_period=2, layouts=_LAYOUTS),
                 "activation_factor", id="foof"),
    pytest.param(functools.partial(eva_optax.shampoo, block_size=4), None, id="shampoo"),
]


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("factory,kind", ROWS)
def test_training_with_a_refresh_mesh_equals_the_local_refresh(factory, kind, axis_type):
  want = _train(factory(0.1), kind)
  mesh = _mesh(axis_type)
  with jax.set_mesh(mesh):
    got = _train(factory(0.1, refresh_mesh=mesh), kind)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(want[0]), jax.tree.leaves(_params())))
  assert moved > 1e-3  # the comparison is of trained parameters, not of the start
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)


def test_a_refresh_mesh_really_distributes_the_inverses():
  # The inverse computation of the partitioned step runs on 1 of the stack's 4 slices per
  # device (K-FAC: the three 5×5 G's and b's A, with "a"'s 7×7 and the stack's 6×6 A's).
  tx = eva_optax.kfac(0.1, layouts=_LAYOUTS, refresh_mesh=_mesh(AxisType.Auto))
  params = _params()
  state = tx.init(params)
  step = jax.jit(lambda g, s, r: tx.update(g, s, params, curvature=r))
  with jax.set_mesh(_mesh(AxisType.Auto)):
    compiled = step.lower(params, state, _records(jax.random.key(2), "kronecker_factors")
                          ).compile().as_text()
  # 5×5 group: G of a, b and the stack's 3 slices + A of b = 6 matrices → 2 per device.
  assert re.search(r"f32\[2,5,5\]", compiled)
  assert "all-gather" in compiled


def test_state_shardings_needs_placed_params():
  params = {"Dense_0": {"kernel": jax.ShapeDtypeStruct((3, 2), jnp.float32)}}
  with pytest.raises(ValueError, match="place them with jax.device_put"):
    distributed.state_shardings(eva_optax.eva(0.1), params)
