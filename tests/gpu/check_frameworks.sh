#!/usr/bin/env bash
# The device check for the sharded framework strategies that do not run on CPU (Trainer FSDP2
# with SHARDED_STATE_DICT, Lightning FSDPStrategy sharded): tests/gpu/test_gpu_frameworks_sharded.py
# on a lent GPU machine, one process per GPU (at most 2).
#
#   run(command="bash tests/gpu/check_frameworks.sh", carry=[".whl"], timeout_s=420)
#
# The device image has torch (CUDA) but none of the frameworks: carry them as wheels in .whl/
# (ignored by git), installed here into /tmp, never into the image -- on this machine:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl crc32c transformers==5.23.0 accelerate==1.16.0 pytorch-lightning==2.6.6 \
#       lightning-utilities torchmetrics huggingface-hub tokenizers safetensors regex tqdm pyyaml
# (add whatever `gpu_frameworks.txt` then reports MISSING). Writes gpu_frameworks.txt (card,
# versions) and gpu_frameworks.log (the pytest run) to $OUT (default benchmarks/out-gpu).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/out-gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/spotckpt-site .whl/*.whl && export PYTHONPATH="/tmp/spotckpt-site:$PWD"
fi
"$PY" - <<'PY' 2>&1 | tee "$OUT/gpu_frameworks.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
for m in ("crc32c", "transformers", "accelerate", "pytorch_lightning", "spotckpt.integrations.lightning"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "ok"))
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING:", repr(e)[:200])
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/gpu_frameworks.txt"
timeout -k 10 "${TEST_TIMEOUT:-360}" "$PY" -m pytest -q -p no:cacheprovider -ra \
    tests/gpu/test_gpu_frameworks_sharded.py 2>&1 | tee "$OUT/gpu_frameworks.log"
rc=${PIPESTATUS[0]}
echo "gpu framework tests exit $rc" | tee -a "$OUT/gpu_frameworks.log"
exit "$rc"
