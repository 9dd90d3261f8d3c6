"""CRC32C: incremental, combinable, and over whole files (sequentially or by several threads);
the write side (:class:`CrcWriter`: the checksum beside the write, writeback started early) and
the read side (files mapped and faulted in by the kernel, checksummed and copied from).

The checksum of the format is CRC32C, stored as the base64 of the big-endian value, the form of
S3's ``ChecksumCRC32C``. :func:`crc32c_combine` joins the CRCs of adjacent byte ranges, so that
ranges can be checksummed by different threads -- or as they land in memory during a restore --
and still give the CRC of the whole file.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import functools
import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Iterable
from typing import Any, BinaryIO

import crc32c as _crc32c
import numpy as np

__all__ = [
    "IO_CHUNK_BYTES",
    "MappedFile",
    "PARALLEL_MIN_BYTES",
    "VERIFY_WINDOW_BYTES",
    "WRITEBACK_BYTES",
    "CrcWriter",
    "crc32c_b64",
    "crc32c_combine",
    "crc32c_update",
    "file_crc32c",
    "fd_crc32c_parallel",
    "file_crc32c_parallel",
    "copy_ranges_mapped",
    "io_threads",
    "mapped_reads_ok",
    "whole_map_limit",
    "start_writeback",
]

#: Chunk of file I/O and checksumming (GIL released by both).
IO_CHUNK_BYTES = 16 * 1024 * 1024


try:  # optional: AWS's CRC32C (awscrt, boto3's CRT) folds with AVX-512/VPCLMULQDQ where the CPU
    # has them: 2-2.5x the ``crc32c`` package's speed on the 2-core VM (25 vs 10 GB/s per core)
    from awscrt import checksums as _crt_checksums
except ImportError:  # pragma: no cover - depends on the environment
    _crt_checksums = None

#: The implementation in use: "awscrt" when it imports, else "crc32c" (both release the GIL).
CRC32C_IMPL = "awscrt" if _crt_checksums is not None else "crc32c"
_CRT_SLICE = 1 << 30  # awscrt takes at most INT_MAX bytes per call in older releases


def crc32c_update(crc: int, data: Any) -> int:
    """Extend a CRC32C with ``data`` (bytes-like; the GIL is released for large buffers)."""
    if _crt_checksums is None:
        return _crc32c.crc32c(data, crc)
    mv = memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    if len(mv) <= _CRT_SLICE:
        return _crt_checksums.crc32c(mv, crc)
    for i in range(0, len(mv), _CRT_SLICE):
        crc = _crt_checksums.crc32c(mv[i : i + _CRT_SLICE], crc)
    return crc


def crc32c_b64(crc: int) -> str:
    """Base64 of the big-endian CRC32C, the form of S3's ``ChecksumCRC32C``."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def file_crc32c(path: str | Path, *, chunk_bytes: int = IO_CHUNK_BYTES) -> tuple[int, int]:
    """``(size, crc)`` of a file, read in chunks into one reused buffer."""
    crc = 0
    size = 0
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            crc = crc32c_update(crc, view[:n])
            size += n
    return size, crc


# CRC32C combine: the CRC of A+B from crc(A), crc(B) and len(B), so that disjoint byte ranges of
# one file can be checksummed by different threads. This is zlib's crc32_combine (the multmodp /
# x2nmodp form of zlib >= 1.2.12) with the reflected Castagnoli polynomial; the pre- and
# post-inversion of CRC32C cancel out exactly as they do for zlib's CRC-32. Unlike zlib, the
# table of x^(2^k) is not wrapped at 32 entries: that shortcut holds for CRC-32's polynomial but
# not for Castagnoli's (combining a 512 MiB range gave wrong CRCs). Neither ``crc32c`` nor
# ``google_crc32c`` offers a combine.

_CRC32C_POLY_REFLECTED = 0x82F63B78


def _gf2_multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial, both in the reflected bit order (x^0 is bit 31)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ _CRC32C_POLY_REFLECTED if b & 1 else b >> 1
    return p


