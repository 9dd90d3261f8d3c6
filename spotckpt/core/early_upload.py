"""Upload while writing, the pipeline's side: hand a save's bytes to the remote store as they are
written locally (the store side is :mod:`spotckpt.remote.s3.early`).

A store that can (``start_upload``, :class:`spotckpt.remote.s3.S3Store`) gets the safetensors
file of a save as chunks in memory when the save begins -- the header and the tensors a blocking
save holds still (contiguous CPU tensors only), or the staging buffer of an async save -- and
uploads them while the persist path writes and fsyncs the same bytes. :func:`written` wraps the
local write: on success the store is told the committed file (the memory may change from then
on; parts not read yet come from the file), on failure the early upload is aborted before the
error goes on, so nothing of the step stays in S3. The uploader then finishes the object against
the manifest's size and CRC32C and writes the manifest last, as for any step.

One process only (``world_size == 1``): with several hosts the data of a step is uploaded by
each host's uploader after the agreed commit, as before. Off with ``upload_while_writing=False``
or ``SPOTCKPT_UPLOAD_WHILE_WRITING=0``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from spotckpt.core.config import env_bool
from spotckpt.format import plan_safetensors, tensor_byte_view

__all__ = ["ENV", "enabled", "host_chunks", "staged_chunks", "start", "written"]

log = logging.getLogger(__name__)

#: The environment switch (default on); ``CheckpointManager(upload_while_writing=...)`` wins.
ENV = "SPOTCKPT_UPLOAD_WHILE_WRITING"


def enabled(setting: bool | None) -> bool:
    return env_bool(ENV, True) if setting is None else bool(setting)


def host_chunks(tensors: Mapping[str, Any], meta: Mapping[str, str]) -> list[Any] | None:
    """The bytes of the safetensors file :func:`spotckpt.format.write_safetensors` writes from
    ``tensors``, without a copy: None when a tensor is not a contiguous CPU tensor (its bytes
    would be a temporary)."""
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values()):
        return None
    header, _ = plan_safetensors(
        ((n, t.dtype, tuple(t.shape), t.numel() * t.element_size()) for n, t in tensors.items()), meta)
    return [header, *(tensor_byte_view(t) for t in tensors.values() if t.numel())]


def staged_chunks(staged: Any) -> list[Any]:
    """The bytes of the file :meth:`spotckpt.core.stage.StagedTensors.write_to` writes."""
    return [staged.header, tensor_byte_view(staged.data)] if staged.nbytes else [staged.header]


def start(store: Any, step: int, rel: str, chunks: Callable[[], list[Any] | None],
          ready: Callable[[], None] | None = None) -> Any:
    """Start uploading file ``rel`` of ``step`` from memory, if ``store`` can; the handle or None.
    A failure to start only costs the head start: the uploader uploads the file as before."""
    begin = getattr(store, "start_upload", None)
    if begin is None:
        return None
    try:
        parts = chunks()
        return None if parts is None else begin(step, rel, parts, ready=ready)
    except Exception as exc:  # noqa: BLE001 - the ordinary upload still follows the commit
        log.warning("spotckpt: could not start uploading step %d while writing it (%s); it is uploaded after "
                    "the local commit", step, exc)
        return None


def written(early: Any, write: Callable[[], Path], rel: str) -> Path:
    """``write()`` (it commits the step and returns its directory); tell ``early`` how it went."""
    if early is None:
        return write()
    try:
        path = write()
    except BaseException:
        early.abort()
        raise
    early.committed(Path(path) / rel)
    return path
