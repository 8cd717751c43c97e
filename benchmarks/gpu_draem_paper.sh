#!/usr/bin/env bash
# Issue 29's GPU step: DRAEM with --preset paper (256 px, widths 128 / 64, batch 8) for a few epochs on
# Magnetic Tile Defects, on a lent GPU, inside one command of under 8 minutes; prints the seconds an epoch from
# the run's training log. Not run yet: no GPU has been lent to this task.
#   bash benchmarks/gpu_draem_paper.sh [EPOCHS] [DEVICE]   (defaults: 3 cuda; PRESET=tiny ... 1 cpu: a dry run)
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-3}
DEVICE=${2:-cuda}
PY=${PYTHON:-.venv/bin/python}
DATA=${MTD:-../shared/data/mtd}
[ -d "$DATA" ] || { echo "skipped: $DATA is absent (needs ../shared/data beside the repo)"; exit 0; }
OUT=$(mktemp -d)/draem_paper
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
start=$(date +%s)
"$PY" -m metaad.cli.main fit --model draem --preset "${PRESET:-paper}" --param epochs="$EPOCHS" --data "$DATA" \
  --device "$DEVICE" --no-progress --out "$OUT"
end=$(date +%s)
echo "wall seconds (fit, calibration and test): $((end - start))"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
log = Path(sys.argv[1]) / "training" / "train_log.jsonl"
rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
print("epochs:", [(r.get("epoch"), round(r.get("seconds", float("nan")), 1), round(r.get("loss", float("nan")), 4)) for r in rows])
metrics = Path(sys.argv[1]) / "metrics.json"
if metrics.is_file():
    m = json.loads(metrics.read_text())
    print({k: m.get(k) for k in ("image_auroc", "pixel_auroc", "pro", "fit_seconds", "ms_per_image")})
PYEOF
