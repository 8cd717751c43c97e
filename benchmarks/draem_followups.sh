#!/bin/bash
# DRAEM's and the U-Net AE's remaining runs, after a queue (pid given as $1, e.g. the lead's) has finished,
# each under the shared benchmark lock: DRAEM with DTD textures (the default, metaad's generated textures,
# is mtd_draem), the U-Net's SSIM-AE map, DRAEM's epoch curve on validation data (MTD training split +
# synthetic defects other than its own Perlin-blob kind, no test label), then metaad's synthetic categories (60 training images each: 50 epochs).
cd "$(dirname "$0")/.." || exit 1
while [ -n "$1" ] && kill -0 "$1" 2>/dev/null; do sleep 30; done
run() { local log=$1; shift; flock /tmp/metaad_bench.lock bash -c ". .venv/bin/activate && $*" >> "$log" 2>&1; }
run benchmarks/logs/mtd_draem_dtd.log "python benchmarks/mtd_benchmark.py --model draem --param texture_dir=../shared/data/dtd --name mtd_draem_dtd --out benchmarks/_work/mtd_draem_dtd"
run benchmarks/logs/mtd_unet_autoencoder_ssim.log "python benchmarks/mtd_benchmark.py --model unet_autoencoder --param map_type=ssim --name mtd_unet_autoencoder_ssim --out benchmarks/_work/mtd_unet_autoencoder_ssim"
run benchmarks/logs/epoch_validation_draem.log "cd benchmarks && python epoch_validation.py --model draem --epochs 25 --every 5 --defects scratch crack hole stain"
run benchmarks/logs/draem_synthetic.log "python benchmarks/synthetic_benchmark.py --model draem --param epochs=50"
