#!/usr/bin/env bash
# The test command (README and .ci/run): bootstrap ./.venv, then the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/unit -x`. Two workers
# (pytest-xdist): most tests wait on child processes and servers, so two overlap well even on two
# cores; `-n 0` runs in this process (for -x, --pdb and readable output).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
exec python -m pytest -p no:cacheprovider -n "${SPOTCKPT_TEST_WORKERS:-2}" --durations=15 "$@"
