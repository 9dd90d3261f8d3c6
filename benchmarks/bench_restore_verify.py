"""How a verified CPU restore should read: the options for "verify while reading", measured side
by side in one process on the same file, calls alternating (order reversed every other
repetition), medians with the spread. Development script (see benchmarks/README.md):

    python benchmarks/bench_restore_verify.py [--mib 256] [--reps 15] [--dir /tmp]

Options, each filling the live tensors of a 16-tensor fp32 state from a file in the page cache:

- ``T``  ``torch.load(mmap=True)`` + ``copy_`` (the reference of ``spotckpt bench``)
- ``A``  what spotckpt does: the file mapped once, CRC32C'd on 2 threads, then copied from the
         same mapping into the live tensors (nothing lands before the whole file verified)
- ``B``  staging: each 1 MiB slice copied into a staging buffer and CRC32C'd there while it is
         in cache, then staging -> live tensors once the file verified (buffer reused per call)
- ``B'`` the same with a fresh staging buffer per call
- ``N``  unverified: ``A`` without the checksum pass
- ``C``  the checksum pass of ``A`` alone (so ``A`` ~ ``C`` + ``N``)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout wins over this folder

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spotckpt.format import SafetensorsFile, write_safetensors  # noqa: E402
from spotckpt.format import checksums as C  # noqa: E402
from spotckpt.tools.bench.context import StateSpec  # noqa: E402
from spotckpt.tools.bench.worker import build_state  # noqa: E402

SLICE = 1 << 20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--dir", default=os.environ.get("DIR") or tempfile.gettempdir())
    args = ap.parse_args(argv)
    state = build_state(StateSpec(device="cpu", dtype="float32", size_mib=args.mib, n_tensors=16))
    work = tempfile.mkdtemp(dir=args.dir, prefix="spotckpt-bench-verify-")
    try:
        pt, st = os.path.join(work, "load.pt"), os.path.join(work, "rank.safetensors")
        torch.save(state, pt)
        ent = write_safetensors(st, state)
        kept: list[np.ndarray] = []

        def t_load() -> None:
            loaded = torch.load(pt, mmap=True, weights_only=True, map_location="cpu")
            with torch.no_grad():
                for k, t in state.items():
                    t.copy_(loaded[k])

        def a_verified() -> None:
            with SafetensorsFile(st, expect=ent) as f:
                f.read_many(state.items())

        def n_unverified() -> None:
            with SafetensorsFile(st) as f:
                f.read_many(state.items())

        def c_crc_only() -> None:
            with open(st, "rb", buffering=0) as fh:
                m = C.MappedFile(fh.fileno(), ent.size)
                try:
                    with SafetensorsFile(st) as f:  # its helper threads
                        assert C.crc32c_b64(m.crc32c(f._run_parallel, f._threads)) == ent.crc32c
                finally:
                    m.close()

        def b_staging(reuse: bool) -> None:
            with SafetensorsFile(st) as f:
                n = ent.size
                m = C.MappedFile(f._f.fileno(), n)
                try:
                    if reuse and kept and kept[0].size == n:
                        buf = kept[0]
                    else:
                        buf = np.empty(n, dtype=np.uint8)
                        kept[:] = [buf] if reuse else []
                    half = n // 2 - n // 2 % 4096

                    def fill(a: int, b: int) -> int:
                        C._populate_at(m._arr, a, b)
                        crc = 0
                        for o in range(a, b, SLICE):
                            e = min(b, o + SLICE)
                            np.copyto(buf[o:e], m._arr[o:e])
                            crc = C.crc32c_update(crc, buf[o:e])
                        return crc

                    c0, c1 = f._run_parallel(fill, [(0, half), (half, n)])
                    if C.crc32c_b64(C.crc32c_combine(c0, c1, n - half)) != ent.crc32c:
                        raise AssertionError("corrupt")
                finally:
                    m.close()
                segs = [(t, f._data_start + f.specs[k].start) for k, t in state.items()]

                def hand_over(items: list[Any]) -> None:
                    for t, off in items:
                        nb = t.numel() * t.element_size()
                        np.copyto(t.view(torch.uint8).numpy().reshape(-1), buf[off : off + nb])

                f._run_parallel(hand_over, [(segs[: len(segs) // 2],), (segs[len(segs) // 2 :],)])

        fns = {"T torch.load(mmap)+copy_": t_load, "A map, CRC32C, copy (spotckpt)": a_verified,
               "B staging reused": lambda: b_staging(True), "B' staging fresh": lambda: b_staging(False),
               "N unverified": n_unverified, "C CRC32C pass alone": c_crc_only}
        res: dict[str, list[float]] = {k: [] for k in fns}
        keys = list(fns)
        for fn in fns.values():  # warm-up: page cache, allocations
            fn()
        for r in range(args.reps):
            for k in keys if r % 2 == 0 else keys[::-1]:
                for t in state.values():
                    t.fill_(0)
                t0 = time.perf_counter()
                fns[k]()
                res[k].append(time.perf_counter() - t0)
                if not k.startswith("C") and not all(float(t[5000]) == i + 1 for i, t in enumerate(state.values())):
                    raise AssertionError(f"{k} did not restore the state")
        base = statistics.median(res[keys[0]])
        print(f"{args.mib} MiB fp32 (16 tensors), {args.reps} alternating repetitions, crc {C.CRC32C_IMPL}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        for k, v in res.items():
            med = statistics.median(v)
            print(f"  {k:32s} median {med * 1e3:8.1f} ms [{min(v) * 1e3:.1f}-{max(v) * 1e3:.1f}]  {med / base:5.2f}x T")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
