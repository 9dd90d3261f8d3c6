"""examples/hf_trainer.py with the Trainer's save of step --slow-step made slow (a sleep between
writing the optimizer and the RNG state), announced on stdout as ``saving N``, so a test can
signal or kill the process in the middle of the framework's own save."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from transformers import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import hf_trainer  # noqa: E402

slow = int(sys.argv[sys.argv.index("--slow-step") + 1])
argv = [a for i, a in enumerate(sys.argv[1:]) if "--slow-step" not in (a, sys.argv[i])]
original = Trainer._save_rng_state


def slow_rng_state(self, output_dir):  # type: ignore[no-untyped-def]
    if self.state.global_step == slow:
        print(f"saving {slow}", flush=True)
        time.sleep(2.0)
    return original(self, output_dir)


Trainer._save_rng_state = slow_rng_state
sys.exit(hf_trainer.main(argv))
