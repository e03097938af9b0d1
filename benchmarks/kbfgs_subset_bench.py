"""2 epochs of a 10k MNIST subset (20 steps, batch 1000, constant lr) per optimizer: loss on the
10k subset after each epoch, median step time (first step excluded), state bytes."""
import sys, time, json
import jax, numpy as np, optax, eva_optax
from benchmarks import datasets, models, optimizers, train
task = models.TASKS["mnist_autoencoder"]()
x = task.prepare(datasets.load_mnist("../shared/data")).x_train[:10000]
params = task.model.init(jax.random.key(0), x[:1])["params"]
order = np.random.default_rng(0).permutation(10000)
out = {}
for name in sys.argv[1].split(","):
  spec = optimizers.OPTIMIZERS[name]
  config = optimizers.parse_entry(name)
  tx = optimizers.make(config, task.name, optimizers.learning_rate(config, task.name))
  step = train.make_step(task, tx, spec.statistics)
  p, s = params, tx.init(params)
  times, evals = [], []
  for k in range(20):
    idx = order[k * 1000 % 10000:][:1000]
    t = time.perf_counter(); p, s, loss = step(p, s, x[idx], x[idx]); jax.block_until_ready(p)
    times.append(time.perf_counter() - t)
    if (k + 1) % 10 == 0:
      evals.append(float(jax.jit(train.loss_fn(task))(p, x, x)))
  out[name] = dict(evals=evals, median_step_s=float(np.median(times[1:])), state_bytes=train.state_bytes(s))
  print(name, out[name], flush=True)
json.dump(out, open("/tmp/issue6_bench.json", "w"))
