"""The capture on the layers of real models: multi-axis DenseGeneral (attention), Einsum, shared
layers (applied several times), layer stacks (nn.scan, nn.vmap), remat — statistics against an
explicit per-row computation, directions against dense Kronecker solves."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from eva_optax import layers

# Statistics: float32 sums of O(100) terms, against float64 references.
RTOL, ATOL = 2e-5, 1e-6


def _loss(out):
  return jnp.mean(jnp.sum(jnp.sin(out) * out, axis=tuple(range(1, out.ndim))))


def _explicit(model, params, x, names):
  """Per application of each layer in ``names``: its input and ∂L/∂y, by the textbook route —
  a zero perturbation added to the layer output and differentiated (no custom VJP, no probes).
  Returns ``{name: [(x, ct), ...]}`` in application order, float64."""
  seen = []

  def run(perturbations):
    calls = iter(perturbations or ())

    def hook(next_fun, args, kwargs, context):
      name = "/".join(context.module.path)
      if context.method_name != "__call__" or name not in names:
        return next_fun(*args, **kwargs)
      y = next_fun(*args, **kwargs)
      if perturbations is None:
        seen.append((name, args[0], y.shape))
        return y
      return y + next(calls)

    with nn.intercept_methods(hook):
      return _loss(model.apply({"params": params}, x))

  run(None)
  cts = jax.grad(run)([jnp.zeros(shape) for _, _, shape in seen])
  out = {name: [] for name in names}
  for (name, inputs, _), ct in zip(seen, cts):
    out[name].append((np.asarray(inputs, np.float64), np.asarray(ct, np.float64)))
  return out


def _reference(applications, contract, out_axes, has_bias, weight_sharing="expand"):
  """ā, ḡ, A, G from explicit rows (DESIGN §4, expand/reduce of Eschenhagen et al. 2023).

  ``contract``: the input's contracting axes in kernel order; ``out_axes``: the number of
  trailing output axes."""
  per_app = []
  for x, ct in applications:
    keep = [a for a in range(x.ndim) if a not in contract]
    rows_x = np.transpose(x, keep + list(contract))
    batch = x.shape[0]
    rows_x = rows_x.reshape(batch, -1, int(np.prod([x.shape[a] for a in contract])))
    rows_g = batch * ct.reshape(batch, -1, int(np.prod(ct.shape[ct.ndim - out_axes:])))
    per_app.append((rows_x, rows_g))
  r = len(per_app)
  a_bar = sum(x.reshape(-1, x.shape[-1]).mean(0) for x, _ in per_app) / r
  g_bar = sum(g.reshape(-1, g.shape[-1]).mean(0) for _, g in per_app) / r
  aug = lambda v: np.concatenate([v, np.ones(v.shape[:-1] + (1,))], -1) if has_bias else v
  if weight_sharing == "expand":
    big_a = sum(np.einsum("ni,nj->ij", aug(x.reshape(-1, x.shape[-1])),
                          aug(x.reshape(-1, x.shape[-1]))) / (x.shape[0] * x.shape[1])
                for x, _ in per_app) / r
    big_g = sum(np.einsum("bpi,bpj->ij", g, g) / g.shape[0] for _, g in per_app)
  else:
    a_n = aug(sum(x.mean(1) for x, _ in per_app) / r)
    g_n = sum(g.sum(1) for _, g in per_app)
    big_a, big_g = a_n.T @ a_n / a_n.shape[0], g_n.T @ g_n / g_n.shape[0]
  return a_bar, g_bar, big_a, big_g


def _check_statistics(model, params, x, expected_views, weight_sharing="expand"):
  """Every record of every layer in ``expected_views`` ({name: (contract, out_axes)}) equals the
  explicit reference."""
  kinds = ("kronecker_vectors", "kronecker_factors", "activation_factor", "activation_vector",
           "output_vectors")
  capture = eva_optax.flax.value_and_grad(
      lambda p, x: _loss(model.apply({"params": p}, x)), statistics=kinds,
      weight_sharing=weight_sharing)
  (_, grads), curvature = capture(params, x)
  explicit = _explicit(model, params, x, set(expected_views))
  flat = {k: eva_optax.collectors.flatten_curvature(v) for k, v in curvature.items()}
  for name, (contract, out_axes) in expected_views.items():
    has_bias = "bias" in layers.find_layers(params)[name]
    a_bar, g_bar, big_a, big_g = _reference(explicit[name], contract, out_axes, has_bias,
                                            weight_sharing)
    check = functools.partial(np.testing.assert_allclose, rtol=RTOL, atol=ATOL)
    check(flat["kronecker_vectors"][name].a, a_bar, err_msg=name)
    check(flat["kronecker_vectors"][name].g, g_bar, err_msg=name)
    check(flat["activation_vector"][name].a, a_bar, err_msg=name)
    check(flat["output_vectors"][name].g, g_bar, err_msg=name)
    check(flat["kronecker_factors"][name].a, big_a, err_msg=name)
    check(flat["activation_factor"][name].a, big_a, err_msg=name)
    check(flat["kronecker_factors"][name].g, big_g, rtol=1e-4, err_msg=name)
  return grads, curvature


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:-1]))
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(x, mask=mask)
    return nn.Dense(3, name="head")(h)


def _attention_problem():
  x = jax.random.normal(jax.random.key(0), (4, 5, 6))
  model = Attention()
  return model, model.init(jax.random.key(1), x)["params"], x


ATTENTION_VIEWS = {"attn/query": ((2,), 2), "attn/key": ((2,), 2), "attn/value": ((2,), 2),
                   "attn/out": ((2, 3), 1), "head": ((2,), 1)}


def test_attention_projections_match_explicit_rows():
  model, params, x = _attention_problem()
  _check_statistics(model, params, x, ATTENTION_VIEWS)


class Thrice(nn.Module):
  """One Dense applied three times (a recurrence), then a head."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(5, name="shared")
    h = x
    for _ in range(3):
      h = jnp.tanh(shared(h))
    return nn.Dense(3, name="head")(h)


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_a_layer_applied_three_times_accumulates_over_its_applications(weight_sharing):
  model, params, x = _thrice_problem()
  _check_statistics(model, params, x, {"shared": ((2,), 1), "head": ((2,), 1)}, weight_sharing)


