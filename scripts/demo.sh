#!/usr/bin/env bash
# The main job: a real PyTorch training loop (examples/train_toy.py) through 2 simulated spot
# interruptions, on an embedded S3 server (moto on 127.0.0.1; no AWS account), with a fresh empty
# local checkpoint directory on every restart -- then the same training uninterrupted, to show
# that the interrupted run ended with bit-for-bit the same weights and loss history.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
log=$(mktemp)
ref=$(mktemp -d)
trap 'rm -rf "$log" "$ref"' EXIT
steps=120
args=(--steps "$steps" --workers 2)
# --total-steps places both interruptions at steps inside the run (never after the last step);
# --step-sleep paces the demo (changes no result)
# 2>&1: one stream, so the simulator's lines and the trainer's come in the order written;
# --plot draws the job's timeline (instances, interruptions, saves, durable steps, lost work)
png=${PLOT:-demo-timeline.png}
spotckpt simulate --interruptions 2 --total-steps "$steps" --seed "${SEED:-0}" --plot "$png" \
  -- python examples/train_toy.py "${args[@]}" --step-sleep 0.02 2>&1 | tee "$log"
echo
echo "Reference: the same training, never interrupted"
done_line=$(SPOTCKPT_METRICS=0 python examples/train_toy.py "${args[@]}" --local-dir "$ref/ckpt" 2>/dev/null | tail -1)
echo "$done_line"
sim=$(grep -o 'weights [0-9a-f]*; losses [0-9a-f]*' "$log" | tail -1)
want=$(echo "$done_line" | grep -o 'weights [0-9a-f]*; losses [0-9a-f]*')
echo
if [ -n "$sim" ] && [ "$sim" = "$want" ]; then
  echo "Identical: interrupted twice, resumed from S3 each time, same final $sim"
  [ -f "$png" ] && echo "The picture of the interrupted run: $(pwd)/$png"
else
  echo "MISMATCH: interrupted run '$sim' vs uninterrupted '$want'" >&2
  exit 1
fi
