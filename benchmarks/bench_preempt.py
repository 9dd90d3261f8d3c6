"""SIGTERM -> final checkpoint committed in S3: how long it takes for a 1 GiB fp32 state, with and
without upload while writing, against the fastest plain upload of the same bytes from memory.

    python benchmarks/bench_preempt.py [--mb 1024] [--repeats 3] [--variants on,off] [--server seaweedfs|moto] [--server-dir DIR]
                                       [--server-cpus CPUS]

Starts a local S3 server on 127.0.0.1 in its own process (SeaweedFS, which verifies every
CRC32C, by default; ``--server moto`` for moto rows, labelled as such), then, per repeat and per
variant (``on``: ``upload_while_writing`` on, the default; ``off``: the upload starts after the
local commit; their order alternates), a trainer child process holding ``--mb`` MiB of fp32
weights under ``CheckpointManager(local_dir, s3_uri=..., every_steps=10**9)`` that calls
``maybe_save`` every step (so no policy save happens: the only checkpoint is the preemption one).
At a random step the parent sends SIGTERM and measures, from the moment of the signal:

- ``to_manifest_s``: until the final step's ``manifest.json`` exists in S3 (a step counts in S3
  only once its manifest does): the time of the trainer's ``durable_s3`` event, which it emits
  when the manifest's PUT has returned (``SPOTCKPT_EVENTS_FILE``; wall clock, one machine);
- ``to_local_commit_s``: until the step is committed under the local dir (its ``durable_local``);
- ``to_exit_s``: until the child has exited (it must exit 0 after ``maybe_save`` returns with
  ``preempted`` set).

The committed step is then checked: it is the step the child reports as preempted, and
``S3Store.verify_step`` finds every object's size and full-object CRC32C right. After the
repeat's first variant, the parent (the child gone) uploads the same bytes -- the step's files,
read into memory first, untimed -- with plain boto3 ``upload_fileobj`` from a ``BytesIO``: with
boto3's default ``TransferConfig``, with spotckpt's part size and concurrency, and the latter through
a client configured as spotckpt's (payload signing off); the fastest of the three is the repeat's
"plain upload from memory", and ``to_manifest_s`` is also given as a ratio
to it (target: at most 1.1). Being the least of three noisy samples, that baseline runs a few per
cent low; the summary also gives the median ``to_manifest_s`` over the median of the
configuration that was fastest by its median. Writes benchmarks/out/preempt.json.

``--server-cpus 1`` runs the server on CPU 1 and everything else on the other CPUs: S3 runs on
machines of its own, and on a 2-core machine a local server otherwise takes most of the CPU
the trainer's local write needs (SeaweedFS spends about 7 CPU-seconds per GiB it receives).

Nothing is polled while the trainer works, so the measurement takes no CPU from the upload it
measures: ``--poll 0.02`` measures as the runs before 2026-12-07 22:30 did, listing the bucket and
the local dir every 20 ms (on the 2-core VM the two ways gave the same figures within their
spread: ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(local_dir: str, s3_uri: str, mb: int, step_seconds: float) -> int:
    """The trainer: a 1 GiB fp32 tensor changed every step, maybe_save every step."""
    import torch

    from spotckpt import CheckpointManager

    g = torch.Generator().manual_seed(0)
    state = {"weights": torch.randn(mb * 1024 * 1024 // 4, generator=g, dtype=torch.float32), "step": 0}
    with CheckpointManager(local_dir, s3_uri, every_steps=10**9, keep_last=2, metrics=False) as mgr:
        for step in range(1, 10**9):
            state["weights"][: 1 << 16].add_(1.0)  # "training": the state differs at every step
            state["step"] = step
            time.sleep(step_seconds)
            print(f"at {step}", flush=True)
            mgr.maybe_save(step, state)
            if mgr.preempted:
                print(f"preempted {step}", flush=True)
                return 0
    return 1


def _stats(xs: list[float]) -> dict[str, float] | None:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None


def plain_uploads(s3: object, bucket: str, prefix: str, files: list[bytes]) -> dict[str, float]:
    """Seconds to upload ``files`` (bytes in memory) with plain boto3 ``upload_fileobj``, one
    after the other: boto3's default TransferConfig, and spotckpt's part size and concurrency."""
    from boto3.s3.transfer import TransferConfig

    from spotckpt.remote.s3 import default_transfer_config, make_client

    ours = default_transfer_config()
    configs = {"boto3_default": TransferConfig(),
               "boto3_spotckpt_parts": TransferConfig(multipart_threshold=ours.multipart_threshold,
                                                      multipart_chunksize=ours.multipart_chunksize,
                                                      max_concurrency=ours.max_concurrency)}
    # the same client with payload signing off, as spotckpt's (no SHA256 of every byte over http://)
    unsigned = make_client()
    out = {}
    for name, cfg, client in [*((n, c, s3) for n, c in configs.items()),
                              ("boto3_spotckpt_parts_unsigned", configs["boto3_spotckpt_parts"], unsigned)]:
        t0 = time.perf_counter()
        for i, data in enumerate(files):
            client.upload_fileobj(io.BytesIO(data), bucket, f"{prefix}/plain-{name}/{i}", Config=cfg)  # type: ignore[attr-defined]
        out[name] = round(time.perf_counter() - t0, 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=int(os.environ.get("MB", "1024")), help="state size in MiB (env MB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="on,off",
                    help="upload while writing on and/or off, alternating in each repeat (default: %(default)s)")
    ap.add_argument("--step-seconds", type=float, default=0.05, help="simulated compute per step")
    ap.add_argument("--min-step", type=int, default=3)
    ap.add_argument("--max-step", type=int, default=40)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--server", choices=("seaweedfs", "moto"), default="seaweedfs")
    ap.add_argument("--server-dir", default=None, metavar="DIR",
                    help="where the server keeps its data (default: beside the trainer's local dir, on the same "
                         "disk); e.g. /dev/shm to see how much of the time is the two sharing one disk")
    ap.add_argument("--server-cpus", default=None, metavar="CPUS",
                    help="run the server on these CPUs (e.g. 1) and the trainer and the plain uploads on the others, "
                         "as S3 runs on machines of its own; default: all share every CPU")
    ap.add_argument("--poll", type=float, default=0.0, metavar="SECONDS",
                    help="measure by polling S3 (list_objects_v2) and the local dir every SECONDS, as before; "
                         "default 0: from the trainer's own durable_local / durable_s3 events, nothing polled")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "preempt.json"))
    ap.add_argument("--child", nargs=2, metavar=("LOCAL_DIR", "S3_URI"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.mb, args.step_seconds)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in ("on", "off") for v in variants):
        ap.error("--variants: a list of on, off")

    rng = random.Random(args.seed)
    from spotckpt.tools.bench import split_cpus
    from spotckpt.tools.s3server import S3Server

    server_cpus = client_cpus = None
    if args.server_cpus:
        try:
            server_cpus, client_cpus = split_cpus(args.server_cpus)
        except ValueError as exc:
            ap.error(str(exc))

    work = Path(tempfile.mkdtemp(prefix="bench-preempt-"))
    server_dir = Path(tempfile.mkdtemp(prefix="bench-preempt-server-", dir=args.server_dir)) if args.server_dir \
        else work / "server"
    srv = S3Server.start(args.server, server_dir, buckets=["bench"], cpus=server_cpus)
    env = srv.apply_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ.update(srv.apply_env())
    from spotckpt.format import MANIFEST_NAME, step_dirname
    from spotckpt.tools.bench import cpu_model
    from spotckpt.remote.s3 import MAX_CONCURRENCY, PART_SIZE_BYTES, S3Store

    s3 = srv.client()
    runs = []
    plain: list[dict[str, float]] = []
    try:
        for r in range(args.repeats):
            k = r % len(variants)
            for n, variant in enumerate(variants[k:] + variants[:k]):
                prefix = f"run{r}-{variant}"
                local = work / f"local{r}-{variant}"
                log_path = work / f"child{r}-{variant}.log"
                events_path = work / f"events{r}-{variant}.jsonl"
                target = rng.randint(args.min_step, args.max_step)
                cenv = dict(env, SPOTCKPT_UPLOAD_WHILE_WRITING="1" if variant == "on" else "0",
                            SPOTCKPT_EVENTS_FILE=str(events_path))
                with open(log_path, "wb") as log_f:
                    proc = subprocess.Popen(
                        [sys.executable, __file__, "--mb", str(args.mb), "--step-seconds", str(args.step_seconds),
                         "--child", str(local), f"s3://bench/{prefix}"],
                        stdout=subprocess.PIPE, stderr=log_f, text=True, env=cenv,
                    )
                    assert proc.stdout is not None
                    line = ""
                    while line != f"at {target}":
                        line = proc.stdout.readline().strip()
                        if not line and proc.poll() is not None:
                            raise SystemExit(f"trainer exited early ({proc.returncode}); see {log_path}:\n{log_path.read_text()}")
                    wall0 = time.time()
                    proc.send_signal(signal.SIGTERM)
                    t0 = time.perf_counter()
                    t_manifest = t_local = None
                    man_key = None
                    while args.poll and t_manifest is None:
                        if t_local is None and local.is_dir() and any(p.name.startswith("step-") for p in local.iterdir()):
                            t_local = time.perf_counter() - t0  # committed locally
                        for o in s3.list_objects_v2(Bucket="bench", Prefix=f"{prefix}/").get("Contents", []):
                            if o["Key"].endswith("/" + MANIFEST_NAME):
                                t_manifest, man_key = time.perf_counter() - t0, o["Key"]
                                break
                        if t_manifest is None:
                            if proc.poll() is not None:
                                break
                            time.sleep(args.poll)
                    out, _ = proc.communicate(timeout=300)
                    t_exit = time.perf_counter() - t0
                if not args.poll:  # the trainer's own events: when its final step committed locally, and in S3
                    evs = [json.loads(x) for x in events_path.read_text().splitlines() if x.strip()]
                    t_local = max((e["time"] - wall0 for e in evs if e["event"] == "durable_local"), default=None)
                    s3_done = [e for e in evs if e["event"] == "durable_s3"]
                    if s3_done:
                        t_manifest = s3_done[-1]["time"] - wall0
                        man_key = f"{prefix}/{step_dirname(int(s3_done[-1]['step']))}/{MANIFEST_NAME}"
                preempted = [int(x.split()[1]) for x in out.splitlines() if x.startswith("preempted ")]
                if proc.returncode != 0 or not preempted or man_key is None:
                    raise SystemExit(f"run {r} ({variant}): exit {proc.returncode}, preempted {preempted}, manifest {man_key}; see {log_path}:\n{log_path.read_text()[-4000:]}")
                final = preempted[0]
                if man_key != f"{prefix}/{step_dirname(final)}/{MANIFEST_NAME}":
                    raise SystemExit(f"run {r}: manifest {man_key} is not the final step {final}")
                with S3Store(f"s3://bench/{prefix}") as store:
                    problems = store.verify_step(final)
                    man = store.read_manifest(final)
                    nbytes = man.total_bytes
                if problems:
                    raise SystemExit(f"run {r}: step {final} in S3 fails verification: {problems}")
                if n == 0:  # the same bytes, from memory, plain boto3 (the child is gone)
                    files = [(local / step_dirname(final) / rel).read_bytes() for rel in sorted(man.files)]
                    plain.append(plain_uploads(s3, "bench", f"{prefix}-plain", files))
                    del files
                best = min(plain[-1].values())
                runs.append({"repeat": r, "variant": variant, "sigterm_at_step": target, "final_step": final,
                             "bytes": nbytes, "to_local_commit_s": None if t_local is None else round(t_local, 3),
                             "to_manifest_s": round(t_manifest, 3), "to_exit_s": round(t_exit, 3),
                             "plain_upload_s": best, "to_manifest_vs_plain": round(t_manifest / best, 3),
                             "exit_code": proc.returncode})
                print(f"repeat {r + 1}/{args.repeats} upload while writing {variant}: SIGTERM at step {target}, final "
                      f"step {final} ({nbytes / 1e6:.0f} MB): committed locally after {t_local or float('nan'):.2f} s, "
                      f"manifest in S3 after {t_manifest:.2f} s ({t_manifest / best:.2f}x the plain upload from memory, "
                      f"{best:.2f} s), exit 0 after {t_exit:.2f} s", flush=True)
                shutil.rmtree(local, ignore_errors=True)
                for pre in (f"{prefix}/", f"{prefix}-plain/"):
                    for o in s3.list_objects_v2(Bucket="bench", Prefix=pre).get("Contents", []):
                        s3.delete_object(Bucket="bench", Key=o["Key"])
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)
        if args.server_dir:
            shutil.rmtree(server_dir, ignore_errors=True)

    plain_stats = {name: _stats([p[name] for p in plain]) for name in plain[0]}
    # the configuration fastest by its median: a per-repeat "fastest of three" is the least of three
    # noisy samples, which biases its ratio upward
    fastest = min(plain_stats, key=lambda n: plain_stats[n]["median"])  # type: ignore[index]
    fastest_median: float = plain_stats[fastest]["median"]  # type: ignore[index]
    summary: dict[str, object] = {"plain_upload_s": plain_stats, "fastest_plain_config": fastest}
    print()
    for variant in variants:
        mine = [x for x in runs if x["variant"] == variant]
        tl = [x["to_local_commit_s"] for x in mine if x["to_local_commit_s"] is not None]
        summary[variant] = {
            "to_local_commit_s": _stats(tl),
            "to_manifest_s": _stats([x["to_manifest_s"] for x in mine]),
            "to_exit_s": _stats([x["to_exit_s"] for x in mine]),
            "to_manifest_vs_plain": _stats([x["to_manifest_vs_plain"] for x in mine]),
            "median_vs_fastest_config_median": round(
                statistics.median(x["to_manifest_s"] for x in mine) / fastest_median, 3),
        }
        sm = summary[variant]
        print(f"upload while writing {variant:3s}: SIGTERM -> final {args.mb} MiB step's manifest.json in S3: median "
              f"{sm['to_manifest_s']['median']:.2f} s [{sm['to_manifest_s']['min']:.2f}-{sm['to_manifest_s']['max']:.2f}], "
              f"{sm['to_manifest_vs_plain']['median']:.2f}x the plain upload from memory "
              f"[{sm['to_manifest_vs_plain']['min']:.2f}-{sm['to_manifest_vs_plain']['max']:.2f}] per repeat, "
              f"{sm['median_vs_fastest_config_median']:.2f}x the median of {fastest}; committed locally "
              f"{statistics.median(tl) if tl else float('nan'):.2f} s; exit {sm['to_exit_s']['median']:.2f} s")
    for name, st in summary["plain_upload_s"].items():  # type: ignore[union-attr]
        print(f"plain upload from memory, {name}: median {st['median']:.2f} s [{st['min']:.2f}-{st['max']:.2f}]")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "state_mib": args.mb, "repeats": args.repeats, "variants": variants, "summary": summary, "runs": runs,
        "plain_uploads_s": plain,
        "spotckpt_part_size_bytes": PART_SIZE_BYTES, "spotckpt_concurrency": MAX_CONCURRENCY,
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg_end": list(os.getloadavg())},
        "server": f"{args.server} on 127.0.0.1, its own process" + (" (moto: not a performance reference)" if args.server == "moto" else "")
                  + (f", its data under {args.server_dir}" if args.server_dir else ", its data on the trainer's disk")
                  + (f"; the server on CPUs {sorted(server_cpus)}, the trainer and the plain uploads on {sorted(client_cpus)}"
                     if server_cpus else "; all sharing every CPU"),
    }, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
