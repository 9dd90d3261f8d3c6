"""The on-disk format ``spotckpt/1``: manifest, CRC32C, streamed safetensors files, JSON trees.

A committed step directory holds, per writer (rank), ``rank-NNNNN.safetensors`` (every tensor, in
the safetensors layout, readable by any safetensors reader) and ``rank-NNNNN.tree.json`` (the
structure of the state with every non-tensor value, tensors referenced by name), and one
``manifest.json`` listing every data file with its size and CRC32C (base64 of the big-endian
value, as S3's ``ChecksumCRC32C``). The manifest is the commit marker: written last, read first.

Nothing here unpickles. The reader validates a safetensors header completely (size bounds,
known dtypes, offsets inside the file, no overlap, no trailing bytes) before it touches data.

This module imports torch but nothing else heavy, and nothing from other spotckpt modules except
:mod:`spotckpt.errors`.
"""

from __future__ import annotations

import base64
import ctypes
import json
import math
import mmap
import os
import re
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import crc32c as _crc32c
import numpy as np
import torch

from .errors import CheckpointCorruptError, PickleRefusedError, StateError

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "FileEntry",
    "Manifest",
    "step_dirname",
    "parse_step_dirname",
    "crc32c_update",
    "crc32c_b64",
    "file_crc32c",
    "file_crc32c_parallel",
    "crc32c_combine",
    "io_threads",
    "safe_relpath",
    "SafetensorsFile",
    "TensorSpec",
    "CrcWriter",
    "plan_safetensors",
    "write_safetensors",
    "tensor_byte_view",
    "encode_tree",
    "decode_tree",
    "data_file_names",
]

FORMAT = "spotckpt/1"
MANIFEST_NAME = "manifest.json"
STEP_DIGITS = 12
MAX_STEP = 10**STEP_DIGITS - 1
_STEP_RE = re.compile(r"^step-(\d{12})$")

#: Upper bound of a safetensors JSON header we accept (the reference reader uses 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Upper bound of a manifest or tree file we parse.
MAX_JSON_BYTES = 256 * 1024 * 1024
#: Chunk of file I/O and checksumming (GIL released by both).
IO_CHUNK_BYTES = 16 * 1024 * 1024


def step_dirname(step: int) -> str:
    """``step-000000001200`` for 1200: zero-padded so name order is step order."""
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise StateError(f"step must be an int in [0, {MAX_STEP}], got {step!r}")
    return f"step-{step:0{STEP_DIGITS}d}"


