"""The rows of ``spotckpt bench``: one small class per measured thing, in one registry.

A row declares its name, its label in the tables, its kind (``floor``, ``save`` or ``restore``)
and what it needs (``needs``: modules, or ``module:attribute``, that must import). A row whose
needs do not import on this machine is reported as skipped with the reason, not run.

Inside a worker process (one per row, see :mod:`spotckpt.tools.bench.worker`) the row is built with
the worker's :class:`~spotckpt.tools.bench.worker.Ctx` and used in this order, all on the main thread::

    row = RowClass(ctx)
    row.prepare()        # once, untimed (e.g. write the checkpoint a restore row reads)
    row.call()           # one warm-up call, then ``reps`` timed calls, each -> Sample
    row.close()          # always

Peers are imported inside the methods, never at module level, so listing the registry imports
nothing heavy and a row's missing package affects that row only.
"""

from __future__ import annotations

import functools
import importlib
import os
import time
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

from spotckpt.tools.bench.context import Sample

if TYPE_CHECKING:
    from spotckpt.tools.bench.context import Ctx

KINDS = ("floor", "save", "restore")


class Row:
    """Base of every row; see the module docstring for the order of calls."""

    name: ClassVar[str]
    label: ClassVar[str]
    kind: ClassVar[str]
    gpu_label: ClassVar[str | None] = None
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx

    @classmethod
    def label_for(cls, device: str) -> str:
        return cls.gpu_label if device == "cuda" and cls.gpu_label else cls.label

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this row cannot run here (the first need that does not import), else None."""
        for need in cls.needs:
            problem = _import_problem(need)
            if problem is not None:
                return problem
        return None

    def prepare(self) -> None:
        """Untimed set-up, run once before the warm-up call."""

    def call(self) -> Sample:
        raise NotImplementedError

    def close(self) -> None:
        """Release what :meth:`prepare` or :meth:`call` opened; runs even after a failure."""


@functools.lru_cache(maxsize=None)
def _import_problem(need: str) -> str | None:
    module, _, attr = need.partition(":")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(module)
        if attr:
            getattr(mod, attr)
    except Exception as exc:  # noqa: BLE001 - any import failure makes the row unavailable
        return f"needs {need}: {type(exc).__name__}: {exc}"[:300]
    return None


ROWS: list[type[Row]] = []
ROW_BY_NAME: dict[str, type[Row]] = {}


def register(cls: type[Row]) -> type[Row]:
    """Add a row class to the registry; the registry's order is the tables' order."""
    if cls.kind not in KINDS:
        raise ValueError(f"row {cls.__name__}: kind must be one of {KINDS}, got {cls.kind!r}")
    if cls.name in ROW_BY_NAME:
        raise ValueError(f"row name {cls.name!r} is registered twice")
    ROWS.append(cls)
    ROW_BY_NAME[cls.name] = cls
    return cls


# --------------------------------------------------------------------------------------------
# shapes of rows


class SaveRow(Row):
    """A blocking save: each call writes a new checkpoint under a fresh path (the previous one is
    removed before the clock starts), timed until the saver returns with its files fsynced."""

    kind = "save"
    stem: ClassVar[str] = "ckpt"

    def save(self, path: str) -> None:
        raise NotImplementedError

    def call(self) -> Sample:
        path = self.ctx.next_path(self.stem)
        return self.ctx.timed(lambda: self.save(path))


class RestoreRow(Row):
    """A restore into the live tensors: :meth:`write` stores the state once (untimed); each call
    zeroes the live tensors, times :meth:`load`, then checks the values came back."""

    kind = "restore"

    def write(self) -> None:
        raise NotImplementedError

    def load(self) -> None:
        raise NotImplementedError

    def prepare(self) -> None:
        self._probe = self.ctx.probe()
        self.write()

    def call(self) -> Sample:
        self.ctx.clobber()
        sample = self.ctx.timed(self.load)
        self.ctx.check(self._probe)
        return sample


def _host_buffers(ctx: Ctx) -> dict[str, Any]:
    """CPU buffers shaped like the state (pinned on a GPU machine), filled with its values."""
    torch = ctx.torch
    host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=ctx.cuda) for k, v in ctx.state.items()}
    for k, v in ctx.state.items():
        host[k].copy_(v)
    ctx.sync()
    return host


# --------------------------------------------------------------------------------------------
# floors


@register
class RawWriteFsync(Row):
    """The state's bytes written with ``write()`` to one new file, then fsync (from pinned host
    copies on a GPU: the disk's part of any save)."""

    name = "raw_write_fsync"
    label = "raw write+fsync (floor)"
    kind = "floor"

    def prepare(self) -> None:
        self._src = _host_buffers(self.ctx) if self.ctx.cuda else self.ctx.state

    def call(self) -> Sample:
        uint8 = self.ctx.torch.uint8
        path = self.ctx.next_path("raw.bin")

        def write() -> None:
            with open(path, "wb", buffering=0) as f:
                for t in self._src.values():  # bf16 has no numpy dtype: write through a uint8 view
                    f.write(memoryview(t.contiguous().view(uint8).numpy()))
                os.fsync(f.fileno())
        return self.ctx.timed(write)