class Cell(nn.Module):
  @nn.compact
  def __call__(self, h, _=None):
    return jnp.tanh(nn.Dense(5, name="shared")(h)), None


class ScanOverTime(nn.Module):
  """Thrice's recurrence as nn.scan over time with broadcast (shared) parameters."""

  @nn.compact
  def __call__(self, x):
    h, _ = nn.scan(Cell, variable_broadcast="params", split_rngs={"params": False},
                   length=3)(name="cell")(x, None)
    return nn.Dense(3, name="head")(h)


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_scan_over_time_with_shared_parameters_equals_the_python_loop(weight_sharing):
  _, _, x = _thrice_problem()
  model = ScanOverTime()
  params = model.init(jax.random.key(3), x)["params"]
  kinds = ("kronecker_vectors", "kronecker_factors", "output_vectors")
  capture = lambda m: eva_optax.flax.value_and_grad(
      lambda p: _loss(m.apply({"params": p}, x)), statistics=kinds, weight_sharing=weight_sharing)
  assert capture(model).describe(params).layouts["cell/shared"] == eva_optax.Layout(0, 1)
  (_, _), got = jax.jit(capture(model))(params)
  loop_params = {"shared": params["cell"]["shared"], "head": params["head"]}
  (_, _), want = capture(Thrice())(loop_params)
  for kind in kinds:
    for g, w in zip(got[kind]["cell"]["shared"], want[kind]["shared"], strict=True):
      np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


