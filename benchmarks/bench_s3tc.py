"""Save to S3 and restore from S3, spotckpt side by side with s3torchconnector and boto3's
defaults (one process), and DCP through ``spotckpt.dcp`` vs s3torchconnector's DCP storage (two
gloo ranks, FSDP2), on SeaweedFS on 127.0.0.1: see benchmarks/README.md.

    python benchmarks/bench_s3tc.py [--mib 1024] [--reps 5] [--cases one,dcp] [--out benchmarks/out]

The same as ``spotckpt bench s3`` (:mod:`spotckpt.tools.bench.s3peers`), run from a checkout, with
``--mib 1024`` unless another size is given. Writes ``s3peers.json`` and ``s3peers.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.path[0] = str(ROOT)  # this folder must not shadow top-level modules; the checkout must win
    from spotckpt.tools.bench.s3peers import main

    argv = sys.argv[1:]
    if not any(a == "--mib" or a.startswith("--mib=") for a in argv):
        argv = ["--mib", "1024", *argv]
    sys.exit(main(argv))