@register
class MemcpyReused(Row):
    """``copy_`` into buffers allocated once, before the row (so not in its peak RSS): the least a
    snapshot can cost. On a GPU, ``non_blocking`` copies into pinned memory, then synchronize."""

    name = "memcpy_reused"
    label = "copy into reused buffers (floor)"
    gpu_label = "pinned D2H copy into reused buffers (floor)"
    kind = "floor"

    def prepare(self) -> None:
        self._host = _host_buffers(self.ctx)

    def _copy(self) -> None:
        for k, v in self.ctx.state.items():
            self._host[k].copy_(v, non_blocking=self.ctx.cuda)

    def call(self) -> Sample:
        if self.ctx.cuda:
            return self.ctx.timed(self._copy)
        # On the CPU the floor is the faster of torch's default intra-op threads and one thread:
        # on a busy or small machine OpenMP threads fighting for cores can be several times slower.
        torch = self.ctx.torch
        default = self.ctx.timed(self._copy)
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single = self.ctx.timed(self._copy)
        finally:
            torch.set_num_threads(n)
        return min(default, single, key=lambda s: s.stall)


@register
class CloneAlloc(Row):
    """A fresh copy per call (CPU ``clone()``, GPU ``.cpu()``): staging without a reused pool."""

    name = "clone_alloc"
    label = "clone into fresh memory"
    gpu_label = "D2H .cpu() into fresh pageable memory"
    kind = "floor"

    def call(self) -> Sample:
        def clone() -> None:
            out = {k: (v.cpu() if self.ctx.cuda else v.clone()) for k, v in self.ctx.state.items()}
            del out
        return self.ctx.timed(clone)


# --------------------------------------------------------------------------------------------
# saves