class EinsumModel(nn.Module):
  @nn.compact
  def __call__(self, x):  # [B, T, 6]
    h = nn.Einsum((6, 2, 4), "btd,dhk->bthk", name="split")(x)
    h = nn.Einsum((2, 4, 3), "tbhk,hkf->btf", use_bias=False, name="merge")(
        jnp.swapaxes(jnp.tanh(h), 0, 1))  # rows (t, b) in the input, (b, t) in the output
    return h


def test_an_einsum_that_moves_the_batch_axis_raises():
  x = jax.random.normal(jax.random.key(4), (4, 5, 6))
  model = EinsumModel()
  params = model.init(jax.random.key(5), x)["params"]
  with pytest.raises(NotImplementedError, match="equation"):  # rows (t, b) vs (b, t)
    _check_statistics(model, params, x, {"split": ((2,), 2)})


class EinsumBatchFirst(nn.Module):
  @nn.compact
  def __call__(self, x):  # [B, T, 6]
    h = nn.Einsum((6, 2, 4), "btd,dhk->bthk", name="split")(x)
    return nn.Einsum((2, 4, 3), "bthk,hkf->btf", use_bias=False, name="merge")(jnp.tanh(h))


def test_einsum_batch_first_matrix_multiplies_match_explicit_rows():
  x = jax.random.normal(jax.random.key(4), (4, 5, 6))
  model = EinsumBatchFirst()
  params = model.init(jax.random.key(5), x)["params"]
  _check_statistics(model, params, x, {"split": ((2,), 2), "merge": ((2, 3), 1)})


# --- directions: every capture-based preconditioner against a dense Kronecker solve -----------


def _kron_solve(left, right, matrix):
  """(left ⊗ right)⁻¹ vec(matrix) for the row-major vec of ``matrix`` [d, d_out], float64."""
  solved = np.linalg.solve(np.kron(left, right), np.asarray(matrix, np.float64).ravel())
  return solved.reshape(matrix.shape)


def _dense_direction(name, record, matrix, damping):
  """The unscaled direction of optimizer ``name`` for one layer, by dense solves (float64)."""
  rec = [np.asarray(v, np.float64) for v in record]
  d, d_out = matrix.shape
  if name == "eva":
    a = np.append(rec[0], 1.0) if len(rec[0]) < d else rec[0]
    curvature = np.kron(np.outer(a, a), np.outer(rec[1], rec[1]))
    return damping * _kron_solve(curvature + damping * np.eye(d * d_out), np.eye(1), matrix)
  if name == "eva_f":
    a = np.append(rec[0], 1.0) if len(rec[0]) < d else rec[0]
    return damping * np.linalg.solve(np.outer(a, a) + damping * np.eye(d), matrix)
  if name == "foof":
    return _kron_solve(rec[0] + damping * np.eye(d), np.eye(d_out), matrix)
  if name == "kfac":
    big_a, big_g = rec
    pi = np.sqrt((np.trace(big_a) / d) / (np.trace(big_g) / d_out))
    return _kron_solve(big_a + pi * np.sqrt(damping) * np.eye(d),
                       big_g + np.sqrt(damping) / pi * np.eye(d_out), matrix)
  # kbfgs, first step: H^a = (A + √λ I)⁻¹, H^g = I.
  return np.linalg.solve(rec[0] + np.sqrt(damping) * np.eye(d), matrix)


DIRECTIONS = [
    ("eva", "kronecker_vectors", lambda g: eva_optax.scale_by_eva(
        g, damping_mode="absolute", scaling=None, layouts=LAYOUTS)),
    ("eva_f", "activation_vector", lambda g: eva_optax.scale_by_eva_f(
        g, damping_mode="absolute", scaling=None, layouts=LAYOUTS)),
    ("foof", "activation_factor", lambda g: eva_optax.scale_by_foof(
        g, inverse_update_period=1, scaling=None, layouts=LAYOUTS)),
    ("kfac", "kronecker_factors", lambda g: eva_optax.scale_by_kfac(
        g, inverse_update_period=1, scaling=None, layouts=LAYOUTS)),
    ("kbfgs", eva_optax.KBFGS_STATISTICS, lambda g: eva_optax.scale_by_kbfgs(
        0.1, g, layouts=LAYOUTS)),
]
LAYOUTS = {"attn/query": eva_optax.Layout(0, 2), "attn/key": eva_optax.Layout(0, 2),
           "attn/value": eva_optax.Layout(0, 2)}


