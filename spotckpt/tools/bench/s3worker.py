"""The worker side of ``spotckpt bench s3``: one process of one case, measuring every peer of
that case in alternating repetitions against one S3 endpoint.

    python -m spotckpt.tools.bench.s3worker '<json>'

Two cases (the JSON's ``case``):

- ``"one"``: one process holding a CPU fp32 state (:func:`spotckpt.tools.bench.worker.build_state`)
  saves it to S3 and restores it from S3 into its live tensors, by each peer:
  ``spotckpt`` (``CheckpointManager.save`` then ``wait()``, which returns once the step is
  committed locally *and* uploaded; restore: ``restore()`` on a manager with an empty local
  directory, CRC32C verified), ``s3torchconnector`` (``S3Checkpoint.writer`` + ``torch.save``;
  ``reader`` + ``torch.load(weights_only=True)`` + ``copy_``) and ``boto3`` (``torch.save`` to a
  file + fsync, then ``upload_file``; ``download_file`` + ``torch.load(mmap=True,
  weights_only=True)`` + ``copy_``), boto3's default ``TransferConfig``.
- ``"dcp"``: one rank of a gloo job (``RANK``/``WORLD_SIZE``/``MASTER_*`` in the environment)
  holding an FSDP2 model and its AdamW state; ``dcp.save`` / ``dcp.load`` through
  ``spotckpt.dcp.StorageWriter(mgr)`` (then ``mgr.wait()``: uploaded) / ``StorageReader(mgr)`` on
  a manager with an empty local directory, and through s3torchconnector's ``S3StorageWriter`` /
  ``S3StorageReader``.

Every timed call starts after ``os.sync()`` (nothing written earlier is still being written back)
and ``gc.collect()``; on several ranks after a barrier. Per call it records the wall time, this
process's CPU time (every thread: ``os.times``) and, on rank 0, the CPU time of the S3 server's
process (``/proc/<pid>/stat``) over the call (on several ranks from the barrier before to the
barrier after it). The first ``warmup`` repetitions (1 by default) are a warm-up, reported
apart. Before each restore the live values are overwritten and after it they are checked, so a
restore that does nothing fails.

The worker prints one line ``RESULT_MARKER + json`` and exits 0; a failure becomes ``error``.
Everything runs on the worker's main thread (the peers' own threads aside).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from typing import Any

RESULT_MARKER = "SPOTCKPT-S3BENCH-RESULT "
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_s(pid: int | None) -> float:
    """utime + stime of process ``pid`` (every thread) from ``/proc/<pid>/stat``; 0 without one."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)
    except (OSError, IndexError, ValueError):
        return 0.0


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class Meter:
    """Times one call: wall, this process's CPU, the server's CPU (see the module doc)."""

    def __init__(self, server_pid: int | None, barrier: Callable[[], None] | None = None,
                 rank: int = 0) -> None:
        self.server_pid = server_pid if rank == 0 else None
        self.barrier = barrier or (lambda: None)

    def __call__(self, fn: Callable[[], object]) -> dict[str, float]:
        os.sync()
        gc.collect()
        self.barrier()
        s0 = proc_cpu_s(self.server_pid)
        c0 = self_cpu_s()
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        c1 = self_cpu_s()
        self.barrier()
        s1 = proc_cpu_s(self.server_pid)
        return {"wall_s": wall, "cpu_s": c1 - c0, "server_cpu_s": s1 - s0}


def order(i: int, names: list[str]) -> list[str]:
    """``names`` rotated by ``i``: every peer goes first, second, ... in turn."""
    k = i % len(names) if names else 0
    return names[k:] + names[:k]


def s3tc_config(endpoint: str | None) -> Any:
    from s3torchconnector import S3ClientConfig

    # a local server is addressed by path (bucket in the path, not the host name)
    return S3ClientConfig(force_path_style=bool(endpoint))


