"""Upload while writing, the pipeline's side: the bytes of a save's safetensors file as chunks
in memory, for the remote store to upload while the same bytes are written locally (the store
side is :mod:`spotckpt.remote.s3.early`).

When the persist path begins a save's write (:meth:`spotckpt.core.steps.CommitPipeline.write_snapshot`),
a store that can (:meth:`~spotckpt.core.protocols.RemoteStore.start_upload` does not return None:
:class:`spotckpt.remote.s3.S3Store`) gets those chunks -- the header and the tensors a blocking
save holds still (contiguous CPU tensors only, :func:`host_chunks`), or the staging buffer of an
async save (:func:`staged_chunks`) -- and uploads them while the write and fsync run. After the
local commit the store is told the committed file (the memory may change from then on; parts not
read yet come from the file); a failed write aborts the early upload before the error goes on,
so nothing of the step stays in S3. The uploader then finishes the object against the manifest's
size and CRC32C and writes the manifest last, as for any step.

One process only (``world_size == 1``): with several hosts the data of a step is uploaded by
each host's uploader after the agreed commit, as before. Off with ``upload_while_writing=False``
or ``SPOTCKPT_UPLOAD_WHILE_WRITING=0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spotckpt.core.config import env_bool
from spotckpt.format import plan_safetensors, tensor_byte_view

__all__ = ["ENV", "enabled", "host_chunks", "staged_chunks"]

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
