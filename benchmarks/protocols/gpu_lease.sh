#!/usr/bin/env bash
# The GPU protocol sized for a short accelerator lease (one ~9-minute command; RESULTS.md
# "GPU figures"): gpu.sh's full protocol does not fit. Three phases against a deadline:
#   A. training curves, RUNS_AT_ONCE processes sharing the GPU (the curves are per step, so
#      sharing does not change them): shakespeare_char at its full configuration (2,000 steps)
#      and cifar10_resnet on the first TRAIN images (EPOCHS epochs, metric on the first 2,000
#      test images); seed 0 of every optimizer first, then seed 1 while time is left;
#   B. step times, every optimizer interleaved in one process alone on the GPU (the wall-clock
#      figures: steps to target × this median step time);
#   C. the refresh cost of K-FAC and Shampoo against the layer width (benchmarks/refresh_cost.py).
# A run still going at its phase's deadline is stopped; its .partial.json keeps the evaluations
# so far. Before spending a lease on it, check the machine's JAX in a first short call, each
# command under `timeout` (RESULTS.md "GPU protocol": a bare `python -c "import jax;
# jax.devices()"` once hung a whole lease).
#   DATA=../shared/data OUT=benchmarks/out/gpu_lease bash benchmarks/protocols/gpu_lease.sh
set -uo pipefail
DATA=${DATA:-${EVA_OPTAX_DATA:-../shared/data}}
OUT=${OUT:-benchmarks/out/gpu_lease}
TRAIN=${TRAIN:-20000}
EPOCHS=${EPOCHS:-20}
RUNS_AT_ONCE=${RUNS_AT_ONCE:-8}
PHASE_A_S=${PHASE_A_S:-290}
PHASE_B_S=${PHASE_B_S:-200}
PHASE_C_S=${PHASE_C_S:-30}
# Slowest first (the 2026-11-29 lease ran out with K-FAC, FOOF, Shampoo and Eva-s on CIFAR last).
LM=${LM:-kbfgs shampoo kfac eva_s foof adamw muon eva eva_eigen eva:damping=1e30 eva_f}
CIFAR=${CIFAR:-kfac foof shampoo eva_s eva_eigen sgd_nesterov adamw muon eva eva:damping=1e30 eva_f}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU
# Phase B's steps compile to the same programs as phase A's: reuse them.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/eva_optax_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
mkdir -p "$OUT"
start=$(date +%s)
deadline_a=$((start + PHASE_A_S))

one() {  # task optimizer seed: one run unless phase A's deadline has passed
  local task=$1 opt=$2 seed=$3 left
  left=$((deadline_a - $(date +%s)))
  [ "$left" -gt 20 ] || { echo "skipped $task $opt seed $seed (deadline)"; return 0; }
  local extra=()
  [ "$task" = cifar10_resnet ] && extra=(--train-subset "$TRAIN" --epochs "$EPOCHS"
    --eval-every $((TRAIN / 128)) --test-subset 2000 --targets 0.7,0.8)
  timeout "$left" python -m benchmarks.run --task "$task" --data-dir "$DATA" --seeds "$seed" \
    --optimizers "$opt" --timing-rounds 0 --no-plot --out "$OUT/$task/runs/$opt-seed$seed" \
    "${extra[@]}" > "$OUT/$task-$opt-seed$seed.log" 2>&1
  echo "$task $opt seed $seed: exit $? at $(( $(date +%s) - start )) s"
}
export -f one
export DATA OUT TRAIN EPOCHS deadline_a start

jobs() {  # a CIFAR run (3,120 steps) outlasts an LM run (2,000): CIFAR first
  for seed in 0 1; do
    for opt in $CIFAR; do echo "cifar10_resnet $opt $seed"; done
    for opt in $LM; do echo "shakespeare_char $opt $seed"; done
  done
}
jobs | xargs -P "$RUNS_AT_ONCE" -L 1 bash -c 'one "$@"' _

join() { local IFS=,; echo "$*"; }
# The ResNet's ten step programs take ~140 s to compile and time on a fresh machine, the LM's ~55 s.
timeout $((PHASE_B_S / 3)) python -m benchmarks.run --task shakespeare_char --data-dir "$DATA" \
  --steps 20 --optimizers "$(join $LM)" --timing-rounds 30 --no-plot \
  --out "$OUT/shakespeare_char/timing" > "$OUT/timing-shakespeare_char.log" 2>&1
echo "timing shakespeare_char: exit $? at $(( $(date +%s) - start )) s"
timeout $((PHASE_B_S * 2 / 3)) python -m benchmarks.run --task cifar10_resnet --data-dir "$DATA" \
  --train-subset "$TRAIN" --steps 10 --test-subset 500 --optimizers "$(join $CIFAR)" \
  --timing-rounds 20 --no-plot --out "$OUT/cifar10_resnet/timing" \
  > "$OUT/timing-cifar10_resnet.log" 2>&1
echo "timing cifar10_resnet: exit $? at $(( $(date +%s) - start )) s"
timeout "$PHASE_C_S" python -m benchmarks.refresh_cost --widths 128,256,512,1024,2048,4096 \
  --layers 4 --repeats 5 --out "$OUT/refresh_cost.json" > "$OUT/refresh_cost.log" 2>&1
echo "refresh cost: exit $? at $(( $(date +%s) - start )) s"
