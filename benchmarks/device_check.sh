#!/usr/bin/env bash
# The one device run (a lent H100/H200): the GPU tests, the sharded (FSDP2) stall check, then the
# side-by-side GPU benchmark.
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=560)
# .whl holds the small wheels the GPU image lacks (crc32c; torchsnapshot and its two deps).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out-gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/spotckpt-site .whl/*.whl && export PYTHONPATH="/tmp/spotckpt-site:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
timeout -k 10 90 "$PY" -m pytest -q -p no:cacheprovider tests/gpu -ra 2>&1 | tee "$OUT/gpu_tests.log"
echo "gpu tests exit ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"
timeout -k 10 120 "$PY" benchmarks/gpu_sharded.py --gib "${SHARDED_GIB:-2}" --out "$OUT/sharded.json" 2>&1 \
    | tee "$OUT/sharded.log"
OUT="$OUT" BENCH_TIMEOUT="${BENCH_TIMEOUT:-330}" bash benchmarks/gpu_check.sh
