"""spotckpt as a storage layer for ``torch.distributed.checkpoint`` (DCP).

Loops that already call DCP (torchtitan-style) keep DCP's planning -- flattening, de-duplication
of replicated items, resharded loads -- and get spotckpt's commit, CRC32C, retention, S3 upload
and preemption handling by passing these::

    import torch.distributed.checkpoint as dcp
    from spotckpt.dcp import StorageReader, StorageWriter

    with spotckpt.CheckpointManager(...) as mgr:
        if mgr.latest_step() is not None:
            dcp.load(state_dict, storage_reader=StorageReader(mgr))       # newest valid step
        ...
        dcp.save(state_dict, storage_writer=StorageWriter(mgr), checkpoint_id=step)
        # or dcp.async_save(...): the same writer, DCP stages and writes in its thread

What lands is an ordinary committed ``step-*`` directory (``"layout": "dcp"`` in the manifest):
``rank-RRRRR.safetensors`` per rank, each chunk under its DCP name with the chunk's offsets and
the tensor's global size in the header (``spotckpt.shards``), the non-tensor items in
``rank-RRRRR.tree.json`` as JSON -- nothing pickled. DCP's ``.metadata`` pickle is not written:
the reader rebuilds DCP's plain-data metadata from the headers.

Commit: every rank writes its files in ``write_data`` (into its host's staging directory), the
ranks exchange their file entries over spotckpt's own gloo group, each host's leader renames the
step into place, and only then does ``write_data`` return -- so DCP's ``finish`` has nothing
left to do, and no rank sees the step before every rank's files are durable. A failure on any
rank commits nothing anywhere. Loading picks the newest step every rank can verify (local, else
S3), checks the CRC32C of every file it reads before the planner touches a live tensor -- or,
for a step only in S3, of every chunk it fetches by ranged reads (each rank its own file's in
``read_metadata``, the rest of its plan in ``read_data``, against the CRC32C each chunk's writer
recorded in the manifest-verified tree; nothing downloaded or committed locally) -- and
checks the whole read plan on every rank (chunks, shapes, coverage, non-tensor items) before
the first copy, so a refused load changes nothing. Targets may be plain tensors, DTensors or
ShardedTensors (FSDP1's ``SHARDED_STATE_DICT``), resharded as DCP plans; a dtype other than the
saved one is cast, as DCP's own reader does. The save planner's ``planner_data`` (flat key ->
path in the nested state dict) is kept as JSON and given back, so key-based and partial loads
return the nested dict.

Async: pass ``async_checkpointer_type=AsyncCheckpointerType.THREAD`` (the default); the process
executor would run the writer in another process, without this job's manager.

Threads and who calls what (every rank, as DCP calls it):

- ``StorageWriter.write_data`` runs on the thread that runs DCP's save: the training thread
  (``dcp.save``) or DCP's async thread (``dcp.async_save``). It first waits for the manager's
  pending async ``save()`` to finish on ``spotckpt-persist`` (not collective), then commits over
  the manager's ``persist`` gloo group -- the one that thread commits on. Each group has a lock,
  so two threads never run one group's collectives at once; the order of the ranks' turns is
  this rule: while a ``dcp.async_save`` through a manager is in flight, do not call that
  manager's ``save``/``maybe_save``/``adopt`` -- wait for DCP's future first (as before the next
  ``dcp.async_save``).
- ``StorageReader`` runs on the thread calling ``dcp.load`` (the training thread), over the
  ``main`` group, like ``restore()``.

Re-saving: a ``checkpoint_id`` that is already committed is not written again -- a committed
step is never replaced -- so that save does nothing and logs a warning naming the step. Give
each save a new, increasing ``checkpoint_id``.

Errors: DCP wraps whatever a storage layer raises -- spotckpt's errors included -- in its own
``CheckpointException`` (a ``BaseException``) on every rank; the message carries spotckpt's.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.futures import Future
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader as _DcpReader
from torch.distributed.checkpoint.storage import StorageWriter as _DcpWriter
from torch.distributed.checkpoint.storage import WriteResult

from spotckpt.errors import CheckpointCorruptError, ConfigError, NoCheckpointError, StateError
from spotckpt.format import FORMAT, Manifest, SafetensorsFile, data_file_names, decode_tree, encode_tree
from spotckpt.format import parse_step_dirname, parse_tree_json, write_safetensors
from spotckpt.core.layouts import CHUNK_CRCS, DCP, tensor_files
from spotckpt.core.metrics import progress_logger
from spotckpt.core.restore import RestoreOptions
from spotckpt.ranks.shard import (RemoteChunk, ShardIndex, ShardInfo, check_coverage, fetch_chunks, read_item,
                                  read_tree, recording_shards, shards_metadata)

if TYPE_CHECKING:
    from spotckpt.manager import CheckpointManager

__all__ = ["StorageWriter", "StorageReader", "LAYOUT"]

log = logging.getLogger(__name__)

#: ``manifest.json``'s ``"layout"`` of a step DCP wrote through :class:`StorageWriter`.
LAYOUT = DCP.name


def _step_of(checkpoint_id: Any) -> int | None:
    """A step from a DCP ``checkpoint_id``: an int, digits, ``step-NNN`` or a path ending in it."""
    if checkpoint_id is None:
        return None
    if isinstance(checkpoint_id, int) and not isinstance(checkpoint_id, bool) and checkpoint_id >= 0:
        return checkpoint_id
    text = os.fspath(checkpoint_id) if isinstance(checkpoint_id, (str, os.PathLike)) else None
    if text is not None:
        base = Path(text).name
        if re.fullmatch(r"\d{1,18}", base):
            return int(base)
        step = parse_step_dirname(base)
        if step is not None:
            return step
    raise ConfigError(f"checkpoint_id={checkpoint_id!r} names no step; pass the step number "
                      "(checkpoint_id=step) or a path ending in step-NNNNNNNNNNNN")


@dataclass(frozen=True)
class _Stored:
    """Where a DCP item is: the file and the name inside it (picklable: DCP gathers results)."""

    file: str
    name: str


class _StepStorage:
    """What the writer and the reader share: the manager, the step a ``checkpoint_id`` names,
    and staying in this process (DCP's process executor would pickle them away from it)."""

    def __init__(self, manager: CheckpointManager, step: int | None = None) -> None:
        super().__init__()
        self.manager = manager
        self.step = step

    def __getstate__(self) -> Any:
        raise ConfigError(f"spotckpt.dcp.{type(self).__name__} works in this process only; with dcp.async_save "
                          "use async_checkpointer_type=AsyncCheckpointerType.THREAD (the default)")

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        step = _step_of(checkpoint_id)
        if step is not None:
            self.step = step

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        try:
            return _step_of(checkpoint_id) is not None
        except ConfigError:
            return False


class StorageWriter(_StepStorage, _DcpWriter):
    """Commits what ``dcp.save`` / ``dcp.async_save`` write as step ``checkpoint_id`` of
    ``manager``'s ``local_dir`` (then uploaded, and retention applied, like any save)."""

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.manager.check_open()
        if self.step is None:
            raise ConfigError("spotckpt.dcp.StorageWriter needs a step: dcp.save(..., checkpoint_id=step) "
                              "or StorageWriter(mgr, step)")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        mgr, step = self.manager, self.step
        assert step is not None
        t0 = time.perf_counter()
        err: BaseException | None = None
        try:
            tensors, shards, items, results = self._lay_out(plan, planner)
        except BaseException as exc:  # noqa: BLE001 - every rank raises below, none waits
            err, tensors, shards, items, results = exc, {}, {}, {}, []
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        # The manager's own async save commits over the same gloo group: let it finish first,
        # so that every rank runs the two commits' collectives in the same order.
        mgr.wait_persist_idle()
        pipe = mgr.pipeline
        pipe.roll_back_before_saving(group="persist")  # after restoring an older step on purpose
        if pipe.agree_committed(step, error=err, group="persist"):  # every rank skips, or none does
            log.warning("spotckpt: step %d is already committed in %s; this dcp.save wrote nothing -- a committed "
                        "step is never replaced: give each save a new, increasing checkpoint_id", step, mgr.local_dir)
        else:
            meta = {"format": FORMAT, "step": str(step), **shards_metadata(shards)}
            tree = {"format": FORMAT, "layout": LAYOUT, "step": step, "rank": mgr.rank, "items": items}
            mapping = _planner_data_json(plan.planner_data)
            if mapping is not None:
                tree["planner_data"] = mapping
            # each chunk's byte range and CRC32C recorded in the (verified) tree, from the write's
            # own pass: a load from S3 then fetches just the chunks its plan reads, each verified
            extra = pipe.stamp(layout=LAYOUT, **{CHUNK_CRCS: True})
            write = recording_shards(tree, shards, tensors,
                                     lambda p, ranges=None: write_safetensors(p, tensors, meta, ranges=ranges))
            pipe.commit(step, lambda: pipe.write_files(step, tree, write, extra), t0=t0, nbytes=nbytes, blocking=True)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _lay_out(self, plan: SavePlan, planner: SavePlanner) -> tuple[dict[str, torch.Tensor], dict[str, ShardInfo],
                                                                       dict[str, Any], list[WriteResult]]:
        """This rank's tensors (each chunk on the CPU, by name) with their sharding, its
        non-tensor items as JSON, and DCP's write results pointing at them."""
        st_name, tree_name = data_file_names(self.manager.rank)
        tensors: dict[str, torch.Tensor] = {}
        shards: dict[str, ShardInfo] = {}
        items: dict[str, Any] = {}
        results: list[WriteResult] = []
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                if not hasattr(planner, "lookup_object"):
                    raise StateError(f"{fqn}: this planner gives non-tensor items only as pickles; use "
                                     "DefaultSavePlanner (spotckpt stores such items as JSON)", key_path=fqn)
                obj = planner.lookup_object(item.index)  # type: ignore[attr-defined]
                items[fqn] = encode_tree(obj, fqn, _no_tensors, allow_pickle=self.manager.allow_pickle)
                results.append(WriteResult(index=item.index, size_in_bytes=0, storage_data=_Stored(tree_name, fqn)))
                continue
            td = item.tensor_data
            assert td is not None
            t = planner.resolve_data(item)
            assert isinstance(t, torch.Tensor)
            name = fqn if fqn not in tensors else f"{fqn}@{','.join(map(str, td.chunk.offsets))}"
            tensors[name] = t.detach().contiguous().cpu()
            shards[name] = ShardInfo(tuple(td.size), tuple(td.chunk.offsets), None if name == fqn else fqn)
            results.append(WriteResult(index=item.index, size_in_bytes=t.numel() * t.element_size(),
                                       storage_data=_Stored(st_name, name)))
        return tensors, shards, items, results

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Nothing left: ``write_data`` committed the step on every host before returning."""


def _planner_data_json(data: Any) -> dict[str, list[str | int]] | None:
    """DCP's ``planner_data`` of a save plan as JSON: ``DefaultSavePlanner`` hands the mapping
    of each flat key to its path in the nested state dict (``"model.w" -> ("model", "w")``),
    which key-based and partial loads need back. None when there is none; anything else (a
    custom planner's) is not kept, with a warning -- spotckpt pickles nothing."""
    if data is None:
        return None
    if isinstance(data, dict) and all(
            isinstance(k, str) and isinstance(v, (tuple, list))
            and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v) for k, v in data.items()):
        return {k: list(v) for k, v in data.items()}
    log.warning("spotckpt: the save planner's planner_data (%s) is not a mapping of flat keys to paths; not kept "
                "(loads by key will see flat keys)", type(data).__name__)
    return None


def _planner_data_of(doc: dict[str, Any], where: str) -> dict[str, tuple[str | int, ...]]:
    """The flat-key mapping a rank's tree file holds (empty for steps written before it was kept)."""
    raw = doc.get("planner_data", {})
    if not isinstance(raw, dict) or not all(
            isinstance(v, list) and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v)
            for v in raw.values()):
        raise CheckpointCorruptError(f"{where}: malformed planner_data; the checkpoint is damaged", path=where)
    return {k: tuple(v) for k, v in raw.items()}


