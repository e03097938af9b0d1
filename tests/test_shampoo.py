"""Shampoo against a dense NumPy implementation of DESIGN §4's formulas."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax

EPS, GRAFT_EPS = 1e-6, 1e-8


def _np_root(s, p, eps=EPS):
  """(S + ε λ_max I)^{-1/p} in float64."""
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * (w + eps * w[-1]) ** (-1.0 / p)) @ v.T


def _np_block_ranges(size, block):
  return [(s, min(s + block, size)) for s in range(0, size, block)]


def _np_mode_product(x, m, mode):
  return np.moveaxis(np.tensordot(m, x, axes=([1], [mode])), 0, mode)


def _np_gram(x, mode):
  other = [a for a in range(x.ndim) if a != mode]
  return np.tensordot(x, x, axes=(other, other))


def _np_graft(graft, grads):
  """Graft direction of the last gradient (AdaGrad: Σ g² over all steps; SGD: g)."""
  g = grads[-1]
  if graft == "sgd":
    return g
  return g / (np.sqrt(sum(x * x for x in grads)) + GRAFT_EPS)


def _np_shampoo(grads, merged, block, beta2, graft, exponent_override=0):
  """The direction of the last of ``grads`` when roots are refreshed on that step."""
  w = 1.0 if beta2 == 1 else 1 - beta2
  shape = grads[-1].shape
  ms = [g.reshape(merged).astype(np.float64) for g in grads]
  k = len(merged)
  p = exponent_override or 2 * k
  out = np.zeros(merged)
  for ranges in itertools.product(*[_np_block_ranges(d, block) for d in merged]):
    index = tuple(slice(a, b) for a, b in ranges)
    x = ms[-1][index]
    for mode in range(k):
      stat = EPS * np.eye(x.shape[mode])
      for g in ms:
        stat = beta2 * stat + w * _np_gram(g[index], mode)
      x = _np_mode_product(x, _np_root(stat, p), mode)
    out[index] = x
  graft_step = _np_graft(graft, [g.astype(np.float64) for g in grads])
  return (out * np.linalg.norm(graft_step) / np.linalg.norm(out)).reshape(shape)


def _run(tx, grads_seq, params):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for grads in grads_seq:
    out, state = update(grads, state)
  return out, state


# (shape, block_size, merged shape DESIGN §4 expects, exponent_override)
CASES = [
    ((10, 6), 4, (10, 6), 0),           # matrix, uneven blocks 4+4+2 × 4+2, p = 4
    ((2, 3, 5), 6, (6, 5), 0),          # rank 3 merged to a matrix: p = 4, not 6
    ((3, 5, 7), 4, (3, 5, 7), 0),       # rank 3, blocks 3 × (4+1) × (4+3), p = 6
    ((3, 3, 4, 5), 4, (3, 3, 4, 5), 0),  # rank 4 (conv kernel), p = 8, a 1-wide block
    ((1, 9, 4), 16, (9, 4), 0),         # a size-1 dim dropped
    ((8, 6), 8, (8, 6), 2),             # exponent_override: S^{-1/2} per side
]


@pytest.mark.parametrize("graft,beta2,root_method", [("adagrad", 1.0, "newton"),
                                                     ("sgd", 0.9, "eigh")])
@pytest.mark.parametrize("shape,block,merged,override", CASES)
def test_one_step_equals_dense_numpy(shape, block, merged, override, graft, beta2,
                                     root_method):
  assert eva_optax.merge_small_dims(shape, block) == merged
  rng = np.random.default_rng(len(shape) * 10 + block)
  grads = [rng.normal(size=shape).astype(np.float32) for _ in range(3)]
  tx = eva_optax.scale_by_shampoo(block, beta2=beta2, graft_type=graft,
                                  start_preconditioning_step=0, exponent_override=override,
                                  root_method=root_method)
  got, _ = _run(tx, [{"w": jnp.asarray(g)} for g in grads], {"w": jnp.zeros(shape)})
  want = _np_shampoo(grads, merged, block, beta2, graft, override)
  # Float32 statistics (condition numbers of these 3-sample grams ≤ ~1e3) and float32 roots:
  # relative errors ~u·κ/p ≲ 1e-5 per root, compounded over ≤ 4 modes and the rescaling.
  np.testing.assert_allclose(got["w"], want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_rank_one_and_huge_dims_get_the_graft_update_only():
  rng = np.random.default_rng(0)
  params = {"bias": jnp.zeros(7), "wide": jnp.zeros((3, 20)), "scalar": jnp.zeros(())}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
           for _ in range(2)]
  tx = eva_optax.scale_by_shampoo(4, start_preconditioning_step=0,
                                  skip_preconditioning_dim_size_gt=16)
  got, state = _run(tx, grads, params)
  assert all(s == () for s in state.stats.values())
  for name in params:
    want = _np_graft("adagrad", [np.asarray(g[name], np.float64) for g in grads])
    np.testing.assert_allclose(got[name], want, rtol=1e-5)


def test_roots_refresh_exactly_on_the_configured_steps_and_graft_before_start():
  start, period, steps = 2, 3, 10
  rng = np.random.default_rng(1)
  params = {"w": jnp.zeros((6, 5))}
  tx = eva_optax.scale_by_shampoo(4, start_preconditioning_step=start,
                                  preconditioning_compute_steps=period)
  state = tx.init(params)
  update = jax.jit(tx.update)
  history, refreshed = [], []
  for step in range(steps):
    g = rng.normal(size=(6, 5)).astype(np.float32)
    history.append(g)
    before = jax.tree.leaves(state.preconditioner)
    out, state = update({"w": jnp.asarray(g)}, state)
    after = jax.tree.leaves(state.preconditioner)
    if any(not np.array_equal(a, b) for a, b in zip(before, after)):
      refreshed.append(step)
    if step < start:  # the graft update alone
      np.testing.assert_allclose(out["w"], _np_graft("adagrad", history), rtol=1e-6)
    elif step in (start, start + period):  # fresh roots from this step's statistics
      np.testing.assert_allclose(out["w"], _np_shampoo(history, (6, 5), 4, 1.0, "adagrad"),
                                 rtol=2e-4, atol=1e-5)
  assert refreshed == [2, 5, 8]


def test_a_non_finite_gradient_keeps_the_previous_roots():
  params = {"w": jnp.zeros((4, 4))}
  tx = eva_optax.scale_by_shampoo(4, start_preconditioning_step=0)
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update({"w": jnp.asarray(np.random.default_rng(2).normal(size=(4, 4)),
                                      jnp.float32)}, state)
  good = state.preconditioner
  _, state = update({"w": jnp.full((4, 4), jnp.nan)}, state)
  for a, b in zip(jax.tree.leaves(state.preconditioner), jax.tree.leaves(good)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])
def test_a_bad_gradient_is_skipped_like_a_zero_one(bad):
  # With β₂ = 1 and the AdaGrad graft a zero gradient adds nothing to the statistics or the
  # graft, and its update is 0: exactly what skipping a step means. A NaN/Inf gradient (which
  # made statistics and graft NaN/Inf for good) and a finite 1e30 one (whose squares overflow
  # into Inf statistics, so that every later root was discarded) must leave the run
  # bit-identical to one with a zero gradient at that step.
  rng = np.random.default_rng(0)
  grads = [jnp.asarray(rng.normal(size=(6, 5)), jnp.float32) for _ in range(6)]
  tx = eva_optax.scale_by_shampoo(4)
  update = jax.jit(tx.update)

  def run(injected):
    state, updates = tx.init({"w": grads[0]}), []
    for i, g in enumerate(grads):
      out, state = update({"w": injected if i == 2 else g}, state)
      updates.append(out["w"])
    return updates, state

  got, got_state = run(jnp.full((6, 5), bad, jnp.float32).at[0, 0].set(1.0))
  want, want_state = run(jnp.zeros((6, 5), jnp.float32))
  # The skipped step's update: NaN for a non-finite gradient (optax.apply_if_finite skips it),
  # 0 for a finite one.
  assert bool(jnp.all(jnp.isfinite(got[2]))) == bool(np.isfinite(bad))
  for i in (0, 1, 3, 4, 5):
    np.testing.assert_array_equal(got[i], want[i])
  for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
    np.testing.assert_array_equal(a, b)


def test_equal_blocks_share_one_vmapped_root_computation():
  """Compile-time scaling: one root loop per (block size, p), however many layers/blocks."""
  def loops(n_layers):
    params = {f"l{i}": jnp.zeros((8, 8)) for i in range(n_layers)}
    tx = eva_optax.scale_by_shampoo(4)
    text = jax.jit(tx.update).lower(params, tx.init(params)).as_text()
    return text.count("stablehlo.while")
  # One Newton loop and one power-iteration loop per (size, p) group.
  assert loops(1) == loops(6) == 2


def test_gradient_only_update_ignores_extra_arguments_and_keeps_dtypes():
  params = {"w": jnp.zeros((6, 4), jnp.bfloat16), "b": jnp.zeros(4, jnp.bfloat16)}
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  tx = optax.chain(eva_optax.shampoo(0.1, block_size=4), optax.scale(1.0))
  out, state = jax.jit(lambda g, s, p: tx.update(g, s, p, curvature={"x": 1}, other=3))(
      grads, tx.init(params), params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(out))
  inner = state[0][0]
  assert all(x.dtype == jnp.float32
             for x in jax.tree.leaves((inner.stats, inner.preconditioner, inner.graft)))


@pytest.mark.parametrize("kwargs,match", [
    ({"block_size": 0}, "block_size must be an int >= 1"),
    ({"block_size": 2.5}, "block_size must be an int >= 1"),
    ({"preconditioning_compute_steps": 0}, "preconditioning_compute_steps must be an int >= 1"),
    ({"start_preconditioning_step": -1}, "start_preconditioning_step must be an int >= 0"),
    ({"exponent_override": -2}, "exponent_override must be an int >= 0"),
    ({"matrix_epsilon": 0.0}, "matrix_epsilon must be > 0"),
    ({"graft_epsilon": -1.0}, "graft_epsilon must be > 0"),
    ({"beta2": 1.5}, r"beta2 must lie in \[0, 1\]"),
    ({"graft_beta2": 1.0}, r"graft_beta2 must lie in \[0, 1\)"),
    ({"graft_type": "lion"}, "graft_type must be one of"),
    ({"root_method": "svd"}, "root_method must be one of"),
])
def test_bad_hyperparameters_are_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    eva_optax.shampoo(0.1, **kwargs)


def test_inject_hyperparams_needs_the_static_args():
  params = {"w": jnp.zeros((6, 4))}
  grads = {"w": jnp.ones((6, 4))}
  tx = optax.inject_hyperparams(eva_optax.shampoo, static_args=eva_optax.SHAMPOO_STATIC_ARGS)(
      learning_rate=0.1, block_size=4)
  out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert np.all(np.isfinite(out["w"]))
  bare = optax.inject_hyperparams(eva_optax.shampoo)(learning_rate=0.1, block_size=4)
  with pytest.raises(ValueError, match="static_args=eva_optax.SHAMPOO_STATIC_ARGS"):
    jax.jit(bare.update)(grads, bare.init(params), params)


@pytest.mark.parametrize("graft", ["sgd", "adagrad", "rmsprop", "adam"])
def test_every_graft_sets_the_step_norm(graft):
  rng = np.random.default_rng(3)
  g = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  tx = eva_optax.scale_by_shampoo(4, graft_type=graft, start_preconditioning_step=0)
  out, _ = jax.jit(tx.update)({"w": g}, tx.init({"w": g}))
  tx0 = eva_optax.scale_by_shampoo(4, graft_type=graft, start_preconditioning_step=5)
  graft_step, _ = jax.jit(tx0.update)({"w": g}, tx0.init({"w": g}))
  np.testing.assert_allclose(jnp.linalg.norm(out["w"]), jnp.linalg.norm(graft_step["w"]),
                             rtol=1e-5)
  assert not np.allclose(out["w"], graft_step["w"], rtol=1e-2)
