"""An in-memory :class:`~spotckpt.core.protocols.RemoteStore`: objects in a dict, S3's rules kept.

It implements the whole protocol the way S3Store does -- the manifest only if none is there
(``If-None-Match``), a different one refused with UploadError, data verified (size and CRC32C)
as it lands on both sides, paths checked -- so it serves as the reference for a custom store
(``CheckpointManager(remote_store=...)``) and lets tests run several hosts through a store
that is not S3 (served to other processes with :mod:`multiprocessing.managers`).

Threads: every method takes the store's lock around the dict; safe from any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from spotckpt.errors import CheckpointCorruptError, DownloadError, LocalStepVanishedError, UploadError
from spotckpt.format import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    crc32c_b64,
    crc32c_update,
    fsync_dir,
    safe_relpath,
    step_dirname,
    write_file_durably,
)

__all__ = ["MemoryStore"]


def _entry(data: bytes) -> FileEntry:
    return FileEntry(len(data), crc32c_b64(crc32c_update(0, data)))


class MemoryStore:
    """Committed steps in memory under ``mem://name``; see the module docstring."""

    def __init__(self, name: str = "store") -> None:
        self.uri = f"mem://{name}"
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def _key(self, step: int, rel: str) -> str:
        return f"{step_dirname(step)}/{rel}"

    def _get(self, key: str) -> bytes | None:
        with self._lock:
            return self._objects.get(key)

    # -- StepSource -----------------------------------------------------------------------
    def list_steps(self) -> list[int]:
        with self._lock:
            keys = list(self._objects)
        return sorted(int(k.split("/")[0].removeprefix("step-")) for k in keys if k.endswith("/" + MANIFEST_NAME))

    def read_manifest(self, step: int) -> Manifest:
        data = self._get(self._key(step, MANIFEST_NAME))
        if data is None:
            raise DownloadError(f"{self.uri}: step {step} is not committed", key=self._key(step, MANIFEST_NAME))
        man = Manifest.from_bytes(data, source=f"{self.uri}/{self._key(step, MANIFEST_NAME)}")
        if man.step != step:
            raise CheckpointCorruptError(f"{self.uri}: the manifest of step {step} says step {man.step}",
                                         path=self.uri)
        return man

    def download_step(self, step: int, dest_dir: Path, manifest: Manifest | None = None, *,
                      progress: Callable[[int], None] | None = None) -> Manifest:
        m = manifest if manifest is not None else self.read_manifest(step)
        dest_dir = Path(dest_dir)
        for rel, ent in sorted(m.files.items()):
            safe_relpath(rel, source=self.uri)
            data = self._get(self._key(step, rel))
            if data is None:
                raise CheckpointCorruptError(f"{self.uri}: {rel} of step {step} is missing", path=self.uri)
            if _entry(data) != ent:
                raise CheckpointCorruptError(f"{self.uri}: {rel} of step {step} does not match the manifest "
                                             "(corrupt)", path=self.uri)
            out = dest_dir / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            write_file_durably(out, data)
            if progress is not None:
                progress(len(data))
        write_file_durably(dest_dir / MANIFEST_NAME, m.to_bytes())
        fsync_dir(dest_dir)
        return m

    # -- RemoteStore ----------------------------------------------------------------------
    def upload_step(self, step: int, src_dir: Path, manifest: Manifest | None = None, *,
                    files: Collection[str] | None = None, commit: bool = True) -> bool:
        src_dir = Path(src_dir)
        if manifest is None:
            try:
                manifest = Manifest.from_bytes((src_dir / MANIFEST_NAME).read_bytes(), source=str(src_dir))
            except FileNotFoundError as exc:
                raise LocalStepVanishedError(f"{src_dir} has no manifest.json (gone?)", key=str(src_dir)) from exc
        if manifest.step != step:
            raise CheckpointCorruptError(f"{src_dir}: the manifest is for step {manifest.step}, not {step}",
                                         path=src_dir)
        if self._get(self._key(step, MANIFEST_NAME)) is not None:
            return self.commit_manifest(step, manifest)  # the same: False; another: UploadError
        for rel, ent in sorted(manifest.files.items()):
            safe_relpath(rel, source=str(src_dir))
            if files is not None and rel not in files:
                continue
            try:
                data = (src_dir / rel).read_bytes()
            except FileNotFoundError as exc:
                if not src_dir.exists():
                    raise LocalStepVanishedError(f"{src_dir} vanished before its upload", key=str(src_dir)) from exc
                raise CheckpointCorruptError(f"{src_dir / rel} is listed in the manifest but missing",
                                             path=src_dir / rel) from exc
            if _entry(data) != ent:
                raise CheckpointCorruptError(f"{src_dir / rel} does not match its manifest entry; not uploaded",
                                             path=src_dir / rel)
            with self._lock:
                self._objects[self._key(step, rel)] = data
        return self.commit_manifest(step, manifest) if commit else False

    def missing_objects(self, step: int, manifest: Manifest) -> list[str]:
        return [rel for rel, ent in sorted(manifest.files.items())
                if (data := self._get(self._key(step, rel))) is None or _entry(data) != ent]

    def commit_manifest(self, step: int, manifest: Manifest, man_bytes: bytes | None = None) -> bool:
        data = man_bytes if man_bytes is not None else manifest.to_bytes()
        key = self._key(step, MANIFEST_NAME)
        with self._lock:
            now = self._objects.get(key)
            if now is None:
                self._objects[key] = data
                return True
        if now == data or Manifest.from_bytes(now) == manifest:
            return False
        raise UploadError(f"{self.uri}: another writer committed step {step} with a different manifest; use a "
                          "separate store per job/run", key=key)

    def read_range(self, step: int, rel: str, start: int, end: int) -> bytes:
        data = self._get(self._key(step, rel))
        if data is None or end > len(data):
            raise DownloadError(f"{self.uri}: bytes {start}-{end - 1} of {rel} of step {step} could not be read",
                                key=self._key(step, rel))
        return data[start:end]

    def read_range_into(self, step: int, rel: str, start: int, out: memoryview) -> None:
        data = self._get(self._key(step, rel))
        if data is None or start + len(out) > len(data):
            raise CheckpointCorruptError(f"{self.uri}: {rel} of step {step} is missing or shorter than bytes "
                                         f"{start}-{start + len(out) - 1} (the step is damaged)")
        out[:] = data[start : start + len(out)]

    def uncommit_step(self, step: int) -> None:
        with self._lock:
            self._objects.pop(self._key(step, MANIFEST_NAME), None)

    def delete_step(self, step: int) -> None:
        prefix = step_dirname(step) + "/"
        with self._lock:
            self._objects.pop(prefix + MANIFEST_NAME, None)  # the manifest first
            for k in [k for k in self._objects if k.startswith(prefix)]:
                del self._objects[k]

    def cleanup_incomplete_uploads(self, *, older_than_seconds: float = 3600.0) -> int:
        return 0  # an object lands whole or not at all

    def check_access(self) -> None:
        pass

    def start_upload(self, step: int, rel: str, chunks: Any) -> None:
        return None  # objects land whole, after the commit

    def discard_early(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass
