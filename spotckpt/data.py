"""Data order that resumes exactly: a resumable sampler and a ``DataLoader`` wrapper.

A resumed run must see the batches an uninterrupted run would have seen next, with the same random
augmentations. Three things make that hold:

1. **Order.** The permutation of epoch ``e`` comes from a ``torch.Generator`` seeded with a hash of
   ``(seed, e)`` -- never from the global RNG -- so it can be recomputed after a restart.
2. **Position.** :class:`ResumableDataLoader` counts the samples *the training loop received*
   (batches yielded x ``batch_size``), not what workers prefetched, and on restore skips exactly
   those.
3. **Randomness inside ``__getitem__``.** Before a batch is fetched, the python ``random``, numpy
   and torch (CPU) RNGs of the process that fetches it are seeded from ``(seed, epoch, start)``,
   ``start`` being the batch's first position in the epoch; its samples are then fetched in
   order. A batch is always fetched whole by one process, and a resumed loader starts at a batch
   boundary, so every sample gets the same augmentation whatever ``num_workers`` is, whichever
   worker fetches it, and whether or not the run was interrupted (the batch size is part of the
   state, checked on load). Seeding once per batch instead of once per sample keeps the
   loader's cost near a plain ``DataLoader``'s (``benchmarks/bench_data.py``). With
   ``num_workers=0`` the main process's RNG states are saved and put back around each batch, so
   the training loop's own randomness (dropout, ...) is not disturbed. DataLoader's
   ``base_seed`` is drawn from the loader's own generator, re-seeded per epoch, so creating an
   iterator never consumes the global RNG.

State dicts hold ints, strings and bools only (JSON-like), so they go into a checkpoint's JSON tree.

torchdata's ``StatefulDataLoader`` already has ``state_dict``/``load_state_dict`` and can be put in
a checkpoint's ``state`` as it is.

Threads: everything here is called from the training loop's thread; ``__getitem__`` of the seeded
dataset wrapper runs in the DataLoader's worker processes (or the loop's thread with
``num_workers=0``).
"""

from __future__ import annotations

import ctypes
import logging
import random
import signal
import sys
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from spotckpt.errors import ConfigError, StateError

__all__ = ["ResumableSampler", "ResumableDataLoader", "derive_seed"]

log = logging.getLogger(__name__)

