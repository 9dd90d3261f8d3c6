"""The ``spotckpt`` command line.

    spotckpt ls DIR|s3://...           committed steps: size, created, valid/corrupt
    spotckpt verify DIR|s3://...       the same with every CRC32C checked; exit 1 if no step, none
                                       valid, or the newest is bad
    spotckpt restore SRC --to DIR      copy the newest valid (or --step) step from SRC into DIR
    spotckpt sync --local DIR --s3 URI standalone uploader (sidecar); flushes on SIGTERM
    spotckpt run [--s3 URI] -- CMD     container entrypoint: forwards signals, uploads, exits with CMD
    spotckpt simulate [...] -- CMD     the managed-spot lifecycle on one machine
    spotckpt bench [...]               checkpoint benchmarks side by side with the peers

Only this module configures logging handlers. Start-up imports neither torch nor boto3: each
command loads what it needs (``ls``/``verify`` of a directory and ``run`` without ``--s3`` need
neither), and ``run`` catches SIGTERM/SIGINT before anything else is imported.

Inspection never writes: ``ls``, ``verify`` and the source of ``restore`` open a directory
read-only (``LocalStore(read_only=True)``): no staging folder, no cleanup, nothing created.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotckpt._version import __version__
from spotckpt.core.config import is_s3_uri
from spotckpt.errors import ConfigError, NoCheckpointError, SpotCkptError

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRow:
    step: int
    files: int
    size: int
    created: str
    status: str  # "valid", "unchecked" or "corrupt: <why>"

    @property
    def ok(self) -> bool:
        return not self.status.startswith("corrupt")


def _human(n: int) -> str:
    f = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if f < 1024 or unit == "TiB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return str(n)


def _local_rows(root: Path, *, checksums: bool) -> list[StepRow]:
    from spotckpt.core.local import LocalStore

    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        hint = (f" (an S3 URI is written s3://{str(root)[3:].lstrip('/')})"
                if str(root).lower().startswith("s3/") else "")
        raise ConfigError(f"{root} {what}; pass the checkpoint directory (e.g. /opt/ml/checkpoints) or an S3 "
                          f"URI{hint}")
    store = LocalStore(root, read_only=True)
    rows = []
    for s in store.committed_steps():
        try:
            man = store.read_manifest(s)
        except SpotCkptError:
            man = None
        # several hosts: a host holds its ranks' files (and maybe copies of rank 0's), not all
        here = None
        if man is not None and int(man.extra.get("world_size", 1) or 1) > 1:
            here = {f for f in man.files if (store.step_path(s) / f).exists()}
        check = store.verify_step(s, checksums=checksums, files=here)
        m = check.manifest
        status = "valid" if check.ok and checksums else ("ok (sizes)" if check.ok else "corrupt: " + check.problems[0])
        if check.ok and m is not None and here is not None:
            status += f" ({len(here)} of {len(m.files)} files on this host)"
            if not here:
                status = "corrupt: no file of this step is on this host"
        rows.append(StepRow(s, len(m.files) if m else 0, m.total_bytes if m else 0, m.created if m else "-", status))
    return rows


def _s3_rows(uri: str, *, checksums: bool) -> list[StepRow]:
    from spotckpt.remote.s3 import S3Store

    store = S3Store(uri)
    try:
        store.check_access()
        rows = []
        for s in store.list_steps():
            try:
                m = store.read_manifest(s)
            except SpotCkptError as exc:
                rows.append(StepRow(s, 0, 0, "-", f"corrupt: {exc}"))
                continue
            status = "ok (manifest)"
            if checksums:
                problems = store.verify_step(s, m)
                status = "valid" if not problems else "corrupt: " + problems[0]
            rows.append(StepRow(s, len(m.files), m.total_bytes, m.created, status))
        return rows
    finally:
        store.close()


def _rows(src: str, *, checksums: bool) -> list[StepRow]:
    if is_s3_uri(src):
        return _s3_rows(src, checksums=checksums)
    return _local_rows(Path(src), checksums=checksums)


def _print_table(rows: list[StepRow], out=None) -> None:  # type: ignore[no-untyped-def]
    out = out or sys.stdout
    if not rows:
        print("no committed steps", file=out)
        return
    print(f"{'STEP':>12}  {'FILES':>5}  {'SIZE':>10}  {'CREATED':<24}  STATUS", file=out)
    for r in rows:
        print(f"{r.step:>12}  {r.files:>5}  {_human(r.size):>10}  {r.created:<24}  {r.status}", file=out)


def cmd_ls(args: argparse.Namespace) -> int:
    rows = _rows(args.src, checksums=False)
    _print_table(rows)
    return 1 if rows and not rows[-1].ok else 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 only when the newest committed step verifies; 1 when there is no committed step,
    when none verifies, or when the newest does not (restore would fall back)."""
    rows = _rows(args.src, checksums=True)
    _print_table(rows)
    if not rows:
        print(f"no committed step in {args.src}: nothing to verify -- check the directory or S3 prefix",
              file=sys.stderr)
        return 1
    valid = [r for r in rows if r.ok]
    if not valid:
        print(f"no valid step in {args.src}: all {len(rows)} committed step(s) are corrupt (see STATUS); "
              "a restore would fail", file=sys.stderr)
        return 1
    if not rows[-1].ok:
        print(f"the newest step ({rows[-1].step}) is corrupt; restore will use step {valid[-1].step}, the "
              "newest valid one", file=sys.stderr)
        return 1
    return 0


