#!/usr/bin/env bash
# Create ./.venv (once) with PyTorch 2.13.0 first -- the CPU build this machine image carries on
# its disk; a looser requirement would pull a multi-GB CUDA build -- then spotckpt with its test,
# benchmark and framework-integration extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.spotckpt-bootstrap
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  python -m pip install -q -e ".[dev,bench,integrations]" 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import torch, boto3, moto, watchdog, crc32c, spotckpt" 
  touch "$stamp"
fi