def split_uri(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


def delete_prefix(client: Any, bucket: str, prefix: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objs:
            client.delete_objects(Bucket=bucket, Delete={"Objects": objs, "Quiet": True})


MANAGER_KW: dict[str, Any] = dict(every_steps=None, metrics=False, install_signal_handlers=False)


# --------------------------------------------------------------------------------------------
# one process


class _Peer:
    """A peer of the one-process case: ``save(step)`` and ``restore()`` are timed, the rest not."""

    def __init__(self, job: dict[str, Any], state: dict[str, Any]) -> None:
        self.job, self.state = job, state
        self.bucket, self.prefix = split_uri(job["s3_uri"])
        self.work = job["workdir"]

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, self.prefix, *parts])

    def key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    def save(self, step: int) -> None:
        raise NotImplementedError

    def after_save(self, step: int) -> None:
        """Untimed clean-up after a save (the previous copy in S3, a local file)."""

    def before_restore(self) -> None:
        """Untimed set-up of the next restore."""

    def restore(self) -> None:
        raise NotImplementedError

    def after_restore(self) -> None:
        """Untimed clean-up after a restore."""

    def close(self) -> None:
        pass


def _copy_into(state: dict[str, Any], loaded: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for k, t in state.items():
            t.copy_(loaded[k])


class SpotckptPeer(_Peer):
    name = "spotckpt"
    #: the manager's settings beyond MANAGER_KW (the after-commit peer turns upload while writing off)
    settings: dict[str, Any] = {}

    def __init__(self, job: dict[str, Any], state: dict[str, Any]) -> None:
        super().__init__(job, state)
        from spotckpt import CheckpointManager

        self.Manager = CheckpointManager
        self.kw = {**MANAGER_KW, **self.settings}
        self.mgr = CheckpointManager(os.path.join(self.work, f"{self.name}-save"), self.uri(f"{self.name}-save"),
                                     keep_last=1, **self.kw)
        # the step the restores read, saved once through a manager as a user would
        with CheckpointManager(os.path.join(self.work, f"{self.name}-src"), self.uri(f"{self.name}-restore"),
                               keep_last=None, **self.kw) as m:
            m.save(1, state, blocking=True)
            if not m.wait():
                raise RuntimeError("the restore source never reached S3")
        shutil.rmtree(os.path.join(self.work, f"{self.name}-src"), ignore_errors=True)
        self.rmgr: Any = None
        # where a save's time goes, from the manager's own events: save() returned (stall),
        # committed locally (durable_local: since save() began), uploaded (durable_s3: the upload)
        self.phases: dict[str, list[float]] = {"stall_s": [], "local_commit_s": [], "upload_s": []}
        self._events: dict[str, float] = {}
        self.mgr.events.subscribe(self._on_event, progress=False)

    def _on_event(self, ev: Any) -> None:
        if ev.name in ("durable_local", "durable_s3"):
            self._events[ev.name] = float(ev.seconds)

    def save(self, step: int) -> None:
        self._events.clear()
        t0 = time.perf_counter()
        self.mgr.save(step, self.state)  # async: returns once the state is staged
        self.phases["stall_s"].append(time.perf_counter() - t0)
        if not self.mgr.wait():  # committed locally and uploaded (manifest last)
            raise RuntimeError(f"step {step} did not reach S3")
        self.phases["local_commit_s"].append(self._events.get("durable_local", float("nan")))
        self.phases["upload_s"].append(self._events.get("durable_s3", float("nan")))

    def before_restore(self) -> None:
        self.rdir = os.path.join(self.work, f"{self.name}-restore")
        shutil.rmtree(self.rdir, ignore_errors=True)
        self.rmgr = self.Manager(self.rdir, self.uri(f"{self.name}-restore"), keep_last=None, **self.kw)
        if not self.rmgr.verify_on_restore:
            raise RuntimeError("the restore must verify CRC32C")

    def restore(self) -> None:
        got = self.rmgr.restore(self.state)
        if got != 1:
            raise RuntimeError(f"spotckpt restored step {got!r}, expected 1")

    def after_restore(self) -> None:
        self.rmgr.close()
        self.rmgr = None
        shutil.rmtree(self.rdir, ignore_errors=True)

    def close(self) -> None:
        if self.rmgr is not None:
            self.rmgr.close()
        self.mgr.close()


class SpotckptAfterCommitPeer(SpotckptPeer):
    """spotckpt with ``upload_while_writing=False``: the upload starts after the local commit, from
    the committed file (the A/B of upload while writing; its restore is spotckpt's)."""

    name = "spotckpt-after-commit"
    settings = {"upload_while_writing": False}


class S3tcPeer(_Peer):
    name = "s3torchconnector"

    def __init__(self, job: dict[str, Any], state: dict[str, Any]) -> None:
        super().__init__(job, state)
        import boto3
        from s3torchconnector import S3Checkpoint

        self.torch = __import__("torch")
        self.s3 = boto3.client("s3")
        self.ck = S3Checkpoint(region=job["region"], endpoint=job["endpoint"],
                               s3client_config=s3tc_config(job["endpoint"]))

    def save(self, step: int) -> None:
        with self.ck.writer(self.uri("s3tc-save", f"step-{step}.pt")) as w:
            self.torch.save(self.state, w)  # the upload completes when the writer closes

    def after_save(self, step: int) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.key("s3tc-save", f"step-{step}.pt"))

    def restore(self) -> None:
        with self.ck.reader(self.job["torch_save_uri"]) as r:
            loaded = self.torch.load(r, weights_only=True, map_location="cpu")
        _copy_into(self.state, loaded)


