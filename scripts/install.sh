#!/usr/bin/env bash
# Create .venv (if missing) and install metaad with its test tools. Torch is pinned to the build that
# installs from this machine's disk; any torch>=2.4 works for metaad itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[test,lite12,serve,export]"