def _x2n_table() -> tuple[int, ...]:
    table, p = [], 1 << 30  # x^1
    for _ in range(67):  # enough for len2 < 2**64 bytes (k runs from 3)
        table.append(p)  # x^(2^k)
        p = _gf2_multmodp(p, p)
    return tuple(table)


_X2N = _x2n_table()


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC32C of the concatenation A+B given ``crc1`` = crc(A), ``crc2`` = crc(B), ``len2`` =
    len(B) in bytes. O(log len2), a few microseconds."""
    if not 0 <= len2 < 1 << 64:
        raise ValueError(f"len2 must be in [0, 2**64), got {len2}")
    p, k, n = 1 << 31, 3, len2  # p = x^0; multiply by x^(8 * len2)
    while n:
        if n & 1:
            p = _gf2_multmodp(_X2N[k], p)
        n >>= 1
        k += 1
    return _gf2_multmodp(p, crc1 & 0xFFFFFFFF) ^ (crc2 & 0xFFFFFFFF)


def io_threads() -> int:
    """Threads for checksumming and restoring one file: the CPUs this process may run on, at
    most 8 (beyond that, memory bandwidth, not CPU, is the limit)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


#: A file (or one tensor) is split across threads only above this size.
PARALLEL_MIN_BYTES = 8 * 1024 * 1024
#: Verification and mapped reads map a file in windows of this size (bounded address space and
#: RSS). Each mapping costs a populate and a munmap: one thread copies 1 GiB from the page cache in
#: 84-100 ms through 64 MiB windows, 73-77 ms through 256 MiB ones (preadv: 170-190 ms).
VERIFY_WINDOW_BYTES = 256 * 1024 * 1024
#: madvise(2) advice that faults a range in (Linux >= 5.14; Python 3.11's mmap lacks the name).
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def _libc_madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()
_populate_ok = _madvise is not None


def _populate(mm: mmap.mmap, length: int) -> None:
    """Fault a fresh read-only mapping in, in the kernel (ctypes releases the GIL). Besides
    saving a trap per page, this turns a read error (EIO on a bad disk, a file truncated under
    us) into an OSError; touching such a page would instead kill the process with SIGBUS."""
    global _populate_ok
    if not _populate_ok or length == 0:
        return
    arr = np.frombuffer(mm, dtype=np.uint8, count=length)
    try:
        if _madvise(arr.ctypes.data, length, _MADV_POPULATE_READ) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:  # kernel older than 5.14: fall back to plain page faults
                _populate_ok = False
                return
            raise OSError(err, f"reading the file failed ({os.strerror(err)})")
    finally:
        del arr


#: How a range is mapped (a seam: tests replace it here, never in the ``mmap`` module itself).
map_readonly = mmap.mmap


