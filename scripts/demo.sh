#!/usr/bin/env bash
# Install, then run the main job on the built-in synthetic data set: fit PatchCore, evaluate, write a report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
metaad demo --out "${1:-runs/demo}"
