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
# pip's output minus two notices that are not problems: its "Location ... is ignored" lines for
# an index it cannot reach, and setuptools' BuildBackendWarning that an editable install is
# editable (the block from that line to the source line after its second "!!"). pip's errors,
# and any other warning, still show.
quiet_pip() {
  awk '/^WARNING: Location /{next}
       /BuildBackendWarning: Editable installation\./{skip=1; bangs=0; next}
       skip==1 && /^ *!!$/{bangs++; if (bangs==2) skip=2; next}
       skip==1{next}
       skip==2{skip=0; next}
       {print}'
}
stamp=.venv/.spotckpt-bootstrap
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing PyTorch 2.13.0 (CPU) and spotckpt with its dev, bench and integrations extras" \
       "into ./.venv (about 1.6 GB; typically 1-2 minutes, once)..."
  start=$SECONDS
  python -m pip install -q --upgrade pip 2>&1 | quiet_pip || true
  python -m pip install -q "torch==2.13.0" 2>&1 | quiet_pip || true
  python -m pip install -q -e ".[dev,bench,integrations]" 2>&1 | quiet_pip || true
  python -c "import torch, boto3, moto, watchdog, crc32c, xdist, spotckpt"
  touch "$stamp"
  echo "bootstrap: done in $((SECONDS - start)) s"
fi