def _torch_save_fsync(torch: Any, obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _dcp_writer(ctx: Ctx, path: str) -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemWriter(path, thread_count=8 if ctx.cuda else 2, sync_files=True)


@register
class TorchSaveFsync(SaveRow):
    name = "torch_save_fsync"
    label = "torch.save + fsync"
    stem = "torch.pt"

    def save(self, path: str) -> None:
        _torch_save_fsync(self.ctx.torch, self.ctx.state, path)


@register
class DcpSave(SaveRow):
    name = "dcp_save"
    label = "DCP save"
    needs = ("torch.distributed.checkpoint:save",)
    stem = "dcp"

    def save(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self.ctx.state, storage_writer=_dcp_writer(self.ctx, path))


@register
class DcpAsyncSave(Row):
    """Stall = until ``async_save`` returns; durable = until its future is done."""

    name = "dcp_async_save"
    label = "DCP async_save"
    kind = "save"
    needs = ("torch.distributed.checkpoint:async_save",)

    def call(self) -> Sample:
        import torch.distributed.checkpoint as dcp

        path = self.ctx.next_path("dcpa")
        self.ctx.sync()
        t0 = time.perf_counter()
        fut = dcp.async_save(self.ctx.state, storage_writer=_dcp_writer(self.ctx, path))
        stall = time.perf_counter() - t0
        getattr(fut, "upload_completion", fut).result()
        return Sample(stall=stall, durable=time.perf_counter() - t0)


@register
class TorchsnapshotTake(SaveRow):
    name = "torchsnapshot_take"
    label = "torchsnapshot take + fsync"
    needs = ("torchsnapshot",)
    stem = "snap"

    def save(self, path: str) -> None:
        import torchsnapshot  # type: ignore[import-untyped]

        torchsnapshot.Snapshot.take(path=path, app_state={"m": torchsnapshot.StateDict(**self.ctx.state)})
        from spotckpt.tools.bench.context import fsync_tree

        fsync_tree(path)


class _SpotckptRow(Row):
    """A ``CheckpointManager`` on a local directory (no S3), closed by :meth:`close`. Like the
    other save rows, the previous checkpoint is removed before the clock starts (no retention of
    the manager's own: its deletion would run on the persist thread inside the next timed call)."""

    needs = ("spotckpt.manager",)
    verify_on_restore: ClassVar[bool] = True

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        from spotckpt.manager import CheckpointManager

        self.mgr = CheckpointManager(local_dir=os.path.join(ctx.workdir, "spotckpt"), s3_uri=None,
                                     keep_last=None, async_save=True,
                                     verify_on_restore=self.verify_on_restore)
        self.step = 0

    def next_step(self) -> int:
        """The step to save next, with the previous one removed (untimed)."""
        if self.step:
            from spotckpt.tools.bench.context import remove

            remove(str(self.mgr.local.step_path(self.step)))
        self.step += 1
        return self.step

    def close(self) -> None:
        self.mgr.close()


@register
class SpotckptAsync(_SpotckptRow):
    """Stall = until ``save()`` returns and the device is free again; durable = until ``wait()``."""

    name = "spotckpt_async"
    label = "spotckpt save (async)"
    kind = "save"

    def call(self) -> Sample:
        step = self.next_step()
        self.ctx.sync()
        t0 = time.perf_counter()
        self.mgr.save(step, self.ctx.state)
        # on a GPU save() returns before the pinned copy has run, but the training stream waits
        # for it: count the stall until the device is free again
        self.ctx.sync()
        stall = time.perf_counter() - t0
        self.mgr.wait()
        return Sample(stall=stall, durable=time.perf_counter() - t0)


@register
class SpotckptBlocking(_SpotckptRow):
    name = "spotckpt_blocking"
    label = "spotckpt save (blocking)"
    kind = "save"

    def call(self) -> Sample:
        step = self.next_step()
        return self.ctx.timed(lambda: self.mgr.save(step, self.ctx.state, blocking=True))


# --------------------------------------------------------------------------------------------
# restores


@register
class TorchLoadMmapCopy(RestoreRow):
    name = "torch_load_mmap_copy"
    label = "torch.load(mmap) + copy_"

    def write(self) -> None:
        self._path = os.path.join(self.ctx.workdir, "load.pt")
        _torch_save_fsync(self.ctx.torch, self.ctx.state, self._path)

    def load(self) -> None:
        torch = self.ctx.torch
        loaded = torch.load(self._path, mmap=True, weights_only=True, map_location="cpu")
        with torch.no_grad():
            for k, t in self.ctx.state.items():
                t.copy_(loaded[k], non_blocking=self.ctx.cuda)
        self.ctx.sync()


@register
class DcpLoad(RestoreRow):
    name = "dcp_load"
    label = "DCP load"
    needs = ("torch.distributed.checkpoint:load",)

    def write(self) -> None:
        import torch.distributed.checkpoint as dcp

        self._path = os.path.join(self.ctx.workdir, "dcp-load")
        dcp.save(self.ctx.state, storage_writer=_dcp_writer(self.ctx, self._path))

    def load(self) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.load(self.ctx.state, storage_reader=dcp.FileSystemReader(self._path))


@register
class TorchsnapshotRestore(RestoreRow):
    name = "torchsnapshot_restore"
    label = "torchsnapshot restore"
    needs = ("torchsnapshot",)

    def write(self) -> None:
        import torchsnapshot

        self._path = os.path.join(self.ctx.workdir, "snap-load")
        self._holder = torchsnapshot.StateDict(**self.ctx.state)
        torchsnapshot.Snapshot.take(path=self._path, app_state={"m": self._holder})

    def load(self) -> None:
        import torchsnapshot

        torchsnapshot.Snapshot(path=self._path).restore(app_state={"m": self._holder})
        with self.ctx.torch.no_grad():  # StateDict.load_state_dict may rebind; copy back if so
            for k, t in self.ctx.state.items():
                if self._holder[k] is not t:
                    t.copy_(self._holder[k])


@register
class SpotckptRestore(_SpotckptRow, RestoreRow):
    name = "spotckpt_restore"
    label = "spotckpt restore"

    def write(self) -> None:
        self.mgr.save(1, self.ctx.state, blocking=True)

    def load(self) -> None:
        got = self.mgr.restore(self.ctx.state)
        if got != 1:
            raise AssertionError(f"spotckpt restore returned step {got!r}, expected 1")


@register
class SpotckptRestoreNoVerify(SpotckptRestore):
    name = "spotckpt_restore_noverify"
    label = "spotckpt restore, verify_on_restore=False"
    verify_on_restore = False


def select(names: str) -> list[type[Row]]:
    """Rows named in a comma-separated list (``all`` for every row), in registry order.

    Raises ValueError naming the unknown ones.
    """
    if names.strip() == "all":
        return list(ROWS)
    wanted = [x.strip() for x in names.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in ROW_BY_NAME]
    if unknown or not wanted:
        raise ValueError(f"unknown rows {unknown}; choose from {[r.name for r in ROWS]}")
    return [r for r in ROWS if r.name in wanted]

