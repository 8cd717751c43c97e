#!/usr/bin/env bash
# Issue 27's GPU step: the paper's pixel-space Metaformer (256 px, full width, batch 64, first-order MAML) meta-
# trained on about 4,000 local wild images (ECSSD + DUTS-TR) inside one command of under 10 minutes, with bf16
# autocast (losses in float32), channels-last layout and the decoded images kept on the GPU; then adapted on
# k = 8 MTD training images (seed-0 split) and tested. Prints the meta-training wall time, its seconds an epoch
# and the MTD figures. Not run yet: no GPU has been lent to this task.
#   bash benchmarks/gpu_metaformer_paper.sh [EPOCHS] [DEVICE]   (defaults: 100 cuda)
#   dry run on CPU: WILD=DIR META_ARGS="--image-size 64 --width 0.125" FIT_ARGS="--param image_size=64
#     --param width_multiplier=0.125" bash benchmarks/gpu_metaformer_paper.sh 1 cpu
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-100}
DEVICE=${2:-cuda}
PY=${PYTHON:-.venv/bin/python}
DATA=${MTD:-../shared/data/mtd}
SALIENCY=../shared/data/saliency
WILD=${WILD:-$SALIENCY/ecssd $SALIENCY/duts_tr}
for folder in $DATA $WILD; do
  [ -d "$folder" ] || { echo "skipped: $folder is absent (needs ../shared/data beside the repo)"; exit 0; }
done
OUT=$(mktemp -d)
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
start=$(date +%s)
# shellcheck disable=SC2086  # WILD and META_ARGS are word lists
timeout "${META_SECONDS:-420}" "$PY" -m metaad.cli.main meta-train --space pixel --preset paper --first-order \
  --mixed-precision --channels-last --epochs "$EPOCHS" --device "$DEVICE" --wild $WILD --out "$OUT/universal" \
  ${META_ARGS:-} || echo "meta-training stopped (exit $?): the epochs done are below"
end=$(date +%s)
echo "meta-training wall seconds (meta-tasks, decoding, priors and epochs): $((end - start))"
"$PY" - "$OUT/universal/progress.json" <<'PYEOF'
import json, sys
from pathlib import Path
progress = Path(sys.argv[1])
rows = json.loads(progress.read_text()).get("history", []) if progress.is_file() else []
seconds = [r["seconds"] for r in rows]
print(f"epochs done: {len(rows)}; seconds an epoch: first {seconds[0] if seconds else '—'}, "
      f"median {sorted(seconds)[len(seconds) // 2] if seconds else '—'}; last loss {rows[-1]['loss'] if rows else '—'}")
PYEOF
[ -f "$OUT/universal/universal.safetensors" ] || { echo "no universal model: MTD not run"; exit 0; }
# shellcheck disable=SC2086
"$PY" -m metaad.cli.main fit --model metaformer --preset paper --param init="$OUT/universal/universal.safetensors" \
  --shots 8 --data "$DATA" --device "$DEVICE" --no-progress --out "$OUT/mtd_k8" ${FIT_ARGS:-}
"$PY" -c "import json, sys; m = json.load(open(sys.argv[1])); print({k: m.get(k) for k in ('image_auroc', 'pixel_auroc', 'pro', 'fit_seconds', 'ms_per_image')})" "$OUT/mtd_k8/metrics.json"
