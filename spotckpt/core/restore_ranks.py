"""Several ranks restore together: the newest step that every rank can load, the same on every
rank (:func:`restore_agreed`). One process: :mod:`spotckpt.core.restore`, whose file checks and
load plans this module uses.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, MutableMapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from spotckpt.core.layouts import CHUNK_CRCS, layout_of, saved_world_size
from spotckpt.core.local import DAMAGED, LocalStore
from spotckpt.core.protocols import RemoteStore
from spotckpt.core.restore import RestoreOptions, RestoreResult, note_reshard, prepare_files, raise_if_all_bad
from spotckpt.errors import CheckpointCorruptError, ConfigError, NoCheckpointError, StorageError
from spotckpt.format import FileEntry, Manifest, data_file_names, fsync_dir
from spotckpt.ranks.dist import Coordinator

__all__ = ["restore_agreed", "needed_files"]

log = logging.getLogger(__name__)

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
            plans = [prepare_files(state, step_dir, manifest, stack, rank=rank, keys=own, **kw)]
            if replicated:
                plans.append(prepare_files(state, step_dir, manifest, stack, rank=0, keys=replicated, **kw))
        else:
            plans = [prepare_files(state, step_dir, manifest, stack, rank=0, keys=None, **kw)]
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
                note_reshard(s, manifest, self.world, self.rank)
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
