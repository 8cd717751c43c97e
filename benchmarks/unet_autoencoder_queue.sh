#!/bin/bash
# The U-Net autoencoder's two MTD runs (l2-AE and SSIM-AE maps), each under the shared benchmark lock.
# Usage: nohup bash benchmarks/unet_autoencoder_queue.sh [--resume] &   (logs: benchmarks/logs/mtd_unet_autoencoder*.log)
cd "$(dirname "$0")/.." || exit 1
flock /tmp/metaad_bench.lock bash -c ". .venv/bin/activate && python benchmarks/mtd_benchmark.py --model unet_autoencoder --out benchmarks/_work/mtd_unet_autoencoder $*" >> benchmarks/logs/mtd_unet_autoencoder.log 2>&1
flock /tmp/metaad_bench.lock bash -c ". .venv/bin/activate && python benchmarks/mtd_benchmark.py --model unet_autoencoder --param map_type=ssim --name mtd_unet_autoencoder_ssim --out benchmarks/_work/mtd_unet_autoencoder_ssim $*" >> benchmarks/logs/mtd_unet_autoencoder_ssim.log 2>&1
