"""S3 transfer benchmark: boto3 upload_file/download_file with the default TransferConfig vs
spotckpt's S3Store.upload_step/download_step, same bytes, same moto server, same run.

    PYTHONPATH=. python benchmarks/bench_s3.py [--mb 1024] [--repeats 2]

Starts moto's ThreadedMotoServer on 127.0.0.1 (in a child process), writes one step (one safetensors file of --mb MiB
plus its manifest), then alternates the two paths ``--repeats`` times per direction and reports
the best and median throughput of each. Writes benchmarks/out/s3.json.

For uploads it also records where the time goes: the client's and the server process's CPU
seconds, and how long moto's CompleteMultipartUpload took (the server assembles the whole object
in memory and, for a full-object checksum, a second copy of it -- serial work real S3 does not
do), so the parts phase can be compared on its own. ``--probe-composite`` adds a diagnostic path
that spotckpt does NOT ship (per-part COMPOSITE CRC32C instead of the full-object one) to show
how much of the upload time is moto's full-object checksum assembly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moto_server  # noqa: E402  (benchmarks/moto_server.py)



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=int(os.environ.get("MB", "1024")), help="step size in MiB (env MB)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--uploads-only", action="store_true", help="skip the (slow) download comparison")
    ap.add_argument("--probe-composite", action="store_true", help="also time a composite-checksum upload (diagnostic)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "s3.json"))
    args = ap.parse_args()

    # The server runs in its own process (still moto's ThreadedMotoServer on 127.0.0.1): in the
    # benchmark's own process it would share one GIL with the client, which penalizes every
    # client thread and measures the fake server's contention rather than the transfer settings.
    srv, host, port = moto_server.start()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    import resource

    import boto3
    import psutil
    import torch
    from boto3.s3.transfer import TransferConfig

    from spotckpt.format import MANIFEST_NAME, Manifest, step_dirname, write_safetensors
    import spotckpt.s3 as s3mod
    from spotckpt.s3 import MAX_CONCURRENCY, PART_SIZE_BYTES, S3Store

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bench")
    size = args.mb * 1024 * 1024
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    step_dir = work / "local" / step_dirname(1)
    step_dir.mkdir(parents=True)
    data = torch.randint(0, 255, (size,), dtype=torch.uint8)
    ent = write_safetensors(step_dir / "rank-00000.safetensors", {"w": data})
    del data
    (step_dir / MANIFEST_NAME).write_bytes(Manifest(step=1, files={"rank-00000.safetensors": ent}).to_bytes())
    path = step_dir / "rank-00000.safetensors"
    nbytes = ent.size
    print(f"step: {nbytes / 1e6:.0f} MB in one file; moto at {host}:{port}", flush=True)

    up_keys = ("boto3_up", "spot_up") + (("probe_composite_up",) if args.probe_composite else ())
    down_keys = () if args.uploads_only else ("boto3_down", "spot_down")
    times: dict[str, list[float]] = {k: [] for k in (*up_keys, *down_keys)}
    detail: dict[str, list[dict[str, float]]] = {k: [] for k in up_keys}
    server = psutil.Process(srv.pid)
    marks: dict[str, float] = {}

    def mark(name: str):  # noqa: ANN202
        def hook(**_: object) -> None:
            marks[name] = time.perf_counter()
        return hook

    def watch(client: object) -> None:
        ev = client.meta.events  # type: ignore[attr-defined]
        ev.register("before-call.s3.CompleteMultipartUpload", mark("complete_start"))
        ev.register("after-call.s3.CompleteMultipartUpload", mark("complete_end"))

    def cpu_now() -> tuple[float, float]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        st = server.cpu_times()
        return ru.ru_utime + ru.ru_stime, st.user + st.system

    def timed_upload(name: str, fn) -> None:  # noqa: ANN001
        marks.clear()
        c0, s0 = cpu_now()
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
        c1, s1 = cpu_now()
        times[name].append(wall)
        complete = marks.get("complete_end", 0.0) - marks.get("complete_start", 0.0)
        detail[name].append({"wall_s": wall, "complete_multipart_s": complete, "parts_phase_s": wall - complete,
                             "client_cpu_s": c1 - c0, "server_cpu_s": s1 - s0})

    watch(s3)
    default_cfg = TransferConfig()
    full_object = s3mod._full_object_checksums_supported
    for r in range(args.repeats):
        timed_upload("boto3_up", lambda: s3.upload_file(str(path), "bench", f"boto3/{r}.bin", Config=default_cfg))

        store = S3Store(f"s3://bench/spot{r}")
        watch(store.client)
        timed_upload("spot_up", lambda: store.upload_step(1, step_dir))

        if args.probe_composite:
            s3mod._full_object_checksums_supported = lambda: False  # type: ignore[assignment]
            try:
                probe = S3Store(f"s3://bench/probe{r}")
                watch(probe.client)
                timed_upload("probe_composite_up", lambda: probe.upload_step(1, step_dir))
                probe.close()
            finally:
                s3mod._full_object_checksums_supported = full_object  # type: ignore[assignment]

        if down_keys:
            dl = work / f"boto3-{r}.bin"
            t = time.perf_counter()
            s3.download_file("bench", f"boto3/{r}.bin", str(dl), Config=default_cfg)
            times["boto3_down"].append(time.perf_counter() - t)
            dl.unlink()

            dest = work / f"restore-{r}"
            t = time.perf_counter()
            store.download_step(1, dest)  # includes the CRC32C verification and fsyncs
            times["spot_down"].append(time.perf_counter() - t)
            shutil.rmtree(dest)
        store.close()
        for prefix in (f"boto3/{r}", f"spot{r}/", f"probe{r}/"):
            for o in s3.list_objects_v2(Bucket="bench", Prefix=prefix).get("Contents", []):
                s3.delete_object(Bucket="bench", Key=o["Key"])
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
        for k in up_keys:
            d = detail[k][-1]
            print(f"  {k}: CompleteMultipartUpload {d['complete_multipart_s']:.2f}s, parts phase {d['parts_phase_s']:.2f}s, "
                  f"client CPU {d['client_cpu_s']:.2f}s, server CPU {d['server_cpu_s']:.2f}s", flush=True)

    def mbps(secs: float) -> float:
        return nbytes / secs / 1e6

    res = {
        k: {"best_s": min(v), "median_s": statistics.median(v), "best_MBps": mbps(min(v)), "median_MBps": mbps(statistics.median(v))}
        for k, v in times.items()
    }
    ratio_up = res["spot_up"]["median_MBps"] / res["boto3_up"]["median_MBps"]
    ratio_down = res["spot_down"]["median_MBps"] / res["boto3_down"]["median_MBps"] if down_keys else None
    phases = {
        k: {f: statistics.median(d[f] for d in v) for f in ("complete_multipart_s", "parts_phase_s", "client_cpu_s", "server_cpu_s")}
        for k, v in detail.items()
    }
    ratio_parts = phases["boto3_up"]["parts_phase_s"] / phases["spot_up"]["parts_phase_s"]
    print()
    print(f"{'path':44s} {'median s':>9s} {'median MB/s':>12s} {'best MB/s':>10s}")
    labels = {
        "boto3_up": "boto3 upload_file (default TransferConfig)",
        "spot_up": f"S3Store.upload_step ({PART_SIZE_BYTES >> 20} MiB x {MAX_CONCURRENCY})",
        **({"probe_composite_up": "probe: composite CRC32C (NOT shipped)"} if args.probe_composite else {}),
        "boto3_down": "boto3 download_file (default TransferConfig)",
        "spot_down": "S3Store.download_step (+CRC32C verify, fsync)",
    }
    for k, lab in labels.items():
        if k not in res:
            continue
        print(f"{lab:44s} {res[k]['median_s']:9.2f} {res[k]['median_MBps']:12.1f} {res[k]['best_MBps']:10.1f}")
    print(f"\nupload ratio   spotckpt / boto3 default: {ratio_up:.2f}x")
    if ratio_down is not None:
        print(f"download ratio spotckpt / boto3 default: {ratio_down:.2f}x")
    print("\nupload phases (medians): " + "; ".join(
        f"{k}: CompleteMultipartUpload {v['complete_multipart_s']:.2f}s, parts {v['parts_phase_s']:.2f}s, "
        f"client CPU {v['client_cpu_s']:.2f}s, server CPU {v['server_cpu_s']:.2f}s" for k, v in phases.items()))
    print(f"upload parts-phase ratio (excluding moto's CompleteMultipartUpload): {ratio_parts:.2f}x")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bytes": nbytes, "repeats": args.repeats, "results": res, "raw_seconds": times,
        "ratio_upload": ratio_up, "ratio_download": ratio_down, "ratio_upload_parts_phase": ratio_parts,
        "upload_phases_median": phases, "upload_detail": detail,
        "spotckpt_part_size_bytes": PART_SIZE_BYTES, "spotckpt_concurrency": MAX_CONCURRENCY,
        "boto3_default": {"multipart_chunksize": default_cfg.multipart_chunksize, "max_concurrency": default_cfg.max_request_concurrency},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "server": "moto ThreadedMotoServer on 127.0.0.1, in its own process",
    }, indent=1))
    print(f"wrote {out}")
    shutil.rmtree(work)
    srv.terminate()
    srv.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
