"""A torchrun worker whose final save after SIGTERM takes longer than torchrun's default 30 s
shutdown timeout; it writes ``<dir>/saved-<rank>`` when done and exits 0."""

import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

out = Path(sys.argv[1])
seconds = float(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
(out / f"ready-{rank}").write_text("ok")
while not stop:
    time.sleep(0.05)
time.sleep(seconds)  # the "final save"
(out / f"saved-{rank}").write_text("ok")
print(f"saved {rank}", flush=True)
sys.exit(0)