# Damping 1e-4 is the ill-conditioned regime (condition numbers up to ~1e4 here). K-BFGS's λ is
# in (0, 1) and enters as √λ, so its 0.1 already puts 0.3 on A's diagonal: one row.
DIRECTION_ROWS = [pytest.param(*row, damping, id=f"{row[0]}-{label}") for row in DIRECTIONS
                  for damping, label in ((1e-1, "damped"), (1e-4, "ill_conditioned"))
                  if row[0] != "kbfgs" or damping > 1e-2]


def _thrice_problem():
  x = jax.random.normal(jax.random.key(2), (4, 3, 5))
  model = Thrice()
  return model, model.init(jax.random.key(3), x)["params"], x


@pytest.mark.parametrize("problem,checked", [
    (_attention_problem, ("attn/query", "attn/out")), (_thrice_problem, ("shared",))],
    ids=["attention", "applied_three_times"])
@pytest.mark.parametrize("name,statistics,make,damping", DIRECTION_ROWS)
def test_directions_match_dense_kronecker_solves(name, statistics, make, damping, problem,
                                                 checked):
  model, params, x = problem()
  loss_fn = lambda p, x: _loss(model.apply({"params": p}, x))
  capture = eva_optax.flax.value_and_grad(loss_fn, statistics=statistics)
  layouts = capture.describe(params, x).layouts
  assert all(layouts[n] == LAYOUTS.get(n, eva_optax.Layout()) for n in layouts)
  (_, grads), curvature = capture(params, x)
  tx = make(damping)
  extra = ({"curvature_fn": eva_optax.flax.curvature_fn(loss_fn, x)} if name == "kbfgs" else {})
  updates, _ = tx.update(grads, tx.init(params), params, curvature=curvature, **extra)
  record_kind = statistics if isinstance(statistics, str) else "activation_factor"
  records = eva_optax.collectors.flatten_curvature(
      curvature[record_kind] if isinstance(statistics, tuple) else curvature)
  found, got = layers.find_layers(grads), layers.find_layers(updates)
  for layer in checked:
    layout = LAYOUTS.get(layer, eva_optax.Layout())
    matrix = np.asarray(layers.to_matrix(found[layer], layout), np.float64)
    want = _dense_direction(name, records[layer], matrix, damping)
    scale = np.max(np.abs(want))
    # float32 solves of systems with condition number ≲ 1e4 (ill-conditioned row): ~1e-7·κ.
    np.testing.assert_allclose(layers.to_matrix(got[layer], layout), want, rtol=0,
                               atol=(2e-4 if damping < 1e-2 else 2e-5) * scale, err_msg=layer)


# --- layer stacks and lifted transforms ------------------------------------------------------


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    return x + nn.Dense(x.shape[-1])(jnp.tanh(nn.Dense(7)(x))), None


