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
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, MutableMapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spotckpt.ranks.dist import Coordinator
from spotckpt.errors import AllStepsCorruptError, CheckpointCorruptError, ConfigError, NoCheckpointError, StorageError
from spotckpt.format import FileEntry, Manifest, SafetensorsFile, crc32c_b64, crc32c_update, data_file_names, fsync_dir, parse_tree_json
from spotckpt.core.layouts import CHUNK_CRCS, STATE, layout_of, saved_world_size, tensor_files
from spotckpt.core.fetch import load_from_memory
from spotckpt.core.local import DAMAGED, LocalStore, verify_files
from spotckpt.ranks.shard import ShardIndex, read_tree
from spotckpt.core.protocols import RemoteStore
from spotckpt.core.torch_state import LoadPlan, prepare_load

__all__ = ["RestoreOptions", "RestoreResult", "load_step", "restore_newest", "restore_agreed", "raise_if_all_bad"]

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
    _note_reshard(manifest.step, manifest, 1, rank)
    with ExitStack() as stack:
        _prepare_files(state, step_dir, manifest, stack, rank=rank, keys=None, allow_pickle=allow_pickle,
                       bounce=bounce, verify=verify).run(state)


def _files_read(step_dir: Path, manifest: Manifest, rank: int) -> set[str]:
    """The files of ``manifest`` that loading ``rank``'s keys from ``step_dir`` reads (and so
    verifies as it reads them, see :func:`load_step`)."""
    read = set(data_file_names(rank))
    if manifest.extra.get("sharded"):
        read |= {n for n in tensor_files(manifest) if (step_dir / n).exists()}
    return read & set(manifest.files)


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


def _note_reshard(step: int, manifest: Manifest, world: int, rank: int) -> None:
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
    local_steps = set(local.committed_steps())
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
    lines = "\n".join(f"  step {s}: {why}" for s, why in sorted(problems.items(), reverse=True))
    raise AllStepsCorruptError(
        f"{len(problems)} checkpoint step(s) exist under {local.root} or in S3 and none verifies:\n{lines}\n"
        "Nothing was loaded and nothing was deleted. Repair or restore a good copy (e.g. from S3 with "
        "`spotckpt restore`), or pass restore(state, start_fresh_if_corrupt=True) to start from scratch "
        "(the damaged steps are then moved aside, not deleted).",
        problems=problems, path=local.root)


# -- several ranks ----------------------------------------------------------------------------


def needed_files(manifest: Manifest, rank: int, world_size: int | None = None, *, ranged: bool = False) -> set[str]:
    """The files ``rank`` reads to load ``manifest``'s step (see :meth:`Layout.needed_files`)."""
    return layout_of(manifest).needed_files(manifest, rank, world_size, ranged=ranged)


