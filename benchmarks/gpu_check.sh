#!/usr/bin/env bash
# The one short device check: the side-by-side save benchmark on a lent GPU machine.
#
# Run from the repo root (the device tool starts there):  bash benchmarks/gpu_check.sh
# Installs nothing heavy: the image's python3 has torch (CUDA), matplotlib and psutil; the few
# small pure/abi wheels it lacks (crc32c for spotckpt; torchsnapshot, importlib-metadata,
# nest-asyncio for the torchsnapshot rows) are installed from ./.whl when that folder was carried
# (see benchmarks/README.md), into /tmp, never into the image.
# Writes save.json, save.md, save.png, bench.log and gpu.txt to $OUT (default benchmarks/out-gpu)
# and prints the JSON. Without CUDA it falls back to a small CPU state so it can be tried anywhere.
#
# Knobs (env): GPU_GIB (4), SIZES (CPU fp32 MiB list on top of the GPU state, default none),
# REPS (2), DIR (where checkpoints are written: /tmp, or benchmarks/out/tmp when /tmp is a
# tmpfs), BENCH_TIMEOUT (seconds, 480).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out-gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/spotckpt-site .whl/*.whl \
        && export PYTHONPATH="/tmp/spotckpt-site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PY' >"$OUT/gpu.txt" 2>&1
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, round(p.total_memory / 2**30, 1), "GiB")
for m in ("crc32c", "torchsnapshot", "matplotlib", "psutil", "spotckpt.manager"):
    try:
        importlib.import_module(m); print(m, "ok")
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING:", repr(e)[:200])
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/gpu.txt" 2>&1 || true
cat "$OUT/gpu.txt"

# checkpoints go to a real disk: if /tmp is a tmpfs, fsync would be free; use the checkout's disk
if [ -z "${DIR:-}" ]; then
    DIR=/tmp
    if [ "$(stat -f -c %T /tmp 2>/dev/null)" = tmpfs ]; then
        DIR=benchmarks/out/tmp; mkdir -p "$DIR"
    fi
fi
SIZES="${SIZES:-none}"
if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    [ "$SIZES" = none ] && SIZES="${CPU_FALLBACK_SIZES:-32}"
    echo "gpu_check: no CUDA here; running the CPU state(s) $SIZES MiB instead"
fi
timeout -k 30 "${BENCH_TIMEOUT:-480}" "$PY" benchmarks/bench_save.py --sizes "$SIZES" \
    --gpu-gib "${GPU_GIB:-4}" --reps "${REPS:-2}" --out "$OUT" --dir "$DIR" \
    --timeout 240 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
echo "=== $OUT/save.json (exit $rc)"
cat "$OUT/save.json" 2>/dev/null || echo "no save.json written"
exit "$rc"