class Scanned(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(Block) if self.remat else Block
    x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(name="blocks")(x, None)
    return nn.Dense(2, name="head")(x)


class Unrolled(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x, _ = Block(name=f"block{i}")(x)
    return nn.Dense(2, name="head")(x)


def _unstack(params):
  blocks = params["blocks"]
  return {"head": params["head"],
          **{f"block{i}": jax.tree.map(lambda v, i=i: v[i], blocks) for i in range(3)}}


def _restack(tree):
  """``{block0: r0, block1: r1, ...}`` records → one stacked ``blocks`` entry."""
  return {"head": tree["head"],
          "blocks": jax.tree.map(lambda *v: jnp.stack(v), *(tree[f"block{i}"] for i in range(3)))}


STACK_KINDS = ("kronecker_vectors", "kronecker_factors", "output_vectors")


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan_remat"])
def test_scan_stack_statistics_equal_the_unrolled_stack(remat):
  x = jax.random.normal(jax.random.key(6), (4, 3, 5))
  scanned = Scanned(remat)
  params = scanned.init(jax.random.key(7), x)["params"]
  capture = lambda model: eva_optax.flax.value_and_grad(
      lambda p, x: _loss(model.apply({"params": p}, x)), statistics=STACK_KINDS)
  info = capture(scanned).describe(params, x)
  assert info.layouts["blocks/Dense_0"] == eva_optax.Layout(stacked_axes=1, output_axes=1)
  (loss, grads), curvature = jax.jit(capture(scanned))(params, x)
  (ref_loss, ref_grads), ref = capture(Unrolled())(_unstack(params), x)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(curvature), jax.tree.leaves(
      {k: _restack(v) for k, v in ref.items()})):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(_restack(ref_grads))):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("make,statistics", [
    (lambda layouts: eva_optax.eva(0.1, layouts=layouts), "kronecker_vectors"),
    (lambda layouts: eva_optax.kfac(0.1, damping=1e-1, inverse_update_period=2,
                                    layouts=layouts), "kronecker_factors"),
    (lambda layouts: eva_optax.kbfgs(0.1, layouts=layouts), eva_optax.KBFGS_STATISTICS),
], ids=["eva", "kfac", "kbfgs"])
def test_stacked_training_equals_the_unrolled_stack(make, statistics):
  """Three steps on the scanned stack (state [L, ...], preconditioned with vmap) equal three
  steps on the same layers unrolled into separate modules."""
  x = jax.random.normal(jax.random.key(8), (8, 3, 5))
  scanned = Scanned(remat=True)
  params = scanned.init(jax.random.key(9), x)["params"]

  def train(model, params, layouts=None):
    loss_fn = lambda p: _loss(model.apply({"params": p}, x))
    capture = eva_optax.flax.value_and_grad(loss_fn, statistics=statistics)
    tx = make(layouts)

    @jax.jit  # one compile instead of three eager passes over the scan (same arithmetic)
    def step(params, state):
      (_, grads), curvature = capture(params)
      updates, state = tx.update(grads, state, params, curvature=curvature,
                                 curvature_fn=eva_optax.flax.curvature_fn(
                                     loss_fn, statistics="output_vectors"))
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(3):
      params, state = step(params, state)
    return params

  layouts = eva_optax.flax.value_and_grad(
      lambda p: _loss(scanned.apply({"params": p}, x)),
      statistics="kronecker_vectors").describe(params).layouts
  got = train(scanned, params, layouts)
  want = _restack(train(Unrolled(), _unstack(params)))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


class Ensemble(nn.Module):
  @nn.compact
  def __call__(self, x):
    members = nn.vmap(lambda module, x: module(x), variable_axes={"params": 0},
                      split_rngs={"params": True}, in_axes=None, out_axes=0, axis_size=3)
    return members(nn.Dense(4, name="member"), x)


def test_vmap_ensemble_statistics_equal_separate_models():
  x = jax.random.normal(jax.random.key(10), (6, 5))
  model = Ensemble()
  params = model.init(jax.random.key(11), x)["params"]
  capture = eva_optax.flax.value_and_grad(
      lambda p: _loss(model.apply({"params": p}, x)), statistics="kronecker_factors")
  assert capture.describe(params).layouts == {"member": eva_optax.Layout(1, 1)}
  _, curvature = capture(params)
  # The loss averages the members' sums (the ensemble axis leads the output), so member i alone
  # contributes ℓ(y_i)/3 with the same batch of 6 examples.
  for i in range(3):
    def alone(p):
      y = nn.Dense(4).apply({"params": p}, x)
      return jnp.sum(jnp.sin(y) * y) / 3
    _, ref = eva_optax.flax.value_and_grad(alone, statistics="kronecker_factors")(
        jax.tree.map(lambda v: v[i], params["member"]))
    for got, want in zip(curvature["member"], ref):
      np.testing.assert_allclose(got[i], want, rtol=RTOL, atol=ATOL)