def _load_ranks(state: MutableMapping[str, Any], step_dir: Path, manifest: Manifest, *, rank: int,
                allow_pickle: bool, bounce: torch.Tensor | None, remote: RemoteStore | None,
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


def restore_agreed(state: MutableMapping[str, Any] | None, local: LocalStore, remote: RemoteStore | None,
                   coord: Coordinator, opts: RestoreOptions = RestoreOptions()) -> RestoreResult | None:
    """Several ranks: load the newest step that *every* rank can load, the same on every rank.

    One collective round each (see :class:`_AgreedRestore`): **survey** -- each rank reports the
    steps it could load from its host's disk (its own files, and rank 0's when the step has
    replicated keys, verified) and those in S3; **agree** -- the newest step in every rank's set
    is tried first; **fetch** -- a host that lacks files its ranks need gets rank 0's over the
    group or the rest from S3 (its leader does; the others wait); **verify** -- what was only
    size-checked so far is CRC-checked before any rank loads a byte; **load** -- every rank its
    own keys and the replicated keys from rank 0's files. A step that turns out corrupt anywhere
    is dropped on every rank and the next older one is tried. A step written by another number
    of ranks is resharded when its layout allows it (sharded state, DCP); otherwise ConfigError.
    AllStepsCorruptError (on every rank) when steps exist and none loads."""
    run = _AgreedRestore(state, local, remote, coord, opts)
    candidates = run.agree(run.survey())
    for s in candidates:
        manifest, problem = run.fetch(s)
        if not run.checked(s, manifest, problem):
            continue
        assert manifest is not None
        if run.load(s, manifest):
            return run.result(s, manifest)
    if opts.step is not None:
        raise NoCheckpointError(f"step {opts.step} exists but does not load on every rank: "
                                f"{run.problems.get(opts.step, '?')}", step=opts.step)
    raise_if_all_bad(run.problems, local, scan_local=False)  # the same on every rank: every rank raises
    return None


class _AgreedRestore:
    """The rounds of :func:`restore_agreed`, with what they learn on the way."""

    def __init__(self, state: MutableMapping[str, Any] | None, local: LocalStore, remote: RemoteStore | None,
                 coord: Coordinator, opts: RestoreOptions) -> None:
        self.t0 = time.perf_counter()
        self.state, self.local, self.remote, self.coord, self.opts = state, local, remote, coord, opts
        self.rank, self.world = coord.rank, coord.world_size
        self.ranged = remote is not None
        self.full: dict[int, Manifest] = {}  # steps this rank can load from this host's disk alone
        self.own: list[int] = []  # steps whose own files are here (rank 0's replicated ones may not be)
        self.unverified: set[int] = set()  # older local steps, size-checked only until one is chosen
        self.local_ok: dict[int, frozenset[str]] = {}  # files of a step that passed the checks here
        self.problems: dict[int, str] = {}
        self.recs: list[dict[str, Any]] = []

    def survey(self) -> list[dict[str, Any]]:
        """Round 1: what each rank can load (local steps checked down to the newest complete
        one; older ones size-checked until chosen), what S3 holds, and the damage seen."""
        local, rank, verify = self.local, self.rank, self.opts.verify
        damaged: dict[int, str] = {}
        for s in reversed(local.committed_steps()):
            try:
                m = local.read_manifest(s)
            except CheckpointCorruptError as exc:
                log.warning("spotckpt: skipping local step %d: %s", s, exc)
                damaged[s] = str(exc)
                continue
            mine = set(data_file_names(rank % saved_world_size(m)))
            need = needed_files(m, rank, self.world, ranged=self.ranged)
            if not need <= set(m.files):
                continue
            present = {f for f in need if (local.step_path(s) / f).exists()}
            crc = verify and not self.full  # CRC32C down to the newest complete step; the rest when chosen
            check = local.verify_step(s, checksums=crc, files=present)
            if not check.ok:
                log.warning("spotckpt: rank %d cannot use local step %d: %s", rank, s, "; ".join(check.problems))
                damaged[s] = "; ".join(check.problems)
                continue
            self.local_ok[s] = frozenset(present)
            if present == need:
                self.full[s] = m
            elif not mine <= present:
                continue
            self.own.append(s)
            if verify and not crc:
                self.unverified.add(s)
        for s, status in local.uncommitted_entries().items():
            if status == DAMAGED:
                damaged.setdefault(s, f"{local.step_path(s)}: damaged manifest")
        in_s3 = sorted(self.remote.list_steps()) if self.remote is not None else []
        newest = _newest_world_size(local, self.remote if rank == 0 else None, in_s3)
        self.recs = self.coord.exchange("restore: steps", {
            "local": sorted(self.full), "own": self.own, "remote": in_s3, "newest": newest,
            "bad": {str(k): v for k, v in damaged.items()}})
        for i, r in enumerate(self.recs):
            for k, why in (r.get("bad") or {}).items():
                self.problems.setdefault(int(k), f"rank {i}: {why}")
        return self.recs

    def agree(self, recs: list[dict[str, Any]]) -> list[int]:
        """Round 2 (no exchange: every rank decides alike from the survey): the steps every rank
        can load, newest first -- or exactly ``opts.step``."""
        seen = [tuple(r["newest"]) for r in recs if r["newest"] is not None]
        if seen and self.opts.step is None:
            last_step, last_ws, last_sharded = max(seen)
            if last_ws != self.world and not last_sharded:
                raise _other_world(last_step, last_ws, self.world, "pass step= of a step saved by this many")
        at0 = set(recs[0]["local"])

        def usable(r: dict[str, Any]) -> set[int]:
            # from S3, from the host's disk, or own files here plus rank 0's sent over the group
            return set(r["remote"]) | set(r["local"]) | (set(r["own"]) & at0)

        candidates = sorted(set.intersection(*(usable(r) for r in recs)), reverse=True)
        if self.opts.step is not None:
            if self.opts.step not in candidates:
                raise NoCheckpointError(f"step {self.opts.step} is not loadable on every rank; steps every rank "
                                        f"can load: {candidates[:10]}", step=self.opts.step)
            candidates = [self.opts.step]
        return candidates

    def fetch(self, s: int) -> tuple[Manifest | None, str | None]:
        """Round 3: step ``s``'s manifest, and the files this host lacks -- rank 0's over the
        group, the rest from S3 (the host leader fetches). Returns (manifest, problem)."""
        local, remote, coord, recs = self.local, self.remote, self.coord, self.recs
        manifest = self.full.get(s)
        problem: str | None = None
        try:
            if manifest is None and s in self.own:
                manifest = local.read_manifest(s)
            if manifest is None and remote is not None:
                manifest = remote.read_manifest(s)
        except CheckpointCorruptError as exc:
            problem = str(exc)
        assert coord.hosts is not None
        hosts = coord.hosts
        at0 = set(recs[0]["local"])
        # hosts whose ranks have their own files but not rank 0's get those from rank 0
        by_group = [h for h in hosts.hosts
                    if any(s not in recs[r]["local"] for r in hosts.ranks_of(h))
                    and all(s in recs[r]["own"] for r in hosts.ranks_of(h)) and s in at0]
        if by_group:
            size0 = {}
            if manifest is not None:
                size0 = {f: manifest.files[f].size for f in data_file_names(0) if f in manifest.files}
            sizes = coord.exchange(f"restore: sizes {s}", size0)[0]
            receive = coord.host in by_group and coord.is_host_leader
            for f in data_file_names(0):
                tmp = local.step_path(s) / f".{f}.incoming"
                got = coord.broadcast_file(f"restore: send {f} of step {s}",
                                           local.step_path(s) / f if self.rank == 0 else None,
                                           tmp if receive else None, int(sizes.get(f, 0)))
                if receive and problem is None and manifest is not None:
                    problem = _adopt_incoming(local, s, tmp, f, manifest, got)
        lacking = [r for r in hosts.ranks_of(coord.host) if s not in recs[r]["local"]]
        loadable = manifest is not None and (saved_world_size(manifest) == self.world
                                             or layout_of(manifest).reshardable(manifest))
        if problem is None and lacking and coord.host not in by_group and coord.is_host_leader and loadable \
                and not self.reads_ranged(manifest):
            assert manifest is not None
            need: set[str] = set()
            for r in hosts.ranks_of(coord.host):
                need |= needed_files(manifest, r, self.world, ranged=self.ranged)
            try:
                if remote is None:
                    raise CheckpointCorruptError(f"step {s} is incomplete on {local.root} and no S3 is configured",
                                                 path=local.step_path(s))
                local.import_step(remote, s, files=need, replace=local.is_committed(s), progress=self.opts.progress)
            except CheckpointCorruptError as exc:
                problem = str(exc)
        return manifest, problem

    def reads_ranged(self, manifest: Manifest | None) -> bool:
        """Whether ``opts.ranged_loader`` loads this step: its files are not downloaded, the
        loader fetches from S3 what this host lacks (the same answer on every rank)."""
        return (self.opts.ranged_loader is not None and self.remote is not None and manifest is not None
                and manifest.extra.get(CHUNK_CRCS) is True)

    def checked(self, s: int, manifest: Manifest | None, problem: str | None) -> bool:
        """Round 4: what was only size-checked is CRC-checked before any rank loads a byte;
        every rank learns every rank's verdict (and the saved world size). False: ``s`` is
        dropped on every rank."""
        if problem is None and s in self.unverified and manifest is not None:
            present = {f for f in needed_files(manifest, self.rank, self.world, ranged=self.ranged)
                       if (self.local.step_path(s) / f).exists()}
            check = self.local.verify_step(s, files=present)
            if not check.ok:
                problem = "; ".join(check.problems)
        reshard = manifest is not None and layout_of(manifest).reshardable(manifest)
        ws = None if manifest is None or reshard else saved_world_size(manifest)
        states = self.coord.exchange(f"restore: fetch {s}", {"problem": problem, "world_size": ws})
        other = [r["world_size"] for r in states if r["world_size"] not in (None, self.world)]
        if other:
            raise _other_world(s, other[0], self.world, "restore a step saved by this many")
        if any(r["problem"] for r in states):
            bad = next(i for i, r in enumerate(states) if r["problem"])
            log.warning("spotckpt: skipping step %d on every rank: rank %d: %s", s, bad, states[bad]["problem"])
            self.problems[s] = f"rank {bad}: {states[bad]['problem']}"
            return False
        return True

    def load(self, s: int, manifest: Manifest) -> bool:
        """Round 5: every rank loads (or hands the step to ``opts.loader``); a failure on any
        rank drops the step on every rank."""
        problem: str | None = None
        try:
            if self.reads_ranged(manifest):
                assert self.opts.ranged_loader is not None and self.remote is not None
                self.opts.ranged_loader(self.local.step_path(s), manifest, self.rank, self.remote,
                                        self.local_ok.get(s, frozenset()))
            elif self.opts.loader is not None:
                self.opts.loader(self.local.step_path(s), manifest, self.rank)
            else:
                assert self.state is not None
                _note_reshard(s, manifest, self.world, self.rank)
                _load_ranks(self.state, self.local.step_path(s), manifest, rank=self.rank,
                            allow_pickle=self.opts.allow_pickle, bounce=self.opts.bounce, remote=self.remote,
                            local_files=needed_files(manifest, self.rank, self.world, ranged=self.ranged))
        except CheckpointCorruptError as exc:
            problem = str(exc)
        except StorageError as exc:  # S3 failed mid-load (after its retries): every rank raises, none waits
            problem = f"{_FATAL}{exc}"
        loaded = self.coord.exchange(f"restore: load {s}", problem)
        fatal = next((i for i, p in enumerate(loaded) if p and p.startswith(_FATAL)), None)
        if fatal is not None:
            raise StorageError(f"rank {fatal}: {loaded[fatal].removeprefix(_FATAL)}; nothing was loaded")
        if any(loaded):
            bad = next(i for i, p in enumerate(loaded) if p)
            log.warning("spotckpt: step %d did not load on rank %d (%s); trying an older step on every rank",
                        s, bad, loaded[bad])
            self.problems[s] = f"rank {bad}: {loaded[bad]}"
            return False
        return True

    def result(self, s: int, manifest: Manifest) -> RestoreResult:
        if self.opts.verify and self.local.is_committed(s):  # (a step read from S3 in ranges is not)
            self.local.mark_verified(s)
        source = "local" if s in self.own or self.remote is None else self.remote.uri
        return RestoreResult(s, source, time.perf_counter() - self.t0, manifest.total_bytes, self.local.step_path(s))


_FATAL = "fatal: "  # a load problem that is not the step's damage


def _other_world(step: int, saved: int, world: int, what: str) -> ConfigError:
    return ConfigError(f"step {step} was saved by {saved} ranks and this job has {world}; restoring onto another "
                       f"world size needs sharded state (DTensor / FSDP2) -- start with the same number of ranks, "
                       f"or {what}")


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


def _newest_world_size(local: LocalStore, remote: RemoteStore | None, in_s3: list[int]) -> list[int] | None:
    """``[step, world_size, sharded]`` of the newest step with a readable manifest, locally
    (and in S3 when ``remote`` is given); None when there is none."""
    def describe(s: int, m: Manifest) -> list[int]:
        return [s, saved_world_size(m), int(layout_of(m).reshardable(m))]

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
