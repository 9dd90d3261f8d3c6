"""Staging: capture the state's tensors into host memory reused across saves, so that training
goes on while the bytes are checksummed, written, fsynced, committed and uploaded.

One save moves through these states (the manager runs them; see ``CheckpointManager.save``)::

    ready_for_staging  the buffer is free (the previous save's persist has finished)
    staging            training thread: Stager.stage() copies every tensor into its slice of the
                       buffer -- a memcpy for CPU tensors; for CUDA tensors non_blocking copies
                       into pinned memory on a side stream, ordered after the work already queued
                       and before any later work on the current stream (so an optimizer step
                       cannot change a tensor before it is copied)
    ready_for_io       save() has returned; the job is queued for the persist thread
    io                 persist thread: StagedTensors.wait_ready(), then write_to(): the
                       safetensors header and the buffer in large sequential writes, CRC32C in
                       the same pass (the GIL is released by both), fsync; then commit
    done               Stager.release(): the buffer is ready_for_staging again

The buffer is laid out exactly as the safetensors data area, so persisting is one sequential
write. It is allocated once and grown only when the state grows: peak extra host memory is about
one copy of the state, flat over any number of saves.

Threads: ``stage`` and ``release`` are called by one thread at a time (the manager serialises
them with its own lock); ``StagedTensors.wait_ready`` / ``write_to`` run on the persist thread.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spotckpt.errors import SaveError
from spotckpt.format import FileEntry, TensorSpec, tensor_byte_view, tensor_ranges, write_chunks_durably
from spotckpt.format.safetensors import plan_entries, render_header

__all__ = ["Stager", "StagedTensors", "bounce_buffer_for"]

log = logging.getLogger(__name__)


@dataclass
class StagedTensors:
    """A captured set of tensors: the safetensors header and the data area in host memory."""

    header: bytes
    specs: list[TensorSpec]
    data: torch.Tensor  # uint8, exactly the data area
    events: list[Any] = field(default_factory=list)  # torch.cuda.Event per device used

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def wait_ready(self) -> None:
        """Block until every device-to-host copy has landed (persist thread)."""
        for ev in self.events:
            ev.synchronize()

    def write_to(self, path: str | Path, *, fsync: bool = True, ranges: dict[str, Any] | None = None) -> FileEntry:
        """Write header + data to ``path`` with CRC32C in the same pass; fsync. ``ranges``: as
        for :func:`spotckpt.format.write_safetensors`."""
        self.wait_ready()
        chunks = (self.header, tensor_byte_view(self.data)) if self.nbytes else (self.header,)
        byte_ranges = tensor_ranges(len(self.header), self.specs, ranges)
        entry = write_chunks_durably(path, chunks, fsync=fsync, ranges=byte_ranges, stable=True)
        if ranges is not None:
            ranges.update(byte_ranges)
        return entry


class Stager:
    """Copies tensors into one host buffer reused across saves (pinned when CUDA tensors are
    staged). Memory cost: the size of the largest state staged so far."""

    def __init__(self, *, pin_memory: bool | None = None) -> None:
        self._pin = pin_memory
        self._buf: torch.Tensor | None = None
        self._streams: dict[int, Any] = {}
        self.in_use = False
        # the last save's layout: a training loop saves the same names, shapes and dtypes every
        # time, so the plan, the header and the buffer views are made once, not per tensor per save
        self._layout: tuple[Any, ...] | None = None  # (items, header entries, specs, buf, views)

    @property
    def capacity_bytes(self) -> int:
        return 0 if self._buf is None else self._buf.numel()

    def _buffer(self, nbytes: int, cuda: bool) -> torch.Tensor:
        pin = self._pin if self._pin is not None else (cuda and torch.cuda.is_available())
        buf = self._buf
        if buf is None or buf.numel() < nbytes or (pin and not buf.is_pinned()):
            self._buf = None  # let the old one go before allocating the new one
            log.debug("spotckpt: allocating a %d-byte staging buffer (pinned=%s)", nbytes, pin)
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=bool(pin))
            self._buf = buf
        return buf

    def reserve(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Have the buffer for ``tensors`` ready, its pages faulted in, so that the first stage()
        of them does not pay for the allocation (a 1 GiB state: 0.3-0.6 s on the 2-core VM).
        Called from the persist thread, under the same lock as :meth:`stage`."""
        if self.in_use:
            return
        _, specs = plan_entries([(n, t.dtype, t.shape, t.numel() * t.element_size()) for n, t in tensors.items()])
        total = specs[-1].end if specs else 0
        if total <= 0:
            return
        buf = self._buffer(total, any(t.device.type == "cuda" for t in tensors.values()))
        with torch.no_grad():
            buf[:total:_PAGE].fill_(0)  # one write per page faults it in

    def stage(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> StagedTensors:
        """Copy ``tensors`` into the buffer (training thread). The caller must ``release`` the
        previous StagedTensors before staging again."""
        if self.in_use:
            raise SaveError("Stager.stage() called while the previous staged save is still in use; release() it "
                            "first (one save at a time per stager)")
        items = [(n, t.dtype, t.shape, t.numel() * t.element_size()) for n, t in tensors.items()]
        layout = self._layout
        if layout is not None and layout[0] == items:
            entries, specs = layout[1], layout[2]
        else:
            entries, specs = plan_entries(items)
            layout = None
        header = render_header(entries, metadata)
        total = specs[-1].end if specs else 0
        any_cuda = any(t.device.type == "cuda" for t in tensors.values())
        buf = self._buffer(total, any_cuda)
        data = buf[:total]
        if layout is None or layout[3] is not buf:
            views = [data[sp.start : sp.end] for sp in specs]
            self._layout = layout = (items, entries, specs, buf, views)
        views = layout[4]
        events: dict[int, Any] = {}
        flat_dst: list[torch.Tensor] = []
        flat_src: list[torch.Tensor] = []
        with torch.no_grad():
            for spec, dst, t in zip(specs, views, tensors.values()):
                if spec.nbytes == 0:
                    continue
                src = t.detach() if t.requires_grad else t
                if src.device.type == "cuda":
                    self._copy_cuda(dst, src, spec, events)
                elif src.is_contiguous():
                    flat_dst.append(dst)
                    flat_src.append(src.view(-1).view(torch.uint8))
                else:
                    _copy_cpu(dst, src, spec)
            if flat_dst:
                _copy_all(flat_dst, flat_src, total)
        self.in_use = True
        return StagedTensors(header=header, specs=specs, data=data, events=list(events.values()))

    def _copy_cuda(self, dst: torch.Tensor, src: torch.Tensor, spec: TensorSpec, events: dict[int, Any]) -> None:
        dev = src.device.index if src.device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(dev)
        if stream is None:
            stream = self._streams[dev] = torch.cuda.Stream(device=dev)
        current = torch.cuda.current_stream(dev)
        if dev not in events:
            stream.wait_stream(current)  # copies see every kernel queued before save()
        with torch.cuda.stream(stream):
            if not src.is_contiguous():
                src = src.contiguous()
            dst.copy_(src.reshape(-1).view(torch.uint8), non_blocking=True)
            src.record_stream(stream)
        ev = events.get(dev)
        if ev is None:
            ev = events[dev] = torch.cuda.Event()
        ev.record(stream)
        # Later work on the training stream (an optimizer step) waits for the copy.
        current.wait_event(ev)

    def release(self, staged: StagedTensors) -> None:
        """Mark the buffer free again (after the staged bytes were written)."""
        self.in_use = False

    def close(self) -> None:
        self._buf = None
        self._layout = None
        self._streams.clear()
        self.in_use = False


#: A state smaller than this is copied by the calling thread alone (a memcpy per tensor): torch's
#: copy of a tensor above its grain size (32 KiB here) runs in an OpenMP parallel region, and waking
#: those threads costs milliseconds on a busy machine, far more than the copy (a 256 KB state on the
#: loaded 2-core VM: the whole save() stall 2-12 ms, median 3.5-6 ms, down to 0.75 ms this way).
#: Larger states are memory-bandwidth bound and gain from the parallel copy.
SERIAL_COPY_BYTES = 16 * 1024 * 1024
#: a page: reserve() touches one byte of each.
_PAGE = 4096
#: torch's intra-op grain size: a copy of fewer elements runs on the calling thread anyway.
_GRAIN = 32768


def _copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor], nbytes: int) -> None:
    """Contiguous CPU tensors into their byte views of the buffer (``nbytes`` in all): one
    batched call, or, for a small state, plain memcpys on this thread (see SERIAL_COPY_BYTES)."""
    if nbytes < SERIAL_COPY_BYTES:
        small_d, small_s = [], []
        for d, s in zip(dsts, srcs):
            if d.numel() >= _GRAIN:
                np.copyto(d.numpy(), s.numpy())
            else:
                small_d.append(d)
                small_s.append(s)
        dsts, srcs = small_d, small_s
        if not dsts:
            return
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None:
        foreach(dsts, srcs)
        return
    for d, s in zip(dsts, srcs):  # pragma: no cover - torch without _foreach_copy_
        d.copy_(s)


def _copy_cpu(dst: torch.Tensor, src: torch.Tensor, spec: TensorSpec) -> None:
    if src.is_contiguous():
        dst.copy_(src.reshape(-1).view(torch.uint8))
        return
    itemsize = src.element_size()
    if dst.storage_offset() % itemsize == 0:
        dst.view(src.dtype).view(src.shape).copy_(src)  # strided copy, no temporary
    else:
        dst.copy_(src.contiguous().reshape(-1).view(torch.uint8))


#: Pinned host memory through which restore feeds CUDA tensors (two alternating halves).
RESTORE_BOUNCE_BYTES = 128 * 1024 * 1024


def bounce_buffer_for(state: Mapping[str, Any]) -> Any:
    """A pinned bounce buffer when CUDA is in use (restoring into device tensors), else None."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.empty(RESTORE_BOUNCE_BYTES, dtype=torch.uint8, pin_memory=True)
