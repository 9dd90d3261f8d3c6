"""examples/lightning_fit.py for the several-ranks tests; with ``--die-in-save N`` rank 0 -- the
rank that writes the ``.ckpt`` under ``ddp`` -- is SIGKILLed in the middle of Lightning's save of
step N: the file written in ``dirpath``, the other rank waiting in the save's barrier, nothing
adopted."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import lightning_fit  # noqa: E402

argv = sys.argv[1:]
if "--die-in-save" in argv:
    i = argv.index("--die-in-save")
    die_at = int(argv[i + 1])
    del argv[i:i + 2]
    original = TorchCheckpointIO.save_checkpoint

    def dying_save(self, checkpoint, path, storage_options=None):  # type: ignore[no-untyped-def]
        original(self, checkpoint, path, storage_options=storage_options)
        if checkpoint["global_step"] == die_at:
            print(f"dying in the save of {die_at}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    TorchCheckpointIO.save_checkpoint = dying_save
sys.exit(lightning_fit.main(argv))
