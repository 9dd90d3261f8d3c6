"""Tensors in the safetensors layout: planning a file, writing it, reading it back strictly.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range of the data area, then the data area. Any safetensors reader can open
what :func:`write_safetensors` and :class:`spotckpt.core.stage.StagedTensors` write. Nothing here
unpickles: :class:`SafetensorsFile` validates the header completely (size bounds, known dtypes,
offsets inside the file, no holes or overlap, no trailing bytes) before it touches data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spotckpt.errors import CheckpointCorruptError, StateError
from spotckpt.format import checksums as _checksums
from spotckpt.format.durable import write_chunks_durably
from spotckpt.format.manifest import FileEntry

__all__ = [
    "MAX_HEADER_BYTES",
    "SafetensorsFile",
    "TensorSpec",
    "plan_entries",
    "plan_safetensors",
    "render_header",
    "tensor_byte_view",
    "tensor_ranges",
    "write_safetensors",
]

#: Upper bound of a safetensors JSON header we accept (the reference reader uses 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

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
    entries, specs = plan_entries(items)
    return render_header(entries, metadata), specs


def plan_entries(items: Iterable[tuple[str, torch.dtype, tuple[int, ...], int]]) -> tuple[str, list[TensorSpec]]:
    """The tensor entries of a safetensors header, as JSON members (no braces), and each
    tensor's range: the part of :func:`plan_safetensors` that depends on the tensors only."""
    header: dict[str, Any] = {}
    specs: list[TensorSpec] = []
    off = 0
    for name, dtype, shape, nbytes in items:
        if dtype not in _DTYPE_TO_ST:
            raise StateError(f"dtype {dtype} of {name!r} is not supported", key_path=name)
        specs.append(TensorSpec(name, dtype, tuple(shape), off, off + nbytes))
        header[name] = {"dtype": _DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    return json.dumps(header, separators=(",", ":"))[1:-1], specs


def render_header(entries: str, metadata: Mapping[str, str] | None = None) -> bytes:
    """The header bytes of a file with tensor ``entries`` (from :func:`plan_entries`) and
    ``metadata``: byte for byte what ``json.dumps`` of the whole header gives, padded."""
    meta = ""
    if metadata:
        meta = json.dumps({"__metadata__": {str(k): str(v) for k, v in metadata.items()}}, separators=(",", ":"))[1:-1]
    raw = ("{" + ",".join(x for x in (meta, entries) if x) + "}").encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_byte_view(t: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor's bytes (no copy)."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return flat.view(torch.uint8).numpy()


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    fsync: bool = True,
    ranges: dict[str, Any] | None = None,
) -> FileEntry:
    """Stream ``tensors`` into a safetensors file, CRC32C in the same pass, and fsync it.

    Tensors are written one at a time straight from their memory: a contiguous CPU tensor is
    written without a copy; a non-contiguous or device tensor is made contiguous on the CPU one
    tensor at a time, so the extra memory is bounded by the largest such tensor, not the state.
    ``ranges``: names whose file byte range and CRC32C are wanted (:func:`tensor_ranges`).
    """
    names = list(tensors)
    header, specs = plan_safetensors(
        ((n, tensors[n].dtype, tuple(tensors[n].shape), _nbytes(tensors[n])) for n in names), metadata
    )
    byte_ranges = tensor_ranges(len(header), specs, ranges)

    def chunks() -> Iterator[Any]:
        yield header
        for n in names:
            t = tensors[n].detach()
            if t.device.type != "cpu":
                t = t.to("cpu")
            if not t.is_contiguous():
                t = t.contiguous()
            yield tensor_byte_view(t)  # the temporary, if any, is dropped after it is written

    # stable: every chunk is a live tensor's memory, which the caller holds still; with temporaries
    # (device or non-contiguous tensors) each is checksummed before the next is made
    stable = all(tensors[n].device.type == "cpu" and tensors[n].is_contiguous() for n in names)
    entry = write_chunks_durably(path, chunks(), fsync=fsync, ranges=byte_ranges, stable=stable)
    if ranges is not None:
        ranges.update(byte_ranges)
    return entry


def tensor_ranges(header_len: int, specs: Iterable[TensorSpec], wanted: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{name: (start, end)}`` file byte ranges of the ``wanted`` tensors of a file laid out as
    ``specs`` after a header of ``header_len`` bytes (what :func:`write_chunks_durably` fills in
    with each range's CRC32C). Ranged reads of a remote copy verify against these."""
    if not wanted:
        return {}
    return {s.name: (header_len + s.start, header_len + s.end) for s in specs if s.name in wanted}


class SafetensorsFile:
    """A strictly validated safetensors file opened for reading.

    The constructor (optionally) verifies the whole file, then reads and checks the header;
    :meth:`read_into` and :meth:`read` copy one tensor's bytes straight from the page cache into a
    tensor's memory (no extra copy for contiguous CPU targets): from read-only mappings faulted in
    by the kernel in one call per window (the mapping a verifying reader checksummed, when it
    kept one), else with ``preadv``. A tensor of at least
    :data:`~spotckpt.format.checksums.PARALLEL_MIN_BYTES` is read as ``threads`` disjoint slices at
    once (default :func:`~spotckpt.format.checksums.io_threads`): the caller's thread reads one,
    helper threads ``spotckpt-restore-read`` the others (the copies release the GIL), and the call
    returns when all have landed. One thread uses a reader at a time; the helpers are joined and
    the mapping closed by :meth:`close`. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self, path: str | Path, *, max_header_bytes: int = MAX_HEADER_BYTES, threads: int | None = None,
        expect: FileEntry | None = None,
    ) -> None:
        """``expect``: the size and CRC32C the file must have (its manifest entry). The whole
        file is then verified here, before the header is even parsed -- CheckpointCorruptError
        when it does not match -- and, where it can be, mapped once: checksummed as its pages
        are read in, then copied from by the reads (verify while reading, one pass over the
        page cache's mappings instead of two)."""
        self.path = str(path)
        self._threads = max(1, threads or _checksums.io_threads())
        self._pool: ThreadPoolExecutor | None = None
        self._mapped: _checksums.MappedFile | None = None
        self._f = open(self.path, "rb", buffering=0)
        try:
            if expect is not None:
                self._verify(expect)
            self._parse(max_header_bytes)
        except BaseException:
            self.close()
            raise

    def _verify(self, expect: FileEntry) -> None:
        fd = self._f.fileno()
        size = os.fstat(fd).st_size
        if size != expect.size:
            raise CheckpointCorruptError(f"{self.path}: size {size}, manifest says {expect.size} (truncated?)",
                                         path=self.path)
        try:
            if size and _checksums.mapped_reads_ok() and size <= _checksums.whole_map_limit():
                try:
                    self._mapped = _checksums.MappedFile(fd, size)
                except (OSError, ValueError):
                    self._mapped = None
            if self._mapped is not None:
                crc = self._mapped.crc32c(self._run_parallel, self._threads)
            else:
                crc = _checksums.fd_crc32c_parallel(fd, size, threads=self._threads)
        except OSError as exc:
            raise CheckpointCorruptError(f"{self.path}: unreadable ({exc.strerror or exc})", path=self.path) from exc
        got = _checksums.crc32c_b64(crc)
        if got != expect.crc32c:
            raise CheckpointCorruptError(f"{self.path}: CRC32C {got} != {expect.crc32c} in manifest (corrupt)",
                                         path=self.path)

    def _run_parallel(self, fn: Any, args: list[tuple[Any, ...]]) -> list[Any]:
        """``[fn(*a) for a in args]``: the first on this thread, the others on the helper
        threads, returning once every call has ended (the first error raised)."""
        if len(args) == 1:
            return [fn(*args[0])]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads - 1, thread_name_prefix="spotckpt-restore-read")
        futs: list[Future[Any]] = [self._pool.submit(fn, *a) for a in args[1:]]
        try:
            first = fn(*args[0])
        finally:
            for f in futs:  # every call has ended (or failed) before anything is used
                f.exception()
        return [first] + [f.result() for f in futs]

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

    def _checked_spec(self, name: str, target: torch.Tensor) -> TensorSpec:
        s = self._spec(name)
        if target.dtype != s.dtype or tuple(target.shape) != s.shape:
            raise StateError(
                f"{self.path}: tensor {name!r} is {s.dtype}{list(s.shape)} in the checkpoint but "
                f"{target.dtype}{list(target.shape)} in the live state; build the model/optimizer "
                "with the same configuration as when it was saved",
                key_path=name,
            )
        return s

    def read_many(
        self, pairs: Iterable[tuple[str, torch.Tensor]], *, bounce: torch.Tensor | None = None
    ) -> None:
        """:meth:`read_into` for several ``(name, target)`` pairs, faster than one at a time.

        Every name, dtype and shape is checked before any byte is written (StateError or
        CheckpointCorruptError, live state untouched). Contiguous CPU targets are then filled in
        one parallel pass: their file ranges, in file order, are cut into one run of about equal
        size per thread, and the call waits once, for all of them -- not once per tensor, where
        each wait is set by the slowest thread. Other targets go through :meth:`read_into`.
        """
        checked = [(self._checked_spec(name, t), t) for name, t in pairs]
        direct = [(s, t) for s, t in checked if t.device.type == "cpu" and t.is_contiguous()]
        with ExitStack() as stack:
            segs = []
            for s, t in sorted(direct, key=lambda st: st[0].start):
                raw = stack.enter_context(memoryview(tensor_byte_view(t)))
                segs.append((stack.enter_context(raw.cast("B")), self._data_start + s.start, s.name))
            self._pread_segments(segs)
        for s, t in checked:
            if not (t.device.type == "cpu" and t.is_contiguous()):
                self.read_into(s.name, t, bounce=bounce)

    def read_into(self, name: str, target: torch.Tensor, *, bounce: torch.Tensor | None = None) -> None:
        """Copy tensor ``name`` into ``target`` in place (same dtype and shape required).

        A contiguous CPU target is filled by ``readinto``; any other target (non-contiguous or
        on a device) goes through a CPU buffer: ``bounce`` (e.g. pinned memory) when it is large
        enough, else a fresh one.
        """
        s = self._checked_spec(name, target)
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

    def read_box_into(self, name: str, offsets: tuple[int, ...], lengths: tuple[int, ...],
                      target: torch.Tensor) -> None:
        """Copy the box ``[offsets, offsets + lengths)`` of tensor ``name`` into ``target``
        (shape ``lengths``, same dtype). Only the rows of the first dimension that the box spans
        are read; a box that spans whole rows of a contiguous CPU target lands with no extra
        copy (the FSDP case: shards are row ranges)."""
        s = self._spec(name)
        ok = (len(offsets) == len(lengths) == len(s.shape) and target.dtype == s.dtype
              and tuple(target.shape) == tuple(lengths)
              and all(0 <= o and o + n <= d for o, n, d in zip(offsets, lengths, s.shape)))
        if not ok:
            raise StateError(
                f"{self.path}: cannot read the box at {list(offsets)} of size {list(lengths)} of {name!r} "
                f"({s.dtype}{list(s.shape)}) into a {target.dtype}{list(target.shape)} tensor",
                key_path=name,
            )
        if not s.shape or target.numel() == 0:
            if s.shape == () and target.numel():
                self.read_into(name, target)
            return
        itemsize = _ST_ITEMSIZE[_DTYPE_TO_ST[s.dtype]]
        row = math.prod(s.shape[1:]) * itemsize
        start = self._data_start + s.start + offsets[0] * row
        whole_rows = all(o == 0 and n == d for o, n, d in zip(offsets[1:], lengths[1:], s.shape[1:]))
        if whole_rows and target.device.type == "cpu" and target.is_contiguous():
            with memoryview(tensor_byte_view(target)) as raw, raw.cast("B") as mv:
                self._pread_parallel(mv, start, name)
            return
        buf = torch.empty((lengths[0], *s.shape[1:]), dtype=s.dtype)
        with memoryview(tensor_byte_view(buf)) as raw, raw.cast("B") as mv:
            self._pread_parallel(mv, start, name)
        src = buf
        for dim in range(1, len(s.shape)):
            src = src.narrow(dim, offsets[dim], lengths[dim])
        with torch.no_grad():
            target.copy_(src)

    def read(self, name: str) -> torch.Tensor:
        """A new CPU tensor holding tensor ``name``."""
        s = self._spec(name)
        out = torch.empty(s.shape, dtype=s.dtype)
        self._readinto(s, tensor_byte_view(out))
        return out

    def _readinto(self, s: TensorSpec, view: np.ndarray) -> None:
        # Page cache -> tensor memory is one memcpy; one thread does not saturate memory bandwidth, so a large tensor is read as disjoint slices in parallel (figures:
        # benchmarks/README.md). Slices are multiples of 1 MiB.
        with memoryview(view) as raw, raw.cast("B") as mv:
            self._pread_parallel(mv, self._data_start + s.start, s.name)

    def _pread_parallel(self, mv: memoryview, off0: int, name: str) -> None:
        """Fill ``mv`` from file offset ``off0``, as parallel slices when it is large."""
        self._pread_segments([(mv, off0, name)])

    def _pread_segments(self, segs: list[tuple[memoryview, int, str]]) -> None:
        """Fill each ``(view, file offset, tensor name)`` segment. When they add up to at
        least PARALLEL_MIN_BYTES, the bytes are cut into one run per thread (at multiples of
        1 MiB of the concatenation); the caller's thread reads the first run, helper threads the
        others, and this returns once every run has landed (or failed)."""
        total = sum(len(mv) for mv, _, _ in segs)
        size = os.fstat(self._f.fileno()).st_size
        for mv, off, name in segs:
            if off + len(mv) > size:
                raise self._bad(f"tensor {name!r} is truncated (the file is {size} bytes)")
        parts = self._threads if total >= _checksums.PARALLEL_MIN_BYTES and hasattr(os, "preadv") else 1
        step = -(-total // parts)
        step += -step % (1 << 20)
        runs: list[list[tuple[memoryview, int, str]]] = [[]]
        room = step
        for mv, off, name in segs:
            pos = 0
            while pos < len(mv):
                if room == 0:
                    runs.append([])
                    room = step
                k = min(room, len(mv) - pos)
                runs[-1].append((mv[pos : pos + k], off + pos, name))
                pos += k
                room -= k
        self._run_parallel(self._pread_run, [(run,) for run in runs])

    def _pread_run(self, run: list[tuple[memoryview, int, str]]) -> None:
        if self._mapped is not None:  # verified through this mapping: copy from it
            self._mapped.copy_into([(mv, off) for mv, off, _ in run])
            return
        if _checksums.mapped_reads_ok():  # page cache -> memory through a mapping: no copy in the kernel
            try:
                _checksums.copy_ranges_mapped(self._f.fileno(), [(mv, off) for mv, off, _ in run])
            except OSError as exc:
                raise self._bad(f"tensor {run[0][2]!r} or one after it is truncated or unreadable "
                                f"({exc.strerror or exc})") from exc
            return
        for mv, off, name in run:
            self._pread_exact(mv, off, name)

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
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None
        self._f.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

