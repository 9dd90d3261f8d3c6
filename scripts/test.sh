#!/usr/bin/env bash
# The test command (README and .ci/run): bootstrap ./.venv, then the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
exec python -m pytest -p no:cacheprovider "$@"
