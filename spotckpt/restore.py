"""Choose the newest valid checkpoint (local, else S3), download it if needed, verify, load.

Order of candidates: every committed step, local or remote, newest first. A local step is used
when it verifies (sizes and CRC32C of every file by default); otherwise -- or when it exists only
in S3 -- the S3 copy is downloaded into staging, verified, committed locally and loaded. A step that
fails anywhere is skipped with a warning naming the file, and the next older one is tried.

Verification happens before anything is loaded, so a damaged step never leaves the live state
half-overwritten.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, MutableMapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .dist import Coordinator
from .errors import AllStepsCorruptError, CheckpointCorruptError, ConfigError, NoCheckpointError
from .format import (
    DCP_LAYOUT,
    FOLDER_LAYOUT,
    MAX_JSON_BYTES,
    FileEntry,
    Manifest,
    SafetensorsFile,
    crc32c_b64,
    crc32c_update,
    data_file_names,
    fsync_dir,
    parse_tree_json,
)
from .local import DAMAGED, LocalStore, verify_files
from .shard import ShardIndex
from .store import StepSource
from .torch_state import LoadPlan, prepare_load

__all__ = ["RestoreResult", "import_step", "load_step", "restore_newest", "restore_agreed", "needed_files"]

log = logging.getLogger(__name__)


#: ``loader(step_dir, manifest, rank)``: what a restore does with the verified step it chose
#: instead of loading it into ``state``; a CheckpointCorruptError moves on to an older step.
StepLoader = Callable[[Path, Manifest, int], None]


@dataclass(frozen=True)
class RestoreResult:
    step: int
    source: str  # "local" or the S3 URI
    seconds: float
    bytes: int
    path: Path


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
    """Verify ``step_dir`` against ``manifest`` (unless ``verify=False``), then load it."""
    if verify:
        problems = verify_files(step_dir, manifest)
        if problems:
            raise CheckpointCorruptError("; ".join(problems), path=step_dir)
    ws = saved_world_size(manifest)
    if ws != 1 and not reshardable(manifest):
        raise ConfigError(
            f"step {manifest.step} was saved by {ws} ranks and this job has 1; restoring onto another world "
            "size needs sharded state (DTensor / FSDP2) -- start with the same number of ranks, or pass step= "
            "of a step saved by one process")
    _note_reshard(manifest.step, manifest, 1, rank)
    with ExitStack() as stack:
        _prepare_files(state, step_dir, manifest, stack, rank=rank, keys=None, allow_pickle=allow_pickle,
                       bounce=bounce).run(state)


def _prepare_files(
    state: MutableMapping[str, Any],
    step_dir: Path,
    manifest: Manifest,
    stack: ExitStack,
    *,
    rank: int,
    keys: Collection[str] | None,
    allow_pickle: bool,
    bounce: torch.Tensor | None,
    remote: StepSource | None = None,
    local_files: Collection[str] | None = None,
) -> LoadPlan:
    """Check and plan loading ``keys`` (None: every key) of the files written by ``rank``
    (:func:`spotckpt.torch_state.prepare_load`: nothing lands yet; the files stay open on
    ``stack`` until the plan runs). A step with sharded keys (DTensor) reads their shards from
    every rank's tensor file: those in ``step_dir`` (only ``local_files``, the verified ones,
    when given), the others with ranged reads from ``remote``, each chunk checked against the
    CRC32C its writer recorded. A step of another layout (DCP's, an adopted folder) is refused
    with ConfigError naming its loader: it is not damage, so a restore does not fall back past
    it."""
    layout = manifest.extra.get("layout")
    if layout == DCP_LAYOUT:
        raise ConfigError(
            f"{step_dir} was written through torch.distributed.checkpoint with spotckpt.dcp.StorageWriter; "
            "load it with dcp.load(state_dict, storage_reader=spotckpt.dcp.StorageReader(mgr))")
    if layout == FOLDER_LAYOUT:
        raise ConfigError(
            f"{step_dir}: step {manifest.step} is a folder adopted with CheckpointManager.adopt() "
            "(another program's files); get its path with restore_folder() and load it with that program"
        )
    st_name, tree_name = data_file_names(rank)
    for name in (st_name, tree_name):
        if name not in manifest.files:
            raise CheckpointCorruptError(
                f"{step_dir}: manifest lists no {name}; this step was written by another number of "
                "ranks or is incomplete",
                path=step_dir,
            )
    tree_path = step_dir / tree_name
    tree = parse_tree_json(tree_path.read_bytes(), str(tree_path))
    reader = stack.enter_context(SafetensorsFile(step_dir / st_name))
    index = None
    if manifest.extra.get("sharded"):
        readers = {st_name: reader}
        ranged = []
        for name in tensor_files(manifest):
            if name == st_name:
                continue
            if (step_dir / name).exists() and (local_files is None or name in local_files):
                readers[name] = stack.enter_context(SafetensorsFile(step_dir / name))
            elif remote is not None and hasattr(remote, "read_range"):
                doc = _tree_of(step_dir, manifest, name, remote, local_files)
                ranged.append((remote, manifest.step, name, doc.get("shards") or {}))
        index = ShardIndex(readers, ranged)
    return prepare_load(state, tree, reader, allow_pickle=allow_pickle, bounce=bounce, source=str(tree_path),
                        keys=keys, shards=index)


def _tree_of(step_dir: Path, manifest: Manifest, st_name: str, remote: Any,
             local_files: Collection[str] | None) -> dict[str, Any]:
    """The tree of the rank that wrote ``st_name``: the local copy when verified, else fetched
    from ``remote`` and checked against the manifest."""
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


def tensor_files(manifest: Manifest) -> list[str]:
    """Every rank's tensor file of a step."""
    return sorted(f for f in manifest.files if f.startswith("rank-") and f.endswith(".safetensors"))


def _note_reshard(step: int, manifest: Manifest, world: int, rank: int) -> None:
    ws = saved_world_size(manifest)
    if ws != world and rank == 0 and manifest.extra.get("sharded"):
        log.warning("spotckpt: step %d was saved by %d rank(s), this job has %d: %s resharded; the per-rank "
                    "values of rank r (RNG, data position, plain values) come from saved rank r %% %d",
                    step, ws, world, ", ".join(manifest.extra["sharded"]), ws)


def reshardable(manifest: Manifest) -> bool:
    """Whether a step can be restored onto another world size: it holds sharded state, or
    DCP wrote it (DCP plans resharded loads)."""
    return bool(manifest.extra.get("sharded")) or manifest.extra.get("layout") == DCP_LAYOUT


def saved_world_size(manifest: Manifest) -> int:
    try:
        return max(1, int(manifest.extra.get("world_size", 1)))
    except (TypeError, ValueError):
        return 1


def restore_newest(
    state: MutableMapping[str, Any],
    local: LocalStore,
    remote: StepSource | None = None,
    *,
    step: int | None = None,
    rank: int = 0,
    verify: bool = True,
    allow_pickle: bool = False,
    bounce: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
    loader: StepLoader | None = None,
) -> RestoreResult | None:
    """Load the newest valid step (or exactly ``step``) into ``state``; None when there is none.
    ``loader(step_dir, manifest, rank)`` replaces loading into ``state`` (the DCP reader)."""
    t0 = time.perf_counter()
    local_steps = set(local.committed_steps())
    remote_steps: set[int] = set(remote.list_steps()) if remote is not None else set()
    candidates = sorted(local_steps | remote_steps, reverse=True)
    if step is not None:
        if step not in local_steps | remote_steps:
            raise NoCheckpointError(
                f"step {step} is not committed in {local.root}"
                + (f" nor in {remote.uri}" if remote is not None else "")
                + f"; committed steps: {candidates[:10]}",
                step=step,
            )
        candidates = [step]
    problems: dict[int, str] = {}
    for s in candidates:
        if s in local_steps:
            check = local.verify_step(s, checksums=verify)
            if check.ok and check.manifest is not None:
                try:
                    if loader is not None:
                        loader(check.path, check.manifest, rank)
                    else:
                        load_step(state, check.path, check.manifest, rank=rank, verify=False,
                                  allow_pickle=allow_pickle, bounce=bounce)
                except CheckpointCorruptError as exc:
                    log.warning("spotckpt: skipping local step %d: %s", s, exc)
                    problems[s] = f"local: {exc}"
                else:
                    if verify:
                        local.mark_verified(s)
                    return RestoreResult(s, "local", time.perf_counter() - t0, check.manifest.total_bytes, check.path)
            else:
                log.warning("spotckpt: skipping corrupt local step %d: %s", s, "; ".join(check.problems))
                problems[s] = "local: " + "; ".join(check.problems)
        if s in remote_steps and remote is not None:
            res = _restore_remote(state, local, remote, s, rank=rank, allow_pickle=allow_pickle,
                                  bounce=bounce, progress=progress, replace_local=s in local_steps, loader=loader)
            if isinstance(res, str):
                problems[s] = (problems[s] + "; " if s in problems else "") + f"{remote.uri}: {res}"
            else:
                local.mark_verified(s)
                return RestoreResult(s, remote.uri, time.perf_counter() - t0, res[1].total_bytes, res[0])
    if step is not None:
        raise NoCheckpointError(f"step {step} exists but does not verify anywhere: {problems.get(step, '?')}",
                                step=step)
    raise_if_all_bad(problems, local)
    return None


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
    lines = "\n".join(f"  step {s}: {why}" for s, why in sorted(problems.items(), reverse=True))
    raise AllStepsCorruptError(
        f"{len(problems)} checkpoint step(s) exist under {local.root} or in S3 and none verifies:\n{lines}\n"
        "Nothing was loaded and nothing was deleted. Repair or restore a good copy (e.g. from S3 with "
        "`spotckpt restore`), or pass restore(state, start_fresh_if_corrupt=True) to start from scratch "
        "(the damaged steps are then moved aside, not deleted).",
        problems=problems, path=local.root)


def import_step(
    dest: LocalStore,
    source: StepSource,
    step: int,
    *,
    replace: bool = False,
    progress: Callable[[int], None] | None = None,
    files: Collection[str] | None = None,
) -> tuple[Path, Manifest]:
    """Copy committed ``step`` from ``source`` (an S3 prefix or another local directory) into
    ``dest`` and commit it there: every file lands in a staging directory, fsynced and verified
    against the manifest, and only then is the step renamed into place. Any failure removes the
    staging directory and leaves ``dest`` as it was. With ``replace``, a (corrupt) local copy of
    the step is un-committed right before the verified one takes its place.

    With ``files`` (several hosts), only those files are copied -- the ones this host's ranks
    need -- and the step is committed with the whole manifest, which lists every host's files.

    Raises CheckpointCorruptError when the source does not verify, StorageError (S3) or
    SaveError (local disk) when copying fails."""
    staging = dest.begin(step)
    try:
        if files is None:
            manifest = source.download_step(step, staging, progress=progress)
        else:
            manifest = source.read_manifest(step)
            missing = sorted(set(files) - set(manifest.files))
            if missing:
                raise CheckpointCorruptError(
                    f"{source.uri}: step {step} lists no {', '.join(missing)}; it was written by "
                    "another set of ranks", path=source.uri)
            part = Manifest(step=step, files={k: v for k, v in manifest.files.items() if k in files},
                            created=manifest.created, extra=dict(manifest.extra))
            source.download_step(step, staging, part, progress=progress)
        if replace:
            log.warning("spotckpt: replacing local step %d with the verified copy from %s", step, source.uri)
            dest.delete_step(step)
        path = dest.commit(staging, manifest)
    except BaseException:
        dest.abort(staging)
        raise
    return path, manifest


def _restore_remote(
    state: MutableMapping[str, Any],
    local: LocalStore,
    remote: StepSource,
    s: int,
    *,
    rank: int,
    allow_pickle: bool,
    bounce: torch.Tensor | None,
    progress: Callable[[int], None] | None,
    replace_local: bool,
    loader: StepLoader | None = None,
) -> tuple[Path, Manifest] | str:
    # The download is verified; it is committed locally before loading, so the step that is
    # loaded is also one the uploader sees (already in S3) and the next restart finds locally.
    # Returns why it failed (a string) when the step does not verify.
    try:
        path, manifest = import_step(local, remote, s, replace=replace_local, progress=progress)
        if loader is not None:
            loader(path, manifest, rank)
        else:
            load_step(state, path, manifest, rank=rank, verify=False, allow_pickle=allow_pickle, bounce=bounce)
    except CheckpointCorruptError as exc:
        log.warning("spotckpt: skipping S3 step %d: %s", s, exc)
        return str(exc)
    return path, manifest


# -- several ranks ----------------------------------------------------------------------------


def needed_files(manifest: Manifest, rank: int, world_size: int | None = None, *, ranged: bool = False) -> set[str]:
    """The files ``rank`` reads to restore ``manifest``'s step: its own, and those of rank 0
    when the step holds replicated keys (written once, by rank 0). Restoring a sharded step
    onto another world size (``world_size``): the per-rank values of saved rank
    ``rank % saved world size``, and every rank's tensor file (shards are resharded) -- unless
    ``ranged``: then the shards of other files are fetched as byte ranges from S3."""
    if manifest.extra.get("layout") == DCP_LAYOUT:
        return set(manifest.files)  # DCP writes replicated items once, on any rank
    ws = saved_world_size(manifest)
    need = set(data_file_names(rank % ws))
    if manifest.extra.get("replicated"):
        need |= set(data_file_names(0))
    if manifest.extra.get("sharded") and world_size not in (None, ws) and not ranged:
        need |= set(tensor_files(manifest))
    return need


def _load_ranks(state: MutableMapping[str, Any], step_dir: Path, manifest: Manifest, *, rank: int,
                allow_pickle: bool, bounce: torch.Tensor | None, remote: StepSource | None,
                local_files: Collection[str]) -> None:
    """Several ranks: this rank's own keys from its file and the replicated ones from rank 0's,
    both checked before either lands."""
    replicated = set(manifest.extra.get("replicated") or ())
    own = {k for k in state if k not in replicated}
    rank = rank % saved_world_size(manifest)  # another world size: resharding (checked by the caller)
    kw: dict[str, Any] = {"allow_pickle": allow_pickle, "bounce": bounce, "remote": remote, "local_files": local_files}
    with ExitStack() as stack:
        if rank != 0:
            plans = [_prepare_files(state, step_dir, manifest, stack, rank=rank, keys=own, **kw)]
            if replicated:
                plans.append(_prepare_files(state, step_dir, manifest, stack, rank=0, keys=replicated, **kw))
        else:
            plans = [_prepare_files(state, step_dir, manifest, stack, rank=0, keys=None, **kw)]
        loaded: list[str] = []
        for plan in plans:
            plan.run(state, loaded)


def restore_agreed(
    state: MutableMapping[str, Any],
    local: LocalStore,
    remote: StepSource | None,
    coord: Coordinator,
    *,
    step: int | None = None,
    verify: bool = True,
    allow_pickle: bool = False,
    bounce: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
    loader: StepLoader | None = None,
) -> RestoreResult | None:
    """Several ranks: load the newest step that *every* rank can load, the same on every rank.

    Each rank reports the steps it could load from its host's disk (its own files, and rank 0's
    when the step has replicated keys, verified) and those in S3; the newest step in every
    rank's set wins. A host that lacks some of the files its ranks need fetches just those from
    S3 (its leader does; the others wait), then every rank loads its own keys from its own files
    and the replicated keys from rank 0's. A step that turns out corrupt anywhere is dropped on
    every rank and the next older one is tried. A step written by another number of ranks is
    resharded when it holds sharded state (DTensor): its shards are read from every rank's
    tensor file, and the per-rank values of rank r come from saved rank ``r % saved world
    size``; without sharded state it is refused with ConfigError."""
    t0 = time.perf_counter()
    rank, world = coord.rank, coord.world_size
    full: dict[int, Manifest] = {}  # steps this rank can load from this host's disk alone
    own: list[int] = []  # steps whose own files are here (rank 0's replicated ones may not be)
    unverified: set[int] = set()  # older local steps, size-checked only until one is chosen
    damaged: dict[int, str] = {}  # local steps this rank found damaged (evidence when none loads)
    for s in reversed(local.committed_steps()):
        try:
            m = local.read_manifest(s)
        except CheckpointCorruptError as exc:
            log.warning("spotckpt: skipping local step %d: %s", s, exc)
            damaged[s] = str(exc)
            continue
        mine = set(data_file_names(rank % saved_world_size(m)))
        need = needed_files(m, rank, world, ranged=remote is not None)
        if not need <= set(m.files):
            continue
        present = {f for f in need if (local.step_path(s) / f).exists()}
        crc = verify and not full  # CRC32C down to the newest complete step; the rest when chosen
        check = local.verify_step(s, checksums=crc, files=present)
        if not check.ok:
            log.warning("spotckpt: rank %d cannot use local step %d: %s", rank, s, "; ".join(check.problems))
            damaged[s] = "; ".join(check.problems)
        elif present == need:
            full[s] = m
            own.append(s)
            if verify and not crc:
                unverified.add(s)
        elif mine <= present:
            own.append(s)
            if verify and not crc:
                unverified.add(s)
    for s, status in local.uncommitted_entries().items():
        if status == DAMAGED:
            damaged.setdefault(s, f"{local.step_path(s)}: damaged manifest")
    in_s3 = sorted(remote.list_steps()) if remote is not None else []
    newest = _newest_world_size(local, remote if rank == 0 else None, in_s3)
    recs = coord.exchange("restore: steps", {"local": sorted(full), "own": own, "remote": in_s3, "newest": newest,
                                             "bad": {str(k): v for k, v in damaged.items()}})
    problems: dict[int, str] = {}
    for i, r in enumerate(recs):
        for k, why in (r.get("bad") or {}).items():
            problems.setdefault(int(k), f"rank {i}: {why}")
    seen = [tuple(r["newest"]) for r in recs if r["newest"] is not None]
    if seen and step is None:
        last_step, last_ws, last_sharded = max(seen)
        if last_ws != world and not last_sharded:
            raise ConfigError(
                f"step {last_step} was saved by {last_ws} ranks and this job has {world}; restoring onto "
                "another world size needs sharded state (DTensor / FSDP2) -- start with the same "
                "number of ranks, or pass step= of a step saved by this many"
            )
    at0 = set(recs[0]["local"])

    def usable(r: dict[str, Any]) -> set[int]:
        # from S3, from the host's disk, or own files here plus rank 0's sent over the group
        return set(r["remote"]) | set(r["local"]) | (set(r["own"]) & at0)

    candidates = sorted(set.intersection(*(usable(r) for r in recs)), reverse=True)
    if step is not None:
        if step not in candidates:
            raise NoCheckpointError(f"step {step} is not loadable on every rank; steps every rank can load: "
                                    f"{candidates[:10]}", step=step)
        candidates = [step]
    assert coord.hosts is not None
    layout = coord.hosts
    host_ranks = layout.ranks_of(coord.host)
    for s in candidates:
        manifest = full.get(s)
        problem: str | None = None
        try:
            if manifest is None and s in own:
                manifest = local.read_manifest(s)
            if manifest is None and remote is not None:
                manifest = remote.read_manifest(s)
        except CheckpointCorruptError as exc:
            problem = str(exc)
        ws = None if manifest is None else saved_world_size(manifest)
        reshard = manifest is not None and reshardable(manifest)
        # hosts whose ranks have their own files but not rank 0's get those from rank 0
        by_group = [h for h in layout.hosts
                    if any(s not in recs[r]["local"] for r in layout.ranks_of(h))
                    and all(s in recs[r]["own"] for r in layout.ranks_of(h)) and s in at0]
        if by_group:
            size0 = {}
            if manifest is not None:
                size0 = {f: manifest.files[f].size for f in data_file_names(0) if f in manifest.files}
            sizes = coord.exchange(f"restore: sizes {s}", size0)[0]
            receive = coord.host in by_group and coord.is_host_leader
            for f in data_file_names(0):
                tmp = local.step_path(s) / f".{f}.incoming"
                got = coord.broadcast_file(f"restore: send {f} of step {s}",
                                           local.step_path(s) / f if rank == 0 else None,
                                           tmp if receive else None, int(sizes.get(f, 0)))
                if receive and problem is None and manifest is not None:
                    problem = _adopt_incoming(local, s, tmp, f, manifest, got)
        # a host whose ranks lack files of s fetches them (leader), verified, from S3
        lacking = [r for r in host_ranks if s not in recs[r]["local"]]
        if (problem is None and lacking and coord.host not in by_group and coord.is_host_leader
                and manifest is not None and (ws == world or reshard)):
            need: set[str] = set()
            for r in host_ranks:
                need |= needed_files(manifest, r, world, ranged=remote is not None)
            try:
                if remote is None:
                    raise CheckpointCorruptError(f"step {s} is incomplete on {local.root} and no S3 is configured",
                                                 path=local.step_path(s))
                import_step(local, remote, s, files=need, replace=local.is_committed(s), progress=progress)
            except CheckpointCorruptError as exc:
                problem = str(exc)
        if problem is None and s in unverified and manifest is not None:  # before any rank loads a byte
            present = {f for f in needed_files(manifest, rank, world, ranged=remote is not None)
                       if (local.step_path(s) / f).exists()}
            check = local.verify_step(s, files=present)
            if not check.ok:
                problem = "; ".join(check.problems)
        states = coord.exchange(f"restore: fetch {s}", {"problem": problem, "world_size": None if reshard else ws})
        if any(r["world_size"] not in (None, world) for r in states):
            saved_ws = next(r["world_size"] for r in states if r["world_size"] not in (None, world))
            raise ConfigError(
                f"step {s} was saved by {saved_ws} ranks and this job has {world}; restoring onto "
                "another world size needs sharded state (DTensor / FSDP2) -- start with the same "
                "number of ranks, or restore a step saved by this many"
            )
        if any(r["problem"] for r in states):
            bad = next(i for i, r in enumerate(states) if r["problem"])
            log.warning("spotckpt: skipping step %d on every rank: rank %d: %s", s, bad, states[bad]["problem"])
            problems[s] = f"rank {bad}: {states[bad]['problem']}"
            continue
        assert manifest is not None
        try:
            if loader is not None:
                loader(local.step_path(s), manifest, rank)
            else:
                _note_reshard(s, manifest, world, rank)
                _load_ranks(state, local.step_path(s), manifest, rank=rank, allow_pickle=allow_pickle, bounce=bounce,
                            remote=remote, local_files=needed_files(manifest, rank, world, ranged=remote is not None))
        except CheckpointCorruptError as exc:
            problem = str(exc)
        loaded = coord.exchange(f"restore: load {s}", problem)
        if any(loaded):
            bad = next(i for i, p in enumerate(loaded) if p)
            log.warning("spotckpt: step %d did not load on rank %d (%s); trying an older step on every rank",
                        s, bad, loaded[bad])
            problems[s] = f"rank {bad}: {loaded[bad]}"
            continue
        if verify:
            local.mark_verified(s)
        source = "local" if s in own else (remote.uri if remote is not None else "local")
        return RestoreResult(s, source, time.perf_counter() - t0, manifest.total_bytes, local.step_path(s))
    if step is not None:
        raise NoCheckpointError(f"step {step} exists but does not load on every rank: {problems.get(step, '?')}",
                                step=step)
    raise_if_all_bad(problems, local, scan_local=False)  # the same on every rank: every rank raises
    return None


def _adopt_incoming(local: LocalStore, step: int, tmp: Path, name: str, manifest: Manifest,
                    got: FileEntry | None) -> str | None:
    """Check a file received from rank 0 against the manifest (its size and CRC32C were
    computed as it was written) and rename it into the committed step directory."""
    try:
        if got != manifest.files[name]:
            tmp.unlink(missing_ok=True)
            return f"{name} received from rank 0 does not match the manifest ({got})"
        os.rename(tmp, local.step_path(step) / name)
        fsync_dir(local.step_path(step))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        return f"cannot store {name} received from rank 0: {exc}"
    return None


def _newest_world_size(local: LocalStore, remote: StepSource | None, in_s3: list[int]) -> list[int] | None:
    """``[step, world_size, sharded]`` of the newest step with a readable manifest, locally
    (and in S3 when ``remote`` is given); None when there is none."""
    def describe(s: int, m: Manifest) -> list[int]:
        return [s, saved_world_size(m), int(reshardable(m))]

    best: list[int] | None = None
    for s in reversed(local.committed_steps()):
        try:
            best = describe(s, local.read_manifest(s))
            break
        except CheckpointCorruptError:
            continue
    if remote is not None:
        for s in reversed(in_s3):
            if best is not None and s <= best[0]:
                break
            try:
                return describe(s, remote.read_manifest(s))
            except CheckpointCorruptError:
                continue
    return best


#: Pinned host memory through which restore feeds CUDA tensors (two alternating halves).
RESTORE_BOUNCE_BYTES = 128 * 1024 * 1024


def bounce_buffer_for(state: MutableMapping[str, Any]) -> Any:
    """A pinned bounce buffer when CUDA is in use (restoring into device tensors), else None."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.empty(RESTORE_BOUNCE_BYTES, dtype=torch.uint8, pin_memory=True)


def progress_logger() -> Callable[[int], None]:
    state = {"bytes": 0, "last": time.monotonic()}

    def cb(n: int) -> None:
        state["bytes"] += n
        now = time.monotonic()
        if now - state["last"] > 2.0:
            state["last"] = now
            log.info("spotckpt: downloaded %.1f MiB", state["bytes"] / 2**20)

    return cb

