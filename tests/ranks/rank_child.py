"""One rank of a small torch.distributed (gloo) job, for the several-ranks tests.

    python rank_child.py SCENARIO LOCAL_DIR [args...]     (RANK, WORLD_SIZE, MASTER_* from the env)

Prints ``result <json>`` on success; errors propagate (the test reads stderr and the exit code).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import spotckpt


def state_for(step: int, rank: int) -> dict[str, object]:
    torch.manual_seed(0)
    net = DistributedDataParallel(nn.Linear(64, 64))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(step * 100 + rank)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))  # same on every rank
    return {"model": net, "optim": opt, "mine": torch.randn(16, generator=g), "info": {"rank": rank, "step": step}}


def memory_store(address: str) -> object:
    """The test's MemoryStore, served from the test process (multiprocessing.managers), behind
    exactly the methods of the RemoteStore protocol: anything else the manager called would
    fail here."""
    from multiprocessing.managers import BaseManager

    from spotckpt.core.protocols import REMOTE_STORE_METHODS

    class Manager(BaseManager):
        pass

    Manager.register("store")
    host, port = address.rsplit(":", 1)
    m = Manager(address=(host, int(port)), authkey=b"spotckpt-test")
    m.connect()
    proxy = m.store()  # type: ignore[attr-defined]

    class Forwarding:
        uri = "mem://two-hosts"

    store = Forwarding()
    for name in REMOTE_STORE_METHODS:
        if name == "download_step":  # a progress callback stays in this process
            def download_step(step, dest_dir, manifest=None, *, progress=None):  # type: ignore[no-untyped-def]
                got = proxy.download_step(step, dest_dir, manifest)
                if progress is not None:
                    progress(sum(e.size for e in (manifest or got).files.values()))
                return got
            store.download_step = download_step  # type: ignore[attr-defined]
        else:
            setattr(store, name, getattr(proxy, name))
    return store


def main() -> int:
    scenario, local_dir, *rest = sys.argv[1:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    kw = {"metrics": False, "keep_last": None, "collective_timeout_seconds": float(os.environ.get("TIMEOUT", "60")),
          "s3_uri": os.environ.get("S3_URI") or None}
    if os.environ.get("MEM_STORE"):
        kw["remote_store"] = memory_store(os.environ["MEM_STORE"])
    out: dict[str, object] = {}
    if scenario == "save":  # save the given steps, blocking or async
        mode = rest[0]
        steps = [int(x) for x in rest[1:]]
        with spotckpt.CheckpointManager(local_dir, **kw) as mgr:
            for s in steps:
                mgr.save(s, state_for(s, rank), blocking=mode == "blocking")
            mgr.wait()
            out["steps"] = mgr.all_steps()
    elif scenario == "restore":  # restore into a zeroed state and report what came back
        st = state_for(0, rank)
        with torch.no_grad():
            for p in st["model"].parameters():  # type: ignore[union-attr]
                p.zero_()
        st["mine"] = torch.zeros(16)
        st["info"] = None
        with spotckpt.CheckpointManager(local_dir, **kw) as mgr:
            step = mgr.restore(st)
        out["step"] = step
        if step is not None:
            want = state_for(step, rank)
            out["model_ok"] = all(torch.equal(a, b) for a, b in zip(st["model"].parameters(), want["model"].parameters()))  # type: ignore[union-attr]
            out["mine_ok"] = torch.equal(st["mine"], want["mine"])  # type: ignore[arg-type]
            out["info"] = st["info"]
    elif scenario == "restore-save":  # restore, then save the next step again, wait and close
        st = state_for(0, rank)
        t0 = time.monotonic()
        with spotckpt.CheckpointManager(local_dir, **kw) as mgr:
            step = mgr.restore(st)
            again = int(rest[0])
            mgr.save(again, state_for(again + 1, rank), blocking=True)  # other values than before
            out["wait_ok"] = mgr.wait()
            out["steps"] = mgr.all_steps()
        out["step"] = step
        out["seconds"] = time.monotonic() - t0
    elif scenario == "auto":  # every_steps="auto" on every rank: rank 0's AutoInterval decides for all
        from spotckpt.policy import AutoInterval

        pol = AutoInterval(interruptions_per_hour=60.0, max_interval_seconds=0.25, probe_steps=3)
        saved = []
        with spotckpt.CheckpointManager(local_dir, save_policy=pol, **kw) as mgr:
            for s in range(1, int(rest[0]) + 1):
                time.sleep(0.01 * (1 + rank))  # the ranks' own clocks and step times differ
                if mgr.maybe_save(s, state_for(s, rank)):
                    saved.append(s)
            mgr.wait()
            out["steps"] = mgr.all_steps()
        out["saved"] = saved
        out["interval_s"] = pol.interval_s
    elif scenario == "bad-step":  # rank 1 passes another step
        with spotckpt.CheckpointManager(local_dir, **kw) as mgr:
            try:
                mgr.save(5 + rank, state_for(5, rank), blocking=True)
            except spotckpt.SpotCkptError as exc:
                out["error"] = type(exc).__name__
                out["message"] = str(exc)
            out["steps"] = mgr.all_steps()
    elif scenario == "bad-keys":  # rank 1 passes a state with an extra key
        st = state_for(5, rank)
        if rank == 1:
            st["extra"] = 1
        with spotckpt.CheckpointManager(local_dir, **kw) as mgr:
            try:
                mgr.save(5, st, blocking=False)
                mgr.wait()
            except spotckpt.SpotCkptError as exc:
                out["error"] = type(exc).__name__
                out["message"] = str(exc)
            out["steps"] = mgr.all_steps()
    elif scenario == "bad-value":  # rank 1's state holds a value only pickle could store
        st = state_for(5, rank)
        if rank == 1:
            st["mine"] = object()
        with spotckpt.CheckpointManager(local_dir, **kw) as mgr:
            try:
                mgr.save(5, st, blocking=True)
            except spotckpt.SpotCkptError as exc:
                out["error"] = type(exc).__name__
                out["message"] = str(exc)
            out["steps"] = mgr.all_steps()
    elif scenario == "die-in-save":  # rank 1 is SIGKILLed in its second save; rank 0 must not hang
        st = state_for(1, rank)
        with spotckpt.CheckpointManager(local_dir, **kw) as mgr:
            mgr.save(1, st, blocking=True)
            if rank == 1:
                os.kill(os.getpid(), 9)
            t0 = time.monotonic()
            try:
                mgr.save(2, st, blocking=True)
            except spotckpt.SpotCkptError as exc:
                out["error"] = type(exc).__name__
                out["message"] = str(exc)[:300]
            out["seconds"] = time.monotonic() - t0
            out["steps"] = mgr.all_steps()
            mgr.close(abandon=True)  # the other rank is gone: no collective close
    elif scenario == "die-in-upload":  # rank 1's host is SIGKILLed while its files upload
        st = state_for(1, rank)
        with spotckpt.CheckpointManager(local_dir, **kw) as mgr:
            mgr.save(1, st, blocking=True)
            mgr.wait()
            if rank == 1:
                import botocore.client  # slow every part of rank 1's upload, then die mid-way

                real = botocore.client.BaseClient._make_api_call

                def slow(self, op, params):  # type: ignore[no-untyped-def]
                    if op in ("PutObject", "UploadPart", "CreateMultipartUpload"):
                        print("uploading", flush=True)
                        time.sleep(0.5)
                        os.kill(os.getpid(), 9)
                    return real(self, op, params)

                botocore.client.BaseClient._make_api_call = slow
            mgr.save(2, st, blocking=True)
            try:
                out["wait_ok"] = mgr.wait(timeout=15)
            except spotckpt.SpotCkptError as exc:
                out["error"] = type(exc).__name__
            mgr.close(abandon=True)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print("result " + json.dumps(out), flush=True)
    if scenario not in ("die-in-save", "die-in-upload"):
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