def _no_tensors(path: str, t: torch.Tensor) -> str:
    raise StateError(f"{path}: a tensor inside a non-tensor DCP item; put it at the top level of the "
                     "state dict", key_path=path)


class StorageReader(_StepStorage, _DcpReader):
    """Loads, for ``dcp.load``, the newest step of ``manager`` that every rank can verify (or
    step ``checkpoint_id``), written by :class:`StorageWriter`; resharding onto the current
    world size and mesh is DCP's. Raises :class:`~spotckpt.NoCheckpointError` when there is
    none (check ``mgr.latest_step()`` first)."""

    def __init__(self, manager: CheckpointManager, step: int | None = None) -> None:
        super().__init__(manager, step)
        self.loaded_step: int | None = None
        self._stack = ExitStack()
        self._index: ShardIndex | None = None
        self._items: dict[str, Any] = {}
        self._planner_data: dict[str, tuple[str | int, ...]] = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        mgr = self.manager
        mgr.check_open()
        self._stack.close()
        res = mgr.pipeline.restore(None, RestoreOptions(step=self.step, verify=mgr.verify_on_restore,
                                                        progress=progress_logger(), loader=self._open_step,
                                                        ranged_loader=self._open_ranged))
        if res is None or self._index is None:
            raise NoCheckpointError(f"no checkpoint in {mgr.local_dir}" + (f" or {mgr.s3_uri}" if mgr.s3_uri else "")
                                    + "; start fresh instead of calling dcp.load")
        self.loaded_step = res.step
        md = self._index.metadata
        storage = dict(self._index.where)
        for fqn, (tree, _) in self._items.items():
            md.state_dict_metadata[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = ("bytes", tree)
        return Metadata(state_dict_metadata=md.state_dict_metadata, storage_data=storage,
                        planner_data=dict(self._planner_data) if self._planner_data else None)

    def _open_step(self, step_dir: Path, manifest: Manifest, rank: int) -> None:
        """restore's loader: open the chosen (verified) step's files and index them."""
        self._open(step_dir, manifest, None, frozenset(manifest.files))

    def _open_ranged(self, step_dir: Path, manifest: Manifest, rank: int, remote: Any,
                     local_files: frozenset[str]) -> None:
        """restore's loader for a step in S3 that records its chunks' CRC32C: the trees (verified
        against the manifest) and the chunks of the files this rank is assigned -- its own, with
        the saved number of ranks -- are fetched and verified now, so that damage found there
        moves every rank to an older step; the files in ``local_files`` are read locally. Other
        chunks the plan reads are fetched, verified, by :meth:`read_data` before any copy."""
        self._open(step_dir, manifest, remote, local_files)
        assert self._index is not None
        world = max(1, int(getattr(self.manager, "world_size", 1)))
        files = tensor_files(manifest)
        mine = {f for i, f in enumerate(files) if i % world == rank % world}
        try:
            fetch_chunks(c for c in self._index.where.values() if isinstance(c, RemoteChunk) and c.file in mine)
        except BaseException:
            self._index.release()
            self._stack.close()
            self._index = None
            raise

    def _open(self, step_dir: Path, manifest: Manifest, remote: Any, local_files: frozenset[str]) -> None:
        """Index the step: headers of the files in ``local_files`` (verified), chunk records of
        the trees of the others (from ``remote``, verified against the manifest)."""
        DCP.require(manifest, step_dir)
        stack = ExitStack()
        try:
            readers: dict[str, SafetensorsFile] = {}
            ranged: list[tuple[Any, int, str, Any]] = []
            docs: dict[str, Any] = {}
            for f in tensor_files(manifest):
                tree_name = f.removesuffix(".safetensors") + ".tree.json"
                if f in local_files:
                    readers[f] = stack.enter_context(SafetensorsFile(step_dir / f))
                else:
                    if remote is None:
                        raise CheckpointCorruptError(f"{step_dir}: {f} is missing", path=step_dir / f)
                    docs[tree_name] = doc = read_tree(step_dir, manifest, f, remote, local_files)
                    ranged.append((remote, manifest.step, f, doc.get("shards") or {}))
            items: dict[str, Any] = {}
            planner_data: dict[str, tuple[str | int, ...]] = {}
            for f in sorted(manifest.files):
                if f.startswith("rank-") and f.endswith(".tree.json"):
                    where = str(step_dir / f) if f in local_files else f"{getattr(remote, 'uri', '?')}: {f}"
                    doc = docs.get(f)
                    if doc is None:
                        doc = read_tree(step_dir, manifest, f.removesuffix(".tree.json") + ".safetensors", remote,
                                        local_files)
                    try:
                        for fqn, enc in doc["items"].items():
                            items[fqn] = (enc, where)
                    except (KeyError, TypeError, AttributeError) as exc:
                        raise CheckpointCorruptError(f"{where}: not a DCP item file ({exc})", path=where) from exc
                    for k, v in _planner_data_of(doc, where).items():
                        planner_data.setdefault(k, v)  # the lowest rank's first, as DCP merges them
            index = ShardIndex(readers, ranged)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        self._index, self._items, self._planner_data = index, items, planner_data

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Every check first -- each stored chunk exists and holds the box, each destination has
        the box's shape and takes the stored dtype, the chunks cover every tensor, each
        non-tensor item decodes -- on every rank (one exchange), and only then the copies: a
        refusal anywhere leaves every live tensor and value as it was. A dtype differing from
        the saved one is cast, as DCP's own FileSystemReader does (``Tensor.copy_``)."""
        mgr = self.manager
        assert self._index is not None
        try:
            err: BaseException | None = None
            objs: list[tuple[Any, bytes]] = []
            jobs: list[tuple[Any, Any, torch.Tensor]] = []
            try:
                objs, jobs = self._checked(plan, planner)
            except BaseException as exc:  # noqa: BLE001 - every rank raises below, none copies
                err = exc
            mgr.pipeline.agree_ok("dcp: read checked", err)
            for item, data in objs:
                planner.load_bytes(item, io.BytesIO(data))
            for loc, item, dest in jobs:
                read_item(loc, item, planner, dest)
        finally:
            self._index.release()
            self._stack.close()
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _checked(self, plan: LoadPlan, planner: LoadPlanner) -> tuple[list[tuple[Any, bytes]],
                                                                       list[tuple[Any, Any, torch.Tensor]]]:
        """The read, checked and resolved, nothing written: the non-tensor items (DCP's planner
        takes them in ``torch.save`` form, made here from JSON) and the tensor boxes with their
        destinations."""
        assert self._index is not None
        objs: list[tuple[Any, bytes]] = []
        jobs: list[tuple[Any, Any, torch.Tensor]] = []
        casts: list[str] = []
        for item in plan.items:
            fqn = item.dest_index.fqn
            if item.type == LoadItemType.BYTE_IO:
                got = self._items.get(item.storage_index.fqn)
                if got is None:
                    raise CheckpointCorruptError(f"no stored item {item.storage_index.fqn!r}; the checkpoint is damaged")
                enc, source = got
                obj = decode_tree(enc, _no_stored_tensor, source=source, allow_pickle=self.manager.allow_pickle)
                buf = io.BytesIO()
                torch.save(obj, buf)
                objs.append((item, buf.getvalue()))
                continue
            loc = self._index.where.get(item.storage_index)
            if loc is None:
                raise CheckpointCorruptError(f"no stored chunk for {item.storage_index}; the checkpoint is damaged")
            offsets, lengths = tuple(item.storage_offsets), tuple(item.lengths)
            if len(offsets) != len(loc.shape) or any(o < 0 or o + n > d for o, n, d in zip(offsets, lengths, loc.shape)):
                raise CheckpointCorruptError(f"{fqn}: the box at {list(offsets)} of size {list(lengths)} is not inside "
                                             f"its stored chunk {list(loc.shape)}; the checkpoint is damaged")
            dest = planner.resolve_tensor(item).detach()
            if tuple(dest.shape) != lengths:
                raise StateError(f"{fqn}: the planner wants {list(lengths)} elements of the saved chunk in a "
                                 f"{list(dest.shape)} tensor; load into a tensor of the saved shape", key_path=fqn)
            if dest.dtype != loc.dtype:
                if not _castable(loc.dtype, dest.dtype):
                    raise StateError(f"{fqn}: saved as {loc.dtype}, which torch cannot copy into the live "
                                     f"{dest.dtype} tensor; load into a {loc.dtype} tensor", key_path=fqn)
                casts.append(f"{fqn} ({loc.dtype} -> {dest.dtype})")
            jobs.append((loc, item, dest))
        _check_coverage(plan, planner)
        remote = [loc for loc, _, _ in jobs if isinstance(loc, RemoteChunk)]
        try:  # what the plan reads from S3 beyond what read_metadata fetched: verified before any copy
            fetch_chunks(remote)
        except CheckpointCorruptError as exc:
            why = str(exc).removesuffix(" -- an older step will be used")
            raise CheckpointCorruptError(f"{why}; nothing was loaded -- load an older step (StorageReader(mgr, "
                                         "step=...)) or repair this one", path=exc.path) from exc
        if casts:
            log.info("spotckpt: dcp.load casts %d saved tensor chunk(s) to the live dtype, e.g. %s",
                     len(casts), casts[0])
        return objs, jobs


def _check_coverage(plan: LoadPlan, planner: LoadPlanner) -> None:
    """Before the first byte lands: the saved chunks cover every tensor this rank loads."""
    targets = getattr(planner, "state_dict", None)
    if not isinstance(targets, dict):
        return  # a custom planner: nothing to check against
    read = {item.dest_index.fqn for item in plan.items if item.type != LoadItemType.BYTE_IO}
    check_coverage(plan.items, {fqn: targets[fqn] for fqn in read if fqn in targets})


@functools.cache
def _castable(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether ``Tensor.copy_`` (what DCP's own reader copies with) takes ``src`` into ``dst``."""
    try:
        torch.zeros(1, dtype=dst).copy_(torch.zeros(1, dtype=src))
    except (RuntimeError, TypeError):
        return False
    return True


def _no_stored_tensor(name: str) -> torch.Tensor:
    raise CheckpointCorruptError(f"a DCP item refers to tensor {name!r}; the checkpoint is damaged")

