"""Sharded tensors (DTensor, as FSDP2 and other DTensor parallelism hold them): what each rank
writes of them, and the resharding read that puts a saved step onto another mesh.

Saving: each rank writes only its local shard of a DTensor (``to_local()``), named like any
other tensor of the state, in its own ``rank-RRRRR.safetensors``; a DTensor replicated over
some mesh dimensions is written once, by the replica at coordinate 0 of those dimensions. The
file's ``__metadata__`` entry ``spotckpt.shards`` maps each such name to the tensor's global
size and the shard's offsets -- the sharding information, pickle-free (DCP's safetensors layout
keeps it in the header the same way).

Restoring: :class:`ShardIndex` rebuilds DCP's plain-data :class:`Metadata` (tensor sizes, chunks)
from those headers; DCP's own load planner (``DefaultLoadPlanner``) turns it and the live
tensors (DTensors of any mesh, or plain full tensors) into read items; this module checks every
live tensor is fully covered by saved chunks and then copies just the needed boxes out of the
files (:meth:`spotckpt.format.SafetensorsFile.read_box_into`). Every check runs before the first
byte lands in a live tensor.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spotckpt.errors import CheckpointCorruptError, StateError
from spotckpt.format import (MAX_JSON_BYTES, FileEntry, Manifest, SafetensorsFile, crc32c_b64, crc32c_update,
                             parse_tree_json, tensor_byte_view)
from spotckpt.format.safetensors import _DTYPE_TO_ST, _ST_TO_DTYPE

__all__ = ["SHARDS_KEY", "ShardInfo", "ShardIndex", "LocalChunk", "RemoteChunk", "is_dtensor", "local_shard",
           "load_boxes", "init_optimizer_state", "recording_shards", "fetch_chunks", "read_tree"]

#: The safetensors ``__metadata__`` key holding the sharding information of a file's shards.
SHARDS_KEY = "spotckpt.shards"


_DTENSOR: list[type] = []  # the DTensor class, once its module is imported


def _dtensor_cls() -> type | None:
    """DTensor, looked up without importing anything: a state can hold a DTensor only once its
    module is imported, and importing it on the training thread cost the first save ~0.8 s."""
    if not _DTENSOR:
        for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
            cls = getattr(sys.modules.get(name), "DTensor", None)
            if isinstance(cls, type):
                _DTENSOR.append(cls)
                break
        else:
            return None
    return _DTENSOR[0]


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


@functools.cache
def _sharded_tensor_cls() -> type | None:
    try:
        from torch.distributed._shard.sharded_tensor import ShardedTensor
    except ImportError:  # a torch without it
        return None
    return ShardedTensor


def local_numel(t: Any) -> int:
    """Elements this rank holds of ``t``: its shard's for a DTensor, its local shards' for a
    ShardedTensor (FSDP1's SHARDED_STATE_DICT), the chunks it reports for another subclass DCP's
    planner plans by chunks (``__create_chunk_list__``), all of a plain tensor. (``numel()`` of
    a ShardedTensor is refused by torch.)"""
    if is_dtensor(t):
        return t.to_local().numel()
    st = _sharded_tensor_cls()
    if st is not None and isinstance(t, st):
        return sum(s.tensor.numel() for s in t.local_shards())
    if hasattr(t, "__create_chunk_list__"):
        return sum(math.prod(c.sizes) for c in t.__create_chunk_list__())
    return t.numel()


@dataclass(frozen=True)
class ShardInfo:
    """One rank's chunk of a global tensor: the global size and where the chunk starts;
    ``fqn``: the tensor's name when it is not the stored name (a rank holding several chunks
    of one tensor stores them under distinct names)."""

    size: tuple[int, ...]
    offsets: tuple[int, ...]
    fqn: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"size": list(self.size), "offsets": list(self.offsets)}
        if self.fqn is not None:
            doc["fqn"] = self.fqn
        return doc


def local_shard(t: Any, path: str) -> tuple[torch.Tensor, ShardInfo, bool]:
    """``(local tensor, sharding info, whether this rank writes it)`` of DTensor ``t``. Replicas
    other than the first on a replicated mesh dimension do not write; neither does a rank
    whose shard is empty. A partial (unreduced) DTensor is refused.

    Runs for every DTensor of every save on the training thread, so the layout is worked out
    once per distinct DTensor spec (mesh, placements, shape, stride, dtype) and cached."""
    spec = getattr(t, "_spec", None)
    try:
        hit = _LAYOUTS.get(spec) if spec is not None else None
    except TypeError:  # an unhashable spec
        spec, hit = None, None
    if hit is None:
        hit = _layout(t, path)
        if spec is not None and hit[3]:
            if len(_LAYOUTS) >= _LAYOUTS_MAX:
                _LAYOUTS.clear()
            _LAYOUTS[spec] = hit
    info, first_replica, want, _ = hit
    local = getattr(t, "_local_tensor", None)
    if local is None:
        with torch.no_grad():
            local = t.to_local()
    if want is not None and tuple(local.shape) != want:
        raise StateError(f"{path}: the local shard is {list(local.shape)} but its placement says "
                         f"{list(want)}; padded shards are not supported", key_path=path)
    return local, info, first_replica and local.numel() > 0


#: DTensor spec -> (sharding info, first replica, local shape, cacheable): the layout is a pure
#: function of the spec in this process; torch computes it in ~25 us, a lookup takes ~1 us.
_LAYOUTS: dict[Any, tuple[ShardInfo, bool, tuple[int, ...] | None, bool]] = {}
_LAYOUTS_MAX = 8192


def _layout(t: Any, path: str) -> tuple[ShardInfo, bool, tuple[int, ...] | None, bool]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(t.placements)
    if any(p.is_partial() for p in placements):
        raise StateError(f"{path}: a Partial DTensor holds unreduced values; reduce it (redistribute "
                         "to Shard/Replicate) before checkpointing", key_path=path)
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:  # this rank is not in the tensor's mesh
        return ShardInfo(tuple(t.shape), (0,) * t.dim()), False, None, True
    shape, offsets = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    cacheable = all(type(c) is int for c in coord)  # not symbolic (simulated ranks)
    first_replica = all(c == 0 for c, p in zip(coord, placements) if not p.is_shard())
    info = ShardInfo(tuple(int(d) for d in t.shape), tuple(int(o) for o in offsets))
    return info, first_replica, tuple(int(d) for d in shape), cacheable


def shards_metadata(shards: Mapping[str, ShardInfo]) -> dict[str, str]:
    """The safetensors ``__metadata__`` entry for a file holding ``shards`` (the last one is
    kept: a loop saves the same shards every time, and the ShardInfo objects are the cached
    ones, so the comparison is one identity check per shard)."""
    global _LAST_METADATA
    items = list(shards.items())
    last = _LAST_METADATA  # one read: another thread (DCP's writer) may replace it meanwhile
    if last is not None and last[0] == items:
        return dict(last[1])
    doc = {SHARDS_KEY: json.dumps({k: v.to_json() for k, v in items}, separators=(",", ":"))}
    _LAST_METADATA = (items, doc)
    return dict(doc)


_LAST_METADATA: tuple[list[Any], dict[str, str]] | None = None


def recording_shards(tree: dict[str, Any], shards: Mapping[str, ShardInfo], tensors: Mapping[str, torch.Tensor],
                     write: Callable[..., FileEntry]) -> Callable[[Any], FileEntry]:
    """``write(path)`` that also records, in the rank's tree (``tree["shards"]``), each shard's
    sharding, byte range in the file and CRC32C -- from the write's own pass. The tree is
    verified with the manifest, so a restore can fetch just the ranges it needs (ranged GETs)
    and verify each one."""
    if not shards:
        return write

    def run(path: Any) -> FileEntry:
        ranges: dict[str, Any] = dict.fromkeys(shards)
        entry = write(path, ranges=ranges)
        tree["shards"] = {n: {**shards[n].to_json(), "dtype": _DTYPE_TO_ST[tensors[n].dtype],
                              "shape": list(tensors[n].shape), "bytes": [r[0], r[1]], "crc32c": r[2]}
                          for n, r in ranges.items()}
        return entry

    return run


def _parse_shards(reader: SafetensorsFile) -> dict[str, ShardInfo]:
    raw = reader.metadata.get(SHARDS_KEY)
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
        out = {}
        for name, ent in doc.items():
            spec = reader.specs.get(name)
            if spec is None:
                raise ValueError(f"shard {name!r} is not in the file")
            out[name] = _shard_info(name, ent, spec.shape)
        return out
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointCorruptError(f"{reader.path}: malformed {SHARDS_KEY} header ({exc}); the checkpoint "
                                     "is damaged -- an older step will be used", path=reader.path) from exc


def _shard_info(name: str, ent: Mapping[str, Any], shape: tuple[int, ...]) -> ShardInfo:
    """A shard record (header or tree) checked against the stored chunk's ``shape``: the
    chunk lies inside the global size. ValueError (the caller's corruption) otherwise."""
    size, offsets = tuple(int(x) for x in ent["size"]), tuple(int(x) for x in ent["offsets"])
    fqn = ent.get("fqn")
    if fqn is not None and not isinstance(fqn, str):
        raise ValueError(f"shard {name!r} has a non-string fqn")
    if len(size) != len(offsets) or len(size) != len(shape) or any(
            o < 0 or o + n > d for o, n, d in zip(offsets, shape, size)):
        raise ValueError(f"shard {name!r} does not fit its tensor")
    return ShardInfo(size, offsets, fqn)


class LocalChunk:
    """A saved chunk in a local (verified) safetensors file."""

    def __init__(self, reader: SafetensorsFile, name: str) -> None:
        self.reader, self.name = reader, name
        spec = reader.specs[name]
        self.dtype, self.shape = spec.dtype, tuple(spec.shape)

    def read_box(self, offsets: tuple[int, ...], lengths: tuple[int, ...], dest: torch.Tensor) -> None:
        self.reader.read_box_into(self.name, offsets, lengths, dest)


class RemoteChunk:
    """A saved chunk of a file this host does not have: fetched with one ranged read of its
    bytes from ``source`` (S3), checked against the CRC32C its writer recorded in its (verified)
    tree, kept for the other boxes of the same chunk until :meth:`release`."""

    def __init__(self, source: Any, step: int, file: str, name: str, ent: Mapping[str, Any]) -> None:
        self.source, self.step, self.file, self.name = source, step, file, name
        self.start, self.end = int(ent["bytes"][0]), int(ent["bytes"][1])
        self.crc32c = str(ent["crc32c"])
        self.dtype = _ST_TO_DTYPE[ent["dtype"]]
        self.shape = tuple(int(d) for d in ent["shape"])
        if self.end - self.start != math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size():
            raise ValueError(f"shard {name!r}: its byte range does not match its shape")
        self._data: torch.Tensor | None = None

    def _verify(self, raw: Any) -> None:
        got = crc32c_b64(crc32c_update(0, raw))
        if got != self.crc32c:
            raise CheckpointCorruptError(
                f"{self.source.uri}: bytes {self.start}-{self.end - 1} of {self.file} (shard {self.name!r}) have "
                f"CRC32C {got}, its writer recorded {self.crc32c}; the checkpoint is damaged -- an older step "
                "will be used", path=self.file)

    def _keep(self, buf: bytearray, offset: int) -> None:
        """Keep the (verified) bytes at ``offset`` of ``buf`` as this chunk's tensor, a view
        where they are aligned for its dtype, else a copy."""
        n = self.end - self.start
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        if n == 0:
            self._data = torch.empty(self.shape, dtype=self.dtype)
        elif offset % itemsize == 0:
            self._data = torch.frombuffer(buf, dtype=self.dtype, count=n // itemsize, offset=offset).reshape(self.shape)
        else:
            self._data = torch.frombuffer(bytearray(buf[offset : offset + n]), dtype=self.dtype).reshape(self.shape)

    def _fetch(self) -> torch.Tensor:
        if self._data is None:
            fetch_chunks([self], threads=1)
        assert self._data is not None
        return self._data

    def read_box(self, offsets: tuple[int, ...], lengths: tuple[int, ...], dest: torch.Tensor) -> None:
        src = self._fetch()
        for dim, (o, n) in enumerate(zip(offsets, lengths)):
            src = src.narrow(dim, o, n)
        if (dest.device.type == "cpu" and dest.dtype == src.dtype and dest.is_contiguous() and src.is_contiguous()
                and dest.shape == src.shape):
            # one memcpy on this thread (the GIL released), not torch's thread pool spinning beside it
            np.copyto(tensor_byte_view(dest), tensor_byte_view(src))
        else:
            dest.copy_(src)

    def release(self) -> None:
        self._data = None


#: Chunks of one file at most this far apart are fetched by one ranged read (the gap too).
FETCH_GAP_BYTES = 256 * 1024
#: One ranged read fetches at most this much; a longer run of chunks is cut into such pieces,
#: fetched in parallel into one buffer.
FETCH_PIECE_BYTES = 16 * 1024 * 1024


def fetch_chunks(chunks: Iterable[RemoteChunk], threads: int = 8) -> None:
    """Fetch and verify each of ``chunks`` not fetched yet, then keep its bytes. Chunks that lie
    (nearly) next to each other in one file are fetched as one run of ranged reads of at most
    :data:`FETCH_PIECE_BYTES`, ``threads`` reads at a time, read straight into one buffer per
    run (the source's ``read_range_into``); each chunk is then checked against
    its own recorded CRC32C. Returns once every read has ended, raising the first error
    (CheckpointCorruptError for a chunk that does not verify) with no chunk kept from a run
    that failed."""
    todo = list({id(c): c for c in chunks if c._data is None}.values())
    if not todo:
        return
    todo.sort(key=lambda c: (id(c.source), c.step, c.file, c.start))
    runs: list[list[RemoteChunk]] = []
    for c in todo:
        last = runs[-1][-1] if runs else None
        if (last is not None and (last.source, last.step, last.file) == (c.source, c.step, c.file)
                and 0 <= c.start - last.end <= FETCH_GAP_BYTES):
            runs[-1].append(c)
        else:
            runs.append([c])
    bufs = [bytearray(run[-1].end - run[0].start) for run in runs]
    pieces = [(run, buf, off, min(FETCH_PIECE_BYTES, len(buf) - off))
              for run, buf in zip(runs, bufs) for off in range(0, len(buf), FETCH_PIECE_BYTES)]

    def fetch(run: list[RemoteChunk], buf: bytearray, off: int, n: int) -> None:
        c = run[0]
        with memoryview(buf) as mv, mv[off : off + n] as out:
            c.source.read_range_into(c.step, c.file, c.start + off, out)

    def check(run: list[RemoteChunk], buf: bytearray) -> None:
        with memoryview(buf) as mv:
            for c in run:
                with mv[c.start - run[0].start : c.end - run[0].start] as part:
                    c._verify(part)

    run_all(fetch, pieces, threads)
    run_all(check, list(zip(runs, bufs)), threads)
    for run, buf in zip(runs, bufs):
        for c in run:
            c._keep(buf, c.start - run[0].start)


def run_all(fn: Callable[..., Any], args: list[tuple[Any, ...]], threads: int) -> list[Any]:
    """``[fn(*a) for a in args]``, ``threads`` at a time; every call has ended before the first
    error is raised."""
    if len(args) <= 1 or threads <= 1:
        return [fn(*a) for a in args]
    with ThreadPoolExecutor(min(threads, len(args)), thread_name_prefix="spotckpt-fetch") as pool:
        futs = [pool.submit(fn, *a) for a in args]
        for f in futs:
            f.exception()
        return [f.result() for f in futs]


def read_tree(step_dir: Any, manifest: Manifest, st_name: str, remote: Any,
             local_files: Collection[str] | None) -> dict[str, Any]:
    """The tree of the rank that wrote ``st_name``: the local copy when verified (in
    ``local_files``), else fetched from ``remote`` and checked against the manifest."""
    tree_name = st_name.removesuffix(".safetensors") + ".tree.json"
    entry = manifest.files.get(tree_name)
    if entry is None:
        raise CheckpointCorruptError(f"{step_dir}: manifest lists {st_name} but no {tree_name}", path=step_dir)
    if (step_dir / tree_name).exists() and local_files is not None and tree_name in local_files:
        return parse_tree_json((step_dir / tree_name).read_bytes(), str(step_dir / tree_name))
    if entry.size > MAX_JSON_BYTES:
        raise CheckpointCorruptError(f"{tree_name}: tree file is too large", path=tree_name)
    raw = remote.read_range(manifest.step, tree_name, 0, entry.size)
    if FileEntry(len(raw), crc32c_b64(crc32c_update(0, raw))) != entry:
        raise CheckpointCorruptError(f"{remote.uri}: {tree_name} of step {manifest.step} does not match the "
                                     "manifest; the checkpoint is damaged", path=tree_name)
    return parse_tree_json(raw, f"{remote.uri}: {tree_name}")


class ShardIndex:
    """Every saved chunk of every sharded tensor of a step, as DCP :class:`Metadata` plus where
    each chunk is: from the headers of local files (``readers``), and from the verified trees
    of files that are only in S3 (``remote``: ``(source, step, file, tree["shards"])``)."""

    def __init__(self, readers: Mapping[str, SafetensorsFile],
                 remote: list[tuple[Any, int, str, Mapping[str, Any]]] = ()) -> None:  # type: ignore[assignment]
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex

        self._md: dict[str, Any] = {}
        self.where: dict[Any, Any] = {}

        def add(name: str, info: ShardInfo, dtype: torch.dtype, shape: tuple[int, ...], chunk: Any, where: str) -> None:
            from torch.distributed.checkpoint.metadata import TensorProperties, TensorStorageMetadata

            fqn = info.fqn or name
            ent = self._md.get(fqn)
            if ent is None:
                ent = self._md[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(info.size), [])
            elif tuple(ent.size) != info.size or ent.properties.dtype != dtype:
                raise CheckpointCorruptError(
                    f"{where}: shard of {name!r} says {dtype}{list(info.size)}, another file "
                    f"{ent.properties.dtype}{list(ent.size)}; the checkpoint is damaged", path=where)
            ent.chunks.append(ChunkStorageMetadata(torch.Size(info.offsets), torch.Size(shape)))
            self.where[MetadataIndex(fqn, torch.Size(info.offsets))] = chunk

        for fname in sorted(readers):
            reader = readers[fname]
            for name, info in _parse_shards(reader).items():
                spec = reader.specs[name]
                add(name, info, spec.dtype, spec.shape, LocalChunk(reader, name), reader.path)
        for source, step, fname, doc in remote:
            try:
                for name, ent in doc.items():
                    chunk = RemoteChunk(source, step, fname, name, ent)
                    add(name, _shard_info(name, ent, chunk.shape), chunk.dtype, chunk.shape, chunk, fname)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise CheckpointCorruptError(f"{fname}: malformed shard record in its tree ({exc}); the checkpoint "
                                             "is damaged -- an older step will be used", path=fname) from exc
        self.metadata = Metadata(state_dict_metadata=dict(self._md))

    def release(self) -> None:
        """Drop the bytes of fetched remote chunks."""
        for chunk in self.where.values():
            if isinstance(chunk, RemoteChunk):
                chunk.release()

    def names(self) -> set[str]:
        return set(self.metadata.state_dict_metadata)


def load_boxes(targets: Mapping[str, torch.Tensor], index: ShardIndex) -> int:
    """Fill each live tensor of ``targets`` (name -> DTensor or plain tensor) from the saved
    chunks that overlap it, planned by DCP's ``DefaultLoadPlanner``. Every size, dtype and the
    full coverage of each target are checked first; nothing is written when one fails (a
    :class:`StateError` naming the tensor). Returns the bytes copied."""
    return plan_boxes(targets, index)()


def plan_boxes(targets: Mapping[str, torch.Tensor], index: ShardIndex) -> Callable[[], int]:
    """The checks of :func:`load_boxes` (sizes, dtypes, coverage; remote chunks fetched and
    verified), returning the copy to run once every other check of a restore passed too."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    # an empty local shard (more ranks than rows) needs nothing, and no rank wrote it
    targets = {n: t for n, t in targets.items() if local_numel(t) > 0}
    for name, t in sorted(targets.items()):
        saved = index.metadata.state_dict_metadata.get(name)
        if saved is None:
            raise CheckpointCorruptError(f"no saved shard of {name!r} in this step; the checkpoint is incomplete")
        if tuple(saved.size) != tuple(t.shape) or saved.properties.dtype != t.dtype:
            raise StateError(
                f"{name}: saved as {saved.properties.dtype}{list(saved.size)}, the live tensor is "
                f"{t.dtype}{list(t.shape)}; build the model/optimizer as when it was saved (the mesh "
                "may differ: resharding handles that)", key_path=name)
    planner = DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    planner.set_up_planner(dict(targets), index.metadata, False)
    try:
        plan = planner.create_local_plan()
    except (RuntimeError, ValueError) as exc:
        raise StateError(f"cannot plan the resharded read: {exc}") from exc
    check_coverage(plan.items, targets)
    jobs = []
    for item in plan.items:
        loc = index.where.get(item.storage_index)
        if loc is None:
            raise CheckpointCorruptError(f"no stored chunk for {item.storage_index}; the checkpoint is damaged")
        jobs.append((loc, item))
    # Remote chunks are fetched and verified before the first byte lands in a live tensor.
    fetch_chunks(loc for loc, _ in jobs if isinstance(loc, RemoteChunk))

    def run() -> int:
        try:
            return sum(read_item(loc, item, planner) for loc, item in jobs)
        finally:
            index.release()

    return run


def check_coverage(items: list[Any], targets: Mapping[str, Any]) -> None:
    """Before the first byte lands: the read items cover every element this rank holds of each
    tensor among ``targets`` that they read into (CheckpointCorruptError naming it)."""
    from torch.distributed.checkpoint.planner import LoadItemType

    covered: dict[str, int] = {}
    for item in items:
        if item.type != LoadItemType.BYTE_IO:
            covered[item.dest_index.fqn] = covered.get(item.dest_index.fqn, 0) + math.prod(item.lengths)
    for name, t in targets.items():
        if not isinstance(t, torch.Tensor):
            continue
        need = local_numel(t)
        if covered.get(name, 0) != need:
            raise CheckpointCorruptError(
                f"the saved shards of {name!r} cover {covered.get(name, 0)} of the {need} elements this rank "
                "needs; the checkpoint is incomplete -- an older step will be used")


def read_item(chunk: LocalChunk | RemoteChunk, item: Any, planner: Any, dest: torch.Tensor | None = None) -> int:
    """Copy one DCP read item (a box of a stored chunk) into ``dest`` (by default the tensor
    the planner resolves it to), cast to its dtype as ``Tensor.copy_`` does, and commit it;
    returns the bytes copied."""
    with torch.no_grad():
        if dest is None:
            dest = planner.resolve_tensor(item)
        if dest.device.type == "cpu" and dest.dtype == chunk.dtype:
            chunk.read_box(tuple(item.storage_offsets), tuple(item.lengths), dest)
        else:
            tmp = torch.empty(tuple(item.lengths), dtype=chunk.dtype)
            chunk.read_box(tuple(item.storage_offsets), tuple(item.lengths), tmp)
            dest.copy_(tmp)
        planner.commit_tensor(item, dest)
    return dest.numel() * dest.element_size()


def init_optimizer_state(optim: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its state tensors (the layout resharded values are read into),
    as ``torch.distributed.checkpoint.state_dict.set_state_dict`` does: one step with zero
    gradients and a learning rate of 0. No-op when it has state already."""
    if optim.state:
        return
    try:
        from torch.distributed.checkpoint.state_dict import _init_optim_state
    except ImportError as exc:  # pragma: no cover - present from torch 2.2 on
        raise StateError("this torch cannot initialise optimizer state; run one optimizer step before "
                         "restore()") from exc
    _init_optim_state(optim)
