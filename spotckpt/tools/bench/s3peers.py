"""``spotckpt bench s3``: save -> S3 and restore from S3, spotckpt side by side with the S3
paths people pick instead, on one S3 endpoint, in one run.

    spotckpt bench s3 [--mib 256] [--reps 5] [--cases one,dcp] [--server seaweedfs|moto]
                      [--s3-uri s3://bucket/prefix] [--out benchmarks/out]

Peers (see :mod:`spotckpt.tools.bench.s3worker` for exactly what each call does):

- one process, a CPU fp32 state of ``--mib`` MiB: ``spotckpt`` (save + wait until uploaded;
  verified restore on an empty local directory), ``spotckpt-after-commit`` (the same with
  ``upload_while_writing=False``: the upload starts after the local commit), ``s3torchconnector`` (``S3Checkpoint`` writer +
  ``torch.save``; reader + ``torch.load`` + ``copy_``) and ``boto3`` (``torch.save`` to a file +
  fsync + ``upload_file``; ``download_file`` + ``torch.load`` + ``copy_``);
- DCP on ``--ranks`` gloo ranks (FSDP2 model + AdamW of about ``--dcp-mib`` MiB in all):
  ``spotckpt.dcp`` vs s3torchconnector's ``S3StorageWriter`` / ``S3StorageReader``.

Every peer's calls alternate within each repetition (their order rotating); the first
``--warmup`` (1) repetitions are a warm-up; reported are the median of ``--reps`` with the
spread (min-max), the ratio "the other's median time / spotckpt's" (above 1: spotckpt faster) and the median of the same ratio
taken repetition by repetition ("paired"), and the client's CPU-seconds per GiB (every thread of
the process; on several ranks the ranks' sum) and the server's. s3torchconnector is optional (the
``bench`` extra): without it its rows are skipped with one line saying so.

By default a SeaweedFS server (``weed mini``, the dev extra) is started on 127.0.0.1 for the run
and stopped after it; ``--s3-uri`` uses an existing bucket instead, with the endpoint and
credentials of the environment (``AWS_ENDPOINT_URL`` for a local server; ``--server-pid`` names
its process so its CPU is reported). ``--server-cpus 1`` gives the started server CPU 1 and the
peers the others: on a 2-core machine SeaweedFS otherwise takes most of both cores (about 7
CPU-seconds per GiB it receives). Writes ``s3peers.json`` and ``s3peers.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spotckpt.tools.bench.s3worker import RESULT_MARKER

__all__ = ["main", "build_parser", "peer_problems", "summarize", "render_markdown", "CASES", "PEERS"]

GiB = 1 << 30
CASES = ("one", "dcp")
PEERS = {"one": ("spotckpt", "spotckpt-after-commit", "s3torchconnector", "boto3"), "dcp": ("spotckpt", "s3torchconnector")}
S3TC_HINT = "pip install 'spotckpt[bench]' (or 's3torchconnector[dcp]>=1.5,<2')"
LABELS = {
    ("one", "save", "spotckpt"): "spotckpt `save()` + `wait()` (committed locally and uploaded)",
    ("one", "save", "spotckpt-after-commit"): "the same with `upload_while_writing=False` (upload after the local commit)",
    ("one", "save", "s3torchconnector"): "s3torchconnector `S3Checkpoint.writer` + `torch.save`",
    ("one", "save", "boto3"): "boto3 defaults: `torch.save` + fsync + `upload_file`",
    ("one", "restore", "spotckpt"): "spotckpt `restore()`, CRC32C verified, empty local dir",
    ("one", "restore", "spotckpt-after-commit"): "the same restore (its own copy of the step)",
    ("one", "restore", "s3torchconnector"): "s3torchconnector `S3Checkpoint.reader` + `torch.load` + `copy_`",
    ("one", "restore", "boto3"): "boto3 defaults: `download_file` + `torch.load(mmap)` + `copy_`",
    ("dcp", "save", "spotckpt"): "`dcp.save` + `spotckpt.dcp.StorageWriter`, then `wait()` (uploaded)",
    ("dcp", "save", "s3torchconnector"): "`dcp.save` + s3torchconnector `S3StorageWriter`",
    ("dcp", "restore", "spotckpt"): "`dcp.load` + `spotckpt.dcp.StorageReader` (verified, empty local dir)",
    ("dcp", "restore", "s3torchconnector"): "`dcp.load` + s3torchconnector `S3StorageReader`",
}
WORKER_TIMEOUT_S = 3600.0
_ROOT = Path(__file__).resolve().parents[3]  # the folder that holds the spotckpt package


def _import_problem(module: str) -> str | None:
    from spotckpt.tools.bench.rows import _import_problem as problem

    return problem(module)


def peer_problems() -> dict[tuple[str, str], str]:
    """(case, peer) -> why that peer cannot run here; absent when it can."""
    out: dict[tuple[str, str], str] = {}
    why = _import_problem("s3torchconnector")
    if why is not None:
        out[("one", "s3torchconnector")] = out[("dcp", "s3torchconnector")] = f"not installed ({why}); {S3TC_HINT}"
    else:
        why = _import_problem("s3torchconnector.dcp")
        if why is not None:
            out[("dcp", "s3torchconnector")] = f"its DCP part does not import ({why}); {S3TC_HINT}"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(job: dict[str, Any], world: int, timeout_s: float) -> list[dict[str, Any]]:
    """Run the case's worker on ``world`` processes; their records (an ``error`` one on failure)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["SPOTCKPT_METRICS"] = "0"
    if world > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")  # as torchrun sets them
    procs = []
    for r in range(world):
        e = dict(env, RANK=str(r), LOCAL_RANK=str(r)) if world > 1 else env
        procs.append(subprocess.Popen([sys.executable, "-m", "spotckpt.tools.bench.s3worker", json.dumps(job)],
                                      stdout=subprocess.PIPE, stderr=None if r == 0 else subprocess.DEVNULL,
                                      text=True, env=e, cwd=str(_ROOT)))
    recs: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        for r, p in enumerate(procs):
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                recs.append({"error": f"rank {r}: timed out after {timeout_s:.0f} s"})
                break
            lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_MARKER)]
            recs.append(json.loads(lines[-1][len(RESULT_MARKER):]) if lines
                        else {"error": f"rank {r} exited {p.returncode} without a result"})
    finally:  # on a failure, a timeout, Ctrl-C or SIGTERM no rank is left behind
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return recs


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(case: str, recs: list[dict[str, Any]], peers: Sequence[str]) -> dict[str, Any]:
    """The table rows of one case from its ranks' records: per op and peer the wall time (the
    slowest rank's, per repetition), the client CPU (the ranks' sum) and the server's CPU, then
    the ratios against spotckpt's."""
    nbytes = recs[0]["bytes"]
    warm = int(recs[0].get("warmup", 1))
    out: dict[str, Any] = {"bytes": nbytes, "ranks": len(recs), "ops": {}}
    for op in ("save", "restore"):
        rows: dict[str, Any] = {}
        for peer in peers:
            per_rank = [r["samples"][peer][op] for r in recs]
            reps = list(zip(*per_rank))  # per repetition, every rank's sample
            wall = [max(s["wall_s"] for s in rep) for rep in reps]
            cpu = [sum(s["cpu_s"] for s in rep) for rep in reps]
            server = [rep[0]["server_cpu_s"] for rep in reps]
            timed = slice(warm, None)  # the first `warm` repetitions: the warm-up
            w = wall[timed]
            rows[peer] = {
                "label": LABELS[(case, op, peer)], "n": len(w), "wall_s": _stats(w), "samples_s": w,
                "warmup_s": wall[:warm], "MBps": nbytes / statistics.median(w) / 1e6,
                "client_cpu_s_per_GiB": statistics.median(cpu[timed]) * GiB / nbytes,
                "server_cpu_s_per_GiB": statistics.median(server[timed]) * GiB / nbytes,
                "client_cpu_samples_s": cpu[timed], "server_cpu_samples_s": server[timed],
            }
            if case == "dcp":
                rows[peer]["correct_every_rank_every_repetition"] = all(all(r["correct"][peer]) for r in recs)
        if "spotckpt" in rows:
            own = rows["spotckpt"]
            for peer, row in rows.items():
                if peer != "spotckpt":
                    row["ratio_vs_spotckpt"] = row["wall_s"]["median"] / own["wall_s"]["median"]
                    row["paired_ratio_vs_spotckpt"] = statistics.median(
                        a / b for a, b in zip(row["samples_s"], own["samples_s"]))
        out["ops"][op] = rows
    if case == "one" and "spotckpt_save_phases" in recs[0]:
        out["spotckpt_save_phases"] = {k: _stats(v[warm:]) for k, v in recs[0]["spotckpt_save_phases"].items()}
    return out


