"""The local store: staging, atomic commit, retention and the committed-step scan.

Commit protocol (readers trust only committed paths)::

    begin(step)            mkdir <staging_root>/<pid>-<uuid>-step-N/   (same filesystem as root)
    ... writers fill it, fsync each file ...
    commit(staging, step)  write manifest.json (fsync), fsync the staging dir,
                           rename -> <root>/step-N, fsync <root>
    delete_step(step)      rename <root>/step-N -> <staging_root>/<pid>-<uuid>-deleting-N,
                           fsync <root>, then remove the data

**Committed** means one thing, decided here (:func:`step_status`): a ``step-*`` directory whose
``manifest.json`` parses and names that step. Anything else under a ``step-*`` name -- a directory
without a manifest (a partial sync, another tool's crash), a damaged manifest, a manifest naming
another step, a file where the directory should be -- is *incomplete*: never a resume point, never
listed by :meth:`LocalStore.committed_steps`, and a commit of that step first moves it aside
(:meth:`LocalStore.quarantine`, logged) instead of silently keeping it. A kill at any point leaves
either the old or the new set of committed steps plus garbage in ``staging_root``, which the next
:class:`LocalStore` removes (entries whose owning process is gone, quarantined ones included).

``staging_root`` is a sibling of ``root`` (``<parent>/.<name>.spotckpt-staging``) so that tools that
sync ``root`` (SageMaker's checkpoint sync) never see work in progress. When the sibling cannot be
used -- the parent is not writable, or ``root`` is a mount point and rename fails with ``EXDEV`` --
a hidden ``root/.spotckpt-staging`` is used instead; the scan ignores hidden entries.

Threads: one writer (the manager's persist thread or the caller) per staging directory; scans and
reads may run concurrently from any thread (the uploader).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotckpt.errors import CheckpointCorruptError, ConfigError, SaveError, SpotCkptError, StateError, StorageError
from spotckpt.format import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    copy_file_durably,
    crc32c_b64,
    fsync_dir,
    parse_step_dirname,
    step_dirname,
    verify_files,
    write_file_durably,
)
from spotckpt.policy import RetentionPolicy, doomed

if TYPE_CHECKING:
    from spotckpt.core.protocols import StepSource

__all__ = [
    "COMMITTED",
    "DAMAGED",
    "INCOMPLETE",
    "LocalStore",
    "LocalIO",
    "StepCheck",
    "fsync_dir",
    "write_file_durably",
    "scan_committed_steps",
    "scan_step_entries",
    "step_status",
    "read_step_manifest",
    "verify_files",
]

log = logging.getLogger(__name__)

#: :func:`step_status` results for a ``step-*`` entry that exists
COMMITTED = "committed"  # manifest.json parses and names the step
DAMAGED = "damaged"  # manifest.json exists but does not parse or names another step
INCOMPLETE = "incomplete"  # no manifest.json (or not a directory): never was committed

_STAGING_SUFFIX = ".spotckpt-staging"
_QUARANTINE = "-quarantine-"
_HIDDEN_STAGING = ".spotckpt-staging"


class LocalIO:
    """The filesystem operations the commit protocol relies on, in one seam: tests pass a
    subclass that fails at a chosen point instead of patching ``os`` process-wide."""

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def fsync_dir(self, path: Path) -> None:
        fsync_dir(path)

    def write_file(self, path: Path, data: bytes) -> None:
        write_file_durably(path, data)


@dataclass(frozen=True)
class StepCheck:
    """Result of verifying one committed step: ``problems`` is empty when it is valid."""

    step: int
    path: Path
    manifest: Manifest | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _owner_gone(pid_s: str) -> bool:
    """Whether the process named by a staging entry's pid prefix is gone (not this one)."""
    return pid_s.isdigit() and int(pid_s) != os.getpid() and not _pid_alive(int(pid_s))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalStore:
    """Committed steps under ``root`` and their staging area."""

    def __init__(self, root: str | Path, *, create: bool = True, cleanup: bool = True,
                 io: LocalIO | None = None, read_only: bool = False) -> None:
        """``read_only=True`` (inspection: ``spotckpt ls``/``verify``, the source of a restore)
        creates, probes and removes nothing -- no staging directory next to or inside ``root``
        -- so it works on a read-only volume; only the scan and read methods may be used."""
        self.io = io or LocalIO()
        self.root = Path(root).expanduser().absolute()
        self.read_only = read_only
        if read_only:
            if not self.root.is_dir():
                raise ConfigError(f"checkpoint directory {self.root} does not exist or is not a directory")
            self.staging_root = self.root.parent / f".{self.root.name}{_STAGING_SUFFIX}"  # never created
            return
        self._check_root(create)
        self.staging_root = self._choose_staging()
        self._verified: set[int] = set()
        if cleanup:
            self.cleanup_stale_staging()

    # -- setup ---------------------------------------------------------------------------
    def _check_root(self, create: bool) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise ConfigError(
                f"checkpoint directory {root} exists and is not a directory; pass another "
                "local_dir or set SPOTCKPT_LOCAL_DIR"
            )
        if not root.exists():
            if not create:
                raise ConfigError(f"checkpoint directory {root} does not exist")
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"cannot create checkpoint directory {root} ({exc.strerror}); pass a writable "
                    "local_dir or set SPOTCKPT_LOCAL_DIR"
                ) from exc
        if create and not os.access(root, os.W_OK | os.X_OK):
            raise ConfigError(
                f"checkpoint directory {root} is not writable by this user; fix its permissions "
                "or pass another local_dir / SPOTCKPT_LOCAL_DIR"
            )

    def _choose_staging(self) -> Path:
        sibling = self.root.parent / f".{self.root.name}{_STAGING_SUFFIX}"
        hidden = self.root / _HIDDEN_STAGING
        try:
            sibling.mkdir(exist_ok=True)
            probe = sibling / f"{os.getpid()}-probe-{uuid.uuid4().hex}"
            probe.mkdir()
            target = self.root / f".probe-{os.getpid()}-{uuid.uuid4().hex}"
            try:
                self.io.rename(probe, target)
            except OSError:
                shutil.rmtree(probe, ignore_errors=True)
                raise
            os.rmdir(target)
            return sibling
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EACCES, errno.EPERM, errno.EROFS):
                log.debug("sibling staging %s unusable: %s", sibling, exc)
            log.info("spotckpt: staging inside %s (%s)", hidden, exc.strerror or exc)
        try:
            hidden.mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create a staging directory next to or inside {self.root} ({exc.strerror}); "
                "make the checkpoint directory writable"
            ) from exc
        return hidden

    def cleanup_stale_staging(self) -> list[Path]:
        """Remove staging entries (and staging probes) left by processes that are gone. Entries
        of live processes -- other ranks sharing this directory -- are never touched."""
        removed: list[Path] = []
        try:
            entries = list(self.staging_root.iterdir())
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if _QUARANTINE in entry.name:
                continue  # evidence: retention removes it once a newer verified step exists
            if _owner_gone(entry.name.split("-", 1)[0]):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        if removed:
            log.info("spotckpt: removed %d stale staging entries under %s", len(removed), self.staging_root)
        for leftover in self.root.glob(".probe-*"):
            if _owner_gone(leftover.name.split("-", 2)[1]):
                shutil.rmtree(leftover, ignore_errors=True)
        return removed

    # -- scan ----------------------------------------------------------------------------
    def step_path(self, step: int) -> Path:
        return self.root / step_dirname(step)

    def is_committed(self, step: int) -> bool:
        """Whether ``step`` is committed: its manifest parses and names it (the one definition)."""
        return step_status(self.root, step) == COMMITTED

    def committed_steps(self) -> list[int]:
        """Committed steps, ascending (see :func:`step_status`)."""
        return scan_committed_steps(self.root)

    def step_entries(self) -> dict[int, str]:
        """Every ``step-*`` entry: step -> COMMITTED, DAMAGED or INCOMPLETE (one scan)."""
        return scan_step_entries(self.root)

    def uncommitted_entries(self) -> dict[int, str]:
        """``step-*`` entries that are not committed: step -> DAMAGED or INCOMPLETE."""
        return {s: st for s, st in self.step_entries().items() if st != COMMITTED}

    def quarantine(self, step: int, why: str) -> Path | None:
        """Move the ``step-*`` entry of ``step`` out of ``root`` (into the staging area, under a
        ``quarantine`` name, kept as evidence until retention removes it once a newer verified
        step exists),
        with a warning naming both paths. Returns where it went (None when nothing was there).
        Used for an incomplete entry that a commit of the same step replaces, and for committed
        steps newer than the one a restore chose (the job will write those steps again)."""
        src = self.step_path(step)
        if not os.path.lexists(src):
            return None
        dst = self.staging_root / f"{os.getpid()}-{uuid.uuid4().hex[:12]}{_QUARANTINE}{step_dirname(step)}"
        try:
            self.staging_root.mkdir(exist_ok=True)
            self.io.rename(src, dst)
            self.io.fsync_dir(self.root)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SaveError(
                f"cannot move {src} aside ({exc.strerror or exc}); {why} -- move or delete it by hand",
                step=step,
            ) from exc
        self._verified.discard(step)
        log.warning("spotckpt: moved %s aside to %s: %s", src, dst, why)
        return dst

    def mark_verified(self, step: int) -> None:
        """``step`` verified (a restore checked it, or this process committed it): retention
        may delete older steps once a newer verified one exists."""
        self._verified.add(step)

    list_steps = committed_steps  # the StepSource name (spotckpt.core.protocols)

    @property
    def uri(self) -> str:
        return str(self.root)

    def read_manifest(self, step: int) -> Manifest:
        return read_step_manifest(self.root, step)

    def verify_step(self, step: int, *, checksums: bool = True, files: Collection[str] | None = None) -> StepCheck:
        """Check the manifest, then every listed file's size and (by default) CRC32C -- or,
        with ``files``, only those (several hosts: the files this host holds or needs)."""
        path = self.step_path(step)
        try:
            manifest = self.read_manifest(step)
        except CheckpointCorruptError as exc:
            return StepCheck(step, path, None, (str(exc),))
        return StepCheck(step, path, manifest, tuple(verify_files(path, manifest, checksums=checksums, only=files)))

    # -- write ---------------------------------------------------------------------------
    def begin(self, step: int) -> Path:
        """A fresh staging directory for ``step`` (same filesystem as ``root``)."""
        return self._mkdir_staging(self.staging_root / f"{os.getpid()}-{uuid.uuid4().hex[:12]}-{step_dirname(step)}",
                                   step, exist_ok=False)

    def shared_staging(self, step: int, *, owner_pid: int) -> Path:
        """The staging directory of ``step`` that every rank of one host writes into (several
        ranks); named after the host leader's process, so stale-staging cleanup knows when it
        is orphaned. Created if needed, by whichever rank comes first."""
        return self._mkdir_staging(self.staging_root / f"{owner_pid}-ranks-{step_dirname(step)}", step, exist_ok=True)

    def _mkdir_staging(self, d: Path, step: int, *, exist_ok: bool) -> Path:
        if self.read_only:
            raise ConfigError(f"{self.root} was opened read-only (for inspection); nothing can be written there")
        try:
            self.staging_root.mkdir(exist_ok=True)
            try:
                d.mkdir(exist_ok=exist_ok)
            except FileNotFoundError:  # another store sharing it released the empty root meanwhile
                self.staging_root.mkdir(exist_ok=True)
                d.mkdir(exist_ok=exist_ok)
        except OSError as exc:
            raise SaveError(
                f"cannot create staging directory {d} ({exc.strerror}); check free space and "
                "permissions of the checkpoint volume",
                step=step,
            ) from exc
        return d

    def commit(self, staging: Path, manifest: Manifest) -> Path:
        """Write the manifest into ``staging`` and rename it into place atomically.

        A committed step is never replaced: when ``step`` is already committed, ``staging`` is
        discarded and the existing path returned (logged; callers check first, so this is a race
        with another writer). An entry of ``step`` that is not committed (:func:`step_status`) is
        moved aside first, with a warning."""
        step = manifest.step
        target = self.step_path(step)
        io = self.io
        try:
            status = step_status(self.root, step)
            if status == COMMITTED:
                log.warning("spotckpt: step %d is already committed in %s; a committed step is never "
                            "replaced, so this save of it was dropped", step, self.root)
                self.abort(staging)
                return target
            if status is not None:
                self.quarantine(step, f"{status} step entry in the way of committing step {step}")
            io.write_file(staging / MANIFEST_NAME, manifest.to_bytes())
            io.fsync_dir(staging)
            io.rename(staging, target)
            io.fsync_dir(self.root)
            self._verified.add(step)
        except OSError as exc:
            self.abort(staging)
            raise SaveError(
                f"could not commit step {step} into {self.root} ({exc.strerror or exc}); earlier "
                "checkpoints are intact -- free disk space or check the volume",
                step=step,
            ) from exc
        return target

    def abort(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def write_step(self, step: int, fill: Callable[[Path], dict[str, FileEntry]], *,
                   extra: dict[str, Any] | None = None) -> Path:
        """One process: ``fill(staging)`` fills a private staging directory (returning
        each file's size and CRC32C), then the step is committed (:meth:`commit`). On any failure
        the staging directory is removed and one typed error raised (:meth:`write_error`)."""
        staging = self.begin(step)
        try:
            files = fill(staging)
            return self.commit(staging, Manifest(step=step, files=files, extra=dict(extra or {})))
        except BaseException as exc:
            self.abort(staging)
            err = self.write_error(exc, step)
            if err is exc:
                raise
            raise err from exc

    def write_error(self, exc: BaseException, step: int) -> BaseException:
        """The typed error for a failure while writing ``step``: SaveError for the disk (what to
        do, and that earlier checkpoints are intact), StateError for a value that cannot be
        serialised; anything else as it is."""
        if isinstance(exc, SpotCkptError):
            return exc
        if isinstance(exc, OSError):
            what = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            err: BaseException = SaveError(
                f"could not write step {step} to {self.root}: {what}; the partial save was "
                "removed and earlier checkpoints are intact -- free space on the checkpoint "
                "volume or lower keep_last",
                step=step,
            )
        elif isinstance(exc, (ValueError, TypeError)):
            err = StateError(f"could not serialise step {step}: {exc}")
        else:
            return exc
        err.__cause__ = exc
        return err

    def release_staging(self) -> None:
        """Remove the staging directory when it is empty (the owner's close: no staging folder
        outlives the process that made it). Entries of other processes keep it in place."""
        if self.read_only:
            return
        try:
            self.staging_root.rmdir()
        except OSError:
            pass

    def delete_step(self, step: int) -> None:
        """Un-commit ``step`` atomically (rename out of ``root``), then delete its data."""
        src = self.step_path(step)
        trash = self.staging_root / f"{os.getpid()}-{uuid.uuid4().hex[:12]}-deleting-{step_dirname(step)}"
        try:
            self.io.rename(src, trash)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot remove {src} ({exc.strerror})", key=str(src)) from exc
        self.io.fsync_dir(self.root)
        self._verified.discard(step)
        shutil.rmtree(trash, ignore_errors=True)

    def prune(self, retention: RetentionPolicy, *, protect: int | None = None) -> list[int]:
        """Delete the committed steps ``retention`` does not keep. A step is deleted only when a
        newer *verified* step exists (committed by this process, or checked by a restore, see
        :meth:`mark_verified`), so a corrupt step is never deleted while nothing newer is known
        to be good; ``protect`` is never deleted. Returns the deleted steps."""
        steps = self.committed_steps()
        good = [s for s in list(self._verified) if s in steps]
        if not good:
            return []
        newest_good = max(good)
        self._drop_quarantined(upto=newest_good)
        deleted = [s for s in doomed(retention, steps, protect=(newest_good, protect)) if s < newest_good]
        for s in deleted:
            self.delete_step(s)
        if deleted:
            log.info("spotckpt: retention removed local steps %s", deleted)
        return deleted

    def _drop_quarantined(self, *, upto: int) -> None:
        """Retention of moved-aside entries: remove those of steps up to ``upto`` (a verified
        step as new as they are exists)."""
        try:
            entries = list(self.staging_root.iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            _, sep, tail = entry.name.partition(_QUARANTINE)
            s = parse_step_dirname(tail) if sep else None
            if s is not None and s <= upto:
                shutil.rmtree(entry, ignore_errors=True)
                if entry.exists():
                    entry.unlink(missing_ok=True)

    # -- copy in ---------------------------------------------------------------------------
    def import_step(self, source: StepSource, step: int, *, replace: bool = False,
                    progress: Callable[[int], None] | None = None,
                    files: Collection[str] | None = None) -> tuple[Path, Manifest]:
        """Copy committed ``step`` from ``source`` (an S3 prefix or another local directory)
        and commit it here: every file lands in a staging directory, fsynced and verified
        against the manifest, and only then is the step renamed into place. Any failure
        removes the staging directory and leaves this store as it was. With ``replace``, a
        (corrupt) local copy of the step is un-committed right before the verified one takes
        its place. With ``files`` (several hosts), only those files are copied -- the ones this
        host's ranks need -- and the step is committed with the whole manifest.

        CheckpointCorruptError when the source does not verify, StorageError (S3) or
        SaveError (local disk) when copying fails."""
        staging = self.begin(step)
        try:
            if files is None:
                manifest = source.download_step(step, staging, progress=progress)
            else:
                manifest = source.read_manifest(step)
                missing = sorted(set(files) - set(manifest.files))
                if missing:
                    raise CheckpointCorruptError(
                        f"{source.uri}: step {step} lists no {', '.join(missing)}; it was written by "
                        "another set of ranks", path=source.uri)
                part = Manifest(step=step, files={k: v for k, v in manifest.files.items() if k in files},
                                created=manifest.created, extra=dict(manifest.extra))
                source.download_step(step, staging, part, progress=progress)
            if replace:
                log.warning("spotckpt: replacing local step %d with the verified copy from %s", step, source.uri)
                self.delete_step(step)
            path = self.commit(staging, manifest)
        except BaseException:
            self.abort(staging)
            raise
        return path, manifest

    # -- read out ------------------------------------------------------------------------
    def download_step(
        self, step: int, dest_dir: Path, manifest: Manifest | None = None, *,
        progress: Callable[[int], None] | None = None,
    ) -> Manifest:
        """Copy committed ``step`` into ``dest_dir`` (a staging directory of another store):
        every data file copied with its CRC32C computed in the same pass and fsynced, then
        checked against the manifest. The same contract as ``S3Store.download_step``, so a
        local directory can be the source of :meth:`import_step`.
        CheckpointCorruptError when the source does not verify."""
        src = self.step_path(step)
        m = manifest if manifest is not None else self.read_manifest(step)
        for rel, ent in m.files.items():
            out = dest_dir / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                got = copy_file_durably(src / rel, out, progress=progress)
            except FileNotFoundError as exc:
                raise CheckpointCorruptError(f"{src / rel}: missing", path=src / rel) from exc
            except OSError as exc:
                what = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
                raise StorageError(
                    f"copying {src / rel} to {out} failed: {what}; nothing was committed -- free "
                    "space on the destination or check both volumes",
                    key=str(src / rel),
                ) from exc
            if got != ent:
                raise CheckpointCorruptError(
                    f"{src / rel}: size {got.size} / CRC32C {got.crc32c}, manifest says "
                    f"{ent.size} / {ent.crc32c} (corrupt)",
                    path=src / rel,
                )
        return m


def step_status(root: Path, step: int) -> str | None:
    """What the ``step-*`` entry of ``step`` under ``root`` is: COMMITTED (a directory whose
    ``manifest.json`` parses and names this step -- the one meaning of "committed"), DAMAGED
    (a manifest is there but does not parse or names another step), INCOMPLETE (no manifest,
    or not a directory), or None when there is no entry. Reads only the manifest."""
    path = Path(root) / step_dirname(step)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return INCOMPLETE
    if not stat.S_ISDIR(st.st_mode):
        return INCOMPLETE
    try:
        read_step_manifest(Path(root), step)
    except CheckpointCorruptError:
        return INCOMPLETE if not os.path.lexists(path / MANIFEST_NAME) else DAMAGED
    return COMMITTED


def scan_step_entries(root: Path) -> dict[int, str]:
    """Every ``step-<12 digits>`` entry under ``root`` with its :func:`step_status`."""
    out: dict[int, str] = {}
    try:
        with os.scandir(root) as it:
            names = [e.name for e in it]
    except (FileNotFoundError, NotADirectoryError):
        return out
    for name in names:
        s = parse_step_dirname(name)
        if s is not None:
            status = step_status(Path(root), s)
            if status is not None:
                out[s] = status
    return out


def scan_committed_steps(root: Path, *, require_manifest: bool = True) -> list[int]:
    """Committed steps under ``root``, ascending (:func:`step_status`: the manifest parses and
    names the step). ``require_manifest`` is kept for callers of the old signature; an entry
    without a valid manifest is never committed. Creates nothing: read-only users such as the
    uploader call it without a :class:`LocalStore`."""
    return sorted(s for s, st in scan_step_entries(root).items() if st == COMMITTED)


def read_step_manifest(root: Path, step: int) -> Manifest:
    """The validated manifest of committed ``step`` under ``root``; CheckpointCorruptError if
    it is missing, unreadable, malformed or names another step."""
    path = root / step_dirname(step) / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointCorruptError(f"{path} is missing; the step directory is incomplete", path=path) from exc
    except OSError as exc:
        raise CheckpointCorruptError(f"{path}: cannot read ({exc.strerror})", path=path) from exc
    m = Manifest.from_bytes(data, source=str(path))
    if m.step != step:
        raise CheckpointCorruptError(
            f"{path} says step {m.step} but lives in {step_dirname(step)}; the directory was "
            "renamed by hand -- rename it back or delete it",
            path=path,
        )
    return m
