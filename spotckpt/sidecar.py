"""Process logic behind ``spotckpt sync`` and ``spotckpt run`` (argparse lives in ``cli``).

``run_sync``: a standalone uploader for any program that writes steps in the format; on
SIGTERM/SIGINT it flushes what is committed, then exits.

``run_command``: the container entrypoint. SageMaker's training toolkit does not forward
SIGTERM to the user process and shell entrypoints swallow it, so this launcher starts CMD in
its own process group, forwards SIGTERM/SIGINT to it (see :func:`forward_signal`: the trainer,
not its DataLoader workers, unless ``--signal-group``), runs the uploader as a sidecar
thread that outlives CMD, flushes the upload after CMD exits (bounded by the grace deadline
once a SIGTERM came: SageMaker sends SIGKILL 120 s after SIGTERM), and exits with CMD's code.

Both install signal handlers, so both must be called from the main thread; the handlers are
restored on return.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from .errors import ConfigError, SpotCkptError

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
    from .config import resolve_local_dir

    return resolve_local_dir(local_dir)


def _make_uploader(local_dir: Path, s3_uri: str, keep_last: int | None) -> Any:
    from .policy import retention_from
    from .s3 import S3Store
    from .uploader import Uploader

    retention = retention_from(keep_last)  # validated before anything is started
    store = S3Store(s3_uri)
    try:
        store.check_access()
    except BaseException:
        store.close()
        raise
    return Uploader(local_dir, store, retention=retention)


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
        uploader = _make_uploader(_default_local_dir(local_dir), s3_uri, keep_last)
        try:
            uploader.sync_once()
        finally:
            uploader.store.close()
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
        uploader = _make_uploader(_default_local_dir(local_dir), s3_uri, keep_last)
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
    from .local import scan_committed_steps

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


def run_command(
    cmd: list[str],
    *,
    s3_uri: str | None = None,
    local_dir: str | Path | None = None,
    keep_last: int | None = None,
    grace_seconds: float = 120.0,
    signal_group: bool = False,
) -> int:
    """Run ``cmd`` as the container's main process; see the module docstring.

    Returns CMD's exit code (128+N when it died of signal N). If CMD succeeded but its
    checkpoints could not all be uploaded, returns 1 (and logs what is missing). Without
    ``s3_uri`` nothing is uploaded (e.g. SageMaker's own checkpoint sync is in use).
    """
    if not cmd:
        raise ConfigError("spotckpt run needs a command after '--', e.g. spotckpt run -- python train.py")
    uploader = None
    if s3_uri:
        uploader = _make_uploader(_default_local_dir(local_dir), s3_uri, keep_last)
        uploader.start()
    first_signal_at: list[float] = []
    proc: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not first_signal_at:
            first_signal_at.append(time.monotonic())
        if proc is not None and proc.poll() is None:
            forward_signal(proc.pid, signum, whole_group=signal_group)

    previous = {s: signal.signal(s, on_signal) for s in _FORWARDED}
    try:
        try:
            proc = subprocess.Popen(with_torchrun_grace(cmd, grace_seconds), start_new_session=True)
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise ConfigError(f"cannot start {cmd[0]!r}: {exc}; check the command after '--' and PATH") from exc
        if first_signal_at:  # a signal arrived while starting: pass it on now
            forward_signal(proc.pid, signal.SIGTERM, whole_group=signal_group)
        rc = proc.wait()
        code = 128 - rc if rc < 0 else rc
        log.info("%s exited with %s", cmd[0], code)
        if first_signal_at:
            # A shell that died of the signal may leave the trainer running in the group:
            # give the group until the deadline to finish its final checkpoint.
            _wait_for_group(proc.pid, first_signal_at[0] + grace_seconds)
        if uploader is None:
            return code
        timeout = None
        if first_signal_at:
            timeout = max(0.0, first_signal_at[0] + grace_seconds - time.monotonic())
        try:
            ok = uploader.flush(timeout=timeout)
        except SpotCkptError as exc:
            log.error("final upload failed: %s", exc)
            ok = False
        if not ok:
            log.error("not every committed step reached %s before the deadline: %s", s3_uri, _missing(uploader))
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
        if uploader is not None:
            uploader.close(timeout=10)
            uploader.store.close()


# ------------------------------------------------------------------------------ command line


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``sync`` and ``run`` to the ``spotckpt`` command line (called by :mod:`spotckpt.cli`)."""
    s = sub.add_parser(
        "sync",
        help="standalone uploader: sync committed steps of --local to --s3; flushes on SIGTERM",
    )
    s.add_argument("--local", default=None, help="checkpoint directory (default: $SPOTCKPT_LOCAL_DIR, "
                   "SageMaker's LocalPath, /opt/ml/checkpoints)")
    s.add_argument("--s3", default=None, help="s3://bucket/prefix (default: $SPOTCKPT_S3_URI)")
    s.add_argument("--keep-last", type=int, default=None, help="keep only the newest N steps in S3")
    s.add_argument("--once", action="store_true", help="one pass, then exit")
    s.set_defaults(func=_cmd_sync)

    r = sub.add_parser(
        "run",
        help="container entrypoint: run CMD in its own process group, forward SIGTERM/SIGINT, "
        "upload its checkpoints as a sidecar, exit with CMD's code",
    )
    r.add_argument("--s3", default=None, help="s3://bucket/prefix (default: $SPOTCKPT_S3_URI; none: no upload)")
    r.add_argument("--local", default=None, help="checkpoint directory (as for sync)")
    r.add_argument("--keep-last", type=int, default=None)
    r.add_argument("--grace-seconds", type=float, default=120.0,
                   help="after SIGTERM, time until the final upload must be done (SageMaker: 120)")
    r.add_argument("--signal-group", action="store_true",
                   help="forward signals to CMD's whole process group (default: CMD, or the children of "
                   "a shell CMD, so that DataLoader workers are not killed mid-save)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    r.set_defaults(func=_cmd_run)


def _cmd_sync(args: argparse.Namespace) -> int:
    from .config import resolve_s3_uri

    uri = resolve_s3_uri(args.s3)
    if uri is None:
        raise ConfigError("spotckpt sync needs --s3 s3://bucket/prefix or SPOTCKPT_S3_URI")
    return run_sync(_default_local_dir(args.local), uri, keep_last=args.keep_last, once=args.once)


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import resolve_s3_uri

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
    )
