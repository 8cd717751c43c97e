#!/usr/bin/env bash
# Issue 27's test figures, after the choice on the validation (they choose nothing): the shipped feature-space
# Metaformer (its defaults) on MTD's seed-0 split at k = 1, 2, 4, 8 and all images, 3 seeds (the k-image draws
# PatchCore's k-shot curve used), and random initialisation with the same adaptation for the claim.
# Usage: bash benchmarks/issue27_mtd.sh [default|random|STEPS...]
set -u
cd "$(dirname "$0")"
PY=${PYTHON:-../.venv/bin/python}
case "${1:-default}" in
  default) flock /tmp/metaad_bench.lock "$PY" mtd_kshot.py --model metaformer --shots 8 all 1 2 4 --seeds 0 1 2 \
             --name metaformer_feature_default > logs/mtd_kshot_metaformer_feature_default.log 2>&1 ;;
  random) flock /tmp/metaad_bench.lock "$PY" mtd_kshot.py --model metaformer --init none --shots 1 2 4 8 \
            --seeds 0 1 2 --name metaformer_feature_random_init > logs/mtd_kshot_metaformer_feature_random_init.log 2>&1 ;;
esac
