#!/usr/bin/env bash
# Install, then lint and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
ruff check src tests benchmarks
python -m pytest -q "$@"