def _range_crc32c(fd: int, start: int, end: int) -> int:
    """CRC32C of bytes [start, end) of ``fd``: checksummed where the page cache holds them, via
    read-only mappings, so no byte is copied (a read() into a buffer would cost a copy, about
    as much again as the checksum); pread into a buffer where mapping fails."""
    crc = 0
    off = start
    gran = mmap.ALLOCATIONGRANULARITY
    while off < end:
        base = off - off % gran
        length = min(end, base + VERIFY_WINDOW_BYTES) - base
        try:
            mm = map_readonly(fd, length, offset=base, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return _range_crc32c_pread(fd, off, end, crc)
        try:
            _populate(mm, length)
            with memoryview(mm) as mv, mv[off - base :] as part:
                crc = crc32c_update(crc, part)
        finally:
            mm.close()
        off = base + length
    return crc


@functools.cache
def whole_map_limit() -> int:
    """The largest file :class:`MappedFile` maps whole: a quarter of the memory this process
    may use -- the machine's, or its cgroup's limit when lower (a larger file is checksummed and
    read in windows instead)."""
    try:
        limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        limit = 4 << 30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
        break
    return limit // 4


class MappedFile:
    """A whole file mapped read-only, for verify-while-reading: :meth:`crc32c` faults its pages
    in (one kernel call per window, so a read error is an OSError, not a SIGBUS) and checksums
    them on several threads; :meth:`copy_into` then copies from the same mapping. Checksumming
    and loading a file this way builds its page tables once, not once per pass (about 20 ms per
    GiB on one core). Use only while :func:`mapped_reads_ok`; :meth:`close` unmaps."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self._mm = map_readonly(fd, size, access=mmap.ACCESS_READ)
        self._arr = np.frombuffer(self._mm, dtype=np.uint8, count=size)

    def _window_crc(self, start: int, end: int) -> int:
        crc = 0
        for a in range(start, end, VERIFY_WINDOW_BYTES):
            b = min(end, a + VERIFY_WINDOW_BYTES)
            _populate_at(self._arr, a, b)
            crc = crc32c_update(crc, self._arr[a:b])
        return crc

    def crc32c(self, run_parallel: Any, threads: int) -> int:
        """CRC32C of the whole file: ``threads`` disjoint ranges, checksummed by
        ``run_parallel(fn, [args...])`` (which returns the results in order) and combined."""
        size = self.size
        if threads <= 1 or size < PARALLEL_MIN_BYTES:
            return self._window_crc(0, size)
        step = -(-size // threads)
        step += -step % mmap.ALLOCATIONGRANULARITY
        bounds = [(a, min(size, a + step)) for a in range(0, size, step)]
        crcs = run_parallel(self._window_crc, bounds)
        crc = crcs[0]
        for (a, b), c in zip(bounds[1:], crcs[1:]):
            crc = crc32c_combine(crc, c, b - a)
        return crc

    def copy_into(self, segs: list[tuple[memoryview, int]]) -> None:
        """Fill each ``(view, file offset)`` from the mapping (numpy copies, the GIL released)."""
        for mv, off in segs:
            n = len(mv)
            np.copyto(np.frombuffer(mv, dtype=np.uint8, count=n), self._arr[off : off + n])

    def close(self) -> None:
        if self._mm is not None:
            self._arr = np.empty(0, dtype=np.uint8)  # the last export of the mapping
            self._mm.close()
            self._mm = None  # type: ignore[assignment]


def _populate_at(arr: np.ndarray, start: int, end: int) -> None:
    """:func:`_populate` for bytes ``[start, end)`` of a mapping's array (``start`` page-aligned)."""
    global _populate_ok
    if not _populate_ok or end <= start:
        return
    if _madvise(arr.ctypes.data + start, end - start, _MADV_POPULATE_READ) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:  # kernel older than 5.14: fall back to plain page faults
            _populate_ok = False
            return
        raise OSError(err, f"reading the file failed ({os.strerror(err)})")


#: Holes between ranges up to this size are mapped over (one mapping) instead of starting a new one.
_MAP_GAP_BYTES = 1024 * 1024


def mapped_reads_ok() -> bool:
    """Whether :func:`copy_ranges_mapped` may be used: the kernel populates a mapping up front
    (so a read error or a truncated file is an OSError, never a SIGBUS)."""
    return _populate_ok and _madvise is not None


def copy_ranges_mapped(fd: int, segs: list[tuple[memoryview, int]]) -> None:
    """Fill each ``(view, file offset)`` of ``segs`` (sorted by offset, not overlapping) with
    the file's bytes through read-only mappings of at most :data:`VERIFY_WINDOW_BYTES`, each
    faulted in by the kernel in one call (:func:`_populate`) and copied from by numpy (the GIL
    released). Page cache to memory this way costs about half of ``preadv``'s time (no
    per-page copy in the kernel; figures in benchmarks/README.md). OSError when the file
    cannot be read (a read error, or it is shorter than a range); a window that cannot be
    mapped at all is read with ``preadv`` instead."""
    gran = mmap.ALLOCATIONGRANULARITY
    k, pos = 0, 0  # segment k, bytes of it done
    while k < len(segs):
        mv, off = segs[k]
        if pos >= len(mv):
            k, pos = k + 1, 0
            continue
        start = off + pos
        base = start - start % gran
        limit = base + VERIFY_WINDOW_BYTES
        end = min(off + len(mv), limit)
        m = k + 1
        while m < len(segs) and end == segs[m - 1][1] + len(segs[m - 1][0]) and segs[m][1] < limit \
                and segs[m][1] - end <= _MAP_GAP_BYTES:
            end = min(segs[m][1] + len(segs[m][0]), limit)
            m += 1
        try:
            mm = map_readonly(fd, end - base, offset=base, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            mm = None
        if mm is None:  # this window by pread
            while k < len(segs) and segs[k][1] + pos < end:
                mv, off = segs[k]
                n = min(off + len(mv), end) - (off + pos)
                _pread_into(fd, mv[pos : pos + n], off + pos)
                pos += n
                if pos >= len(mv):
                    k, pos = k + 1, 0
            continue
        try:
            _populate(mm, end - base)
            src = np.frombuffer(mm, dtype=np.uint8, count=end - base)
            try:
                while k < len(segs) and segs[k][1] + pos < end:
                    mv, off = segs[k]
                    a = off + pos
                    n = min(off + len(mv), end) - a
                    np.copyto(np.frombuffer(mv, dtype=np.uint8, count=n, offset=pos), src[a - base : a - base + n])
                    pos += n
                    if pos >= len(mv):
                        k, pos = k + 1, 0
            finally:
                del src
        finally:
            mm.close()


def _pread_into(fd: int, mv: memoryview, offset: int) -> None:
    got = 0
    while got < len(mv):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if not n:
            raise OSError(errno.EIO, f"file ended at byte {offset + got}, expected {offset + len(mv)}")
        got += n


def _range_crc32c_pread(fd: int, start: int, end: int, crc: int = 0) -> int:
    buf = bytearray(min(IO_CHUNK_BYTES, max(1, end - start)))
    mv = memoryview(buf)
    off = start
    while off < end:
        n = os.preadv(fd, [mv[: min(len(buf), end - off)]], off)
        if not n:
            raise OSError(errno.EIO, f"file ended at byte {off}, expected {end} (truncated while reading)")
        crc = crc32c_update(crc, mv[:n])
        off += n
    return crc


def file_crc32c_parallel(path: str | Path, *, threads: int | None = None) -> tuple[int, int]:
    """``(size, crc)`` of a file like :func:`file_crc32c`, but split into ``threads`` disjoint
    byte ranges (default :func:`io_threads`) checksummed concurrently -- ``crc32c`` and the
    page faults run without the GIL -- and joined with :func:`crc32c_combine`. Raises OSError
    when the file cannot be read. The threads (``spotckpt-verify``) end before it returns."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        return size, fd_crc32c_parallel(fd, size, threads=threads)
    finally:
        os.close(fd)


def fd_crc32c_parallel(fd: int, size: int, *, threads: int | None = None) -> int:
    """CRC32C of the first ``size`` bytes of the open file ``fd`` (:func:`file_crc32c_parallel`)."""
    n = threads or io_threads()
    if n <= 1 or size < PARALLEL_MIN_BYTES:
        return _range_crc32c(fd, 0, size)
    step = -(-size // n)
    step += -step % mmap.ALLOCATIONGRANULARITY
    bounds = [(a, min(size, a + step)) for a in range(0, size, step)]
    if len(bounds) == 1:
        return _range_crc32c(fd, 0, size)
    with ThreadPoolExecutor(len(bounds) - 1, thread_name_prefix="spotckpt-verify") as pool:
        futs = [pool.submit(_range_crc32c, fd, a, b) for a, b in bounds[1:]]
        try:
            crc = _range_crc32c(fd, *bounds[0])
        finally:
            results = [f.result() for f in futs]  # waits for all before the fd closes
    for (a, b), c in zip(bounds[1:], results):
        crc = crc32c_combine(crc, c, b - a)
    return crc


#: A part of at least this size is checksummed on the writer's helper thread, beside its write.
BACKGROUND_CRC_MIN_BYTES = 1024 * 1024
#: Writeback of what a durable write has written so far is started every this many bytes.
WRITEBACK_BYTES = 8 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _libc_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` of ``fd`` to the disk now
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``; ctypes releases the GIL), so the disk works
    while the rest of the file is still being written instead of only at the fsync. A hint:
    durability still comes from the fsync that follows. False where it is not available (not
    Linux, or a filesystem that refuses it)."""
    if _sync_file_range is None or nbytes <= 0:
        return False
    return _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) == 0


class CrcWriter:
    """Writes to a raw file, extending a CRC32C over everything written. ``marks``: file
    offsets at which to remember the running CRC (``self.at[offset]``), so that the CRC32C of
    any byte range between marks comes out of the same pass (:meth:`range_crc`).

    The CRC of a large part runs on a helper thread (``spotckpt-crc``) *while* the part is
    written (both release the GIL), so a durable write costs the write, not the write plus a
    checksum pass. The helper is done with the memory of the data passed to :meth:`write` before
    that call returns -- unless ``stable=True``: the caller promises that every chunk's memory
    stays as it is until :meth:`close` (not a buffer refilled between writes), and the helper
    may then lag a part or two behind, across calls. ``writeback=True``: start the disk's
    writeback of each stretch already written (:func:`start_writeback`), for a file about to be
    fsynced. Call :meth:`close` (it waits for the helper) before reading :attr:`crc`,
    :attr:`at` or :meth:`range_crc`."""

    def __init__(self, f: BinaryIO, marks: Iterable[int] = (), *, stable: bool = False,
                 writeback: bool = False) -> None:
        self.f = f
        self.crc = 0
        self.size = 0  # bytes written
        self._crc_size = 0  # bytes checksummed
        self._marks = sorted(set(marks))
        self._cuts = list(self._marks)  # where write() cuts its parts (the marks, in order)
        self._next = 0
        self._cut = 0
        self.at: dict[int, int] = {}
        self._stable = stable
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Any] = []  # futures of the helper's parts, oldest first
        self._wb_fd = f.fileno() if writeback and _sync_file_range is not None else None
        self._wb_from = 0
        self._mark()

    def _mark(self) -> None:
        while self._next < len(self._marks) and self._marks[self._next] <= self._crc_size:
            if self._marks[self._next] == self._crc_size:
                self.at[self._crc_size] = self.crc
            self._next += 1

    def _crc_part(self, part: Any) -> None:
        self.crc = crc32c_update(self.crc, part)
        self._crc_size += len(part)
        self._mark()

    def write(self, data: Any) -> None:
        mv = memoryview(data).cast("B")
        i = 0
        while i < len(mv):
            n = min(IO_CHUNK_BYTES, len(mv) - i)
            while self._cut < len(self._cuts) and self._cuts[self._cut] <= self.size:
                self._cut += 1
            if self._cut < len(self._cuts):
                n = min(n, self._cuts[self._cut] - self.size)
            part = mv[i : i + n]
            if self._pool is None and n >= BACKGROUND_CRC_MIN_BYTES and io_threads() > 1:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="spotckpt-crc")
            if self._pool is not None:  # in order: the helper runs its parts one after another
                self._pending.append(self._pool.submit(self._crc_part, part))
            else:
                self._crc_part(part)
            try:
                written = 0
                while written < len(part):
                    written += self.f.write(part[written:])
            except BaseException:
                for fut in self._pending:  # the helper is done with the memory before it is let go
                    fut.exception()
                self._pending = []
                raise
            self.size += n
            i += n
            if self._wb_fd is not None and self.size - self._wb_from >= WRITEBACK_BYTES:
                if not start_writeback(self._wb_fd, self._wb_from, self.size - self._wb_from):
                    self._wb_fd = None  # refused here: leave it all to the fsync
                self._wb_from = self.size
            if self._stable:
                while len(self._pending) > 2:  # bounded lag (a temporary chunk stays alive meanwhile)
                    self._pending.pop(0).result()
        if not self._stable:
            self._drain()

    def _drain(self) -> None:
        """Wait for every part handed to the helper; raise the first error."""
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.exception()
        for fut in pending:
            fut.result()

    def close(self) -> None:
        """Wait for the helper's checksums and end it. Idempotent."""
        try:
            self._drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def range_crc(self, start: int, end: int) -> int:
        """CRC32C of the bytes written at ``[start, end)``, both marks: crc(B) is crc(A+B) with
        crc(A) shifted past B taken out (CRC32C is linear)."""
        return self.at[end] ^ crc32c_combine(self.at[start], 0, end - start)
