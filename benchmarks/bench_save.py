"""Side-by-side checkpoint benchmark (issue 4): see benchmarks/README.md.

    python benchmarks/bench_save.py [--sizes 256,1024] [--out benchmarks/out] [--reps N] [--dir D]

Same as ``spotckpt bench``. It loads ``spotckpt/bench.py`` by path, without importing the
``spotckpt`` package, so the peers' rows still run on a machine where the package's own
dependencies are missing (its rows are then reported as n/a with the import error).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("spotckpt_bench", ROOT / "spotckpt" / "bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    sys.exit(_load_bench().main())
