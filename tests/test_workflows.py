"""The optax and Flax workflows people already use: TrainState, partitioned optimizers,
``optax.tree.map_params``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from test_common import Net as ConvNet
from test_common import OPTIMIZERS, ROWS, _problem, _step, capture_fn, second_pass


@pytest.mark.parametrize("factory,statistics,hparams", ROWS)
def test_train_state_apply_gradients_equals_the_manual_update_loop(factory, statistics, hparams):
  params, loss_fn = _problem()
  tx = factory(0.05, **hparams)
  capture = capture_fn(loss_fn, statistics)

  @jax.jit
  def train_state_step(state):
    (loss, grads), curvature = capture(state.params)
    return state.apply_gradients(grads=grads, curvature=curvature,
                                 **second_pass(loss_fn, statistics))

  state = eva_optax.flax.TrainState.create(apply_fn=None, params=params, tx=tx)
  manual = (params, tx.init(params))
  step = jax.jit(_step(tx, statistics, loss_fn))
  for _ in range(3):
    state = train_state_step(state)
    manual = step(*manual)[:2]
  assert int(state.step) == 3
  for got, want in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves(manual),
                       strict=True):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("factory,statistics,hparams", ROWS)
def test_map_params_round_trips_every_state(factory, statistics, hparams):
  params, _ = _problem()
  tx = factory(0.05, **hparams)
  state = tx.init(params)
  cast = optax.tree.map_params(tx, lambda v: v.astype(jnp.bfloat16), state)
  back = optax.tree.map_params(tx, lambda v: v.astype(jnp.float32), cast)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
    assert got.dtype == want.dtype and got.shape == want.shape


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8, name="body")(x))
    return nn.Dense(3, name="head")(x)


PARTITIONED = [row for row in OPTIMIZERS if row[2] is not None and not row[0].startswith("kbfgs")]


@pytest.mark.parametrize("factory,statistics,hparams",
                         [pytest.param(*row[1:], id=row[0]) for row in PARTITIONED])
def test_multi_transform_uses_the_curvature_of_the_layers_it_owns(factory, statistics, hparams):
  """Eva (etc.) on the body, Adam on the head, from one capture of the whole model: equal to
  each optimizer alone on its part."""
  x = jax.random.normal(jax.random.key(0), (16, 5))
  labels = jax.random.randint(jax.random.key(1), (16,), 0, 3)
  model = Net()
  params = model.init(jax.random.key(2), x)["params"]
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), labels).mean()
  partition = {"body": jax.tree.map(lambda _: "second", params["body"]),
               "head": jax.tree.map(lambda _: "adam", params["head"])}
  second, adam = factory(0.05, **hparams), optax.adam(1e-2)
  tx = optax.multi_transform({"second": second, "adam": adam}, partition)
  (_, grads), curvature = capture_fn(loss_fn, statistics)(params)
  updates, _ = jax.jit(lambda g, s: tx.update(g, s, params, curvature=curvature))(
      grads, tx.init(params))
  alone, _ = second.update({"body": grads["body"]}, second.init({"body": params["body"]}),
                           {"body": params["body"]},
                           curvature=_only(curvature, "body"))
  head, _ = adam.update(grads["head"], adam.init(params["head"]))
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(
      {"body": alone["body"], "head": head}), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
  # A layer that exists nowhere in the params is still an error.
  stray = jax.tree.map(lambda v: v, curvature)
  _only_tree(stray)["nowhere"] = _only_tree(stray)["body"]
  with pytest.raises(ValueError, match="'nowhere'"):
    tx.update(grads, tx.init(params), params, curvature=stray)


def _only_tree(curvature):
  """The single statistics tree of ``curvature`` (a dict of trees for several kinds)."""
  return curvature if "body" in curvature else next(iter(curvature.values()))


def _only(curvature, layer):
  if "body" in curvature:
    return {layer: curvature[layer]}
  return {kind: {layer: tree[layer]} for kind, tree in curvature.items()}


def test_kbfgs_inside_multi_transform_raises_clearly():
  x = jax.random.normal(jax.random.key(0), (8, 5))
  model = Net()
  params = model.init(jax.random.key(2), x)["params"]
  loss_fn = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
  partition = {"body": jax.tree.map(lambda _: "kbfgs", params["body"]),
               "head": jax.tree.map(lambda _: "sgd", params["head"])}
  tx = optax.multi_transform({"kbfgs": eva_optax.kbfgs(0.1), "sgd": optax.sgd(0.1)}, partition)
  (_, grads), curvature = eva_optax.flax.value_and_grad(
      loss_fn, statistics=eva_optax.KBFGS_STATISTICS)(params)
  with pytest.raises(NotImplementedError, match="multi_transform"):
    tx.update(grads, tx.init(params), params, curvature=curvature,
              curvature_fn=eva_optax.flax.curvature_fn(loss_fn))


# --- a model that is not Flax: hand-built curvature, parameters under other names ------------


def _jax_mlp():
  """A hand-written two-layer JAX MLP with params {"l1": {"w", "b"}, "l2": {"w", "b"}}, its
  gradients, and its K-FAC and Eva statistics built by hand (README, "The curvature pytree")
  from the layer inputs and the output gradients of a zero perturbation."""
  params = {"l1": {"w": 0.3 * jax.random.normal(jax.random.key(0), (5, 8)), "b": jnp.zeros(8)},
            "l2": {"w": 0.3 * jax.random.normal(jax.random.key(1), (8, 3)), "b": jnp.zeros(3)}}
  x = jax.random.normal(jax.random.key(2), (16, 5))
  labels = jax.random.randint(jax.random.key(3), (16,), 0, 3)

  def loss(p, perturbations):
    hidden = jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"] + perturbations[0])
    out = hidden @ p["l2"]["w"] + p["l2"]["b"] + perturbations[1]
    return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean(), (x, hidden)

  zeros = [jnp.zeros((16, 8)), jnp.zeros((16, 3))]
  (_, inputs), (grads, cts) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params,
                                                                                    zeros)
  batch = x.shape[0]
  with_one = lambda a: jnp.concatenate([a, jnp.ones((batch, 1))], axis=1)
  curvature = {
      "kronecker_vectors": {name: eva_optax.KroneckerVectors(a.mean(0), batch * g.mean(0))
                            for name, a, g in zip(("l1", "l2"), inputs, cts)},
      "kronecker_factors": {name: eva_optax.KroneckerFactors(
          with_one(a).T @ with_one(a) / batch, batch * g.T @ g)
          for name, a, g in zip(("l1", "l2"), inputs, cts)}}
  return params, grads, curvature


@pytest.mark.parametrize("make", [eva_optax.eva, eva_optax.kfac], ids=["eva", "kfac"])
def test_a_jax_model_with_other_parameter_names_equals_the_flax_naming(make):
  params, grads, curvature = _jax_mlp()
  layouts = {name: eva_optax.Layout(kernel="w", bias="b") for name in ("l1", "l2")}
  tx = make(0.1, layouts=layouts)
  updates, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  flax_names = lambda tree: {n: {"kernel": v["w"], "bias": v["b"]} for n, v in tree.items()}
  reference = make(0.1)
  want, _ = reference.update(flax_names(grads), reference.init(flax_names(params)),
                             flax_names(params), curvature=curvature)
  for got, expected in zip(jax.tree.leaves(flax_names(updates)), jax.tree.leaves(want),
                           strict=True):
    np.testing.assert_array_equal(got, expected)
  sgd_like = jax.tree.map(lambda g: -0.1 * g, grads)
  assert not np.allclose(updates["l1"]["w"], sgd_like["l1"]["w"])  # preconditioned


def test_other_parameter_names_without_layouts_or_with_wrong_ones_raise_naming_the_layout():
  params, grads, curvature = _jax_mlp()
  tx = eva_optax.eva(0.1)
  with pytest.raises(ValueError, match=r"no 'l1/kernel'.*Layout\(kernel=\.\.\., bias=\.\.\.\)"):
    tx.update(grads, tx.init(params), params, curvature=curvature)
  with pytest.raises(ValueError, match=r"no 'l1/W' \(keys there: \['b', 'w'\]\)"):
    eva_optax.eva(0.1, layouts={"l1": eva_optax.Layout(kernel="W")}).init(params)


@pytest.mark.parametrize("factory,statistics,hparams",
                         [pytest.param(*row[1:], id=row[0]) for row in PARTITIONED])
def test_multi_steps_on_two_halves_equals_one_step_on_the_whole_batch(factory, statistics,
                                                                     hparams):
  params, _ = _problem()  # test_common's conv net
  x = jax.random.normal(jax.random.key(0), (32, 6, 6, 2))
  labels = jax.random.randint(jax.random.key(1), (32,), 0, 3)
  loss = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      ConvNet().apply({"params": p}, x), y).mean()
  capture = eva_optax.flax.value_and_grad(loss, statistics=statistics)
  whole = factory(0.05, **hparams)
  (_, grads), curvature = capture(params, x, labels)
  want, whole_state = whole.update(grads, whole.init(params), params, curvature=curvature)

  tx = eva_optax.multi_steps(factory(0.05, **hparams), 2,
                             jax.eval_shape(capture, params, x[:16], labels[:16])[1])
  state = tx.init(params)
  for half in (slice(0, 16), slice(16, 32)):
    (_, grads), curvature = capture(params, x[half], labels[half])
    got, state = jax.jit(lambda g, s, c: tx.update(g, s, params, curvature=c))(
        grads, state, curvature)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  held = optax.tree_utils.tree_get(state.inner.inner_opt_state, "stats")
  for a, b in zip(jax.tree.leaves(held), jax.tree.leaves(
      optax.tree_utils.tree_get(whole_state, "stats")), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(state.curvature))  # next cycle
