#!/usr/bin/env bash
# CPU protocol of the real workloads (benchmarks/RESULTS.md, "Issues 13 and 14") for a 2-core box
# in the background: all of it takes ~4 hours in sequence (a Transformer run is 5-10 minutes,
# K-BFGS's 15, a 200-step ResNet run ~5); LM=, CIFAR=, SEEDS= select a part, and parts can run
# side by side (they write separate run directories). Every (optimizer, seed) run is its own process with a stall
# watchdog (exit status 3), retried once
# (XLA's CPU runtime hung twice in a K-FAC refresh on the busy box, see RESULTS.md); one short
# process then times every optimizer's step interleaved, and benchmarks.report merges it all.
# Learning rates are the registry's task defaults (benchmarks/optimizers.py), from the tuning
# proxy recorded in RESULTS.md.
#   bash benchmarks/protocols/cpu.sh            # DATA=../shared/data OUT=benchmarks/out/cpu
set -uo pipefail
DATA=${DATA:-${EVA_OPTAX_DATA:-../shared/data}}
OUT=${OUT:-benchmarks/out/cpu}
SEEDS=${SEEDS:-0 1}
# Every optimizer of the comparison, then issue 14's arms (Eva's eigenvector statistics, its
# correction switched off by γ → ∞, the reference's 16-example statistics).
LM=${LM:-adamw eva muon kfac eva_f foof shampoo eva_s kbfgs eva_eigen eva:damping=1e30}
# Sensitivity runs after the main ones: AdamW at its own proxy-tuned rate (seed 0).
EXTRA=${EXTRA:-adamw:lr=0.004}
CIFAR=${CIFAR:-sgd_nesterov eva adamw muon eva_f kfac foof shampoo eva_s eva_eigen eva:damping=1e30 eva_subset}
# CIFAR on 2 cores: 200 steps of 128 (half an epoch), the metric on the first 2,000 test images.
CIFAR_ARGS=(--steps 200 --eval-every 50 --test-subset 2000 --targets 0.3,0.4)
export OPENBLAS_NUM_THREADS=1

one() {  # task optimizer seed [extra args...]: one run, retried once if it hangs or fails
  local task=$1 opt=$2 seed=$3; shift 3
  local out="$OUT/$task/runs/$opt-seed$seed"
  for attempt in 1 2; do
    python -m benchmarks.run --task "$task" --data-dir "$DATA" --seeds "$seed" \
      --optimizers "$opt" --timing-rounds 0 --stall-timeout 300 --no-plot --out "$out" "$@" \
      && return 0
    echo "$task $opt seed $seed: attempt $attempt failed" >&2
  done
}

for seed in $SEEDS; do
  for opt in $LM; do one shakespeare_char "$opt" "$seed"; done
  for opt in $CIFAR; do one cifar10_resnet "$opt" "$seed" "${CIFAR_ARGS[@]}"; done
done
for opt in $EXTRA; do one shakespeare_char "$opt" 0; done
join() { local IFS=,; echo "$*"; }
timeout 30m python -m benchmarks.run --task shakespeare_char --data-dir "$DATA" --steps 20 \
  --optimizers "$(join $LM $EXTRA)" --timing-rounds 30 --no-plot --out "$OUT/shakespeare_char/timing"
timeout 30m python -m benchmarks.run --task cifar10_resnet --data-dir "$DATA" --steps 10 \
  --test-subset 500 --optimizers "$(join $CIFAR)" --timing-rounds 20 --no-plot \
  --out "$OUT/cifar10_resnet/timing"
for task in shakespeare_char cifar10_resnet; do
  python -m benchmarks.report "$OUT/$task"/runs/*/"$task.json" \
    --timing "$OUT/$task/timing/$task.json" --out "$OUT/$task"
done