class Lifted(nn.Module):
  """The attention model under ``nn.jit`` (a lifted transform) or not."""

  lifted: bool

  @nn.compact
  def __call__(self, x):
    return (nn.jit(Attention) if self.lifted else Attention)(name="inner")(x)


def test_jax_checkpoint_around_apply_and_nn_jit_give_the_same_statistics():
  _, _, x = _attention_problem()
  params = Lifted(False).init(jax.random.key(1), x)["params"]
  kinds = ("kronecker_vectors", "kronecker_factors")
  plain = lambda p, x: _loss(Lifted(False).apply({"params": p}, x))
  variants = [lambda p, x: _loss(jax.checkpoint(Lifted(False).apply)({"params": p}, x)),
              lambda p, x: _loss(Lifted(True).apply({"params": p}, x))]
  (_, g1), c1 = eva_optax.flax.value_and_grad(plain, statistics=kinds)(params, x)
  assert len(eva_optax.collectors.flatten_curvature(c1["kronecker_vectors"])) == 5
  for variant in variants:
    (_, g2), c2 = jax.jit(eva_optax.flax.value_and_grad(variant, statistics=kinds))(params, x)
    for a, b in zip(jax.tree.leaves((g1, c1)), jax.tree.leaves((g2, c2)), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


class WithEmbedding(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(7, 6)
    h = nn.Conv(6, (3,), feature_group_count=2, name="grouped")(embed(tokens))
    return embed.attend(nn.Dense(6, name="mix")(h))


def test_exclude_leaves_an_unsupported_layer_first_order_and_the_report_says_so():
  tokens = jax.random.randint(jax.random.key(12), (4, 5), 0, 7)
  model = WithEmbedding()
  params = model.init(jax.random.key(13), tokens)["params"]
  loss_fn = lambda p: _loss(model.apply({"params": p}, tokens))
  with pytest.raises(NotImplementedError, match=r"'grouped'.*exclude=\['grouped'\]"):
    eva_optax.flax.value_and_grad(loss_fn, statistics="kronecker_vectors")(params)
  capture = eva_optax.flax.value_and_grad(loss_fn, statistics="kronecker_vectors",
                                          exclude="group*")
  info = capture.describe(params)
  (_, grads), curvature = capture(params)
  assert set(eva_optax.collectors.flatten_curvature(curvature)) == {"mix"}
  rows = {r.parameter: r for r in eva_optax.coverage(params, curvature, info)}
  assert rows["mix/kernel"].preconditioned
  assert not rows["grouped/kernel"].preconditioned and "excluded" in rows["grouped/kernel"].detail
  assert "nn.Embed" in rows["Embed_0/embedding"].detail
  report = eva_optax.coverage_report(params, curvature, info)
  assert "1 of 3 kernel-bearing parameters preconditioned" in report
  tx = eva_optax.scale_by_eva()
  updates, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  np.testing.assert_array_equal(updates["grouped"]["kernel"], grads["grouped"]["kernel"])
  assert not np.allclose(updates["mix"]["kernel"], grads["mix"]["kernel"])


def test_coverage_flags_a_vanishing_output_gradient():
  """BatchNorm in training mode removes the mean output gradient of the conv before it."""
  class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.BatchNorm(use_running_average=False)(nn.Conv(4, (3, 3), name="conv")(x))
      return nn.Dense(2, name="head")(nn.relu(h).mean(axis=(1, 2)))

  x = jax.random.normal(jax.random.key(14), (8, 6, 6, 3))
  model = ConvBN()
  variables = model.init(jax.random.key(15), x)

  def loss_fn(p):
    out, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                         mutable=["batch_stats"])
    return _loss(out)

  _, curvature = eva_optax.flax.value_and_grad(loss_fn, statistics="kronecker_vectors")(
      variables["params"])
  rows = {r.parameter: r for r in eva_optax.coverage(variables["params"], curvature)}
  assert "‖ḡ‖" in rows["conv/kernel"].health and rows["head/kernel"].health == ""
