"""Child process for fault tests: saves a step-determined state in a loop.

usage: python saver_child.py DIR MODE [--start-from-restore] [--numel N] [--policy] [--max-steps N]
MODE: sync | async. Prints "saved N" after each save() returns (for sync: committed),
"restored N" at start, and "preempted N" when a SIGTERM turned into the final save.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from spotckpt import CheckpointManager  # noqa: E402
from tests.helpers import empty_state, step_state  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("mode", choices=["sync", "async"])
    p.add_argument("--numel", type=int, default=1 << 18)
    p.add_argument("--policy", action="store_true", help="use maybe_save every step (SIGTERM test)")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--step-sleep", type=float, default=0.0)
    a = p.parse_args()
    state = empty_state(numel=a.numel)
    with CheckpointManager(a.dir, keep_last=2, every_steps=10**9 if a.policy else 1,
                           async_save=a.mode == "async", metrics=False) as mgr:
        start = mgr.restore(state) or 0
        print(f"restored {start}", flush=True)
        for step in range(start + 1, start + 1 + a.max_steps):
            cur = step_state(step, numel=a.numel)
            for k, v in cur["weights"].items():  # type: ignore[union-attr]
                state["weights"][k].copy_(v)  # type: ignore[index]
            state["step_tensor"].copy_(cur["step_tensor"])  # type: ignore[union-attr]
            state["meta"] = cur["meta"]
            if a.policy:
                print(f"at {step}", flush=True)
                mgr.maybe_save(step, state)
                if mgr.preempted:
                    print(f"preempted {step}", flush=True)
                    return 0
                time.sleep(a.step_sleep)
            else:
                mgr.save(step, state)
                print(f"saved {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
