"""The storage protocols the upper layers depend on, so they never need a concrete store.

::

    StepSource       where committed steps can be listed and copied from: list_steps,
                     read_manifest, download_step (into a staging directory, verified).
                     Implemented by S3Store, MemoryStore, and LocalStore (a local directory
                     as a source).
    RemoteStore      a StepSource that the uploader also writes, and that several hosts share:
                     everything the uploader, restore and the multi-host commit call --
                     upload_step (data first, manifest last; or one host's files without the
                     manifest), missing_objects + commit_manifest (the step counts once every
                     host's files are in), read_range / read_range_into (shards of other ranks'
                     files, DCP chunks),
                     uncommit_step / delete_step, cleanup_incomplete_uploads, check_access,
                     start_upload / discard_early (upload while writing,
                     :mod:`spotckpt.core.early_upload`; a store that cannot returns None and
                     the files go up after the commit), close. Implemented by S3Store and
                     MemoryStore (:mod:`spotckpt.remote.memory`, which a two-host test runs a
                     job through).

Threads: a store is used by one thread at a time per method call, but restore (training
thread) and the uploader (its own thread) may call the same store concurrently.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from spotckpt.format import Manifest

__all__ = ["StepSource", "RemoteStore", "REMOTE_STORE_METHODS"]


@runtime_checkable
class StepSource(Protocol):
    uri: str

    def list_steps(self) -> list[int]:
        """Committed steps, ascending."""
        ...

    def read_manifest(self, step: int) -> Manifest:
        """The validated manifest of committed ``step`` (CheckpointCorruptError when it is
        damaged, a StorageError when it is missing)."""
        ...

    def download_step(
        self, step: int, dest_dir: Path, manifest: Manifest | None = None, *,
        progress: Callable[[int], None] | None = None,
    ) -> Manifest:
        """Copy every file of ``manifest`` (default: the step's own) into ``dest_dir``, fsynced
        and verified against it, then its ``manifest.json``; returns the manifest.
        CheckpointCorruptError when a file is missing or does not verify."""
        ...


@runtime_checkable
class RemoteStore(StepSource, Protocol):
    def upload_step(self, step: int, src_dir: Path, manifest: Manifest | None = None, *,
                    files: Collection[str] | None = None, commit: bool = True) -> bool:
        """Upload the data files of the committed local step in ``src_dir`` (only ``files``
        when given: one host's share), then -- with ``commit`` -- the manifest last, only if
        none is there. True when this call committed the step; False when the same manifest
        was there already or ``commit`` is False. UploadError for a different manifest."""
        ...

    def missing_objects(self, step: int, manifest: Manifest) -> list[str]:
        """The files of ``manifest`` not (yet) stored with its size and CRC32C."""
        ...

    def commit_manifest(self, step: int, manifest: Manifest, man_bytes: bytes | None = None) -> bool:
        """Write the manifest if none is there (the step counts from now on); False when the
        same one was there; UploadError for a different one."""
        ...

    def read_range(self, step: int, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of file ``rel`` of ``step``; the caller verifies them."""
        ...

    def read_range_into(self, step: int, rel: str, start: int, out: memoryview) -> None:
        """Fill ``out`` with bytes ``[start, start + len(out))`` of file ``rel`` of ``step``;
        CheckpointCorruptError when the object is missing or shorter (the step is damaged). The
        caller verifies the bytes."""
        ...

    def uncommit_step(self, step: int) -> None:
        """Delete only the step's manifest (it stops counting); data objects may stay."""
        ...

    def delete_step(self, step: int) -> None:
        """Remove ``step``: the manifest first, then the data."""
        ...

    def cleanup_incomplete_uploads(self, *, older_than_seconds: float = 3600.0) -> int:
        """Abort uploads a killed writer left behind; how many."""
        ...

    def check_access(self) -> None:
        """A StorageError that says what to do when the store cannot be used."""
        ...

    def start_upload(self, step: int, rel: str, chunks: Any) -> Any:
        """Start uploading file ``rel`` of ``step`` from ``chunks`` (its bytes in memory) while
        the caller writes it locally; a handle (``committed(path)`` / ``abort()``) that
        :meth:`upload_step` finishes, or None when this store uploads after the commit only."""
        ...

    def discard_early(self, step: int) -> None:
        """Abort what :meth:`start_upload` began for ``step`` (a step that will not be uploaded)."""
        ...

    def close(self) -> None: ...


#: Every method of :class:`RemoteStore`, for stores that forward calls (and their tests).
REMOTE_STORE_METHODS = ("list_steps", "read_manifest", "download_step", "upload_step", "missing_objects",
                        "commit_manifest", "read_range", "read_range_into", "uncommit_step", "delete_step",
                        "cleanup_incomplete_uploads", "check_access", "start_upload", "discard_early", "close")
