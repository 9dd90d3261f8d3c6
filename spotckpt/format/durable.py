"""The one way spotckpt writes a file it must keep, and the one way it fsyncs.

:func:`write_chunks_durably` is the only write path of data files and manifests: it writes the
chunks in order from their memory (no copy), extends a CRC32C over every byte in the same pass,
fsyncs the file and returns its :class:`FileEntry`. :func:`fsync_path` is the only fsync of a
path (file or directory); a commit fsyncs the directory after renaming into it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from spotckpt.format.checksums import CrcWriter, crc32c_b64
from spotckpt.format.manifest import FileEntry

__all__ = ["copy_file_durably", "fsync_dir", "fsync_path", "write_chunks_durably", "write_file_durably"]


def fsync_path(path: str | Path, *, directory: bool = False) -> None:
    """fsync the file or (``directory=True``) the directory at ``path``."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that entries created or renamed in it survive a crash."""
    fsync_path(path, directory=True)


def write_chunks_durably(path: str | Path, chunks: Iterable[Any], *, fsync: bool = True,
                         ranges: dict[Any, Any] | None = None, stable: bool = False) -> FileEntry:
    """Create (or truncate) ``path`` and write ``chunks`` (bytes-like: bytes, memoryviews,
    numpy byte views of tensors) in order, CRC32C in the same pass, then fsync unless
    ``fsync=False``. ``chunks`` may be a generator, so a caller can produce each chunk only
    when it is written. Returns the size and CRC32C of what was written.

    The CRC32C of large parts runs on a helper thread beside their write, and a file to be
    fsynced has its writeback started as it is written (:class:`CrcWriter`), so the fsync finds
    little left to do. ``stable=True``: the caller promises that no chunk's memory changes until
    this returns (chunks are not one buffer refilled between yields), which lets the checksum
    run across chunks instead of finishing each one before the next is produced.

    ``ranges``: ``{key: (start, end)}`` byte ranges of the file whose own CRC32C is wanted;
    each value is replaced by ``(start, end, crc32c)`` (base64), from the same pass."""
    with open(path, "wb", buffering=0) as f:
        marks = [x for r in (ranges or {}).values() for x in r[:2]]
        w = CrcWriter(f, marks, stable=stable, writeback=fsync)  # type: ignore[arg-type]
        try:
            for chunk in chunks:
                w.write(chunk)
        finally:
            w.close()
        if fsync:
            os.fsync(f.fileno())
    for key, (start, end, *_) in (ranges or {}).items():
        ranges[key] = (start, end, crc32c_b64(w.range_crc(start, end)))  # type: ignore[index]
    return FileEntry(size=w.size, crc32c=crc32c_b64(w.crc))


def write_file_durably(path: str | Path, data: Any) -> FileEntry:
    """Write ``data`` to ``path`` and fsync it (:func:`write_chunks_durably` with one chunk)."""
    return write_chunks_durably(path, (data,))


def copy_file_durably(
    src: str | Path, dst: str | Path, *, chunk_bytes: int = 8 << 20, progress: Callable[[int], None] | None = None
) -> FileEntry:
    """Copy ``src`` to ``dst`` through :func:`write_chunks_durably` (CRC32C of the copied bytes
    in the same pass, fsynced); ``progress(n)`` after each chunk. Returns what was written."""
    view = memoryview(bytearray(chunk_bytes))

    def chunks() -> Iterator[memoryview]:
        with open(src, "rb", buffering=0) as f:
            while n := f.readinto(view):
                yield view[:n]  # written before the next readinto reuses the buffer
                if progress is not None:
                    progress(n)

    return write_chunks_durably(dst, chunks())