class Boto3Peer(_Peer):
    name = "boto3"

    def __init__(self, job: dict[str, Any], state: dict[str, Any]) -> None:
        super().__init__(job, state)
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.torch = __import__("torch")
        self.s3 = boto3.client("s3")
        self.cfg = TransferConfig()
        self.path = os.path.join(self.work, "boto3.pt")

    def save(self, step: int) -> None:
        with open(self.path, "wb") as f:
            self.torch.save(self.state, f)
            f.flush()
            os.fsync(f.fileno())
        self.s3.upload_file(self.path, self.bucket, self.key("boto3-save", f"step-{step}.pt"), Config=self.cfg)

    def after_save(self, step: int) -> None:
        os.unlink(self.path)
        self.s3.delete_object(Bucket=self.bucket, Key=self.key("boto3-save", f"step-{step}.pt"))

    def restore(self) -> None:
        b, k = split_uri(self.job["torch_save_uri"])
        self.s3.download_file(b, k, self.path, Config=self.cfg)
        loaded = self.torch.load(self.path, mmap=True, weights_only=True, map_location="cpu")
        _copy_into(self.state, loaded)
        del loaded

    def after_restore(self) -> None:
        os.unlink(self.path)


ONE_PEERS: dict[str, type[_Peer]] = {p.name: p for p in (SpotckptPeer, SpotckptAfterCommitPeer, S3tcPeer, Boto3Peer)}


def _probe(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v[:257].clone(), v[-3:].clone()) for k, v in state.items()}


def _check(state: dict[str, Any], probe: dict[str, Any], who: str) -> None:
    import torch

    for k, (head, tail) in probe.items():
        if not (torch.equal(state[k][:257], head) and torch.equal(state[k][-3:], tail)):
            raise AssertionError(f"{who}: restored tensor {k} differs from what was saved")


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """The one-process case: every peer's save -> S3 and restore, alternating."""
    import boto3
    import torch

    from spotckpt.tools.bench.context import StateSpec
    from spotckpt.tools.bench.worker import build_state

    state = build_state(StateSpec(device="cpu", dtype="float32", size_mib=job["mib"], n_tensors=16))
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    probe = _probe(state)
    # one torch.save object in S3, read back by both torch.save-based peers' restores
    bucket, prefix = split_uri(job["s3_uri"])
    src = os.path.join(job["workdir"], "src.pt")
    torch.save(state, src)
    boto3.client("s3").upload_file(src, bucket, f"{prefix}/torch-save/state.pt")
    os.unlink(src)
    job = dict(job, torch_save_uri=f"s3://{bucket}/{prefix}/torch-save/state.pt")
    peers = {n: ONE_PEERS[n](job, state) for n in job["peers"]}
    meter = Meter(job.get("server_pid"))
    samples: dict[str, dict[str, list[dict[str, float]]]] = {n: {"save": [], "restore": []} for n in peers}
    try:
        for i in range(job.get("warmup", 1) + job["reps"]):  # the first ones are the warm-up
            step = i + 1
            for n in order(i, list(peers)):
                samples[n]["save"].append(meter(lambda: peers[n].save(step)))
                peers[n].after_save(step)
            for n in order(i, list(peers)):
                p = peers[n]
                p.before_restore()
                with torch.no_grad():
                    for t in state.values():
                        t.fill_(0)
                samples[n]["restore"].append(meter(p.restore))
                _check(state, probe, n)
                p.after_restore()
            print(f"  repetition {i}{' (warm-up)' if i < job.get('warmup', 1) else ''}: " + ", ".join(
                f"{n} save {samples[n]['save'][-1]['wall_s']:.2f} s restore {samples[n]['restore'][-1]['wall_s']:.2f} s"
                for n in peers), file=sys.stderr, flush=True)
    finally:
        for p in peers.values():
            p.close()
    out: dict[str, Any] = {"bytes": nbytes, "samples": samples, "warmup": job.get("warmup", 1)}
    if "spotckpt" in peers:
        out["spotckpt_save_phases"] = peers["spotckpt"].phases  # type: ignore[attr-defined]
    return out