_STATE_VERSION = 1
_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part, the same in every process and on every run.

    SplitMix64 folded over the parts (Python's ``hash()`` is salted per process, so it cannot be
    used for this). The values are part of the data order: they must never change.
    """
    h = 0
    for p in parts:
        x = (h ^ (int(p) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        h = x ^ (x >> 31)
    return h & _MASK63


def _length(data_source_or_len: Sized | int) -> int:
    if isinstance(data_source_or_len, bool):
        raise ConfigError("ResumableSampler needs a dataset or a length, got a bool")
    if isinstance(data_source_or_len, int):
        n = data_source_or_len
    else:
        try:
            n = len(data_source_or_len)
        except TypeError as exc:
            raise ConfigError(
                "ResumableSampler needs a map-style dataset with __len__ (or a length); for an "
                "IterableDataset keep the position yourself or use torchdata's StatefulDataLoader"
            ) from exc
    if n < 0:
        raise ConfigError(f"dataset length must be >= 0, got {n}")
    return n


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(f"data loader state: {name!r} must be an int, got {value!r}")
    return value


class ResumableSampler(Sampler[int]):
    """Yields a seeded permutation per epoch and remembers how far it got.

    The permutation of epoch ``e`` comes from a ``torch.Generator`` seeded with
    ``derive_seed(seed, e)``. ``position`` counts the indices yielded in the current epoch; after
    :meth:`load_state_dict` iteration continues with exactly the remaining ones. Finishing an epoch
    advances to the next one (``position`` back to 0).

    With ``num_replicas > 1`` every rank gets every ``num_replicas``-th index of the same
    permutation (as ``DistributedSampler`` does); ``drop_last`` then drops the tail that does not
    divide evenly instead of padding it by repeating indices from the start. With one replica
    ``drop_last`` has no effect (the loader's ``drop_last`` drops a short last batch).

    Note: used inside a plain ``DataLoader`` with workers, ``position`` runs ahead of the training
    loop by the prefetched samples; :class:`ResumableDataLoader` counts consumed samples instead.
    """

    def __init__(
        self,
        data_source_or_len: Sized | int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.total_size_of_dataset = _length(data_source_or_len)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.position = 0

    # -- sizes ---------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Indices this rank yields per epoch."""
        n, r = self.total_size_of_dataset, self.num_replicas
        if self.drop_last:
            return n // r
        return -(-n // r)

    def __len__(self) -> int:
        return self.num_samples

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full index list for ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else epoch
        n = self.total_size_of_dataset
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(derive_seed(self.seed, e))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        total = self.num_samples * self.num_replicas
        if total > n and n > 0:  # pad by wrapping around, as DistributedSampler does
            order += (order * (-(-(total - n) // n)))[: total - n]
        else:
            order = order[:total]
        return order[self.rank : total : self.num_replicas]

    # -- iteration -----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch``; a no-op (position kept) when it already is the current epoch.

        So ``for epoch in range(start, n): sampler.set_epoch(epoch)`` after a restore continues
        mid-epoch instead of starting the epoch over.
        """
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def set_position(self, position: int) -> None:
        """Skip to ``position`` within the current epoch (used by :class:`ResumableDataLoader`)."""
        if not 0 <= position <= self.num_samples:
            raise ConfigError(f"position must be in [0, {self.num_samples}], got {position}")
        self.position = int(position)

    def __iter__(self) -> Iterator[int]:
        if self.position >= self.num_samples and self.num_samples > 0:
            self.epoch += 1
            self.position = 0
        order = self.indices()
        while self.position < len(order):
            i = order[self.position]
            self.position += 1
            yield i
        self.epoch += 1
        self.position = 0

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "position": self.position,
            "shuffle": self.shuffle,
            "dataset_len": self.total_size_of_dataset,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken; refuses a state from a different data setup."""
        _check_compatible(
            state,
            {
                "seed": self.seed,
                "shuffle": self.shuffle,
                "dataset_len": self.total_size_of_dataset,
                "num_replicas": self.num_replicas,
                "drop_last": self.drop_last,
            },
            what="ResumableSampler",
        )
        epoch = _check_int("epoch", state.get("epoch"))
        position = _check_int("position", state.get("position"))
        if epoch < 0 or not 0 <= position <= self.num_samples:
            raise StateError(f"ResumableSampler state out of range: epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position


def _check_compatible(state: Any, expected: dict[str, Any], *, what: str) -> None:
    if not isinstance(state, dict):
        raise StateError(f"{what} state must be a dict, got {type(state).__name__}")
    version = state.get("version")
    if version != _STATE_VERSION:
        raise StateError(f"{what} state has version {version!r}; this spotckpt reads {_STATE_VERSION}")
    for key, want in expected.items():
        got = state.get(key)
        if got != want:
            raise StateError(
                f"{what} state was saved with {key}={got!r} but this one has {key}={want!r}: the "
                "data order would differ after resuming; construct it with the same dataset and "
                "settings, or start a new run (new checkpoint location)"
            )


class _KeyedBatches(Sampler[tuple[int, int, list[int]]]):
    """Batches of a :class:`ResumableSampler` as ``(epoch, start, indices)`` keys.

    ``start`` is the batch's first position in the epoch's order: with the epoch it names the
    batch, and both travel with it so that worker processes (even persistent ones holding an old
    copy of the dataset) seed the batch by what it is, not by who fetches it. Slicing the epoch's
    order keeps the per-sample cost of batching at a list slice. ``drop_last`` drops a short last
    batch, as ``BatchSampler`` does.
    """

    def __init__(self, inner: ResumableSampler, batch_size: int, drop_last: bool) -> None:
        self.inner = inner
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = self.inner.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, int, list[int]]]:
        s, bs = self.inner, self.batch_size
        if s.position >= s.num_samples and s.num_samples > 0:
            s.epoch += 1
            s.position = 0
        epoch, order = s.epoch, s.indices()
        n = len(order)
        while s.position < n:
            start = s.position
            end = min(start + bs, n)
            if self.drop_last and end - start < bs:
                break
            s.position = end
            yield (epoch, start, order[start:end])
        s.epoch += 1
        s.position = 0


class _SeededDataset(Dataset):
    """``dataset[(epoch, start, indices)]`` = the batch ``[inner[i] for i in indices]``, fetched
    with every RNG seeded from ``(seed, epoch, start)``.

    One seeding per batch, not per sample: the batch is fetched by one process, in one call, in a
    fixed order, and a resumed loader starts at a batch boundary, so every sample still gets the
    same random draws whatever ``num_workers`` is and whether or not the run was interrupted.
    ``__getitems__`` runs in DataLoader workers, or in the training loop's thread with
    ``num_workers=0``, where :class:`_MainRNG` keeps the loop's own RNG states out of it.
    """

    def __init__(self, inner: Dataset, seed: int) -> None:
        self.inner = inner
        self.seed = seed
        self._main = _MainRNG()
        self._batched = callable(getattr(inner, "__getitems__", None))

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitems__(self, key: tuple[int, int, list[int]]) -> list[Any]:
        # DataLoader's fetcher passes the whole key the batch sampler yielded
        epoch, start, indices = key
        if torch.utils.data.get_worker_info() is not None:
            return self._fetch(derive_seed(self.seed, epoch, start), indices)
        self._main.save()
        try:
            return self._fetch(derive_seed(self.seed, epoch, start), indices)
        finally:
            self._main.restore()

    def _fetch(self, s: int, indices: list[int]) -> list[Any]:
        random.seed(s)
        np.random.seed(s & 0xFFFFFFFF)
        # The CPU generator only: torch.manual_seed would also reseed (and lazily touch) CUDA.
        torch.random.default_generator.manual_seed(s)
        if self._batched:
            return list(self.inner.__getitems__(indices))  # type: ignore[attr-defined]
        inner = self.inner
        return [inner[i] for i in indices]

    def __getstate__(self) -> dict[str, Any]:  # to workers: the cached main-process state stays
        return {"inner": self.inner, "seed": self.seed, "_batched": self._batched}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._main = _MainRNG()


class _MainRNG:
    """Saves the training loop's python, numpy and torch (CPU) RNG states before a batch is fetched
    in its process (``num_workers=0``), and puts them back after.

    ``random.getstate()`` and numpy's ``get_state()`` copy a 2.5 KB Mersenne Twister state through
    Python objects: tens of microseconds, as much as a whole batch of a cheap dataset. So each
    state is also read as raw bytes (numpy's through its public ``bit_generator.ctypes``
    address; python's from the ``random.Random`` object, whose layout is checked against
    ``getstate()`` once) and compared with what was put back after the previous batch. When the
    loop has not drawn from that generator since (the common case), the full state taken earlier
    is still exact and is reused. Where a raw layout does not match (another Python or numpy
    build), the full calls are used every time. numpy's legacy cached Gaussian cannot be read
    cheaply: while one is pending the full calls are used, and putting the state back clears the
    Gaussian the fetch may have cached (one blind spot: a numpy state put back by the loop between
    two batches that differs from the current one only in its cached Gaussian goes unnoticed).
    Called from the training loop's thread only.
    """

    _MT_BYTES = 624 * 4 + 4  # numpy's mt19937_state: uint32 key[624]; int pos
    _PY_OFFSET = 16  # CPython's RandomObject: PyObject_HEAD; int index; uint32_t state[624]

    def __init__(self) -> None:
        self._checked = False
        self._np_addr: int | None = None
        self._py_addr: int | None = None
        self._np_raw: bytes | None = None  # raw numpy state matching self._np_full
        self._np_full: Any = None
        self._py_raw: bytes | None = None  # raw python state matching self._py_full
        self._py_full: Any = None
        self._torch: torch.Tensor | None = None

    def _check_layouts(self) -> None:
        self._checked = True
        try:
            addr = int(np.random.mtrand._rand._bit_generator.ctypes.state_address)
            full = np.random.get_state(legacy=True)
            want = (np.asarray(full[1], dtype=np.uint32).tobytes()
                    + int(full[2]).to_bytes(4, sys.byteorder, signed=True))
            if full[0] == "MT19937" and ctypes.string_at(addr, self._MT_BYTES) == want:
                self._np_addr = addr
        except Exception:  # noqa: BLE001 - any surprise: numpy's full state calls
            self._np_addr = None
        try:
            inst = random._inst  # type: ignore[attr-defined]
            version, internal, _ = inst.getstate()
            want = int(internal[-1]).to_bytes(4, sys.byteorder, signed=True) + np.asarray(
                internal[:-1], dtype=np.uint32).tobytes()
            addr = id(inst) + self._PY_OFFSET
            if (sys.implementation.name == "cpython" and len(internal) == 625
                    and ctypes.string_at(addr, self._MT_BYTES) == want):
                self._py_addr = addr
        except Exception:  # noqa: BLE001 - any surprise: random.getstate() every time
            self._py_addr = None

    def save(self) -> None:
        if not self._checked:
            self._check_layouts()
        self._torch = torch.random.default_generator.get_state()
        raw = None if self._py_addr is None else ctypes.string_at(self._py_addr, self._MT_BYTES)
        gauss_next = random._inst.gauss_next  # type: ignore[attr-defined]
        if raw is None or raw != self._py_raw or gauss_next != self._py_full[2]:
            self._py_full = random.getstate()
            self._py_raw = raw
        raw = None if self._np_addr is None else ctypes.string_at(self._np_addr, self._MT_BYTES)
        if raw is None or raw != self._np_raw or self._np_full[3]:  # [3]: has_gauss
            self._np_full = np.random.get_state(legacy=True)
            self._np_raw = raw

    def restore(self) -> None:
        torch.random.default_generator.set_state(self._torch)  # type: ignore[arg-type]
        random.setstate(self._py_full)
        if self._np_raw is None or self._np_full[3]:
            np.random.set_state(self._np_full)
        else:
            np.random.seed(0)  # clears a Gaussian the fetch may have cached in the RandomState
            ctypes.memmove(self._np_addr, self._np_raw, self._MT_BYTES)


class _WorkerInit:
    """``worker_init_fn`` for our workers: ignore SIGTERM, then call the user's function.

    A preemption SIGTERMs the trainer's whole process group (``spotckpt run``/``simulate`` forward
    it there; an instance shutdown signals every process). A DataLoader worker dying of it makes
    the main process raise "DataLoader worker ... is killed by signal: Terminated" in the middle
    of saving the final checkpoint. Workers need no handling of their own: they exit when the
    iterator shuts them down, or notice their parent is gone, or die with the group's SIGKILL.
    Picklable (a module-level class), so it works with the ``spawn`` start method too.
    """

    def __init__(self, user_fn: Any = None) -> None:
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.user_fn is not None:
            self.user_fn(worker_id)


_RESERVED = ("sampler", "batch_sampler", "shuffle", "generator")


class ResumableDataLoader:
    """A ``torch.utils.data.DataLoader`` whose position goes into the checkpoint.

    ``state_dict()`` records the epoch and the samples the training loop has received this epoch
    (batches yielded x ``batch_size``; prefetched but unconsumed batches are not counted). After
    ``load_state_dict()``, iterating yields exactly the batches an uninterrupted run would have seen
    next, with identical per-sample augmentations, for any ``num_workers``. Finishing an epoch
    advances the epoch for the next ``iter()``. ``len()`` is the number of batches of a full epoch,
    as for ``DataLoader``.

    Usage::

        loader = ResumableDataLoader(ds, batch_size=32, shuffle=True, seed=0, num_workers=2)
        state = {"loader": loader, ...}
        mgr.restore(state)
        for epoch in range(state_epoch, epochs):
            loader.set_epoch(epoch)           # keeps the restored position if epoch is current
            for batch in loader: ...

    Other keyword arguments go to ``DataLoader`` (``collate_fn``, ``pin_memory``, ``drop_last``,
    ``persistent_workers``, ``worker_init_fn``, ...); ``sampler``, ``batch_sampler``, ``shuffle``
    and ``generator`` are set by this class. Worker processes ignore SIGTERM (see
    :class:`_WorkerInit`), so a preemption signal sent to the whole process group reaches the
    training loop without killing the loader under it. Called from the training loop's thread only.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        **kw: Any,
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise ConfigError(
                "ResumableDataLoader needs a map-style dataset; for an IterableDataset use "
                "torchdata's StatefulDataLoader"
            )
        bad = [k for k in _RESERVED if k in kw]
        if bad:
            raise ConfigError(f"ResumableDataLoader sets {', '.join(bad)} itself; pass shuffle= and seed= instead")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.drop_last = bool(kw.pop("drop_last", False))
        # several ranks (DDP): each takes every num_replicas-th index of one shared permutation,
        # and seeds its batches apart from the other ranks'
        self.sampler = ResumableSampler(dataset, shuffle=shuffle, seed=self.seed,  # type: ignore[arg-type]
                                        num_replicas=num_replicas, rank=rank, drop_last=num_replicas > 1)
        batch_seed = self.seed if num_replicas == 1 else derive_seed(self.seed, rank)
        self._generator = torch.Generator()
        self._epoch = 0
        self._position = 0  # samples received by the training loop in self._epoch
        self._generation = 0  # only the newest iterator updates the position
        kw["worker_init_fn"] = _WorkerInit(kw.get("worker_init_fn"))
        self._loader = DataLoader(
            _SeededDataset(dataset, batch_seed),
            batch_sampler=_KeyedBatches(self.sampler, batch_size, self.drop_last),
            num_workers=num_workers,
            generator=self._generator,
            **kw,
        )

    # -- sizes ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Samples the training loop has received in the current epoch."""
        return self._position

    def _epoch_samples(self) -> int:
        """Samples delivered in a full epoch (a short last batch excluded with ``drop_last``)."""
        n = self.sampler.num_samples
        return (n // self.batch_size) * self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        return len(self._loader)

    # -- iteration -----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch``; keeps the position when ``epoch`` is already the current one."""
        epoch = int(epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._position = 0

    def __iter__(self) -> Iterator[Any]:
        if self._position >= self._epoch_samples():
            # The loop took the last batch but the checkpoint was written before StopIteration.
            self._epoch += 1
            self._position = 0
        self._generation += 1
        return self._run(self._generation, self._epoch, self._position)

    def _run(self, generation: int, epoch: int, start: int) -> Iterator[Any]:
        self.sampler.set_epoch(epoch)
        self.sampler.set_position(start)
        # base_seed (worker seeds) from our generator, never the global RNG; per-batch seeding
        # makes its value irrelevant to the data, but drawing it must not move the global RNG.
        self._generator.manual_seed(derive_seed(self.seed, epoch, -1))
        end = self._epoch_samples()
        received = start
        for batch in self._loader:
            received = min(received + self.batch_size, end)
            if generation == self._generation:
                self._position = received
            yield batch
        if generation == self._generation:
            self._epoch = epoch + 1
            self._position = 0

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "shuffle": self.sampler.shuffle,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "dataset_len": self.sampler.total_size_of_dataset,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken; refuses a state from a different data setup.

        An iterator created before this call stops updating the position.
        """
        _check_compatible(
            state,
            {
                "seed": self.seed,
                "shuffle": self.sampler.shuffle,
                "batch_size": self.batch_size,
                "drop_last": self.drop_last,
                "dataset_len": self.sampler.total_size_of_dataset,
            },
            what="ResumableDataLoader",
        )
        epoch = _check_int("epoch", state.get("epoch"))
        position = _check_int("position", state.get("position"))
        if epoch < 0 or not 0 <= position <= self._epoch_samples():
            raise StateError(f"ResumableDataLoader state out of range: epoch={epoch}, position={position}")
        self._generation += 1
        self._epoch, self._position = epoch, position
