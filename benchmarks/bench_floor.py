"""Local hot-path figures of two checkouts side by side, alternating: see benchmarks/README.md.

    python benchmarks/bench_floor.py --trees new=.,base=/tmp/ab-base [--cmds raw,blocking,...]
                                     [--reps 11] [--mib 1024] [--dir D]

One long-lived worker process per checkout (``PYTHONPATH`` = that checkout) holds the same
synthetic state (``--mib`` of float32 in 16 tensors); the driver asks each worker in turn, the
order reversed every repetition, so that a load change on a shared machine hits both alike. Per
command it prints the median with [min..max] and, against the first command of the first tree,
the median and quartiles of the per-repetition ratios (adjacent in time, so less exposed to the
machine's load than ratios of medians). Commands (time of one call, seconds unless noted):

    copy        copy_ of the state into buffers allocated once (the floor of a snapshot)
    raw         the state's bytes written to one new file, then fsync (the disk's floor)
    tload       torch.load(mmap=True) of a torch.save of the state + copy_ into it
    blocking    CheckpointManager.save(blocking=True)
    async       save() -> "stall" (until it returns) and "t" (until wait() returns)
    restore     restore() by a fresh manager (verify_on_restore=True), into the live tensors
    restore_nv  the same with verify_on_restore=False
    maybe       maybe_save() per step when no save is due, microseconds (best of 5 x 200k)

Deleted files and old steps are removed and ``os.sync()`` is called *outside* the timed region
after every write, so a deletion's discards or another row's dirty pages are not paid by the
next timed call. Restores read from a warm page cache (the step was just written).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORKER_CMDS = ("copy", "raw", "tload", "blocking", "async", "restore", "restore_nv", "maybe")
SHARED = ("copy", "raw", "tload")  # measured once (by the first tree's worker): not spotckpt's code


def worker(mib: int, workdir: str) -> None:
    """Answer one command per stdin line with one JSON line of timings."""
    import torch

    import spotckpt

    n_t = 16
    state = {f"t{i}": torch.randn(mib * 1024 * 1024 // 4 // n_t) for i in range(n_t)}
    root = tempfile.mkdtemp(dir=workdir)
    ck = os.path.join(root, "ck")

    def manager(**kw: Any) -> Any:
        return spotckpt.CheckpointManager(local_dir=ck, s3_uri=None, keep_last=10**6, metrics=False,
                                          install_signal_handlers=False, **kw)

    mgr = manager()
    step = [0]
    probe = {k: v[:257].clone() for k, v in state.items()}
    host: dict[str, Any] = {}

    def clobber() -> None:
        with torch.no_grad():
            for t in state.values():
                t.fill_(0)

    def check() -> None:
        for k, v in probe.items():
            if not torch.equal(state[k][:257], v):
                raise AssertionError(f"{k} was not restored")

    def prune() -> None:
        for name in sorted(n for n in os.listdir(ck) if n.startswith("step-"))[:-1]:
            shutil.rmtree(os.path.join(ck, name))
        os.sync()

    def copy() -> dict[str, float]:
        if not host:
            host.update({k: torch.empty_like(v) for k, v in state.items()})
        t0 = time.perf_counter()
        for k, v in state.items():
            host[k].copy_(v)
        return {"t": time.perf_counter() - t0}

    def raw() -> dict[str, float]:
        p = os.path.join(root, "raw.bin")
        t0 = time.perf_counter()
        with open(p, "wb", buffering=0) as f:
            for t in state.values():
                f.write(memoryview(t.view(torch.uint8).numpy()))
            os.fsync(f.fileno())
        d = time.perf_counter() - t0
        os.unlink(p)
        os.sync()
        return {"t": d}

    def tload() -> dict[str, float]:
        p = os.path.join(root, "load.pt")
        if not os.path.exists(p):
            torch.save(state, p)
        clobber()
        t0 = time.perf_counter()
        loaded = torch.load(p, mmap=True, weights_only=True, map_location="cpu")
        with torch.no_grad():
            for k, t in state.items():
                t.copy_(loaded[k])
        del loaded
        d = time.perf_counter() - t0
        check()
        return {"t": d}

    def blocking() -> dict[str, float]:
        step[0] += 1
        t0 = time.perf_counter()
        mgr.save(step[0], state, blocking=True)
        d = time.perf_counter() - t0
        mgr.wait()
        prune()
        return {"t": d}

    def async_() -> dict[str, float]:
        step[0] += 1
        t0 = time.perf_counter()
        mgr.save(step[0], state)
        stall = time.perf_counter() - t0
        mgr.wait()
        d = time.perf_counter() - t0
        prune()
        return {"stall": stall, "t": d}

    def restore(verify: bool) -> dict[str, float]:
        if step[0] == 0:
            step[0] += 1
            mgr.save(step[0], state, blocking=True)
        mgr.wait()
        r = manager(verify_on_restore=verify)  # as a restarted job would
        clobber()
        t0 = time.perf_counter()
        got = r.restore(state)
        d = time.perf_counter() - t0
        r.close()
        check()
        if got != step[0]:
            raise AssertionError(f"restored step {got}, expected {step[0]}")
        return {"t": d}

    def maybe() -> dict[str, float]:
        small = {"w": torch.zeros(16)}
        d = os.path.join(root, "mb")
        m = spotckpt.CheckpointManager(local_dir=d, s3_uri=None, every_steps=10**9, metrics=False,
                                       install_signal_handlers=False)
        n, best = 200_000, float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(1, n + 1):
                m.maybe_save(i, small)
            best = min(best, (time.perf_counter() - t0) / n)
        m.close()
        shutil.rmtree(d, ignore_errors=True)
        return {"t": best * 1e6}

    cmds = {"copy": copy, "raw": raw, "tload": tload, "blocking": blocking, "async": async_,
            "restore": lambda: restore(True), "restore_nv": lambda: restore(False), "maybe": maybe}
    print(json.dumps({"ready": spotckpt.__file__}), flush=True)
    for line in sys.stdin:
        c = line.strip()
        if c == "quit":
            break
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        out: dict[str, Any] = cmds[c]()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        out["cpu"] = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        print(json.dumps(out), flush=True)
    mgr.close()
    shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trees", default=f"this={Path(__file__).resolve().parents[1]}",
                    help="name=checkout[:extra sys.path],... (PYTHONPATH of each worker)")
    ap.add_argument("--cmds", default="raw,blocking,async,tload,restore,restore_nv",
                    help=f"comma-separated, from {','.join(WORKER_CMDS)}")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--dir", default=os.environ.get("DIR") or tempfile.gettempdir(), help="where files go")
    ap.add_argument("--json", help="write every sample here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.mib, a.dir)
        return 0
    trees = dict(x.split("=", 1) for x in a.trees.split(","))
    cmds = a.cmds.split(",")
    unknown = sorted(set(cmds) - set(WORKER_CMDS))
    if unknown:
        ap.error(f"unknown commands {unknown}")
    procs = {}
    for name, tree in trees.items():
        env = dict(os.environ, PYTHONPATH=tree)
        procs[name] = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "--mib", str(a.mib), "--dir", a.dir],
            cwd=tree.split(":")[0], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        print(name, json.loads(procs[name].stdout.readline())["ready"], flush=True)

    def ask(name: str, cmd: str) -> dict[str, float]:
        p = procs[name]
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(cmd + "\n")
        p.stdin.flush()
        return json.loads(p.stdout.readline())

    first = next(iter(trees))
    jobs = [(n, c) for c in cmds for n in trees if not (c in SHARED and n != first)]
    res: dict[tuple[str, str, str], list[float]] = {}
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    for r in range(a.reps):
        for n, c in (jobs if r % 2 == 0 else list(reversed(jobs))):
            for k, v in ask(n, c).items():
                res.setdefault((n, c, k), []).append(v)
    for p in procs.values():
        assert p.stdin is not None
        p.stdin.write("quit\n")
        p.stdin.flush()
        p.wait()
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    for (n, c, k), v in sorted(res.items(), key=lambda x: (x[0][1], x[0][0], x[0][2])):
        if k == "cpu":
            continue
        unit = "us" if c == "maybe" else "s"
        print(f"{c:11s} {n:6s} {k:5s} median {statistics.median(v):.4f} {unit} [{min(v):.4f}..{max(v):.4f}] n={len(v)}")
    ref = (first, cmds[0], "t")
    for (n, c, k), v in sorted(res.items()):
        if (n, c, k) == ref or k != "t" or ref not in res:
            continue
        rs = sorted(x / y for x, y in zip(v, res[ref]))
        q1, q3 = rs[len(rs) // 4], rs[min(len(rs) - 1, 3 * len(rs) // 4)]
        print(f"{c}/{n} / {ref[1]}: median {statistics.median(rs):.3f} IQR [{q1:.3f}..{q3:.3f}] [{rs[0]:.3f}..{rs[-1]:.3f}]")
    if a.json:
        Path(a.json).write_text(json.dumps({"|".join(k): v for k, v in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
