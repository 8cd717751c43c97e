#!/usr/bin/env bash
# Issue 29's CPU grid (benchmarks/NOTES.md, "the CPU grid, the decision rule"): each candidate 12 minutes of
# training on MTD's training split, validated on held-out training images with low-contrast synthetic defects.
# Resumable: a candidate whose results file exists is skipped.
# Usage: bash benchmarks/issue29_grid.sh [draem|draem-kinds|unet]
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
run() {  # NAME MODEL ARGS...
  local name=$1 model=$2; shift 2
  [ -f "benchmarks/results/epoch_validation_${model}_${name}.json" ] && grep -q '"epochs_done": true' \
    "benchmarks/results/epoch_validation_${model}_${name}.json" && { echo "skip $name"; return; }
  flock /tmp/metaad_bench.lock "$PY" benchmarks/epoch_validation.py --model "$model" --defects subtle --native \
    --budget-minutes 12 --every 4 --name "$name" "$@" > "benchmarks/logs/epoch_validation_${model}_${name}.log" 2>&1
}
if [ "${1:-draem}" = draem ]; then
  run grid_d1 draem --param image_size=128 --param reconstructive_width=8 --param discriminative_width=8
  run grid_d0 draem --param image_size=128 --param reconstructive_width=8 --param discriminative_width=8 \
    --param anomaly_colour=as_is --param anomaly_kinds=textures
  run grid_d2 draem --param image_size=128 --param reconstructive_width=16 --param discriminative_width=16
  run grid_d3 draem --param image_size=128 --param reconstructive_width=32 --param discriminative_width=32
  run grid_d4 draem --param image_size=192 --param reconstructive_width=8 --param discriminative_width=8
  run grid_d5 draem --param image_size=256 --param reconstructive_width=8 --param discriminative_width=8
fi
if [ "${1:-draem}" = draem-kinds ]; then  # the simulator's kinds at the chosen D2, scored on scratches alone
  run kinds_mixed draem --param image_size=128 --param reconstructive_width=16 --param discriminative_width=16 \
    --defects fine_scratch
  run kinds_textures draem --param image_size=128 --param reconstructive_width=16 --param discriminative_width=16 \
    --param anomaly_kinds=textures --defects fine_scratch
fi
if [ "${1:-draem}" = unet ]; then
  run grid_u1 unet_autoencoder --param image_size=128 --param width=16
  run grid_u2 unet_autoencoder --param image_size=128 --param width=32
  run grid_u3 unet_autoencoder --param image_size=192 --param width=16
  run grid_u4 unet_autoencoder --param image_size=256 --param width=16
fi
