"""Choose the newest valid checkpoint (local, else S3), download it if needed, verify, load.

Order of candidates: every committed step, local or remote, newest first. A local step is used
when it verifies (sizes and CRC32C of every file by default); otherwise -- or when it exists only
in S3 -- the S3 copy is read into memory, verified piece by piece, loaded, and committed locally
afterwards off the training thread (:mod:`spotckpt.core.fetch`); a step too large for memory, or
going to another loader, or chosen by several ranks, is downloaded into staging, verified,
committed locally and then loaded. A step that fails anywhere is skipped with a warning naming the
file, and the next older one is tried.

Verification ends before anything is loaded, so a damaged step never leaves the live state
half-overwritten. A local step loaded into a state is verified while it is read (the tensor file
mapped once: checksummed, then copied from; :func:`load_step`); a step handed to another loader,
or chosen by several ranks together, is checksummed first and read after.

One process here (:func:`restore_newest`); several ranks agree on their step in
:mod:`spotckpt.core.restore_ranks`, with this module's file checks and load plans.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, MutableMapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spotckpt.errors import AllStepsCorruptError, CheckpointCorruptError, ConfigError, NoCheckpointError
from spotckpt.format import FileEntry, Manifest, SafetensorsFile, crc32c_b64, crc32c_update, data_file_names, parse_tree_json
from spotckpt.core.layouts import CHUNK_CRCS, STATE, layout_of, saved_world_size, tensor_files
from spotckpt.core.fetch import load_from_memory
from spotckpt.core.local import COMMITTED, DAMAGED, LocalStore, verify_files
from spotckpt.ranks.shard import ShardIndex, read_tree
from spotckpt.core.protocols import RemoteStore
from spotckpt.core.torch_state import LoadPlan, prepare_load

__all__ = ["RestoreOptions", "RestoreResult", "load_step", "restore_newest", "raise_if_all_bad", "prepare_files",
           "note_reshard"]

log = logging.getLogger(__name__)


#: ``loader(step_dir, manifest, rank)``: what a restore does with the verified step it chose
#: instead of loading it into ``state`` (the DCP reader's index, an adopted folder's check);
#: a CheckpointCorruptError moves on to an older step.
StepLoader = Callable[[Path, Manifest, int], None]

#: ``ranged_loader(step_dir, manifest, rank, remote, local_files)``: a loader that reads what
#: ``local_files`` (the files of ``step_dir`` verified on this host; no other local file may be
#: read) lacks straight from ``remote``, as ranged reads each checked against the CRC32C the
#: step's verified trees record (:data:`~spotckpt.core.layouts.CHUNK_CRCS`) before any byte is
#: used. Used instead of downloading a step that records them; nothing is committed locally.
RangedLoader = Callable[[Path, Manifest, int, RemoteStore, frozenset[str]], None]


@dataclass(frozen=True)
class RestoreOptions:
    """How a restore runs: ``step`` (None: the newest that verifies), ``verify`` (CRC32C of
    every file before loading), ``allow_pickle``, ``bounce`` (pinned memory for device
    tensors), ``progress`` (bytes downloaded), ``loader`` (instead of loading into a state),
    ``ranged_loader`` (with ``loader``: for a step in S3 that records its chunks' CRC32C)."""

    step: int | None = None
    verify: bool = True
    allow_pickle: bool = False
    bounce: torch.Tensor | None = None
    progress: Callable[[int], None] | None = None
    loader: StepLoader | None = None
    ranged_loader: RangedLoader | None = None


@dataclass(frozen=True)
class RestoreResult:
    """``path``: the directory the step was loaded from. ``keep_local``: for a step loaded
    from memory (:mod:`spotckpt.core.fetch`), the local copy still to make -- run it off the
    training thread; it raises what a failed download would (the step stays in S3)."""

    step: int
    source: str  # "local" or the S3 URI
    seconds: float
    bytes: int
    path: Path
    keep_local: Callable[[], None] | None = field(default=None, compare=False, repr=False)


def load_step(
    state: MutableMapping[str, Any],
    step_dir: Path,
    manifest: Manifest,
    *,
    rank: int = 0,
    verify: bool = True,
    allow_pickle: bool = False,
    bounce: torch.Tensor | None = None,
) -> None:
    """Verify ``step_dir`` against ``manifest`` (unless ``verify=False``), then load it.

    Verify while reading: the files the load reads (this rank's tensors and tree, and with
    sharded state every rank's tensor file here) are checksummed as they are read in -- each
    tensor file through one mapping that is checksummed first and copied from after -- and the
    other files of the step up front. Every check still ends before the first byte lands in
    ``state``: a file that does not verify raises CheckpointCorruptError with the state
    untouched."""
    if verify:
        read = _files_read(step_dir, manifest, rank)
        problems = verify_files(step_dir, manifest, checksums=False, only=read)  # sizes; CRC32C as they are read
        problems += verify_files(step_dir, manifest, only=set(manifest.files) - read)
        if problems:
            raise CheckpointCorruptError("; ".join(problems), path=step_dir)
    ws = saved_world_size(manifest)
    if ws != 1 and not layout_of(manifest).reshardable(manifest):
        raise ConfigError(
            f"step {manifest.step} was saved by {ws} ranks and this job has 1; restoring onto another world "
            "size needs sharded state (DTensor / FSDP2) -- start with the same number of ranks, or pass step= "
            "of a step saved by one process")
    note_reshard(manifest.step, manifest, 1, rank)
    with ExitStack() as stack:
        prepare_files(state, step_dir, manifest, stack, rank=rank, keys=None, allow_pickle=allow_pickle,
                      bounce=bounce, verify=verify).run(state)


def _files_read(step_dir: Path, manifest: Manifest, rank: int) -> set[str]:
    """The files of ``manifest`` that loading ``rank``'s keys from ``step_dir`` reads (and so
    verifies as it reads them, see :func:`load_step`)."""
    read = set(data_file_names(rank))
    if manifest.extra.get("sharded"):
        read |= {n for n in tensor_files(manifest) if (step_dir / n).exists()}
    return read & set(manifest.files)


def prepare_files(
    state: MutableMapping[str, Any],
    step_dir: Path,
    manifest: Manifest,
    stack: ExitStack,
    *,
    rank: int,
    keys: Collection[str] | None,
    allow_pickle: bool,
    bounce: torch.Tensor | None,
    remote: RemoteStore | None = None,
    local_files: Collection[str] | None = None,
    verify: bool = False,
) -> LoadPlan:
    """Check and plan loading ``keys`` (None: every key) of the files written by ``rank``
    (:func:`spotckpt.core.torch_state.prepare_load`: nothing lands yet; the files stay open on
    ``stack`` until the plan runs). A step with sharded keys (DTensor) reads their shards from
    every rank's tensor file: those in ``step_dir`` (only ``local_files``, the verified ones,
    when given), the others with ranged reads from ``remote``, each chunk checked against the
    CRC32C its writer recorded. A step of another layout (DCP's, an adopted folder) is refused
    with ConfigError naming its loader: it is not damage, so a restore does not fall back past
    it. ``verify``: each local file read here is checked against its manifest entry as it is
    read (:func:`load_step`)."""
    STATE.require(manifest, step_dir)
    st_name, tree_name = data_file_names(rank)
    for name in (st_name, tree_name):
        if name not in manifest.files:
            raise CheckpointCorruptError(
                f"{step_dir}: manifest lists no {name}; this step was written by another number of "
                "ranks or is incomplete",
                path=step_dir,
            )

    def expect(name: str) -> FileEntry | None:
        return manifest.files[name] if verify else None

    tree_path = step_dir / tree_name
    tree_bytes = tree_path.read_bytes()
    got = FileEntry(len(tree_bytes), crc32c_b64(crc32c_update(0, tree_bytes))) if verify else None
    if got is not None and got != manifest.files[tree_name]:
        want = manifest.files[tree_name]
        raise CheckpointCorruptError(f"{tree_path}: size {got.size} / CRC32C {got.crc32c}, manifest says {want.size} / "
                                     f"{want.crc32c} (corrupt)", path=tree_path)
    tree = parse_tree_json(tree_bytes, str(tree_path))
    reader = stack.enter_context(SafetensorsFile(step_dir / st_name, expect=expect(st_name)))
    index = None
    if manifest.extra.get("sharded"):
        readers = {st_name: reader}
        ranged = []
        for name in tensor_files(manifest):
            if name == st_name:
                continue
            if (step_dir / name).exists() and (local_files is None or name in local_files):
                readers[name] = stack.enter_context(SafetensorsFile(step_dir / name, expect=expect(name)))
            elif remote is not None:
                doc = read_tree(step_dir, manifest, name, remote, local_files)
                ranged.append((remote, manifest.step, name, doc.get("shards") or {}))
        index = ShardIndex(readers, ranged)
    return prepare_load(state, tree, reader, allow_pickle=allow_pickle, bounce=bounce, source=str(tree_path),
                        keys=keys, shards=index)


def note_reshard(step: int, manifest: Manifest, world: int, rank: int) -> None:
    ws = saved_world_size(manifest)
    if ws != world and rank == 0 and manifest.extra.get("sharded"):
        log.warning("spotckpt: step %d was saved by %d rank(s), this job has %d: %s resharded; the per-rank "
                    "values of rank r (RNG, data position, plain values) come from saved rank r %% %d",
                    step, ws, world, ", ".join(manifest.extra["sharded"]), ws)


def restore_newest(state: MutableMapping[str, Any] | None, local: LocalStore, remote: RemoteStore | None = None,
                   opts: RestoreOptions = RestoreOptions(), *, rank: int = 0) -> RestoreResult | None:
    """One process: load the newest valid step (or exactly ``opts.step``) into ``state`` (or
    hand it to ``opts.loader``); None when there is none."""
    t0 = time.perf_counter()
    entries = local.step_entries()
    local_steps = {s for s, st in entries.items() if st == COMMITTED}
    remote_steps: set[int] = set(remote.list_steps()) if remote is not None else set()
    candidates = sorted(local_steps | remote_steps, reverse=True)
    if opts.step is not None:
        if opts.step not in local_steps | remote_steps:
            raise NoCheckpointError(
                f"step {opts.step} is not committed in {local.root}"
                + (f" nor in {remote.uri}" if remote is not None else "")
                + f"; committed steps: {candidates[:10]}",
                step=opts.step,
            )
        candidates = [opts.step]
    else:
        _say_uncommitted(local, entries, max(candidates, default=-1))
    problems: dict[int, str] = {}
    for s in candidates:
        if s in local_steps:
            # loading into a state verifies while it reads (load_step); another loader is
            # handed a step whose every file was checksummed first
            while_loading = opts.verify and opts.loader is None
            check = local.verify_step(s, checksums=opts.verify and not while_loading)
            if check.ok and check.manifest is not None:
                try:
                    _load_one(state, check.path, check.manifest, rank, opts, verify=while_loading)
                except CheckpointCorruptError as exc:
                    log.warning("spotckpt: skipping local step %d: %s", s, exc)
                    problems[s] = f"local: {exc}"
                else:
                    if opts.verify:
                        local.mark_verified(s)
                    return RestoreResult(s, "local", time.perf_counter() - t0, check.manifest.total_bytes, check.path)
            else:
                log.warning("spotckpt: skipping corrupt local step %d: %s", s, "; ".join(check.problems))
                problems[s] = "local: " + "; ".join(check.problems)
        if s in remote_steps and remote is not None:
            try:
                ranged = _ranged_manifest(remote, s, opts)
                if ranged is not None:  # read from S3 by the loader, chunk by verified chunk
                    assert opts.ranged_loader is not None
                    opts.ranged_loader(local.step_path(s), ranged, rank, remote, frozenset())
                    return RestoreResult(s, remote.uri, time.perf_counter() - t0, ranged.total_bytes,
                                         local.step_path(s))
                if state is not None and opts.loader is None:
                    got = load_from_memory(local, remote, s, _loader_of(state, rank, opts), replace=s in local_steps,
                                           progress=opts.progress)
                    if got is not None:
                        path, manifest, keep = got
                        return RestoreResult(s, remote.uri, time.perf_counter() - t0, manifest.total_bytes, path,
                                             keep_local=keep)
                # verified as it lands and committed locally before loading: the step loaded is
                # also one the uploader sees (already in S3) and the next restart finds locally
                path, manifest = local.import_step(remote, s, replace=s in local_steps, progress=opts.progress)
                _load_one(state, path, manifest, rank, opts)
            except CheckpointCorruptError as exc:
                log.warning("spotckpt: skipping S3 step %d: %s", s, exc)
                problems[s] = (problems[s] + "; " if s in problems else "") + f"{remote.uri}: {exc}"
            else:
                local.mark_verified(s)
                return RestoreResult(s, remote.uri, time.perf_counter() - t0, manifest.total_bytes, path)
    if opts.step is not None:
        raise NoCheckpointError(f"step {opts.step} exists but does not verify anywhere: "
                                f"{problems.get(opts.step, '?')}", step=opts.step)
    raise_if_all_bad(problems, local)
    return None


def _say_uncommitted(local: LocalStore, entries: dict[int, str], newest: int) -> None:
    """A warning for each ``step-*`` entry newer than the newest committed step that is not a
    resume point: a save that never finished (no manifest) or a damaged manifest."""
    for s, status in sorted(entries.items(), reverse=True):
        if s > newest and status != COMMITTED:
            why = ("its manifest.json is damaged" if status == DAMAGED
                   else "it has no manifest.json: a save that did not finish")
            log.warning("spotckpt: %s is not a committed step (%s); it is not a resume point -- %s",
                        local.step_path(s), why,
                        f"the newest committed step is {newest}" if newest >= 0 else "there is no committed step")


def _ranged_manifest(remote: RemoteStore, s: int, opts: RestoreOptions) -> Manifest | None:
    """Step ``s``'s manifest from ``remote`` when ``opts.ranged_loader`` reads it (the step
    records its chunks' CRC32C), else None (the step is downloaded and committed first)."""
    if opts.ranged_loader is None:
        return None
    m = remote.read_manifest(s)
    return m if m.extra.get(CHUNK_CRCS) is True else None


def _loader_of(state: MutableMapping[str, Any], rank: int, opts: RestoreOptions) -> Callable[[Path, Manifest], None]:
    """Load a step that verified already (from memory) into ``state``."""
    return lambda path, m: load_step(state, path, m, rank=rank, verify=False, allow_pickle=opts.allow_pickle,
                                     bounce=opts.bounce)


def _load_one(state: MutableMapping[str, Any] | None, path: Path, manifest: Manifest, rank: int,
              opts: RestoreOptions, *, verify: bool = False) -> None:
    if opts.loader is not None:
        opts.loader(path, manifest, rank)
    else:
        assert state is not None
        load_step(state, path, manifest, rank=rank, verify=verify, allow_pickle=opts.allow_pickle, bounce=opts.bounce)


def raise_if_all_bad(problems: dict[int, str], local: LocalStore, *, scan_local: bool = True) -> None:
    """Checkpoints exist and none verified: AllStepsCorruptError naming each step and why --
    damaged local manifests count as evidence too (``scan_local``; several ranks exchange them
    first, so every rank decides alike). Nothing at all: return (a new job)."""
    for s, status in (local.uncommitted_entries() if scan_local else {}).items():
        if status == DAMAGED and s not in problems:
            try:
                local.read_manifest(s)
            except CheckpointCorruptError as exc:
                problems[s] = f"local: {exc}"
    if not problems:
        return
    # each step's own message ends "-- an older step will be used": not so when none verifies
    lines = "\n".join(f"  step {s}: {why.replace(' -- an older step will be used', '')}"
                      for s, why in sorted(problems.items(), reverse=True))
    raise AllStepsCorruptError(
        f"{len(problems)} checkpoint step(s) exist under {local.root} or in S3 and none verifies:\n{lines}\n"
        "Nothing was loaded and nothing was deleted. Repair or restore a good copy (e.g. from S3 with "
        "`spotckpt restore`), or pass restore(state, start_fresh_if_corrupt=True) to start from scratch "
        "(the damaged steps are then moved aside, not deleted).",
        problems=problems, path=local.root)