# --------------------------------------------------------------------------------------------
# DCP on several ranks


def _fsdp_state(mib: float, seed: int) -> tuple[Any, Any]:
    """An FSDP2 stack of ``nn.Linear`` layers of ``mib`` MiB of fp32 parameters and its AdamW,
    its state created by one real step (the job's bytes: ~3x the parameters)."""
    import torch
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    width = 1024 if mib >= 32 else 256
    layers = max(2, round(mib * 2**20 / (4 * (width * width + width))))
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def _named_dtensors(model: Any, opt: Any) -> list[tuple[str, Any]]:
    out = []
    for n, p in model.named_parameters():
        out.append((f"model/{n}", p))
        for k in ("exp_avg", "exp_avg_sq"):
            out.append((f"optim/{n}/{k}", opt.state[p][k]))
    return out


def _expected(name: str, dt: Any) -> Any:
    """The value of DTensor ``dt``'s local shard: a function of its name and global index."""
    import torch
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, off = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    start = off[0] * math.prod(dt.shape[1:]) if dt.dim() else 0
    idx = torch.arange(start, start + math.prod(shape), dtype=torch.int64)
    v = (idx * 2654435761 + zlib.crc32(name.encode())) % 1000003
    return v.to(torch.float32).mul_(1.0 / 1000003).sub_(0.5).view(shape)


