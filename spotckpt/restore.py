"""Choose the newest valid checkpoint (local, else S3), download it if needed, verify, load.

Order of candidates: every committed step, local or remote, newest first. A local step is used
when it verifies (sizes and CRC32C of every file by default); otherwise -- or when it exists only
in S3 -- the S3 copy is downloaded into staging, verified, committed locally and loaded. A step that
fails anywhere is skipped with a warning naming the file, and the next older one is tried.

Verification happens before anything is loaded, so a damaged step never leaves the live state
half-overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Collection, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .dist import Coordinator
from .errors import CheckpointCorruptError, ConfigError, NoCheckpointError
from .format import FOLDER_LAYOUT, MAX_JSON_BYTES, FileEntry, Manifest, SafetensorsFile, data_file_names, fsync_dir
from .local import LocalStore, verify_files
from .store import StepSource
from .torch_state import apply

__all__ = ["RestoreResult", "import_step", "load_step", "restore_newest", "restore_agreed", "needed_files"]

log = logging.getLogger(__name__)


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
    _load_files(state, step_dir, manifest, rank=rank, keys=None, allow_pickle=allow_pickle, bounce=bounce)


def _load_files(
    state: MutableMapping[str, Any],
    step_dir: Path,
    manifest: Manifest,
    *,
    rank: int,
    keys: Collection[str] | None,
    allow_pickle: bool,
    bounce: torch.Tensor | None,
) -> None:
    """Load ``keys`` (None: every key) of the files written by ``rank``."""
    if manifest.extra.get("layout") == FOLDER_LAYOUT:  # not damage: no falling back past it
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
    raw = tree_path.read_bytes()
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointCorruptError(f"{tree_path}: tree file is too large", path=tree_path)
    try:
        tree = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorruptError(f"{tree_path}: not valid JSON ({exc})", path=tree_path) from exc
    with SafetensorsFile(step_dir / st_name) as reader:
        apply(state, tree, reader, allow_pickle=allow_pickle, bounce=bounce, source=str(tree_path), keys=keys)


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
) -> RestoreResult | None:
    """Load the newest valid step (or exactly ``step``) into ``state``; None when there is none."""
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
    for s in candidates:
        if s in local_steps:
            check = local.verify_step(s, checksums=verify)
            if check.ok and check.manifest is not None:
                try:
                    load_step(state, check.path, check.manifest, rank=rank, verify=False,
                              allow_pickle=allow_pickle, bounce=bounce)
                except CheckpointCorruptError as exc:
                    log.warning("spotckpt: skipping local step %d: %s", s, exc)
                else:
                    return RestoreResult(s, "local", time.perf_counter() - t0, check.manifest.total_bytes, check.path)
            else:
                log.warning("spotckpt: skipping corrupt local step %d: %s", s, "; ".join(check.problems))
        if s in remote_steps and remote is not None:
            res = _restore_remote(state, local, remote, s, rank=rank, allow_pickle=allow_pickle,
                                  bounce=bounce, progress=progress, replace_local=s in local_steps)
            if res is not None:
                return RestoreResult(s, remote.uri, time.perf_counter() - t0, res[1].total_bytes, res[0])
    if step is not None:
        raise NoCheckpointError(f"step {step} exists but does not verify anywhere", step=step)
    return None


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
) -> tuple[Path, Manifest] | None:
    # The download is verified; it is committed locally before loading, so the step that is
    # loaded is also one the uploader sees (already in S3) and the next restart finds locally.
    try:
        path, manifest = import_step(local, remote, s, replace=replace_local, progress=progress)
        load_step(state, path, manifest, rank=rank, verify=False, allow_pickle=allow_pickle, bounce=bounce)
    except CheckpointCorruptError as exc:
        log.warning("spotckpt: skipping S3 step %d: %s", s, exc)
        return None
    return path, manifest


# -- several ranks ----------------------------------------------------------------------------


def needed_files(manifest: Manifest, rank: int) -> set[str]:
    """The files ``rank`` reads to restore ``manifest``'s step: its own, and those of rank 0
    when the step holds replicated keys (written once, by rank 0)."""
    need = set(data_file_names(rank))
    if manifest.extra.get("replicated"):
        need |= set(data_file_names(0))
    return need


def _load_ranks(state: MutableMapping[str, Any], step_dir: Path, manifest: Manifest, *, rank: int,
                allow_pickle: bool, bounce: torch.Tensor | None) -> None:
    replicated = set(manifest.extra.get("replicated") or ())
    own = {k for k in state if k not in replicated}
    if rank != 0:
        _load_files(state, step_dir, manifest, rank=rank, keys=own, allow_pickle=allow_pickle, bounce=bounce)
        if replicated:
            _load_files(state, step_dir, manifest, rank=0, keys=replicated, allow_pickle=allow_pickle, bounce=bounce)
    else:
        _load_files(state, step_dir, manifest, rank=0, keys=None, allow_pickle=allow_pickle, bounce=bounce)


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
) -> RestoreResult | None:
    """Several ranks: load the newest step that *every* rank can load, the same on every rank.

    Each rank reports the steps it could load from its host's disk (its own files, and rank 0's
    when the step has replicated keys, verified) and those in S3; the newest step in every
    rank's set wins. A host that lacks some of the files its ranks need fetches just those from
    S3 (its leader does; the others wait), then every rank loads its own keys from its own files
    and the replicated keys from rank 0's. A step that turns out corrupt anywhere is dropped on
    every rank and the next older one is tried. A step written by another number of ranks is
    refused with ConfigError (resharding needs sharded state)."""
    t0 = time.perf_counter()
    rank, world = coord.rank, coord.world_size
    full: dict[int, Manifest] = {}  # steps this rank can load from this host's disk alone
    own: list[int] = []  # steps whose own files are here (rank 0's replicated ones may not be)
    for s in local.committed_steps():
        try:
            m = local.read_manifest(s)
        except CheckpointCorruptError as exc:
            log.warning("spotckpt: skipping local step %d: %s", s, exc)
            continue
        mine = set(data_file_names(rank))
        need = needed_files(m, rank)
        if not need <= set(m.files):
            continue
        present = {f for f in need if (local.step_path(s) / f).exists()}
        check = local.verify_step(s, checksums=verify, files=present)
        if not check.ok:
            log.warning("spotckpt: rank %d cannot use local step %d: %s", rank, s, "; ".join(check.problems))
        elif present == need:
            full[s] = m
            own.append(s)
        elif mine <= present:
            own.append(s)
    in_s3 = sorted(remote.list_steps()) if remote is not None else []
    newest = _newest_world_size(local, remote if rank == 0 else None, in_s3)
    recs = coord.exchange("restore: steps", {"local": sorted(full), "own": own, "remote": in_s3, "newest": newest})
    seen = [tuple(r["newest"]) for r in recs if r["newest"] is not None]
    if seen and step is None:
        last_step, last_ws = max(seen)
        if last_ws != world:
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
        ws = None if manifest is None else manifest.extra.get("world_size", 1)
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
                and manifest is not None and ws == world):
            need: set[str] = set()
            for r in host_ranks:
                need |= needed_files(manifest, r)
            try:
                if remote is None:
                    raise CheckpointCorruptError(f"step {s} is incomplete on {local.root} and no S3 is configured",
                                                 path=local.step_path(s))
                import_step(local, remote, s, files=need, replace=local.is_committed(s), progress=progress)
            except CheckpointCorruptError as exc:
                problem = str(exc)
        states = coord.exchange(f"restore: fetch {s}", {"problem": problem, "world_size": ws})
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
            continue
        assert manifest is not None
        try:
            _load_ranks(state, local.step_path(s), manifest, rank=rank, allow_pickle=allow_pickle, bounce=bounce)
        except CheckpointCorruptError as exc:
            problem = str(exc)
        loaded = coord.exchange(f"restore: load {s}", problem)
        if any(loaded):
            bad = next(i for i, p in enumerate(loaded) if p)
            log.warning("spotckpt: step %d did not load on rank %d (%s); trying an older step on every rank",
                        s, bad, loaded[bad])
            continue
        source = "local" if s in own else (remote.uri if remote is not None else "local")
        return RestoreResult(s, source, time.perf_counter() - t0, manifest.total_bytes, local.step_path(s))
    if step is not None:
        raise NoCheckpointError(f"step {step} exists but does not load on every rank", step=step)
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
    """``[step, world_size]`` of the newest step with a readable manifest, locally (and in S3
    when ``remote`` is given); None when there is none."""
    best: list[int] | None = None
    for s in reversed(local.committed_steps()):
        try:
            best = [s, int(local.read_manifest(s).extra.get("world_size", 1))]
            break
        except (CheckpointCorruptError, TypeError, ValueError):
            continue
    if remote is not None:
        for s in reversed(in_s3):
            if best is not None and s <= best[0]:
                break
            try:
                return [s, int(remote.read_manifest(s).extra.get("world_size", 1))]
            except (CheckpointCorruptError, TypeError, ValueError):
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

