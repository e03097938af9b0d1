#!/usr/bin/env bash
# GPU protocol of the real workloads (benchmarks/RESULTS.md, "Issue 13"): every optimizer,
# three seeds, the full configurations — Tiny Shakespeare 2,000 steps; ResNet-20 60 epochs of
# CIFAR-10 (targets 80 % and 90 % test accuracy on all 10,000 test images).
#   pip install -e ".[bench]" "jax[cuda12]" && bash benchmarks/protocols/gpu.sh
set -euo pipefail
DATA=${DATA:-${EVA_OPTAX_DATA:-../shared/data}}
OUT=${OUT:-benchmarks/out/gpu}
SEEDS=${SEEDS:-0 1 2}
# eva_eigen, eva_subset, eva:damping=1e30: issue 14's ablation of Eva's statistics.
LM=${LM:-adamw,muon,sgd_nesterov,eva,eva_eigen,eva:damping=1e30,eva_f,kfac,foof,shampoo,eva_s,kbfgs}
CIFAR=${CIFAR:-sgd_nesterov,adamw,muon,eva,eva_eigen,eva_subset,eva:damping=1e30,eva_f,kfac,foof,shampoo,eva_s}
for seed in $SEEDS; do
  rounds=$([ "$seed" = 0 ] && echo 50 || echo 0)
  python -m benchmarks.run --task shakespeare_char --data-dir "$DATA" --seeds "$seed" \
    --optimizers "$LM" --timing-rounds "$rounds" --no-plot --out "$OUT/shakespeare_char/seed$seed"
  python -m benchmarks.run --task cifar10_resnet --data-dir "$DATA" --seeds "$seed" \
    --epochs 60 --eval-every 390 --targets 0.8,0.9 \
    --optimizers "$CIFAR" --timing-rounds "$rounds" --no-plot --out "$OUT/cifar10_resnet/seed$seed"
done
for task in shakespeare_char cifar10_resnet; do
  python -m benchmarks.report "$OUT/$task"/seed*/"$task.json" --out "$OUT/$task"
done