def run_dcp(job: dict[str, Any]) -> dict[str, Any]:
    """One rank of the DCP case: spotckpt.dcp and s3torchconnector's DCP storage, alternating."""
    import boto3
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = _fsdp_state(job["mib"] / 3, seed=0)
    named = _named_dtensors(model, opt)
    want = [(dt, _expected(n, dt)) for n, dt in named]
    steps = [st["step"] for st in opt.state.values()]

    def set_values() -> None:
        with torch.no_grad():
            for dt, w in want:
                dt.to_local().copy_(w)
            for s in steps:
                s.fill_(1.0)

    def clobber() -> None:
        with torch.no_grad():
            for dt, _ in want:
                dt.to_local().fill_(-7.0)
            for s in steps:
                s.fill_(0.0)

    def correct() -> bool:
        return all(torch.equal(dt.to_local(), w) for dt, w in want) and all(float(s) == 1.0 for s in steps)

    set_values()
    local = sum(dt.to_local().numel() * 4 for _, dt in named) + sum(s.numel() * s.element_size() for s in steps)
    tot = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(tot)
    nbytes = int(tot.item())

    def sd() -> dict[str, Any]:
        m, o = get_state_dict(model, opt)
        return {"model": m, "optim": o}

    def load_into(reader: Any) -> None:
        d = sd()
        dcp.load(d, storage_reader=reader)
        set_state_dict(model, opt, model_state_dict=d["model"], optim_state_dict=d["optim"])

    bucket, prefix = split_uri(job["s3_uri"])
    uri = lambda *p: "s3://" + "/".join([bucket, prefix, *p])  # noqa: E731
    s3 = boto3.client("s3")
    work = job["workdir"]  # one directory for the job: every rank on one host
    from spotckpt import CheckpointManager
    import spotckpt.dcp as sdcp

    peers = list(job["peers"])
    if "s3torchconnector" in peers:
        from s3torchconnector.dcp import S3StorageReader, S3StorageWriter

        cfg = s3tc_config(job["endpoint"])
        threads = int(job.get("s3tc_threads", 8))
    meter = Meter(job.get("server_pid"), barrier=dist.barrier, rank=rank)
    samples: dict[str, dict[str, list[dict[str, float]]]] = {n: {"save": [], "restore": []} for n in peers}
    correct_all: dict[str, list[bool]] = {n: [] for n in peers}
    mgr = CheckpointManager(os.path.join(work, "dcp-spot-save"), uri("dcp-spotckpt-save"), keep_last=1,
                            **MANAGER_KW) if "spotckpt" in peers else None
    try:
        # the checkpoints the restores read, saved once by each peer
        if "spotckpt" in peers:
            with CheckpointManager(os.path.join(work, "dcp-spot-src"), uri("dcp-spotckpt-restore"), keep_last=None,
                                   **MANAGER_KW) as m:
                dcp.save(sd(), storage_writer=sdcp.StorageWriter(m), checkpoint_id=1)
                if not m.wait():
                    raise RuntimeError("the DCP restore source never reached S3")
        if "s3torchconnector" in peers:
            dcp.save(sd(), storage_writer=S3StorageWriter(job["region"], uri("dcp-s3tc-restore"),
                                                          s3client_config=cfg, thread_count=threads))
        dist.barrier()
        for i in range(job.get("warmup", 1) + job["reps"]):  # the first ones are the warm-up
            step = i + 1
            for n in order(i, peers):
                if n == "spotckpt":
                    def save() -> None:
                        dcp.save(sd(), storage_writer=sdcp.StorageWriter(mgr), checkpoint_id=step)
                        if not mgr.wait():  # collective: uploaded on every rank
                            raise RuntimeError(f"step {step} did not reach S3")
                    samples[n]["save"].append(meter(save))
                else:
                    samples[n]["save"].append(meter(lambda: dcp.save(sd(), storage_writer=S3StorageWriter(
                        job["region"], uri("dcp-s3tc-save", str(step)), s3client_config=cfg, thread_count=threads))))
                    dist.barrier()
                    if rank == 0:
                        delete_prefix(s3, bucket, f"{prefix}/dcp-s3tc-save/{step}")
                    dist.barrier()
            for n in order(i, peers):
                clobber()
                if n == "spotckpt":
                    rdir = os.path.join(work, f"dcp-spot-restore-{i}")
                    with CheckpointManager(rdir, uri("dcp-spotckpt-restore"), keep_last=None, **MANAGER_KW) as rm:
                        samples[n]["restore"].append(meter(lambda: load_into(sdcp.StorageReader(rm))))
                    dist.barrier()
                    if rank == 0:
                        shutil.rmtree(rdir, ignore_errors=True)
                else:
                    samples[n]["restore"].append(meter(lambda: load_into(S3StorageReader(
                        job["region"], uri("dcp-s3tc-restore"), s3client_config=cfg))))
                correct_all[n].append(correct())
            if rank == 0:
                print(f"  repetition {i}{' (warm-up)' if i < job.get('warmup', 1) else ''}, rank 0: " + ", ".join(
                    f"{n} save {samples[n]['save'][-1]['wall_s']:.2f} s restore "
                    f"{samples[n]['restore'][-1]['wall_s']:.2f} s" for n in peers), file=sys.stderr, flush=True)
    finally:
        if mgr is not None:
            mgr.close()
    return {"bytes": nbytes, "rank": rank, "world": world, "samples": samples, "correct": correct_all,
            "warmup": job.get("warmup", 1),
            "tensors_per_rank": len(named) + len(steps)}


def main(payload: str) -> int:
    job = json.loads(payload)
    try:
        rec = run_one(job) if job["case"] == "one" else run_dcp(job)
    except BaseException as exc:  # noqa: BLE001 - reported, not raised: the orchestrator prints it
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exc()
        rec = {"error": f"{type(exc).__name__}: {exc}"[:800]}
    print(RESULT_MARKER + json.dumps(rec), flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if job["case"] == "dcp":
        try:
            import torch.distributed as dist

            if dist.is_initialized() and "error" not in rec:
                dist.barrier()
        finally:  # gloo may abort at teardown after FSDP2 collectives (a torch issue): no finalizers
            os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
