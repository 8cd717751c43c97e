#!/usr/bin/env bash
# Issue 27: the feature-space universal models of Table 3 (A, A+P+T, A+P), meta-trained with `metaad meta-train`
# (preset cpu) on ECSSD, DUTS-TR and DTD's training split, the inner loop = the default adaptation. Resumable:
# rerun it and each continues from its checkpoint. A+P and A+P+T share one feature cache (features and P's maps).
# Usage: bash benchmarks/issue27_meta_train.sh [CONFIGURATION ...]   (default: A A+P+T A+P)
set -u
cd "$(dirname "$0")/.."
METAAD=${METAAD:-.venv/bin/metaad}
WILD=(../shared/data/saliency/ecssd ../shared/data/saliency/duts_tr ../shared/data/dtd/train/*)
WORK=benchmarks/_work
mkdir -p "$WORK/metaformer_feature_shared_prior_features" benchmarks/logs
for configuration in "${@:-A A+P+T A+P}"; do
  for conf in $configuration; do
    tag=${conf//+/}
    out=$WORK/metaformer_feature_$tag
    mkdir -p "$out"
    if [ "$conf" != A ] && [ ! -e "$out/features" ]; then
      ln -s ../metaformer_feature_shared_prior_features "$out/features"
    fi
    for tasks in "$WORK"/metaformer_feature_*/meta_tasks_*.json; do  # the same meta-tasks (a cached JSON)
      [ -f "$tasks" ] && [ ! -f "$out/$(basename "$tasks")" ] && cp "$tasks" "$out/"
    done
    "$METAAD" meta-train --wild "${WILD[@]}" --out "$out" --configuration "$conf" --threads 2 --resume \
      > "benchmarks/logs/metaformer_feature_meta_train_$tag.log" 2>&1
  done
done