def _open_source(src: str) -> Any:
    """The step source of a restore, opened read-only (nothing is created next to it)."""
    if is_s3_uri(src):
        from spotckpt.remote.s3 import S3Store

        return S3Store.open(src)
    from spotckpt.core.local import LocalStore

    if not Path(src).is_dir():
        raise ConfigError(f"{src} is not a directory; pass a checkpoint directory or s3://bucket/prefix")
    return LocalStore(Path(src), read_only=True)


def _note_newer(dest: Any, step: int) -> None:
    """Say so when ``dest`` holds committed steps newer than ``step``: a manager resuming from it
    would pick the newest, not the step just restored."""
    newer = [s for s in dest.committed_steps() if s > step]
    if newer:
        print(f"note: {dest.root} also holds newer step(s) {', '.join(map(str, newer))}: a CheckpointManager "
              f"resuming from it restores step {newer[-1]}, not {step}; to resume from step {step}, restore into "
              "an empty directory", file=sys.stderr)


def cmd_restore(args: argparse.Namespace) -> int:
    """Copy the newest valid (or ``--step``) step of SRC into ``--to``, verified, committed there
    atomically (:meth:`spotckpt.core.local.LocalStore.import_step`). The source is only read. What this
    command creates on the target side -- the target directory, its staging folder -- is
    removed again when it ends up empty (a failed restore leaves the target as it was)."""
    src: str = args.src
    to = Path(args.to).expanduser().absolute()
    if is_s3_uri(args.to):
        raise ConfigError(f"--to {args.to}: the target must be a local directory; to copy into S3, restore "
                          "locally and run `spotckpt sync --once`")
    if to.exists() and not to.is_dir():
        raise ConfigError(f"--to {args.to} is an existing file; pass a directory (it is created if missing)")
    above = next((p for p in to.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"--to {args.to}: {above} is a file, so nothing can be created under it; pass a "
                          "directory (it is created if missing)")
    source = _open_source(src)
    created = [p for p in (to, *to.parents) if not p.exists()]
    staging_sibling = to.parent / f".{to.name}.spotckpt-staging"
    staging_inside = to / ".spotckpt-staging"  # where LocalStore stages when the sibling is not possible
    made = [p for p in (staging_inside, staging_sibling) if not p.exists()]
    try:
        steps = sorted(source.list_steps(), reverse=True)
        if args.step is not None:
            if args.step not in steps:
                have = ", ".join(str(s) for s in sorted(steps)) or "none"
                raise NoCheckpointError(f"step {args.step} is not committed in {src}; committed steps: {have}",
                                        step=args.step)
            steps = [args.step]
        if not steps:
            print(f"no committed step in {src}: nothing to restore -- check the directory or S3 prefix",
                  file=sys.stderr)
            return 1
        from spotckpt.core.local import LocalStore

        dest = LocalStore(to)
        for s in steps:
            if dest.is_committed(s) and dest.verify_step(s).ok:
                print(f"step {s} is already in {dest.root}")
                _note_newer(dest, s)
                return 0
            bar = _progress_bar(f"step {s}")
            try:
                dest.import_step(source, s, replace=dest.is_committed(s), progress=bar.update if bar is not None else None)
            except SpotCkptError as exc:
                print(f"step {s}: {exc}", file=sys.stderr)
                if args.step is not None:
                    return 1
                continue
            finally:
                if bar is not None:
                    bar.close()
            print(f"restored step {s} from {src} into {dest.step_path(s)}")
            _note_newer(dest, s)
            return 0
        print(f"no valid step in {src}: every committed step failed to verify (see above)", file=sys.stderr)
        return 1
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
        _remove_if_empty([*made, *created])


def _remove_if_empty(paths: Sequence[Path]) -> None:
    """rmdir each of ``paths`` (innermost first) that exists and is empty; never anything else."""
    for p in paths:
        try:
            p.rmdir()
        except OSError:
            pass


def _progress_bar(desc: str):  # type: ignore[no-untyped-def]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spotckpt", description="Checkpoints for spot training.")
    p.add_argument("--version", action="version", version=f"spotckpt {__version__}",
                   help="print the version and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("ls", help="list committed steps of a directory or s3:// prefix (reads only)")
    s.add_argument("src", help="checkpoint directory or s3://bucket/prefix")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("verify", help="check every file's size and CRC32C (reads only); exit 1 when there is "
                       "no committed step, none verifies, or the newest is bad")
    s.add_argument("src", help="checkpoint directory or s3://bucket/prefix")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("restore", help="copy the newest valid step (or --step) into a local directory")
    s.add_argument("src", help="checkpoint directory or s3://bucket/prefix (only read)")
    s.add_argument("--to", required=True, metavar="DIR",
                   help="local checkpoint directory to commit the step into (created if missing)")
    s.add_argument("--step", type=int, default=None, metavar="N",
                   help="restore this step instead of the newest valid one")
    s.set_defaults(func=cmd_restore)

    _add_commands_of_other_modules(sub)
    return p


def _add_commands_of_other_modules(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Commands implemented in their own modules (sidecar, simulate, bench); their heavy
    imports happen when the command runs, not here."""
    import spotckpt.remote.sidecar as sidecar
    import spotckpt.tools.simulate as simulate

    sidecar.add_commands(sub)
    s = sub.add_parser("simulate", help="run CMD through a local managed-spot lifecycle with interruptions")
    simulate.add_arguments(s)
    s.set_defaults(func=simulate.main_from_args)
    s = sub.add_parser("bench", help="checkpoint benchmarks side by side with torch.save, DCP, torchsnapshot "
                       "(options: spotckpt bench --help)", add_help=False)
    s.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import spotckpt.tools.bench as bench

    return int(bench.main(args.bench_args) or 0)


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first argument that is not a global option)."""
    for a in argv:
        if a == "--":
            return None
        if not a.startswith("-"):
            return a
    return None


class _EarlySignals:
    """SIGTERM/SIGINT caught from the first line of ``spotckpt run`` until ``run_command``
    installs its own handlers (which take over the list): a container stopped while the
    launcher starts is told so, instead of dying silently with 143."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.previous = {s: signal.signal(s, self._on) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


_QUIET_COMMANDS = ("ls", "verify", "restore")  # they print their result; INFO logs would repeat it


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    early = None
    if _command_of(argv) == "run" and threading.current_thread() is threading.main_thread():
        early = _EarlySignals()
    try:
        return _main(argv, early)
    finally:
        if early is not None:
            early.restore()


def _main(argv: list[str], early: _EarlySignals | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra  # everything after `bench` belongs to the benchmark's own parser
    elif extra:  # the subcommand's usage, not the top level's
        sub = next((a.choices.get(args.command) for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction)), None)
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if early is not None:
        args.early_signals = early.signals
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("spotckpt.metrics").setLevel(logging.WARNING)  # the metric lines: already on stderr
    if args.command in _QUIET_COMMANDS and not args.verbose:
        logging.getLogger("spotckpt").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"spotckpt: error: {exc}", file=sys.stderr)
        return 2
    except SpotCkptError as exc:
        print(f"spotckpt: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, NoCheckpointError) else 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
