"""examples/hf_trainer.py for the several-ranks tests; with ``--die-in-save N`` rank 1 is
SIGKILLed in the middle of the Trainer's save of step N (its RNG file written, rank 0's files
maybe not yet, nothing adopted)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from transformers import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import hf_trainer  # noqa: E402

argv = sys.argv[1:]
if "--die-in-save" in argv:
    i = argv.index("--die-in-save")
    die_at = int(argv[i + 1])
    del argv[i:i + 2]
    original = Trainer._save_rng_state

    def dying_rng_state(self, output_dir):  # type: ignore[no-untyped-def]
        original(self, output_dir)
        if self.state.global_step == die_at and self.args.process_index == 1:
            print(f"dying in the save of {die_at}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer._save_rng_state = dying_rng_state
sys.exit(hf_trainer.main(argv))
