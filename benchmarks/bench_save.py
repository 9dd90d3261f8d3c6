"""Checkpoint save/restore benchmark, side by side with the peers: see benchmarks/README.md.

    python benchmarks/bench_save.py [--sizes 256,1024] [--out benchmarks/out] [--reps N] [--dir D]

The same as ``spotckpt bench``, run from a checkout. Where spotckpt's own dependencies are
missing (e.g. a bare GPU image) it still loads ``spotckpt.tools.bench`` -- without running the
package's ``__init__`` -- so the peers' rows run and spotckpt's rows are reported as skipped.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.path[0] = str(ROOT)  # this folder must not shadow top-level modules; the checkout must win
    try:
        import spotckpt  # noqa: F401
    except ImportError:
        stub = types.ModuleType("spotckpt")
        stub.__path__ = [str(ROOT / "spotckpt")]  # type: ignore[attr-defined]
        sys.modules["spotckpt"] = stub
    from spotckpt.tools.bench import main

    sys.exit(main())
