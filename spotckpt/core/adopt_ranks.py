"""Adopted folders with several ranks and hosts: one step from the files every host holds, and
the newest such step brought back to every host.

A framework under torchrun writes one checkpoint from several processes: the Hugging Face
``Trainer`` writes the model, optimizer and ``trainer_state.json`` from the main process and
``rng_state_<i>.pth`` from every process; Lightning's ``ddp`` writes the ``.ckpt`` on global rank 0
only; ``accelerator.save_state`` writes per-process RNG files; sharded strategies write every
rank's shards. With several hosts and no shared filesystem, each host's copy of the folder holds
only what its own processes wrote. Every rank calls :meth:`CheckpointManager.adopt` after the
framework's save (a rank that wrote nothing too, with the same folder or ``None``); then::

    agree_folder     the save agreement (same step on every rank; committed anywhere -> skip on
                     every rank); every rank's folder; each host's leader scans its host's copy
                     (a host that holds none adds no files); any error raised on every rank
    commit_folder    each host's leader copies its host's files into the host's staging
                     directory (CRC32C, fsync, change check) -- then the same commit as save():
                     the entries exchanged, one manifest listing every host's files (a path
                     that several hosts hold once, the lowest rank's copy), each host's step
                     directory renamed into place only when every rank's files are durable

In S3 each host's uploader uploads what its directory holds and rank 0 writes the manifest only
after every listed file is there (:class:`spotckpt.remote.uploader.Uploader`), as for save().

:func:`newest_folder_agreed` is the way back, collective: every host reports the adopted steps it
holds and which of their files it has (sizes checked), rank 0 those in S3; the newest step whose
files exist somewhere -- S3, or the union of the hosts -- is chosen on every rank; each host's
leader CRC-checks what it holds and gets every file it lacks (or that does not verify): from S3
when the step is there, else sent over spotckpt's gloo group by a host that holds a good copy.
Every host then holds the whole step (what the frameworks load on each node: the Trainer's model,
optimizer and state on every rank, Lightning's one ``.ckpt``). A step that fails anywhere is
skipped on every rank and the next older one tried.

The manager's ``adopt()`` and ``restore_folder()`` are :func:`adopt_folder` and
:func:`restore_folder` here, one process or several, through its :class:`CommitPipeline`.

Threads: the training thread (``agree_folder``, ``newest_folder_agreed``); ``commit_folder`` runs
where the manager puts it (training thread, or its persist thread for ``blocking=False``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotckpt.core.adopt import FolderScan, adopt_into, copy_into, folder_extra, scan
from spotckpt.ranks.dist import Coordinator, check_save
from spotckpt.errors import (
    AllStepsCorruptError,
    CheckpointCorruptError,
    CollectiveError,
    ConfigError,
    FolderChangedError,
    NoCheckpointError,
    SpotCkptError,
)
from spotckpt.core.layouts import FOLDER
from spotckpt.format import FOLDER_LAYOUT, MANIFEST_NAME, FileEntry, Manifest, fsync_dir
from spotckpt.core.local import DAMAGED, LocalStore, verify_files
from spotckpt.core.steps import CommitPipeline, commit_files
from spotckpt.core.restore import RestoreOptions, RestoreResult, raise_if_all_bad
from spotckpt.core.protocols import StepSource

__all__ = ["AgreedFolder", "adopt_folder", "restore_folder", "agree_folder", "commit_folder", "newest_folder_agreed"]

log = logging.getLogger(__name__)


def adopt_folder(pipe: CommitPipeline, step: int, folder: str | os.PathLike[str] | None, *, blocking: bool,
                 meta: dict[str, Any] | None) -> Path:
    """``CheckpointManager.adopt``: ``folder`` committed as ``step`` through ``pipe`` (several
    ranks: collective, each host's files of the folder as one step). Returns the step's path."""
    local, coord = pipe.local, pipe.coord
    if folder is None and coord is None:
        raise ConfigError("adopt(step, None) is for a rank of several that wrote nothing; pass the folder")
    err: BaseException | None = None
    try:
        pipe.wait_pending()
    except SpotCkptError as exc:
        if coord is None:
            raise
        err = exc  # raised on every rank by the agreement below
    pipe.roll_back_before_saving()
    path = local.step_path(step)
    t0 = time.perf_counter()
    if coord is not None:
        agreed = agree_folder(coord, step, folder, error=err, committed=err is None and pipe.committed(step))
        if agreed.skip:
            pipe.skip(step)
            return path
        extra = pipe.stamp(layout=FOLDER.name, **folder_extra(None, meta, adopted=agreed.adopted))
        pipe.commit(step, lambda: commit_folder(local, step, agreed, extra=extra, coord=coord), t0=t0,
                    nbytes=agreed.nbytes, blocking=blocking)
        return path
    if pipe.committed(step):
        pipe.skip(step)
        return path
    assert folder is not None
    seen = scan(folder)
    extra = pipe.stamp(layout=FOLDER.name, **folder_extra(seen, meta))
    pipe.commit(step, lambda: adopt_into(local, step, seen, extra=extra), t0=t0, nbytes=seen.nbytes,
                blocking=blocking)
    return path


def restore_folder(pipe: CommitPipeline, opts: RestoreOptions, *, start_fresh_if_corrupt: bool) -> Path | None:
    """``CheckpointManager.restore_folder``: one process, the restore's candidate walk with the
    folder loader; several ranks, :func:`newest_folder_agreed` (every host gets the whole step)."""
    if pipe.coord is None:
        res = pipe.restore(None, opts, start_fresh_if_corrupt=start_fresh_if_corrupt)
    else:
        try:
            res = newest_folder_agreed(pipe.local, pipe.store, pipe.coord, step=opts.step, verify=opts.verify,
                                       progress=opts.progress)
        except AllStepsCorruptError as exc:
            if not start_fresh_if_corrupt:
                raise
            log.warning("spotckpt: no adopted step verifies; starting fresh as asked:\n%s", exc)
            pipe.roll_back(None)
            return None
        if res is not None:
            pipe.note_restore(res, explicit=opts.step is not None)
    return None if res is None else res.path


@dataclass(frozen=True)
class AgreedFolder:
    """What every rank agreed about one adopt: ``skip`` (the step is committed already),
    ``scan`` (what this rank copies: its host's folder when it is the host's leader and the host
    holds files, else None), the bytes of every host, and the adopted name (the folder's, or the
    single file's) from the lowest host that holds it."""

    skip: bool
    scan: FolderScan | None = None
    nbytes: int = 0
    adopted: str = ""


def agree_folder(coord: Coordinator, step: int, folder: str | os.PathLike[str] | None, *, committed: bool,
                 error: BaseException | None = None) -> AgreedFolder:
    """Collective (``main`` group), after every rank's part of the framework's save: agree on
    the step and scan each host's copy of the folder. ConfigError on every rank when ranks of
    one host pass different folders, or no host holds any file."""
    check = check_save(coord, step=step, keys=[], replicated=[], busy=False, committed=committed, error=error)
    if check.skip is not None:
        return AgreedFolder(skip=True)
    path = None if folder is None else str(Path(folder).absolute())
    paths = coord.exchange(f"adopt: folders {step}", path)
    layout = coord.hosts
    assert layout is not None
    per_host = {h: sorted({paths[r] for r in layout.ranks_of(h) if paths[r] is not None}) for h in layout.hosts}
    odd = {h: f for h, f in per_host.items() if len(f) > 1}
    if odd:
        h, f = next(iter(odd.items()))
        raise ConfigError(f"adopt({step}): the ranks sharing {h} passed different folders ({', '.join(f)}); every "
                          "rank of a host passes the same folder (or None when it wrote nothing)")
    seen: FolderScan | None = None
    err: BaseException | None = None
    mine = per_host[coord.host]
    if coord.is_host_leader and mine and os.path.lexists(mine[0]):
        try:
            seen = scan(mine[0])
        except ConfigError as exc:
            if "holds no files" not in str(exc):  # an empty folder: this host wrote nothing
                err = exc
    info = None
    if seen is not None:
        info = {"bytes": seen.nbytes, "name": next(iter(seen.files)) if seen.single_file else seen.root.name}
    infos = coord.exchange(f"adopt: scan {step}", info, error=err)
    found = [i for i in infos if i]
    if not found:
        raise ConfigError(f"cannot adopt {folder} as step {step}: no rank's host holds any file of it; save the "
                          "checkpoint into it first (every rank calls adopt after the framework's save)")
    return AgreedFolder(skip=False, scan=seen, nbytes=sum(int(i["bytes"]) for i in found), adopted=str(found[0]["name"]))


def commit_folder(local: LocalStore, step: int, agreed: AgreedFolder, *, extra: dict[str, Any],
                  coord: Coordinator) -> Path:
    """Collective (``persist`` group): copy this host's files (its leader) and commit the step
    on every host with one manifest (:func:`spotckpt.core.steps.commit_files`). A folder that
    changed while it was copied raises FolderChangedError on every rank, nothing committed."""
    seen = agreed.scan

    def write(staging: Path) -> dict[str, FileEntry]:
        return copy_into(staging, step, seen, local) if seen is not None else {}

    try:
        return commit_files(local, step, write, extra={**extra, "layout": FOLDER_LAYOUT}, coord=coord)
    except CollectiveError as exc:
        if "FolderChangedError:" in str(exc):  # another host's copy changed: the same outcome here
            raise FolderChangedError(str(exc), step=step) from exc
        raise


def newest_folder_agreed(
    local: LocalStore,
    remote: StepSource | None,
    coord: Coordinator,
    *,
    step: int | None = None,
    verify: bool = True,
    progress: Callable[[int], None] | None = None,
) -> RestoreResult | None:
    """Collective: the newest adopted step (or exactly ``step``) that every host can hold whole,
    the same on every rank, brought to every host (see the module docstring). None when there is
    none; AllStepsCorruptError (every rank) when adopted steps exist and none verifies;
    ConfigError for a step written by ``CheckpointManager.save``."""
    t0 = time.perf_counter()
    leader = coord.is_host_leader
    held: dict[str, dict[str, Any]] = {}  # step -> what this host holds of it (leaders only)
    bad: dict[str, str] = {}
    if leader:
        for s in reversed(local.committed_steps()):
            try:
                m = local.read_manifest(s)
            except CheckpointCorruptError as exc:
                bad[str(s)] = str(exc)
                continue
            sized = {f for f in m.files if not verify_files(local.step_path(s), m, checksums=False, only={f})}
            held[str(s)] = {"have": sorted(sized), "created": m.created, "n": len(m.files)}
        for s, status in local.uncommitted_entries().items():
            if status == DAMAGED:
                bad.setdefault(str(s), f"{local.step_path(s)}: damaged manifest")
    in_s3 = sorted(remote.list_steps()) if remote is not None and coord.rank == 0 else []
    recs = coord.exchange("restore folder: steps", {"held": held, "s3": in_s3, "bad": bad})
    remote_steps = set(recs[0]["s3"])
    problems: dict[int, str] = {}
    for i, r in enumerate(recs):
        for k, why in r["bad"].items():
            problems.setdefault(int(k), f"rank {i}: {why}")

    def usable(s: int) -> bool:
        if s in remote_steps:
            return True
        entries = [r["held"][str(s)] for r in recs if str(s) in r["held"]]
        if len({e["created"] for e in entries}) > 1:
            problems.setdefault(s, "the hosts hold different manifests of this step (written by different runs)")
            return False
        have = set().union(*(e["have"] for e in entries))
        if len(have) < entries[0]["n"]:
            problems.setdefault(s, "no host and no S3 copy holds every file of it")
            return False
        return True

    steps = remote_steps | {int(k) for r in recs for k in r["held"]}
    candidates = [s for s in sorted(steps, reverse=True) if usable(s)]
    if step is not None:
        if step not in candidates:
            raise NoCheckpointError(f"step {step} is not committed whole on the hosts nor in S3; steps every host can "
                                    f"get: {candidates[:10]}", step=step)
        candidates = [step]
    for s in candidates:
        got = _bring(local, remote, coord, s, recs, remote_steps, verify=verify, progress=progress)
        if isinstance(got, str):
            problems[s] = got
            continue
        manifest, source = got
        local.mark_verified(s)
        return RestoreResult(s, source, time.perf_counter() - t0, manifest.total_bytes, local.step_path(s))
    if step is not None:
        raise NoCheckpointError(f"step {step} exists but cannot be brought to every host: {problems.get(step, '?')}",
                                step=step)
    raise_if_all_bad(problems, local, scan_local=False)  # the same on every rank: every rank raises
    return None


def _bring(local: LocalStore, remote: StepSource | None, coord: Coordinator, s: int, recs: list[dict[str, Any]],
           remote_steps: set[int], *, verify: bool, progress: Callable[[int], None] | None) -> tuple[Manifest, str] | str:
    """Step ``s`` whole on every host (collective); (manifest, source) or why not (every rank)."""
    assert coord.hosts is not None
    layout = coord.hosts
    leaders = [layout.leader_of(h) for h in layout.hosts]
    holders = [r for r in leaders if str(s) in recs[r]["held"]]
    sender = holders[0] if holders else 0  # who hands out the manifest
    text, problem = None, None
    if coord.rank == sender:
        try:
            m = local.read_manifest(s) if holders else remote.read_manifest(s)  # type: ignore[union-attr]
            text = m.to_bytes().decode()
        except CheckpointCorruptError as exc:
            problem = str(exc)
    texts = coord.exchange(f"restore folder: manifest {s}", {"text": text, "problem": problem})
    if texts[sender]["problem"]:
        log.warning("spotckpt: skipping step %d: %s", s, texts[sender]["problem"])
        return f"rank {sender}: {texts[sender]['problem']}"
    manifest = Manifest.from_bytes(texts[sender]["text"].encode(), source=f"step {s}")
    if manifest.extra.get("layout") != FOLDER_LAYOUT:
        raise ConfigError(
            f"step {s} was saved by CheckpointManager.save, not adopted from a folder; load it with "
            "restore(state), or point restore_folder() at a local_dir / S3 prefix that holds only adopted steps")
    # each leader: what of it this host holds and verifies
    good: list[str] = []
    if coord.is_host_leader and str(s) in recs[coord.rank]["held"]:
        have = set(recs[coord.rank]["held"][str(s)]["have"])
        if verify:
            good = sorted(f for f in have if not verify_files(local.step_path(s), manifest, only={f}))
            for f in sorted(have - set(good)):
                log.warning("spotckpt: %s does not verify; getting a good copy", local.step_path(s) / f)
        else:
            good = sorted(have)
    goods = coord.exchange(f"restore folder: verified {s}", good)
    holds = {r: set(goods[r]) for r in leaders}
    from_s3 = s in remote_steps and remote is not None
    lacking = {r: sorted(set(manifest.files) - holds[r]) for r in leaders}
    if not from_s3:
        orphans = [f for f in manifest.files if not any(f in holds[r] for r in leaders)]
        if orphans:
            why = f"no host holds a good copy of {', '.join(sorted(orphans)[:5])} and S3 has no copy of the step"
            log.warning("spotckpt: skipping step %d: %s", s, why)
            return why
    mine = lacking.get(coord.rank, []) if coord.is_host_leader else []
    staging = local.begin(s) if mine else None
    problem = None
    try:
        if from_s3:
            if mine:
                part = Manifest(step=s, files={f: manifest.files[f] for f in mine}, created=manifest.created,
                                extra=dict(manifest.extra))
                remote.download_step(s, staging, part, progress=progress)  # type: ignore[union-attr,arg-type]
        else:
            for f in sorted({f for r in leaders for f in lacking[r]}):
                root = next(r for r in leaders if f in holds[r])
                dst = None
                if f in mine:
                    assert staging is not None
                    dst = staging / f
                    dst.parent.mkdir(parents=True, exist_ok=True)
                got = coord.broadcast_file(f"restore folder: send {f} of step {s}",
                                           local.step_path(s) / f if coord.rank == root else None, dst,
                                           manifest.files[f].size, root=root)
                if dst is not None and problem is None and got != manifest.files[f]:
                    problem = f"{f} received from rank {root} does not match the manifest ({got})"
        if mine and problem is None:
            assert staging is not None
            _install(local, s, staging, mine, manifest)
    except (CheckpointCorruptError, OSError) as exc:
        problem = str(exc)
    finally:
        if staging is not None:
            local.abort(staging)
    states = coord.exchange(f"restore folder: fetch {s}", problem)
    if any(states):
        bad = next(i for i, p in enumerate(states) if p)
        log.warning("spotckpt: skipping step %d on every rank: rank %d: %s", s, bad, states[bad])
        return f"rank {bad}: {states[bad]}"
    fetched = any(lacking[r] for r in leaders)
    return manifest, (remote.uri if from_s3 and fetched and remote is not None else "local")


def _install(local: LocalStore, s: int, staging: Path, files: list[str], manifest: Manifest) -> None:
    """Put the fetched (verified) ``files`` of step ``s`` in place: the whole step committed when
    this host had none of it, else each file renamed into the committed directory (replacing
    a copy that did not verify)."""
    if not local.is_committed(s):
        (staging / MANIFEST_NAME).unlink(missing_ok=True)
        local.commit(staging, manifest)
        return
    dest = local.step_path(s)
    dirs = {dest}
    for f in files:
        out = dest / f
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / f, out)
        dirs.add(out.parent)
    for d in dirs:
        fsync_dir(d)