def _warm(n: int) -> str:
    return "no warm-up" if n == 0 else f"{n} warm-up repetition{'s' if n > 1 else ''}"


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB // 2 else f"{nbytes / (1 << 20):.1f} MiB"


def _fmt(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def render_markdown(result: dict[str, Any]) -> str:
    """One table per case, then the peers that were skipped or failed."""
    m = result["machine"]
    lines = [
        "# Save to S3 and restore from S3, side by side",
        "",
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cpu_count')} cores; Python {m.get('python')}, torch "
        f"{m.get('torch')}, s3torchconnector {m.get('s3torchconnector')}; S3: {result['server']}; "
        f"{result['created']}; load average (1 min) {m.get('loadavg_start', ['?'])[0]} at start, "
        f"{m.get('loadavg_end', ['?'])[0]} at end.",
        f"Medians of {result['reps']} alternating repetitions after {_warm(result.get('warmup', 1))}, "
        "min–max in brackets; "
        "ratio = the other's time ÷ spotckpt's (above 1: spotckpt faster), paired = the median of "
        "that ratio taken repetition by repetition; CPU-s/GiB: client = every thread of the "
        "process (DCP: the ranks' sum), server = the S3 server's process.",
        "",
    ]
    if result.get("interrupted"):
        lines += ["**Interrupted (Ctrl-C / SIGTERM): the case that was running is not reported.**", ""]
    for case, res in result["cases"].items():
        if "error" in res:
            lines += [f"## {case}: failed", "", f"`{res['error']}`", ""]
            continue
        size = _size(res["bytes"])
        title = (f"One process, {size} fp32 state (16 tensors)" if case == "one" else
                 f"DCP on {res['ranks']} ranks (FSDP2 + AdamW, gloo on CPU), {size} in the job")
        lines += [f"## {title}", "",
                  "| op | peer | median s [min–max] | MB/s | ratio (paired) | client CPU-s/GiB | server CPU-s/GiB |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for op, rows in res["ops"].items():
            opname = "save → in S3" if op == "save" else "restore from S3"
            for peer, r in rows.items():
                w = r["wall_s"]
                ratio = (f"{r['ratio_vs_spotckpt']:.2f}× ({r['paired_ratio_vs_spotckpt']:.2f}×)"
                         if "ratio_vs_spotckpt" in r else "1")
                label = f"**{r['label']}**" if peer == "spotckpt" else r["label"]
                bad = "" if r.get("correct_every_rank_every_repetition", True) else " **WRONG VALUES**"
                lines.append(f"| {opname} | {label}{bad} | {_fmt(w['median'])} [{_fmt(w['min'])}–"
                             f"{_fmt(w['max'])}] | {r['MBps']:.0f} | {ratio} | {r['client_cpu_s_per_GiB']:.2f} | "
                             f"{r['server_cpu_s_per_GiB']:.2f} |")
        if "spotckpt_save_phases" in res:
            ph = {k: v["median"] for k, v in res["spotckpt_save_phases"].items()}
            lines += ["", f"spotckpt's save, medians: `save()` returned after {_fmt(ph['stall_s'])} s (training "
                      f"goes on from there), the step was committed locally (written, fsynced) "
                      f"{_fmt(ph['local_commit_s'])} s after `save()` began, and the uploader's part then took "
                      f"{_fmt(ph['upload_s'])} s (with upload while writing the data went up from `save()` on: "
                      "this is what was left after the commit -- finishing it, the manifest)."]
        lines.append("")
    if result["skipped"]:
        lines += ["Skipped:", ""] + [f"- {s}" for s in result["skipped"]] + [""]
    return "\n".join(lines)


def peer_lines(result: dict[str, Any]) -> list[str]:
    """One line per measured row, as printed at the end of a run."""
    out = []
    for case, res in result["cases"].items():
        for op, rows in res.get("ops", {}).items():
            for peer, r in rows.items():
                ratio = f"  {r['ratio_vs_spotckpt']:.2f}x spotckpt's time" if "ratio_vs_spotckpt" in r else ""
                out.append(f"{case:3s} {op:7s} {peer:16s} median {r['wall_s']['median']:7.3f} s "
                           f"[{r['wall_s']['min']:.3f}-{r['wall_s']['max']:.3f}]  {r['MBps']:7.1f} MB/s  "
                           f"client {r['client_cpu_s_per_GiB']:5.2f} CPU-s/GiB  server "
                           f"{r['server_cpu_s_per_GiB']:5.2f} CPU-s/GiB{ratio}")
    return out


def _machine() -> dict[str, Any]:
    from spotckpt.tools.bench import cpu_model

    info: dict[str, Any] = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(), "hostname": platform.node()}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["s3torchconnector"] = version("s3torchconnector")
    except Exception:  # noqa: BLE001 - not installed
        info["s3torchconnector"] = "not installed"
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spotckpt bench s3",
        description="Save -> S3 and restore from S3: spotckpt side by side with s3torchconnector and "
                    "boto3's defaults (one process), and DCP through spotckpt.dcp vs s3torchconnector's "
                    "DCP storage (several ranks), on one S3 endpoint.")
    p.add_argument("--mib", type=int, default=256, help="one-process state in MiB (default: %(default)s)")
    p.add_argument("--dcp-mib", type=int, default=None,
                   help="the DCP job's bytes in MiB, model + AdamW (default: --mib)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the DCP case (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5,
                   help="timed repetitions after the warm-up; medians reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed repetitions first, reported apart (default: %(default)s)")
    p.add_argument("--cases", default="one,dcp", help="a subset of one,dcp (default: %(default)s)")
    p.add_argument("--peers", default="spotckpt,spotckpt-after-commit,s3torchconnector,boto3",
                   help="a subset of spotckpt,spotckpt-after-commit,s3torchconnector,boto3 (default: all; "
                        "spotckpt-after-commit is spotckpt with upload_while_writing=False)")
    p.add_argument("--s3tc-threads", type=int, default=8,
                   help="thread_count of S3StorageWriter (default: %(default)s, as in its README)")
    p.add_argument("--server", choices=("seaweedfs", "moto"), default="seaweedfs",
                   help="the local S3 server to start for the run (default: %(default)s)")
    p.add_argument("--server-cpus", default=None, metavar="CPUS",
                   help="run the started server on these CPUs (e.g. 1) and the peers on the others, as S3 "
                        "runs on machines of its own (default: they share every CPU)")
    p.add_argument("--s3-uri", default=None,
                   help="use this existing bucket/prefix instead of starting a server; endpoint and "
                        "credentials from the environment")
    p.add_argument("--server-pid", type=int, default=None,
                   help="with --s3-uri: the S3 server's process id, to report its CPU")
    p.add_argument("--dir", default=os.environ.get("DIR") or tempfile.gettempdir(),
                   help="where local files go (a temp dir is made inside and removed); default $DIR or "
                        "the system temp dir")
    p.add_argument("--out", default=os.path.join("benchmarks", "out"),
                   help="directory for s3peers.json and s3peers.md (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=WORKER_TIMEOUT_S, help="seconds per case")
    p.add_argument("--list", action="store_true",
                   help="print which peers would run in each case (and which are skipped here), and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spotckpt bench s3`` and ``benchmarks/bench_s3tc.py``; returns an exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = [c for c in cases if c not in CASES] + [p for p in wanted if p not in PEERS["one"]]
    if bad or not cases or "spotckpt" not in wanted or args.reps < 1 or args.ranks < 1 or args.warmup < 0:
        print(f"spotckpt bench s3: bad arguments {bad or ''}: cases from {CASES}, peers from {PEERS['one']} "
              "(spotckpt always), --reps and --ranks at least 1, --warmup at least 0", file=sys.stderr)
        return 2
    problems = peer_problems()
    skipped: list[str] = []
    plan: dict[str, list[str]] = {}
    for case in cases:
        plan[case] = []
        for peer in PEERS[case]:
            if peer not in wanted:
                continue
            why = problems.get((case, peer))
            if why is not None:
                line = f"{case}: {peer} skipped: {why}"
                skipped.append(line)
                print(f"spotckpt bench s3: {line}", flush=True)
            else:
                plan[case].append(peer)
    if args.list:
        for case in cases:
            print(f"{case}: {', '.join(plan[case])}")
        return 0

    server_cpus: frozenset[int] | None = None
    client_cpus: frozenset[int] = frozenset()
    if args.server_cpus:
        if args.s3_uri:
            print("spotckpt bench s3: --server-cpus pins the server this run starts; with --s3-uri there is "
                  "none (pin yours with taskset)", file=sys.stderr)
            return 2
        from spotckpt.tools.bench import split_cpus

        try:
            server_cpus, client_cpus = split_cpus(args.server_cpus)
        except ValueError as exc:
            print(f"spotckpt bench s3: {exc}", file=sys.stderr)
            return 2

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the workers' kill, the server's stop, the temp dir

    prev = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    os.makedirs(args.dir, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="spotckpt-bench-s3-", dir=args.dir))
    srv = None
    base = ""
    t0 = time.perf_counter()
    machine = _machine()
    result: dict[str, Any] = {"schema": "spotckpt-bench-s3/1", "reps": args.reps, "warmup": args.warmup,
                              "skipped": skipped, "cases": {},
                              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "args": vars(args), "machine": machine}
    try:
        if args.s3_uri:
            if not args.s3_uri.startswith("s3://") or len(args.s3_uri) <= 5:
                print("spotckpt bench s3: --s3-uri must be s3://bucket[/prefix]", file=sys.stderr)
                return 2
            base = args.s3_uri.rstrip("/") + f"/spotckpt-bench-{uuid.uuid4().hex[:8]}"
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
            server_pid = args.server_pid
            result["server"] = (f"{endpoint or 'AWS S3'} ({args.s3_uri})"
                                + (f", server pid {server_pid}" if server_pid else ", server CPU not measured"))
        else:
            from spotckpt.tools.s3server import S3Server

            print(f"spotckpt bench s3: starting {args.server} on 127.0.0.1", flush=True)
            srv = S3Server.start(args.server, work / "server", buckets=["bench"], cpus=server_cpus)
            os.environ.update(srv.apply_env())
            base, endpoint, server_pid = "s3://bench/run", srv.endpoint_url, srv.process.pid
            result["server"] = f"{args.server} on 127.0.0.1, its own process" + (
                " (moto: no place to measure)" if args.server == "moto" else "") + (
                f", on CPUs {sorted(server_cpus)}; the peers on {sorted(client_cpus)}" if server_cpus else "")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        for case in cases:
            peers = plan[case]
            if "spotckpt" not in peers:
                continue
            world = 1 if case == "one" else args.ranks
            mib = args.mib if case == "one" else (args.dcp_mib or args.mib)
            cwork = work / case
            cwork.mkdir()
            job = {"case": case, "mib": mib, "reps": args.reps, "warmup": args.warmup, "peers": peers,
                   "s3_uri": f"{base}/{case}",
                   "endpoint": endpoint, "region": region, "server_pid": server_pid, "workdir": str(cwork),
                   "s3tc_threads": args.s3tc_threads}
            print(f"spotckpt bench s3: {case}: {', '.join(peers)}; {mib} MiB, {world} process(es), "
                  f"{args.reps} repetitions after {args.warmup} warm-up", flush=True)
            recs = _spawn(job, world, args.timeout)
            errors = [r["error"] for r in recs if "error" in r]
            if errors or len(recs) != world:
                result["cases"][case] = {"error": "; ".join(errors) or "a rank gave no result"}
                print(f"spotckpt bench s3: {case} failed: {result['cases'][case]['error']}", file=sys.stderr,
                      flush=True)
            else:
                result["cases"][case] = summarize(case, recs, peers)
            shutil.rmtree(cwork, ignore_errors=True)
    except KeyboardInterrupt:
        result["interrupted"] = True
        print("spotckpt bench s3: interrupted", file=sys.stderr, flush=True)
    finally:
        if srv is not None:
            srv.stop()
        elif args.s3_uri and base:  # an existing bucket: take away what the run wrote there
            try:
                import boto3

                from spotckpt.tools.bench.s3worker import delete_prefix, split_uri

                bucket, prefix = split_uri(base)
                delete_prefix(boto3.client("s3"), bucket, prefix)
            except Exception as exc:  # noqa: BLE001 - said, not fatal: the figures are measured
                print(f"spotckpt bench s3: could not delete {base}: {exc}", file=sys.stderr, flush=True)
        shutil.rmtree(work, ignore_errors=True)
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
    if hasattr(os, "getloadavg"):
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    md = render_markdown(result)
    with open(os.path.join(args.out, "s3peers.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.out, "s3peers.md"), "w") as f:
        f.write(md)
    print(md)
    print("\n".join(peer_lines(result)))
    print(f"wrote {os.path.join(args.out, 's3peers.json')}, {os.path.join(args.out, 's3peers.md')} "
          f"in {result['wall_s']:.0f} s", flush=True)
    failed = any("error" in r for r in result["cases"].values()) or result.get("interrupted")
    return 1 if failed else 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
