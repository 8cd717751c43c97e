#!/bin/bash
# DRAEM's follow-up runs, after the U-Net autoencoder's queue (pid given as $1) has finished, each under the
# shared benchmark lock: the epoch curve on validation data (MTD training split + synthetic defects, no test
# label), then metaad's synthetic categories (60 training images each, so 50 epochs = ~400 steps per category).
cd "$(dirname "$0")/.." || exit 1
while [ -n "$1" ] && kill -0 "$1" 2>/dev/null; do sleep 30; done
flock /tmp/metaad_bench.lock bash -c ". .venv/bin/activate && cd benchmarks && python epoch_validation.py --model draem --epochs 25 --every 5" >> benchmarks/logs/epoch_validation_draem.log 2>&1
flock /tmp/metaad_bench.lock bash -c ". .venv/bin/activate && python benchmarks/synthetic_benchmark.py --model draem --param epochs=50" >> benchmarks/logs/draem_synthetic.log 2>&1