def parse_step_dirname(name: str) -> int | None:
    """The step of a committed step directory's name, or None for any other name."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def data_file_names(rank: int) -> tuple[str, str]:
    """The two data files one writer produces: its tensors and its tree."""
    return f"rank-{rank:05d}.safetensors", f"rank-{rank:05d}.tree.json"


# ----------------------------------------------------------------------------------- CRC32C


def crc32c_update(crc: int, data: Any) -> int:
    """Extend a CRC32C with ``data`` (bytes-like; the GIL is released for large buffers)."""
    return _crc32c.crc32c(data, crc)


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
#: Verification maps a file in windows of this size (bounded address space and RSS).
VERIFY_WINDOW_BYTES = 64 * 1024 * 1024
_MADV_POPULATE_READ = 22  # Linux >= 5.14


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
            if err == 22:  # EINVAL: kernel older than 5.14; fall back to plain page faults
                _populate_ok = False
                return
            raise OSError(err, f"reading the file failed ({os.strerror(err)})")
    finally:
        del arr


def _range_crc32c(fd: int, start: int, end: int) -> int:
    """CRC32C of bytes [start, end) of ``fd``: checksummed where the page cache holds them, via
    read-only mappings, so no byte is copied (a read() into a buffer costs a copy and, on a
    2-core VM, more than doubles the time); pread into a buffer where mapping fails."""
    crc = 0
    off = start
    gran = mmap.ALLOCATIONGRANULARITY
    while off < end:
        base = off - off % gran
        length = min(end, base + VERIFY_WINDOW_BYTES) - base
        try:
            mm = mmap.mmap(fd, length, offset=base, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return _range_crc32c_pread(fd, off, end, crc)
        try:
            _populate(mm, length)
            with memoryview(mm) as mv, mv[off - base :] as part:
                crc = _crc32c.crc32c(part, crc)
        finally:
            mm.close()
        off = base + length
    return crc


def _range_crc32c_pread(fd: int, start: int, end: int, crc: int = 0) -> int:
    buf = bytearray(min(IO_CHUNK_BYTES, max(1, end - start)))
    mv = memoryview(buf)
    off = start
    while off < end:
        n = os.preadv(fd, [mv[: min(len(buf), end - off)]], off)
        if not n:
            raise OSError(0, f"file ended at byte {off}, expected {end} (truncated while reading)")
        crc = _crc32c.crc32c(mv[:n], crc)
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
        n = threads or io_threads()
        if n <= 1 or size < PARALLEL_MIN_BYTES:
            return size, _range_crc32c(fd, 0, size)
        step = -(-size // n)
        step += -step % mmap.ALLOCATIONGRANULARITY
        bounds = [(a, min(size, a + step)) for a in range(0, size, step)]
        if len(bounds) == 1:
            return size, _range_crc32c(fd, 0, size)
        with ThreadPoolExecutor(len(bounds) - 1, thread_name_prefix="spotckpt-verify") as pool:
            futs = [pool.submit(_range_crc32c, fd, a, b) for a, b in bounds[1:]]
            try:
                crc = _range_crc32c(fd, *bounds[0])
            finally:
                results = [f.result() for f in futs]  # waits for all before the fd closes
        for (a, b), c in zip(bounds[1:], results):
            crc = crc32c_combine(crc, c, b - a)
        return size, crc
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class FileEntry:
    """Size and CRC32C (base64, big-endian) of one data file."""

    size: int
    crc32c: str


def safe_relpath(rel: object, *, source: str = "") -> str:
    """Return ``rel`` if it is a safe relative POSIX path inside a step directory, else raise.

    Refused: non-strings, empty, absolute, ``..`` or ``.`` components, backslashes, NUL, empty
    components, hidden (``.``-leading) components and the manifest's own name.
    """
    bad = CheckpointCorruptError(
        f"{source or 'manifest'}: refusing file path {rel!r}: paths must be relative, inside the "
        "step directory, without '..'; this checkpoint was not written by spotckpt or was "
        "tampered with -- delete it or restore an older step",
        path=source,
    )
    if not isinstance(rel, str) or not rel or len(rel) > 1024:
        raise bad
    if "\\" in rel or "\x00" in rel or rel.startswith("/"):
        raise bad
    parts = rel.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise bad
    if PurePosixPath(rel).is_absolute() or rel == MANIFEST_NAME:
        raise bad
    return rel


def _utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Manifest:
    """The commit marker of one step: ``manifest.json``.

    ``files`` maps every data file's path relative to the step directory to its size and CRC32C.
    ``extra`` holds optional writer information (world size, wall time of the save, ...).
    """

    step: int
    files: Mapping[str, FileEntry]
    created: str = field(default_factory=_utc_now_iso)
    format: str = FORMAT
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "format": self.format,
            "step": self.step,
            "created": self.created,
            "files": {k: {"size": v.size, "crc32c": v.crc32c} for k, v in sorted(self.files.items())},
        }
        doc.update({k: v for k, v in self.extra.items() if k not in doc})
        return (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "manifest.json") -> Manifest:
        """Parse and validate a manifest; raise :class:`CheckpointCorruptError` on anything off."""

        def bad(why: str) -> CheckpointCorruptError:
            return CheckpointCorruptError(
                f"{source}: {why}; this step is not usable -- an older step will be used",
                path=source,
            )

        if len(data) > MAX_JSON_BYTES:
            raise bad(f"manifest is {len(data)} bytes, more than {MAX_JSON_BYTES}")
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"not valid JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise bad("not a JSON object")
        fmt = doc.get("format")
        if fmt != FORMAT:
            raise bad(
                f"unknown format {fmt!r} (this spotckpt reads {FORMAT!r}); upgrade spotckpt to "
                "read it"
            )
        step = doc.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
            raise bad(f"'step' must be an int in [0, {MAX_STEP}], got {step!r}")
        created = doc.get("created")
        if not isinstance(created, str):
            raise bad("'created' must be an ISO-8601 string")
        files_doc = doc.get("files")
        if not isinstance(files_doc, dict) or not files_doc:
            raise bad("'files' must be a non-empty object")
        files: dict[str, FileEntry] = {}
        for rel, ent in files_doc.items():
            safe_relpath(rel, source=source)
            if not isinstance(ent, dict):
                raise bad(f"entry of {rel!r} is not an object")
            size, crc = ent.get("size"), ent.get("crc32c")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad(f"size of {rel!r} must be a non-negative int, got {size!r}")
            if not isinstance(crc, str):
                raise bad(f"crc32c of {rel!r} must be a base64 string")
            try:
                raw = base64.b64decode(crc, validate=True)
            except ValueError as exc:
                raise bad(f"crc32c of {rel!r} is not base64") from exc
            if len(raw) != 4:
                raise bad(f"crc32c of {rel!r} is not 4 bytes")
            files[rel] = FileEntry(size=size, crc32c=crc)
        extra = {k: v for k, v in doc.items() if k not in ("format", "step", "created", "files")}
        return cls(step=step, files=files, created=created, format=fmt, extra=extra)


# ------------------------------------------------------------------------------ safetensors

_DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
):
    if hasattr(torch, _name):
        _DTYPE_TO_ST[getattr(torch, _name)] = _st
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}
_ST_ITEMSIZE = {st: torch.empty((), dtype=dt).element_size() for dt, st in _DTYPE_TO_ST.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in a safetensors file: dtype, shape, byte range of the data area."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_safetensors(
    items: Iterable[tuple[str, torch.dtype, tuple[int, ...], int]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, list[TensorSpec]]:
    """Lay out a safetensors file: the 8-byte length + JSON header (padded to 8 bytes with
    spaces, as the reference writer does) and each tensor's range in the data area, in order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    specs: list[TensorSpec] = []
    off = 0
    for name, dtype, shape, nbytes in items:
        if dtype not in _DTYPE_TO_ST:
            raise StateError(f"dtype {dtype} of {name!r} is not supported", key_path=name)
        specs.append(TensorSpec(name, dtype, tuple(shape), off, off + nbytes))
        header[name] = {"dtype": _DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, specs


def tensor_byte_view(t: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor's bytes (no copy)."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return flat.view(torch.uint8).numpy()


class CrcWriter:
    """Writes to a raw file, extending a CRC32C over everything written."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.crc = 0
        self.size = 0

    def write(self, data: Any) -> None:
        mv = memoryview(data).cast("B")
        for i in range(0, len(mv), IO_CHUNK_BYTES):
            part = mv[i : i + IO_CHUNK_BYTES]
            self.crc = crc32c_update(self.crc, part)
            written = 0
            while written < len(part):
                written += self.f.write(part[written:])
            self.size += len(part)


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    fsync: bool = True,
) -> FileEntry:
    """Stream ``tensors`` into a safetensors file, CRC32C in the same pass, and fsync it.

    Tensors are written one at a time straight from their memory: a contiguous CPU tensor is
    written without a copy; a non-contiguous or device tensor is made contiguous on the CPU one
    tensor at a time, so the extra memory is bounded by the largest such tensor, not the state.
    """
    names = list(tensors)
    header, _ = plan_safetensors(
        ((n, tensors[n].dtype, tuple(tensors[n].shape), _nbytes(tensors[n])) for n in names), metadata
    )
    with open(path, "wb", buffering=0) as f:
        w = CrcWriter(f)  # type: ignore[arg-type]
        w.write(header)
        for n in names:
            t = tensors[n].detach()
            if t.device.type != "cpu":
                t = t.to("cpu")
            if not t.is_contiguous():
                t = t.contiguous()
            w.write(tensor_byte_view(t))
        if fsync:
            os.fsync(f.fileno())
    return FileEntry(size=w.size, crc32c=crc32c_b64(w.crc))


class SafetensorsFile:
    """A strictly validated safetensors file opened for reading.

    The constructor reads and checks the header; :meth:`read_into` and :meth:`read` copy one
    tensor's bytes straight from the file into a tensor's memory (positional reads, no extra copy
    for contiguous CPU targets). A tensor of at least :data:`PARALLEL_MIN_BYTES` is read as
    ``threads`` disjoint slices at once (default :func:`io_threads`): the caller's thread reads
    one, helper threads ``spotckpt-restore-read`` the others (``preadv`` releases the GIL), and
    the call returns when all have landed. One thread uses a reader at a time; the helpers are
    joined by :meth:`close`. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self, path: str | Path, *, max_header_bytes: int = MAX_HEADER_BYTES, threads: int | None = None
    ) -> None:
        self.path = str(path)
        self._threads = max(1, threads or io_threads())
        self._pool: ThreadPoolExecutor | None = None
        self._f = open(self.path, "rb", buffering=0)
        try:
            self._parse(max_header_bytes)
        except BaseException:
            self._f.close()
            raise

    def _bad(self, why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"{self.path}: invalid safetensors file: {why}; the checkpoint is damaged -- an older "
            "step will be used",
            path=self.path,
        )

    def _parse(self, max_header_bytes: int) -> None:
        file_size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) != 8:
            raise self._bad(f"file is {file_size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > max_header_bytes or n > file_size - 8:
            raise self._bad(f"header claims {n} bytes, file has {file_size - 8} after the length")
        raw = self._f.read(n)
        if len(raw) != n:
            raise self._bad("header is truncated")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._bad(f"header is not JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise self._bad("header is not a JSON object")
        meta = doc.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._bad("__metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self._data_start = 8 + n
        data_len = file_size - self._data_start
        specs: dict[str, TensorSpec] = {}
        for name, ent in doc.items():
            if not isinstance(ent, dict):
                raise self._bad(f"entry {name!r} is not an object")
            st, shape, offs = ent.get("dtype"), ent.get("shape"), ent.get("data_offsets")
            if st not in _ST_TO_DTYPE:
                raise self._bad(f"entry {name!r} has unknown dtype {st!r}")
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
            ):
                raise self._bad(f"entry {name!r} has an invalid shape {shape!r}")
            if (
                not isinstance(offs, list)
                or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len
            ):
                raise self._bad(f"entry {name!r} has offsets {offs!r} outside the data ({data_len} bytes)")
            want = math.prod(shape) * _ST_ITEMSIZE[st]
            if offs[1] - offs[0] != want:
                raise self._bad(f"entry {name!r} spans {offs[1] - offs[0]} bytes, its shape needs {want}")
            specs[name] = TensorSpec(name, _ST_TO_DTYPE[st], tuple(shape), offs[0], offs[1])
        pos = 0
        for s in sorted(specs.values(), key=lambda s: (s.start, s.end)):
            if s.start != pos:
                raise self._bad(f"entry {s.name!r} starts at {s.start}, expected {pos} (holes or overlap)")
            pos = s.end
        if pos != data_len:
            raise self._bad(f"data area is {data_len} bytes, entries cover {pos} (truncated or padded)")
        self.specs = specs

    def keys(self) -> list[str]:
        return list(self.specs)

    def _spec(self, name: str) -> TensorSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise self._bad(f"tensor {name!r} named by the tree is missing") from None

    def read_into(self, name: str, target: torch.Tensor, *, bounce: torch.Tensor | None = None) -> None:
        """Copy tensor ``name`` into ``target`` in place (same dtype and shape required).

        A contiguous CPU target is filled by ``readinto``; any other target (non-contiguous or
        on a device) goes through a CPU buffer: ``bounce`` (e.g. pinned memory) when it is large
        enough, else a fresh one.
        """
        s = self._spec(name)
        if target.dtype != s.dtype or tuple(target.shape) != s.shape:
            raise StateError(
                f"{self.path}: tensor {name!r} is {s.dtype}{list(s.shape)} in the checkpoint but "
                f"{target.dtype}{list(target.shape)} in the live state; build the model/optimizer "
                "with the same configuration as when it was saved",
                key_path=name,
            )
        if target.device.type == "cpu" and target.is_contiguous():
            self._readinto(s, tensor_byte_view(target))
            return
        if (
            target.device.type == "cuda"
            and target.is_contiguous()
            and bounce is not None
            and bounce.is_pinned()
            and bounce.numel() >= 2
            and s.nbytes
        ):
            self._read_into_cuda(s, target, bounce)
            return
        if bounce is not None and bounce.numel() * bounce.element_size() >= s.nbytes:
            buf = bounce.view(torch.uint8).reshape(-1)[: s.nbytes]
        else:
            buf = torch.empty(s.nbytes, dtype=torch.uint8)
        self._readinto(s, buf.numpy())
        src = buf.view(s.dtype).reshape(s.shape) if s.nbytes else torch.empty(s.shape, dtype=s.dtype)
        with torch.no_grad():
            target.copy_(src, non_blocking=False)

    def _read_into_cuda(self, s: TensorSpec, target: torch.Tensor, bounce: torch.Tensor) -> None:
        """File -> pinned bounce buffer (two halves, alternating) -> device, so reading the
        next chunk overlaps the host-to-device copy of the previous one."""
        halves = bounce.view(torch.uint8).reshape(-1)
        half = halves.numel() // 2
        bufs = (halves[:half], halves[half : 2 * half])
        events = [torch.cuda.Event(), torch.cuda.Event()]
        used = [False, False]
        dst = target.reshape(-1).view(torch.uint8)
        stream = torch.cuda.current_stream(target.device)
        off, i = 0, 0
        while off < s.nbytes:
            n = min(half, s.nbytes - off)
            if used[i]:
                events[i].synchronize()  # that half's previous copy has landed
            with memoryview(tensor_byte_view(bufs[i][:n])) as raw, raw.cast("B") as mv:
                self._pread_parallel(mv, self._data_start + s.start + off, s.name)
            dst[off : off + n].copy_(bufs[i][:n], non_blocking=True)
            events[i].record(stream)
            used[i] = True
            off += n
            i ^= 1
        for ev, u in zip(events, used):
            if u:
                ev.synchronize()

    def read(self, name: str) -> torch.Tensor:
        """A new CPU tensor holding tensor ``name``."""
        s = self._spec(name)
        out = torch.empty(s.shape, dtype=s.dtype)
        self._readinto(s, tensor_byte_view(out))
        return out

    def _readinto(self, s: TensorSpec, view: np.ndarray) -> None:
        # Page cache -> tensor memory is a memcpy inside the kernel; one thread does not saturate
        # memory bandwidth (2-core VM, 1 GiB: 1 thread 0.15 s, 2 threads 0.11 s), so a large
        # tensor is read as disjoint slices in parallel. Slices are multiples of 1 MiB.
        with memoryview(view) as raw, raw.cast("B") as mv:
            self._pread_parallel(mv, self._data_start + s.start, s.name)

    def _pread_parallel(self, mv: memoryview, off0: int, name: str) -> None:
        """Fill ``mv`` from file offset ``off0``, as parallel slices when it is large."""
        n = len(mv)
        parts = self._threads if n >= PARALLEL_MIN_BYTES and hasattr(os, "preadv") else 1
        if parts == 1:
            self._pread_exact(mv, off0, name)
            return
        step = -(-n // parts)
        step += -step % (1 << 20)
        bounds = [(a, min(n, a + step)) for a in range(0, n, step)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads - 1, thread_name_prefix="spotckpt-restore-read")
        futs: list[Future[None]] = [
            self._pool.submit(self._pread_exact, mv[a:b], off0 + a, name) for a, b in bounds[1:]
        ]
        try:
            a, b = bounds[0]
            self._pread_exact(mv[a:b], off0 + a, name)
        finally:
            for f in futs:  # every slice has landed (or failed) before the target is used
                f.exception()
        for f in futs:
            f.result()

    def _pread_exact(self, mv: memoryview, offset: int, name: str) -> None:
        fd = self._f.fileno()
        got = 0
        if not hasattr(os, "preadv"):  # not Linux/BSD: one thread, seek + readinto
            self._f.seek(offset)
        while got < len(mv):
            if hasattr(os, "preadv"):
                k = os.preadv(fd, [mv[got:]], offset + got)
            else:
                k = self._f.readinto(mv[got:])
            if not k:
                raise self._bad(f"tensor {name!r} is truncated")
            got += k

    def close(self) -> None:
        """Join the helper threads, then close the file. Idempotent."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._f.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------- JSON tree
#
# Plain JSON where JSON is exact (str-keyed dicts, lists, str, int, bool, None, finite floats);
# a one-key tagged object elsewhere. Tags never collide with user data: a user dict that has a
# single key starting with "__" is itself written in the tagged "__dict__" form.

_TAGS = (
    "__tensor__",
    "__tuple__",
    "__dict__",
    "__float__",
    "__ndarray__",
    "__npscalar__",
    "__bytes__",
    "__dtype__",
    "__size__",
    "__device__",
    "__pickle__",
)


def _key_str(k: object) -> str:
    return str(k).replace("/", "%2F")


def encode_tree(
    obj: Any,
    path: str,
    add_tensor: Callable[[str, torch.Tensor], str],
    *,
    allow_pickle: bool = False,
) -> Any:
    """JSON-able form of ``obj``; each tensor is handed to ``add_tensor(key_path, tensor)``,
    which returns the name it is stored under. Raise :class:`StateError` naming the key path of
    an unsupported value -- unless ``allow_pickle``, which stores such a value pickled (and the
    loader must opt in too)."""
    if allow_pickle:
        def rec(o: Any, p: str) -> Any:
            return encode_tree(o, p, add_tensor, allow_pickle=True)
    else:
        def rec(o: Any, p: str) -> Any:
            return encode_tree(o, p, add_tensor)
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        if obj.is_sparse or obj.layout != torch.strided:
            raise StateError(
                f"{path}: sparse/quantized tensor layouts are not supported; convert with "
                ".to_dense() before checkpointing",
                key_path=path,
            )
        if obj.dtype not in _DTYPE_TO_ST:
            raise StateError(
                f"{path}: tensor dtype {obj.dtype} is not supported by the safetensors format; "
                "convert it (e.g. complex -> torch.view_as_real) before checkpointing",
                key_path=path,
            )
        return {"__tensor__": add_tensor(path, obj)}
    if isinstance(obj, torch.Size):
        return {"__size__": list(obj)}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"__device__": str(obj)}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf" or obj.dtype.hasobject:
            raise StateError(f"{path}: numpy dtype {obj.dtype} is not supported", key_path=path)
        arr = np.ascontiguousarray(obj)
        return {
            "__ndarray__": {
                "dtype": arr.dtype.str,
                "shape": list(arr.shape),
                "data": base64.b64encode(arr.tobytes()).decode("ascii"),
            }
        }
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in "biuf":
            raise StateError(f"{path}: numpy scalar of dtype {obj.dtype} is not supported", key_path=path)
        return {"__npscalar__": {"dtype": obj.dtype.str, "data": base64.b64encode(obj.tobytes()).decode("ascii")}}
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, tuple):
        return {"__tuple__": [rec(v, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [rec(v, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)).startswith("__"))
        if plain:
            return {k: rec(v, f"{path}/{_key_str(k)}") for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (str, int, float, bool, tuple))):
                raise StateError(f"{path}: dict key {k!r} of type {type(k).__name__} is not supported", key_path=path)
            items.append([rec(k, f"{path}/<key>"), rec(v, f"{path}/{_key_str(k)}")])
        return {"__dict__": items}
    if allow_pickle:
        import pickle

        return {"__pickle__": base64.b64encode(pickle.dumps(obj, protocol=4)).decode("ascii")}
    raise StateError(
        f"{path}: value of type {type(obj).__module__}.{type(obj).__qualname__} cannot be "
        "checkpointed; store tensors, numbers, strings, lists/tuples/dicts of them, numpy arrays, "
        "or an object with state_dict()/load_state_dict()",
        key_path=path,
    )


def decode_tree(
    doc: Any,
    get_tensor: Callable[[str], torch.Tensor],
    *,
    source: str = "tree",
    allow_pickle: bool = False,
) -> Any:
    """Inverse of :func:`encode_tree`; ``get_tensor(name)`` supplies stored tensors. A pickled
    value raises :class:`PickleRefusedError` unless ``allow_pickle``."""

    def bad(why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"{source}: {why}; the checkpoint is damaged", path=source)

    def dec(d: Any) -> Any:
        if d is None or isinstance(d, (bool, str, int, float)):
            return d
        if isinstance(d, list):
            return [dec(v) for v in d]
        if not isinstance(d, dict):
            raise bad(f"unexpected JSON value {type(d).__name__}")
        if len(d) == 1:
            (tag, val), = d.items()
            if tag == "__pickle__":
                if not allow_pickle:
                    raise PickleRefusedError(
                        f"{source}: the checkpoint holds a pickled value; unpickling runs code "
                        "from the file, so it is refused -- pass allow_pickle=True only for "
                        "checkpoints you trust",
                        path=source,
                    )
                import pickle

                return pickle.loads(base64.b64decode(val, validate=True))  # noqa: S301 - opted in
            if tag in _TAGS:
                try:
                    return _decode_tag(tag, val, dec, get_tensor)
                except CheckpointCorruptError:
                    raise
                except (TypeError, ValueError, KeyError, IndexError) as exc:
                    raise bad(f"malformed {tag} value ({exc})") from exc
        return {k: dec(v) for k, v in d.items()}

    return dec(doc)


_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _decode_tag(tag: str, val: Any, dec: Callable[[Any], Any], get_tensor: Callable[[str], torch.Tensor]) -> Any:
    if tag == "__tensor__":
        if not isinstance(val, str):
            raise TypeError("tensor reference must be a string")
        return get_tensor(val)
    if tag == "__tuple__":
        if not isinstance(val, list):
            raise TypeError("tuple must be a list")
        return tuple(dec(v) for v in val)
    if tag == "__dict__":
        out = {}
        for pair in val:
            k, v = pair
            out[dec(k)] = dec(v)
        return out
    if tag == "__float__":
        return _FLOATS[val]
    if tag == "__ndarray__":
        dt = np.dtype(val["dtype"])
        if dt.kind not in "biuf":
            raise ValueError(f"dtype {dt} not allowed")
        data = base64.b64decode(val["data"], validate=True)
        shape = tuple(int(s) for s in val["shape"])
        return np.frombuffer(data, dtype=dt).reshape(shape).copy()
    if tag == "__npscalar__":
        dt = np.dtype(val["dtype"])
        if dt.kind not in "biuf":
            raise ValueError(f"dtype {dt} not allowed")
        return np.frombuffer(base64.b64decode(val["data"], validate=True), dtype=dt)[0]
    if tag == "__bytes__":
        return base64.b64decode(val, validate=True)
    if tag == "__dtype__":
        dt = getattr(torch, str(val))
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"{val!r} is not a torch dtype")
        return dt
    if tag == "__size__":
        return torch.Size([int(v) for v in val])
    if tag == "__device__":
        return torch.device(str(val))
    raise KeyError(tag)
