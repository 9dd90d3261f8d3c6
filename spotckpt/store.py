"""The storage protocols the upper layers depend on, so they never need a concrete store.

::

    StepSource       where committed steps can be listed and copied from: list_steps,
                     read_manifest, download_step (into a staging directory, verified).
                     Implemented by S3Store and by LocalStore (a local directory as a source).
    RemoteStore      a StepSource that the uploader also writes: upload_step (data first,
                     manifest last), delete_step (manifest first), cleanup_incomplete_uploads,
                     close. Implemented by S3Store; tests pass their own.

Threads: a store is used by one thread at a time per method call, but restore (training
thread) and the uploader (its own thread) may call the same store concurrently.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from .format import Manifest

__all__ = ["StepSource", "RemoteStore"]


@runtime_checkable
class StepSource(Protocol):
    uri: str

    def list_steps(self) -> list[int]:
        """Committed steps, ascending."""
        ...

    def read_manifest(self, step: int) -> Manifest:
        """The validated manifest of committed ``step`` (CheckpointCorruptError otherwise)."""
        ...

    def download_step(
        self, step: int, dest_dir: Path, manifest: Manifest | None = None, *,
        progress: Callable[[int], None] | None = None,
    ) -> Manifest:
        """Copy every file of ``step`` into ``dest_dir``, fsynced and verified against the
        manifest (CheckpointCorruptError when it does not verify); returns the manifest."""
        ...


@runtime_checkable
class RemoteStore(StepSource, Protocol):
    def upload_step(self, step: int, src_dir: Path, manifest: Manifest | None = None) -> bool:
        """Upload data files, then the manifest last; False when the step was already there."""
        ...

    def uncommit_step(self, step: int) -> None:
        """Delete only the step's manifest (it stops counting); data objects may stay."""
        ...

    def delete_step(self, step: int) -> None:
        """Remove ``step``: the manifest first, then the data."""
        ...

    def cleanup_incomplete_uploads(self, *, older_than_seconds: float = 3600.0) -> int: ...

    def close(self) -> None: ...
