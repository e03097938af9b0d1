"""Step time, capture overhead, compile time and Eva's per-layer diagnostics on a causal
Transformer language model (Tiny Shakespeare characters).

    python -m benchmarks.transformer_step --data-dir ../shared/data --rounds 40

The model is :class:`benchmarks.models.TransformerLM` (stock Flax modules: Embed, causal
MultiHeadDotProductAttention, LayerNorm, GELU MLP, blocks in ``nn.scan`` under ``nn.remat``).
Every optimizer's jitted training step is compiled (timed), trained ``--train-steps`` steps on
random windows of the first 90 % of the text, then timed interleaved on one batch (one step of
each optimizer per round, so all see the same machine load). The capture's own overhead is the
jitted capture (``eva_optax.flax.value_and_grad``) against the jitted ``jax.value_and_grad``,
interleaved the same way. Eva's diagnostics are taken after its training steps.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from statistics import median

import jax
import numpy as np
import optax

import eva_optax
from benchmarks import datasets, models, train

CAPTURED = {  # name: (factory(lr, layouts), statistics, lr)
    "eva": (lambda lr, lay: eva_optax.eva(lr, layouts=lay), "kronecker_vectors", 0.1),
    "eva_f": (lambda lr, lay: eva_optax.eva_f(lr, layouts=lay), "activation_vector", 0.1),
    "kfac": (lambda lr, lay: eva_optax.kfac(lr, damping=1.0, layouts=lay), "kronecker_factors",
             0.1),
    "foof": (lambda lr, lay: eva_optax.foof(lr, damping=1.0, layouts=lay), "activation_factor",
             0.1),
    "kbfgs": (lambda lr, lay: eva_optax.kbfgs(lr, layouts=lay), eva_optax.KBFGS_STATISTICS,
              0.01),
    "kbfgs_l": (lambda lr, lay: eva_optax.kbfgs_l(lr, memory_size=20, layouts=lay),
                eva_optax.KBFGS_STATISTICS, 0.01),
}
FIRST_ORDER = {
    "adamw": lambda: optax.adamw(1e-3, b2=0.99, weight_decay=0.1),
    "sgd": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "shampoo": lambda: eva_optax.shampoo(1e-3, preconditioning_compute_steps=10),
    "eva_s": lambda: eva_optax.eva_s(0.1),
}


def lm_loss(model):
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss_fn


def eva_layer_kinds(diagnostics: dict, stats: dict) -> dict:
  """Per layer: ‖ḡ‖ (min over stack slices), signal/damping and removed fraction (means)."""
  out = {}
  for name, values in diagnostics.items():
    g = np.asarray(stats[name].g).reshape(-1, np.shape(stats[name].g)[-1])
    out[name] = {"min_g_norm": float(np.linalg.norm(g, axis=-1).min()),
                 "signal_to_damping": float(np.mean(values["signal_to_damping"])),
                 "removed_fraction": float(np.mean(values["removed_fraction"]))}
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m benchmarks.transformer_step",
                              description=__doc__.split("\n")[0])
  p.add_argument("--data-dir")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--context", type=int, default=64)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--train-steps", type=int, default=100)
  p.add_argument("--rounds", type=int, default=40)
  p.add_argument("--optimizers", default=",".join(["adamw", "sgd", *CAPTURED, "shampoo",
                                                   "eva_s"]))
  p.add_argument("--out", default="benchmarks/out/transformer_step.json")
  args = p.parse_args(argv)
  text = datasets.language_model_data(datasets.load_shakespeare(args.data_dir), args.context)
  model = models.TransformerLM(vocab=len(datasets.SHAKESPEARE_VOCABULARY), width=args.width,
                               depth=args.depth, heads=args.heads, context=args.context)
  rng = np.random.default_rng(0)

  def data():  # random training windows
    while True:
      index = rng.integers(0, len(text.x_train), args.batch)
      yield text.x_train[index], text.y_train[index]

  data = data()
  x, y = next(data)
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lm_loss(model)
  info, coverage = train.capture_info(loss_fn, params, x, y)
  print(coverage)

  runs, results = {}, {}
  for name in args.optimizers.split(","):
    if name in CAPTURED:
      factory, statistics, lr = CAPTURED[name]
      tx = factory(lr, info.layouts)
    else:
      tx, statistics = FIRST_ORDER[name](), None
    step = train.loss_step(loss_fn, tx, statistics)
    state = tx.init(params)
    start = time.perf_counter()
    step = step.lower(params, state, x, y).compile()
    compile_s = time.perf_counter() - start
    p_, s_ = params, state
    for _ in range(args.train_steps):
      p_, s_, loss = step(p_, s_, *next(data))
    runs[name] = (step, p_, s_)
    results[name] = {"compile_s": compile_s, "loss_after_training": float(loss)}
    print(f"{name}: compiled in {compile_s:.1f} s, loss {float(loss):.3f} after "
          f"{args.train_steps} steps", flush=True)
    if name == "eva":
      grads = jax.jit(jax.grad(loss_fn))(p_, x, y)
      stats = optax.tree_utils.tree_get(s_, "stats")
      results[name]["diagnostics"] = eva_layer_kinds(
          eva_optax.eva_diagnostics(grads, stats, layouts=info.layouts), stats)

  times = train.time_interleaved(runs, x, y, args.rounds)
  base = median(times["adamw"]) if "adamw" in times else None
  print(f"\nTransformerLM vocab {len(datasets.SHAKESPEARE_VOCABULARY)}, width {args.width}, "
        f"depth {args.depth}, batch {args.batch}, context {args.context}, "
        f"{jax.devices()[0].platform}, {args.rounds} interleaved rounds")
  print("optimizer  step ms  x AdamW  compile s")
  for name, t in times.items():
    results[name]["median_step_s"] = median(t)
    ratio = median(t) / base if base else float("nan")
    print(f"{name:9s}  {1e3 * median(t):7.2f}  {ratio:7.2f}  {results[name]['compile_s']:9.1f}")

  capture = jax.jit(eva_optax.flax.value_and_grad(loss_fn, statistics="kronecker_vectors"))
  plain = jax.jit(jax.value_and_grad(loss_fn))
  overhead = {"capture": [], "value_and_grad": []}
  for fn in (capture, plain):
    jax.block_until_ready(fn(params, x, y))
  for _ in range(args.rounds):
    for label, fn in (("capture", capture), ("value_and_grad", plain)):
      start = time.perf_counter()
      jax.block_until_ready(fn(params, x, y))
      overhead[label].append(time.perf_counter() - start)
  medians = {k: median(v) for k, v in overhead.items()}
  results["capture_overhead"] = {**medians, "ratio": medians["capture"] / medians[
      "value_and_grad"]}
  print(f"\ncapture (kronecker_vectors) {1e3 * medians['capture']:.2f} ms vs "
        f"jax.value_and_grad {1e3 * medians['value_and_grad']:.2f} ms: "
        f"{100 * (results['capture_overhead']['ratio'] - 1):+.1f} %")
  if "eva" in results:
    print("\nEva per layer after training: min ‖ḡ‖ over slices, signal/damping, removed "
          "fraction")
    for layer, d in results["eva"]["diagnostics"].items():
      print(f"  {layer:55s} {d['min_g_norm']:9.2e} {d['signal_to_damping']:9.3g} "
            f"{100 * d['removed_fraction']:6.2f}%")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=1))
  return results


if __name__ == "__main__":
  main()
