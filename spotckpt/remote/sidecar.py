"""Process logic behind ``spotckpt sync`` and ``spotckpt run`` (argparse lives in ``cli``).

``run_sync``: a standalone uploader for any program that writes steps in the format; on
SIGTERM/SIGINT it flushes what is committed, then exits.

``run_command``: the container entrypoint. SageMaker's training toolkit does not forward
SIGTERM to the user process and shell entrypoints swallow it, so this launcher starts CMD in
its own process group with ``SPOTCKPT_LOCAL_DIR`` / ``SPOTCKPT_S3_URI`` /
``SPOTCKPT_GRACE_SECONDS`` set from its options, forwards SIGTERM/SIGINT to it (see
:func:`forward_signal`: the trainer, not its DataLoader workers, unless ``--signal-group``),
and exits with CMD's code. Who uploads: the trainer's ``CheckpointManager`` (it knows when a
step of several ranks is complete); the launcher uploads nothing while CMD runs, and after CMD
exits it uploads the newest local step only when S3 has nothing as new (bounded by the grace
deadline once a SIGTERM came: SageMaker sends SIGKILL 120 s after SIGTERM).

Both install signal handlers, so both must be called from the main thread; the handlers are
restored on return.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from spotckpt.errors import ConfigError, SpotCkptError

__all__ = ["run_sync", "run_command", "add_commands", "forward_signal"]

log = logging.getLogger(__name__)

_FORWARDED = (signal.SIGTERM, signal.SIGINT)
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ash", "ksh", "mksh", "busybox"})


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; empty where /proc is not available)."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(name))
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _is_torchrun(pid: int) -> bool:
    """Whether ``pid`` is a torchrun agent (``torchrun``, ``python -m torch.distributed.run``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    return torchrun_arg_index(argv) is not None


def torchrun_arg_index(argv: list[str]) -> int | None:
    """Where torchrun's own options start in ``argv`` (right after ``torchrun``, or after
    ``-m torch.distributed.run``); None when ``argv`` does not start torchrun."""
    for i, a in enumerate(argv[:3]):
        if (i < 2 and os.path.basename(a) == "torchrun") or a in ("torch.distributed.run", "torch.distributed.launch"):
            return i + 1
    return None


def torchrun_nproc(cmd: list[str]) -> int | None:
    """torchrun's ``--nproc_per_node`` (``--nproc-per-node``) in ``cmd`` when it is a number;
    None when ``cmd`` is not torchrun, or gives none or a word (``auto``, ``gpu``)."""
    at = torchrun_arg_index(cmd)
    if at is None:
        return None
    args = cmd[at:]
    for i, a in enumerate(args):
        name, eq, value = a.partition("=")
        if name in ("--nproc_per_node", "--nproc-per-node"):
            if not eq:
                value = args[i + 1] if i + 1 < len(args) else ""
            return int(value) if value.isdigit() else None
        if not a.startswith("-"):
            return None  # the training script: what follows is its own arguments
    return None


def with_torchrun_threads(cmd: list[str], env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``OMP_NUM_THREADS=1`` when ``cmd`` is torchrun with ``--nproc_per_node`` > 1
    and ``env`` has no ``OMP_NUM_THREADS`` -- what torchrun would set itself, minus the banner it
    prints about it on every start (every host, every restart). A value the user set is kept."""
    nproc = torchrun_nproc(cmd)
    if nproc is None or nproc < 2 or "OMP_NUM_THREADS" in env:
        return env
    return {**env, "OMP_NUM_THREADS": "1"}


def with_torchrun_grace(cmd: list[str], grace_seconds: float) -> list[str]:
    """``cmd`` with ``--shutdown-timeout`` set from the grace period when ``cmd`` starts torchrun
    directly and this PyTorch's torchrun has the option (2.13 does; older ones hard-code 30 s)
    -- so that even a SIGTERM that reaches torchrun itself leaves the workers the whole grace."""
    at = torchrun_arg_index(cmd)
    if at is None or any(a.startswith(("--shutdown-timeout", "--shutdown_timeout")) for a in cmd):
        return cmd
    try:
        import importlib.util

        spec = importlib.util.find_spec("torch.distributed.run")
        text = Path(spec.origin).read_text() if spec is not None and spec.origin else ""
    except (ImportError, OSError, ValueError):
        text = ""
    if "--shutdown-timeout" not in text:
        return cmd  # older torchrun: forward_signal signals its workers instead
    return [*cmd[:at], f"--shutdown-timeout={max(1, int(grace_seconds) - 5)}", *cmd[at:]]


def forward_signal(pid: int, signum: int, *, whole_group: bool = False) -> None:
    """Pass ``signum`` on to the trainer started as ``pid`` (a process-group leader).

    By default it goes to the leader -- and, when the leader is a shell (``/bin/sh -c ...``, which
    would not pass it on), to the shell's direct children -- but not to the rest of the group:
    PyTorch's DataLoader workers die of a SIGTERM that does not come from their parent, and the
    trainer would then crash in the middle of its final save. That is also what a container
    runtime does (``docker stop`` signals PID 1 only). ``whole_group=True`` signals every
    process of the group instead.

    A torchrun agent (started directly or by the shell) is not signalled itself: its workers
    are. torchrun would pass the signal on and then SIGKILL its workers after its own shutdown
    timeout (30 s unless set), cutting a large final upload short; signalled directly, the
    workers save within the whole grace period, exit 0, and torchrun exits 0 after them.
    """
    try:
        if whole_group:
            os.killpg(pid, signum)
            return
        targets = [pid]
        if _comm(pid) in _SHELLS:
            targets += _children(pid)
        for t in list(targets):
            if _is_torchrun(t):
                targets.remove(t)
                targets += _children(t)
        for t in targets:
            try:
                os.kill(t, signum)
            except ProcessLookupError:
                pass
    except ProcessLookupError:
        pass


def _default_local_dir(local_dir: str | Path | None) -> Path:
    """The argument, else $SPOTCKPT_LOCAL_DIR, else SageMaker's LocalPath, else the default."""
    from spotckpt.core.config import is_s3_uri, resolve_local_dir

    if local_dir is not None and is_s3_uri(str(local_dir)):
        raise ConfigError(f"--local {local_dir}: the checkpoint directory must be a local path; the S3 URI "
                          "goes to --s3")
    return resolve_local_dir(local_dir)


def _checked_local_dir(local_dir: str | Path | None, *, must_exist: bool) -> Path:
    """:func:`_default_local_dir`, refused (ConfigError) when it is a file, or when it does not
    exist and ``must_exist`` (a one-off upload of a mistyped directory would otherwise upload
    nothing and succeed)."""
    local = _default_local_dir(local_dir)
    if local.exists() and not local.is_dir():
        raise ConfigError(f"--local {local} is a file, not a directory: pass the checkpoint directory "
                          "(the trainer's local_dir)")
    if must_exist and not local.exists():
        raise ConfigError(f"--local {local} does not exist: nothing to upload; pass the checkpoint directory "
                          "(the trainer's local_dir)")
    return local


def _durable_s3_line(step: int, seconds: float, nbytes: int) -> None:
    """The ``event=durable_s3`` metric line of a step this process committed in S3 -- the same
    line a trainer's manager prints (``$SPOTCKPT_METRICS=0``: none), so a MetricDefinition
    scrapes the launcher's and the standalone uploader's uploads too."""
    from spotckpt.core.config import env_bool
    from spotckpt.events import DurableS3Event
    from spotckpt.core.metrics import MetricsListener

    MetricsListener(enabled=env_bool("SPOTCKPT_METRICS", True))(DurableS3Event(step=step, seconds=seconds, bytes=nbytes))


def _make_uploader(local_dir: Path, s3_uri: str, keep_last: int | None) -> Any:
    from spotckpt.policy import retention_from
    from spotckpt.remote.s3 import S3Store
    from spotckpt.remote.uploader import Uploader

    retention = retention_from(keep_last)  # validated before anything is started
    return Uploader(local_dir, S3Store.open(s3_uri), retention=retention, on_uploaded=_durable_s3_line)


def run_sync(
    local_dir: str | Path | None,
    s3_uri: str,
    *,
    keep_last: int | None = None,
    once: bool = False,
    grace_seconds: float = 110.0,
) -> int:
    """Upload committed steps of ``local_dir`` to ``s3_uri`` until SIGTERM/SIGINT, then flush
    (for at most ``grace_seconds``) and return 0 (1 if the final flush did not complete).
    ``once``: one reconcile pass, then return."""
    if once:
        from spotckpt.core.local import scan_committed_steps

        local = _checked_local_dir(local_dir, must_exist=True)
        uploader = _make_uploader(local, s3_uri, keep_last)
        try:
            uploader.sync_once()
            in_s3 = set(uploader.uploaded_steps())
        finally:
            uploader.store.close()
        committed = scan_committed_steps(local, require_manifest=True)
        print(f"spotckpt sync: {local} holds {len(committed)} committed step(s)"
              + (f" (newest {committed[-1]})" if committed else "") + f"; {s3_uri} holds "
              + (f"{len(in_s3)} (newest {max(in_s3)})" if in_s3 else "none"), file=sys.stderr, flush=True)
        return 0
    stop = threading.Event()
    got: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        got.append(signum)
        stop.set()

    # Handlers first: a SIGTERM during start-up (credentials, HeadBucket) still gets a flush.
    previous = {s: signal.signal(s, on_signal) for s in _FORWARDED}
    uploader = None
    try:
        local = _checked_local_dir(local_dir, must_exist=False)
        if not local.exists():
            log.warning("spotckpt sync: %s does not exist yet; creating it and watching it for the trainer's "
                        "checkpoints (if that is a typo, stop this and pass the right --local)", local)
        uploader = _make_uploader(local, s3_uri, keep_last)
        uploader.start()
        log.info("spotckpt sync: watching %s -> %s", uploader.local_dir, s3_uri)
        while not stop.wait(1.0):
            pass
        log.info("signal %s: flushing committed checkpoints to %s", got[0] if got else "?", s3_uri)
        try:
            ok = uploader.flush(timeout=grace_seconds)
        except SpotCkptError as exc:
            log.error("final upload failed: %s", exc)
            ok = False
        if not ok:
            log.error("not every committed step reached %s: %s", s3_uri, _missing(uploader))
        return 0 if ok else 1
    finally:
        if uploader is not None:
            uploader.close(timeout=10)
            uploader.store.close()
        for s, h in previous.items():
            signal.signal(s, h)


def _missing(uploader: Any) -> str:
    from spotckpt.core.local import scan_committed_steps

    done = set(uploader.uploaded_steps())
    left = [s for s in scan_committed_steps(uploader.local_dir, require_manifest=True) if s not in done]
    return f"local steps not in S3: {left}" if left else "unknown"


def _wait_for_group(pgid: int, deadline: float) -> None:
    """Wait (reaping any of our children in it) until process group ``pgid`` is empty or the
    monotonic ``deadline`` passes."""
    while time.monotonic() < deadline:
        try:
            os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)
    log.warning("processes of group %s still running at the deadline", pgid)


DEFAULT_GRACE_SECONDS = 120.0


def trainer_env(local_dir: Path, s3_uri: str | None, grace_seconds: float,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment CMD starts with: ``base`` (default ``os.environ``) plus the launcher's
    settings, so that the trainer's ``CheckpointManager(local_dir=None, s3_uri=None)`` commits
    where the launcher looks, restores from and uploads to the same S3 prefix, and budgets
    its final save with the same grace."""
    env = dict(os.environ if base is None else base)
    env["SPOTCKPT_LOCAL_DIR"] = str(local_dir)
    if s3_uri:
        env["SPOTCKPT_S3_URI"] = s3_uri
    env["SPOTCKPT_GRACE_SECONDS"] = f"{grace_seconds:g}"
    return env


def final_upload(local_dir: Path, store: Any, *, keep_last: int | None = None) -> int | None:
    """After CMD exited: when the newest step committed in ``local_dir`` is newer than every
    step in S3 (a program that writes steps but does not upload them, or a trainer killed
    before its upload finished), upload that one step, data first, manifest last; then apply
    ``keep_last`` in S3. Returns the step uploaded, or None. Steps written by several ranks
    are left to their trainer (its manager writes their manifest once every host's files are
    in S3; one host cannot)."""
    from spotckpt.format import step_dirname
    from spotckpt.core.local import read_step_manifest, scan_committed_steps
    from spotckpt.policy import doomed, retention_from

    retention = retention_from(keep_last)
    local = scan_committed_steps(local_dir, require_manifest=True)
    remote = store.list_steps()
    uploaded = None
    if local and (not remote or local[-1] > remote[-1]):
        step = local[-1]
        manifest = read_step_manifest(local_dir, step)
        if int(manifest.extra.get("world_size", 1) or 1) > 1:
            log.warning("step %s (several ranks) is not in %s and its trainer is gone; spotckpt run does not "
                        "upload a step of several ranks itself", step, store.uri)
        else:
            log.info("step %s is committed locally but not in %s: uploading it", step, store.uri)
            t0 = time.perf_counter()
            if store.upload_step(step, local_dir / step_dirname(step), manifest):
                _durable_s3_line(step, time.perf_counter() - t0, manifest.total_bytes)
            uploaded = step
    remote = store.list_steps()
    for s in doomed(retention, remote, protect=remote[-1:]):
        store.delete_step(s)
    return uploaded


def run_command(
    cmd: list[str],
    *,
    s3_uri: str | None = None,
    local_dir: str | Path | None = None,
    keep_last: int | None = None,
    grace_seconds: float | None = None,
    signal_group: bool = False,
    early_signals: list[int] | None = None,
) -> int:
    """Run ``cmd`` as the container's main process; see the module docstring.

    CMD gets ``SPOTCKPT_LOCAL_DIR``, ``SPOTCKPT_S3_URI`` (with ``s3_uri``) and
    ``SPOTCKPT_GRACE_SECONDS`` (:func:`trainer_env`). **The trainer uploads**: its
    ``CheckpointManager`` restores from and uploads to ``s3_uri`` (with several ranks and hosts
    only it can commit a step in S3 correctly), and the launcher uploads nothing while CMD runs
    -- exactly one process uploads a step. Once CMD has exited, the launcher uploads the newest
    local step if S3 holds nothing as new (:func:`final_upload`), within the grace deadline
    after a SIGTERM.

    Signals are handled from the first line: a SIGTERM/SIGINT that arrives before CMD is
    started (``early_signals``: ones the command line already caught) means CMD is not started
    at all; the launcher says so and returns 128+N. Returns CMD's exit code (128+N when it died
    of signal N); 1 if CMD succeeded but its newest step could not be uploaded.
    """
    got: list[int] = list(early_signals or [])
    first_signal_at: list[float] = [time.monotonic()] if got else []
    proc: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        got.append(signum)
        if not first_signal_at:
            first_signal_at.append(time.monotonic())
        if proc is not None and proc.poll() is None:
            forward_signal(proc.pid, signum, whole_group=signal_group)

    previous = {s: signal.signal(s, on_signal) for s in _FORWARDED}
    store = None
    try:
        if not cmd:
            raise ConfigError("spotckpt run needs a command after '--', e.g. spotckpt run -- python train.py")
        if grace_seconds is None:
            from spotckpt.core.config import env_float

            grace_seconds = env_float("SPOTCKPT_GRACE_SECONDS", DEFAULT_GRACE_SECONDS) or DEFAULT_GRACE_SECONDS
        if not grace_seconds > 0:
            raise ConfigError(f"--grace-seconds must be > 0, got {grace_seconds!r}")
        if keep_last is not None and keep_last < 1:
            raise ConfigError(f"--keep-last must be >= 1, got {keep_last!r}")
        local = _checked_local_dir(local_dir, must_exist=False)
        env = trainer_env(local, s3_uri, grace_seconds)
        if s3_uri:
            from spotckpt.remote.s3 import S3Store

            store = S3Store.open(s3_uri)  # fail now, before training starts, on a bad bucket or credentials
        if got:
            name = signal.Signals(got[0]).name
            log.warning("spotckpt run: %s arrived before %s was started; not starting it", name, cmd[0])
            return 128 + got[0]
        try:
            proc = subprocess.Popen(with_torchrun_grace(cmd, grace_seconds), env=with_torchrun_threads(cmd, env),
                                    start_new_session=True)
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise ConfigError(f"cannot start {cmd[0]!r}: {exc}; check the command after '--' and PATH") from exc
        rc = proc.wait()
        code = 128 - rc if rc < 0 else rc
        log.info("%s exited with %s", cmd[0], code)
        if first_signal_at:
            # A shell that died of the signal may leave the trainer running in the group:
            # give the group until the deadline to finish its final checkpoint.
            _wait_for_group(proc.pid, first_signal_at[0] + grace_seconds)
        if store is None:
            return code
        timeout = None
        if first_signal_at:
            timeout = max(0.0, first_signal_at[0] + grace_seconds - time.monotonic())
        ok = _bounded(lambda: final_upload(local, store, keep_last=keep_last), timeout)
        if not ok:
            log.error("the newest committed step of %s did not reach %s before the deadline", local, s3_uri)
            return code or 1
        return code
    finally:
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for s, h in previous.items():
            signal.signal(s, h)
        if store is not None:
            store.close()


def _bounded(fn: Any, timeout: float | None) -> bool:
    """Run ``fn`` on a ``spotckpt-final-upload`` thread; False when it failed (logged) or was
    still running after ``timeout`` seconds (None: no limit)."""
    result: list[bool] = []

    def target() -> None:
        try:
            fn()
            result.append(True)
        except SpotCkptError as exc:
            log.error("final upload failed: %s", exc)
            result.append(False)

    t = threading.Thread(target=target, name="spotckpt-final-upload", daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


# ------------------------------------------------------------------------------ command line


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``sync`` and ``run`` to the ``spotckpt`` command line (called by :mod:`spotckpt.tools.cli`)."""
    s = sub.add_parser(
        "sync",
        help="standalone uploader: sync committed steps of --local to --s3; flushes on SIGTERM",
    )
    s.add_argument("--local", default=None, metavar="DIR", help="checkpoint directory (default: $SPOTCKPT_LOCAL_DIR, "
                   "SageMaker's LocalPath, /opt/ml/checkpoints)")
    s.add_argument("--s3", default=None, metavar="URI", help="s3://bucket/prefix (default: $SPOTCKPT_S3_URI)")
    s.add_argument("--keep-last", type=int, default=None, metavar="N", help="keep only the newest N steps in S3 "
                   "(default: keep all)")
    s.add_argument("--once", action="store_true", help="one pass, then exit")
    s.set_defaults(func=_cmd_sync)

    r = sub.add_parser(
        "run",
        help="container entrypoint: run CMD in its own process group with SPOTCKPT_LOCAL_DIR/S3_URI/"
        "GRACE_SECONDS set, forward SIGTERM/SIGINT, exit with CMD's code",
        description="Run CMD (after '--') as the container's main process. CMD gets SPOTCKPT_LOCAL_DIR, "
        "SPOTCKPT_S3_URI and SPOTCKPT_GRACE_SECONDS from the options below (or keeps the values already in "
        "the environment), so CheckpointManager(local_dir=None, s3_uri=None) in the trainer uses them. "
        "Who uploads: the trainer's CheckpointManager restores from and uploads to --s3; this launcher "
        "uploads nothing while CMD runs (exactly one process uploads a step). After CMD exits it uploads "
        "the newest local step only if S3 holds nothing as new (a program that writes steps without "
        "uploading, or a trainer killed mid-upload). For continuous uploads of a program that does not "
        "use CheckpointManager, run `spotckpt sync` beside it.",
    )
    r.add_argument("--s3", default=None, metavar="URI", help="s3://bucket/prefix the trainer restores from and uploads to "
                   "(default: $SPOTCKPT_S3_URI; none: local only, e.g. SageMaker's own sync)")
    r.add_argument("--local", default=None, metavar="DIR", help="checkpoint directory, passed on as SPOTCKPT_LOCAL_DIR "
                   "(default: $SPOTCKPT_LOCAL_DIR, SageMaker's LocalPath, /opt/ml/checkpoints)")
    r.add_argument("--keep-last", type=int, default=None, metavar="N",
                   help="after CMD exits, keep only the newest N steps in S3 (the trainer's keep_last "
                   "governs while it runs; default: keep all)")
    r.add_argument("--grace-seconds", type=float, default=None, metavar="S",
                   help="SIGTERM to SIGKILL budget, passed on as SPOTCKPT_GRACE_SECONDS; the launcher's "
                   "final upload ends by then (default: $SPOTCKPT_GRACE_SECONDS, else 120, SageMaker's)")
    r.add_argument("--signal-group", action="store_true",
                   help="forward signals to CMD's whole process group (default: CMD, or the children of "
                   "a shell CMD, so that DataLoader workers are not killed mid-save)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    r.set_defaults(func=_cmd_run)


def _cmd_sync(args: argparse.Namespace) -> int:
    from spotckpt.core.config import resolve_s3_uri

    uri = resolve_s3_uri(args.s3)
    if uri is None:
        raise ConfigError("spotckpt sync needs --s3 s3://bucket/prefix or SPOTCKPT_S3_URI")
    if args.keep_last is not None and args.keep_last < 1:
        raise ConfigError(f"--keep-last must be >= 1, got {args.keep_last!r}")
    return run_sync(_default_local_dir(args.local), uri, keep_last=args.keep_last, once=args.once)


def _cmd_run(args: argparse.Namespace) -> int:
    from spotckpt.core.config import resolve_s3_uri

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return run_command(
        cmd,
        s3_uri=resolve_s3_uri(args.s3),
        local_dir=args.local,
        keep_last=args.keep_last,
        grace_seconds=args.grace_seconds,
        signal_group=args.signal_group,
        early_signals=getattr(args, "early_signals", None),
    )
