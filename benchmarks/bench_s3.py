"""S3 transfer benchmark on a real S3 server (SeaweedFS on 127.0.0.1), same file, same run:

- upload: boto3 ``upload_file`` with the default ``TransferConfig`` vs ``S3Store.upload_step``;
- download: boto3 ``download_file`` (default) vs ``S3Store.download_step`` (+ CRC32C verify, fsync);
- restore: ``CheckpointManager.restore`` of the same bytes as a fp32 state on an empty local dir
  (download + verify + commit + load) vs its floor, the download alone (``S3Store``'s transfer of
  the step's objects with no verify, fsync or load) and boto3's default ``download_file``.

    python benchmarks/bench_s3.py [--mb 1024] [--repeats 3] [--server seaweedfs|moto]

Paths alternate within each repeat so a noisy machine hits them alike, each after an ``os.sync()``
(so no path pays for the previous one's writeback); medians are reported, with
client CPU-seconds per GiB (``getrusage`` of this process: every client thread, checksums
included) and the server's CPU. Writes benchmarks/out/s3.json (``--out``). ``--concurrency`` /
``--part-mb`` override S3Store's transfer settings (for tuning; the reported rows use the
defaults). ``--server moto`` gives moto rows, labelled as such (moto is no place to measure: a
Python server that is slow and quadratic on large ranged GETs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GiB = 1 << 30


def machine() -> dict[str, Any]:
    from spotckpt.tools.bench import cpu_model
    from spotckpt.remote.s3 import usable_cpus

    return {"cpus": os.cpu_count(), "usable_cpus": usable_cpus(), "cpu": cpu_model(),
            "platform": platform.platform(), "python": platform.python_version()}


class Meter:
    """Wall time, this process's CPU time and the server process's CPU time of one call."""

    def __init__(self, server_pid: int) -> None:
        import psutil

        self.server = psutil.Process(server_pid)

    def _cpu(self) -> tuple[float, float]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        st = self.server.cpu_times()
        return ru.ru_utime + ru.ru_stime, st.user + st.system

    def __call__(self, fn: Callable[[], object]) -> dict[str, float]:
        c0, s0 = self._cpu()
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
        c1, s1 = self._cpu()
        return {"wall_s": wall, "client_cpu_s": c1 - c0, "server_cpu_s": s1 - s0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=int(os.environ.get("MB", "1024")), help="step size in MiB (env MB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server", choices=("seaweedfs", "moto"), default="seaweedfs")
    ap.add_argument("--concurrency", type=int, default=None, help="override S3Store's concurrency (tuning)")
    ap.add_argument("--part-mb", type=int, default=None, help="override S3Store's part size in MiB (tuning)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: up,down,restore")
    ap.add_argument("--dir", default=os.environ.get("DIR"), help="where local files go (default: system temp)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "s3.json"))
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import boto3
    import torch
    from boto3.s3.transfer import TransferConfig

    import spotckpt.remote.s3 as s3mod
    from spotckpt import CheckpointManager
    from spotckpt.format import MANIFEST_NAME, Manifest, step_dirname, write_safetensors
    from spotckpt.remote.s3 import S3Store, default_transfer_config
    from spotckpt.tools.s3server import S3Server

    work = Path(tempfile.mkdtemp(prefix="bench-s3-", dir=args.dir))
    srv = S3Server.start(args.server, work / "server", buckets=["bench"])
    os.environ.update(srv.apply_env())
    try:
        spot_cfg = default_transfer_config()
        if args.concurrency:
            spot_cfg.max_request_concurrency = args.concurrency
        if args.part_mb:
            spot_cfg.multipart_chunksize = args.part_mb << 20
        part_bytes, concurrency = spot_cfg.multipart_chunksize, spot_cfg.max_request_concurrency

        # one step: one safetensors file of --mb MiB (a fp32 state) plus its manifest
        numel = args.mb * (1 << 20) // 4
        state = {"weights": torch.randn(numel, generator=torch.Generator().manual_seed(0))}
        step_dir = work / "local" / step_dirname(1)
        step_dir.mkdir(parents=True)
        ent = write_safetensors(step_dir / "rank-00000.safetensors", {"weights": state["weights"]})
        (step_dir / MANIFEST_NAME).write_bytes(Manifest(step=1, files={"rank-00000.safetensors": ent}).to_bytes())
        path = step_dir / "rank-00000.safetensors"
        nbytes = ent.size
        print(f"{nbytes / 1e6:.0f} MB in one file; {args.server} at {srv.endpoint_url}; "
              f"S3Store {part_bytes >> 20} MiB x {concurrency}; machine {machine()}", flush=True)

        s3 = boto3.client("s3")
        default_cfg = TransferConfig()
        meter = Meter(srv.process.pid)
        rows: dict[str, list[dict[str, float]]] = {}

        def record(name: str, fn: Callable[[], object]) -> None:
            os.sync()  # the previous path's dirty pages are written back now, not during this one
            m = meter(fn)
            rows.setdefault(name, []).append(m)
            print(f"  {name:22s} {m['wall_s']:7.2f} s  {nbytes / m['wall_s'] / 1e6:7.1f} MB/s  "
                  f"client CPU {m['client_cpu_s']:5.2f} s  server CPU {m['server_cpu_s']:5.2f} s", flush=True)

        def clear(prefix: str) -> None:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=prefix):
                objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objs:
                    s3.delete_objects(Bucket="bench", Delete={"Objects": objs})

        # the restore state is saved once (through the manager, as a user would) and reused
        if "restore" not in skip:
            with CheckpointManager(work / "saver", "s3://bench/restore", async_save=False, metrics=False) as mgr:
                mgr.save(1, state)
                mgr.wait()
        del state

        for r in range(args.repeats):
            print(f"repeat {r + 1}/{args.repeats}", flush=True)
            store = S3Store("s3://bench/spot", transfer_config=spot_cfg)
            if "up" not in skip:
                record("boto3_up", lambda: s3.upload_file(str(path), "bench", "boto3/obj.bin", Config=default_cfg))
                record("spot_up", lambda: store.upload_step(1, step_dir))
            else:
                s3.upload_file(str(path), "bench", "boto3/obj.bin", Config=default_cfg)
                store.upload_step(1, step_dir)
            if "down" not in skip:
                dl = work / "boto3-down.bin"
                record("boto3_down", lambda: s3.download_file("bench", "boto3/obj.bin", str(dl), Config=default_cfg))
                dl.unlink()
                dest = work / "spot-down"
                record("spot_down", lambda: store.download_step(1, dest))
                shutil.rmtree(dest)
            if "restore" not in skip:
                rstore = S3Store("s3://bench/restore", transfer_config=spot_cfg)
                man = rstore.read_manifest(1)
                floor_dir = work / "floor"
                floor_dir.mkdir()
                jobs = [s3mod.requests.Transfer(rstore.step_key(1, rel), floor_dir / rel, e.size, {}) for rel, e in man.files.items()]
                record("floor_download", lambda: rstore.requests.transfer_all(jobs, download=True))
                shutil.rmtree(floor_dir)
                rstore.close()
                target = {"weights": torch.zeros(numel)}
                fresh = work / "fresh"

                def restore() -> None:
                    with CheckpointManager(fresh, "s3://bench/restore", metrics=False) as mgr:
                        assert mgr.restore(target) == 1

                record("spot_restore", restore)
                assert float(target["weights"][12345]) != 0.0
                del target
                shutil.rmtree(fresh)
            store.close()
            clear("spot/")
            clear("boto3/")

        def med(name: str, field: str) -> float:
            return statistics.median(m[field] for m in rows[name])

        res = {
            k: {"median_s": med(k, "wall_s"), "median_MBps": nbytes / med(k, "wall_s") / 1e6,
                "best_MBps": nbytes / min(m["wall_s"] for m in v) / 1e6,
                "client_cpu_s_per_GiB": med(k, "client_cpu_s") * GiB / nbytes,
                "server_cpu_s_per_GiB": med(k, "server_cpu_s") * GiB / nbytes}
            for k, v in rows.items()
        }
        ratios: dict[str, float] = {}
        if "up" not in skip:
            ratios["upload_speed_vs_boto3_default"] = res["boto3_up"]["median_s"] / res["spot_up"]["median_s"]
            ratios["upload_client_cpu_vs_boto3_default"] = res["spot_up"]["client_cpu_s_per_GiB"] / res["boto3_up"]["client_cpu_s_per_GiB"]
        if "down" not in skip:
            ratios["download_speed_vs_boto3_default"] = res["boto3_down"]["median_s"] / res["spot_down"]["median_s"]
            ratios["download_client_cpu_vs_boto3_default"] = res["spot_down"]["client_cpu_s_per_GiB"] / res["boto3_down"]["client_cpu_s_per_GiB"]
        if "restore" not in skip:
            ratios["restore_time_vs_floor_download"] = res["spot_restore"]["median_s"] / res["floor_download"]["median_s"]
            if "down" not in skip:
                ratios["restore_time_vs_boto3_default_download"] = res["spot_restore"]["median_s"] / res["boto3_down"]["median_s"]

        labels = {
            "boto3_up": "boto3 upload_file (default TransferConfig)",
            "spot_up": f"S3Store.upload_step ({part_bytes >> 20} MiB x {concurrency})",
            "boto3_down": "boto3 download_file (default TransferConfig)",
            "spot_down": "S3Store.download_step (+CRC32C verify, fsync)",
            "floor_download": "floor: S3Store transfer alone (no verify/load)",
            "spot_restore": "CheckpointManager.restore from S3 (empty dir)",
        }
        print(f"\n{args.server}, {nbytes / GiB:.2f} GiB, medians of {args.repeats}")
        print(f"{'path':48s} {'s':>7s} {'MB/s':>8s} {'client CPU-s/GiB':>17s} {'server CPU-s/GiB':>17s}")
        for k, lab in labels.items():
            if k in res:
                v = res[k]
                print(f"{lab:48s} {v['median_s']:7.2f} {v['median_MBps']:8.1f} {v['client_cpu_s_per_GiB']:17.2f} {v['server_cpu_s_per_GiB']:17.2f}")
        for k, v in ratios.items():
            print(f"{k:45s} {v:.2f}x")

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "server": f"{args.server} on 127.0.0.1, its own process" + (" (moto: not a performance reference)" if args.server == "moto" else ""),
            "bytes": nbytes, "repeats": args.repeats, "results": res, "ratios": ratios, "samples": rows,
            "labels": labels, "spotckpt_part_size_bytes": part_bytes, "spotckpt_concurrency": concurrency,
            "boto3_default": {"multipart_chunksize": default_cfg.multipart_chunksize,
                              "max_concurrency": default_cfg.max_request_concurrency},
            "machine": machine(),
        }, indent=1))
        print(f"wrote {out}")
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
