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
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointCorruptError, NoCheckpointError
from .format import MAX_JSON_BYTES, Manifest, SafetensorsFile, data_file_names
from .local import LocalStore, verify_files
from .store import StepSource
from .torch_state import apply

__all__ = ["RestoreResult", "import_step", "load_step", "restore_newest"]

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
        apply(state, tree, reader, allow_pickle=allow_pickle, bounce=bounce, source=str(tree_path))


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
) -> tuple[Path, Manifest]:
    """Copy committed ``step`` from ``source`` (an S3 prefix or another local directory) into
    ``dest`` and commit it there: every file lands in a staging directory, fsynced and verified
    against the manifest, and only then is the step renamed into place. Any failure removes the
    staging directory and leaves ``dest`` as it was. With ``replace``, a (corrupt) local copy of
    the step is un-committed right before the verified one takes its place.

    Raises CheckpointCorruptError when the source does not verify, StorageError (S3) or
    SaveError (local disk) when copying fails."""
    staging = dest.begin(step)
    try:
        manifest = source.download_step(step, staging, progress=progress)
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
