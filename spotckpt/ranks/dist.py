"""Several ranks: how the ranks of one ``torch.distributed`` job agree, over groups of spotckpt's own.

Every rank constructs its :class:`~spotckpt.CheckpointManager` after ``init_process_group``;
the manager then builds a :class:`Coordinator` (collectively, in the same order on every rank):

- two gloo groups of its own, whatever the job's backend (NCCL included): ``main`` for the
  training thread's agreements (save, restore, policy, close) and ``persist`` for the persist
  thread's commit of each save. One group per thread, so collectives issued by different threads
  can never interleave differently on different ranks;
- every exchange has a name and a timeout. Each rank contributes either its value or its error,
  so a failure anywhere is raised everywhere as :class:`~spotckpt.errors.CollectiveError` naming
  the rank (as DCP turns any rank's exception into one error on every rank); a rank that died
  or never arrives makes the others raise when the timeout passes, never hang;
- a :class:`RequestChannel` on the job's store (the one ``init_process_group`` built): any rank
  can ask for a save at an agreed step -- preemption (SIGTERM on any one rank), or rank 0's clock
  for ``every_seconds`` -- with no collective on the training hot path (see the class).

Hosts: a host is a distinct ``local_dir`` (ranks passing the same ``local_dir`` share it, a
shared filesystem included); its *leader* is its lowest rank, which commits that host's step
directories and runs its uploader.

Threads: ``exchange(group="main")`` and ``broadcast_file`` are called by the training thread;
``exchange(group="persist")`` by whichever thread commits a save -- the persist thread (async
saves), the training thread (blocking saves), or the thread running :mod:`spotckpt.dcp`'s writer
(the training thread, or DCP's async thread). Each group has a lock held for the whole of each
collective, so one group's collectives never run from two threads of a process at once (gloo
would mix them up); the order in which the ranks' threads take turns is the callers' rule: a
blocking save and the DCP writer first wait for the manager's pending async save. The request
channel's listener is ``spotckpt-requests``.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spotckpt.errors import CollectiveError, ConfigError

if TYPE_CHECKING:
    from spotckpt.format import FileEntry

__all__ = ["Coordinator", "HostLayout", "RequestChannel", "Request", "SaveCheck", "coordinator_from_torch"]

log = logging.getLogger(__name__)

#: Default timeout of one collective exchange (seconds): a save's commit waits for the slowest
#: rank's write and fsync, so it is generous; override with ``collective_timeout_seconds``.
DEFAULT_TIMEOUT_SECONDS = 600.0


def _how_it_failed(exc: BaseException, timeout_seconds: float) -> str:
    """``within N s`` when the collective timed out; else the peer's connection broke (gloo
    reports a rank that died as a reset or closed connection at once, not after the timeout)."""
    text = str(exc).lower()
    if "timed out" in text or "timeout" in text:
        return f"within {timeout_seconds:.0f} s"
    return "because the connection to another rank broke"


@dataclass(frozen=True)
class HostLayout:
    """Which ranks share a ``local_dir``."""

    local_dirs: tuple[str, ...]  # by rank
    pids: tuple[int, ...]  # by rank

    def host_of(self, rank: int) -> str:
        return self.local_dirs[rank]

    def ranks_of(self, local_dir: str) -> list[int]:
        return [r for r, d in enumerate(self.local_dirs) if d == local_dir]

    def leader_of(self, local_dir: str) -> int:
        return self.ranks_of(local_dir)[0]

    def is_leader(self, rank: int) -> bool:
        return self.leader_of(self.host_of(rank)) == rank

    @property
    def hosts(self) -> list[str]:
        seen: dict[str, None] = {}
        for d in self.local_dirs:
            seen.setdefault(d, None)
        return list(seen)


def coordinator_from_torch(*, timeout_seconds: float | None = None) -> Coordinator | None:
    """The job's coordinator when ``torch.distributed`` is initialised with more than one rank;
    None for a single process (collective on every rank of the default group)."""
    import os

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        world = os.environ.get("WORLD_SIZE", "1")
        if world.isdigit() and int(world) > 1:
            raise ConfigError(
                f"WORLD_SIZE={world} (a torchrun/torch.distributed job) but torch.distributed is not "
                "initialised: call torch.distributed.init_process_group() on every rank before "
                "creating the CheckpointManager, or every rank would write as rank 0"
            )
        return None
    if dist.get_world_size() == 1:
        return None
    return Coordinator(timeout_seconds=timeout_seconds or DEFAULT_TIMEOUT_SECONDS)


class Coordinator:
    """Named, timed exchanges among every rank of the default process group."""

    def __init__(self, *, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ConfigError(
                "torch.distributed is not initialised; call init_process_group() before "
                "creating the CheckpointManager on every rank"
            )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.timeout_seconds = timeout_seconds
        timeout = timedelta(seconds=timeout_seconds)
        try:
            self._groups = {
                "main": dist.new_group(backend="gloo", timeout=timeout),
                "persist": dist.new_group(backend="gloo", timeout=timeout),
            }
        except RuntimeError as exc:
            raise ConfigError(
                f"cannot create spotckpt's gloo process groups ({exc}); spotckpt needs the gloo "
                "backend (built into every PyTorch) beside the job's own"
            ) from exc
        #: one lock per group, held around each collective on it (see the module docstring)
        self._locks = {name: threading.Lock() for name in self._groups}
        from torch.distributed import distributed_c10d as c10d

        self.store = c10d._get_default_store()
        self.hosts: HostLayout | None = None

    def set_hosts(self, local_dir: str) -> HostLayout:
        """Collective: learn every rank's ``local_dir`` (call once, from the constructor)."""
        import os

        recs = self.exchange("hosts", {"dir": local_dir, "pid": os.getpid()})
        self.hosts = HostLayout(tuple(str(r["dir"]) for r in recs), tuple(int(r["pid"]) for r in recs))
        return self.hosts

    @property
    def leader_pid(self) -> int:
        """The process id of this host's leader (names the host's shared staging directories)."""
        assert self.hosts is not None
        return self.hosts.pids[self.hosts.leader_of(self.host)]

    @property
    def host(self) -> str:
        assert self.hosts is not None
        return self.hosts.host_of(self.rank)

    @property
    def is_host_leader(self) -> bool:
        assert self.hosts is not None
        return self.hosts.is_leader(self.rank)

    # -- exchanges -----------------------------------------------------------------------
    def exchange(self, name: str, value: Any = None, *, error: BaseException | None = None,
                 group: str = "main") -> list[Any]:
        """Every rank's ``value`` (JSON-able), by rank. When any rank passes ``error``, every
        rank raises: that rank its own error, the others CollectiveError naming it."""
        mine = {"name": name, "ok": error is None, "value": value if error is None else None,
                "error": None if error is None else f"{type(error).__name__}: {error}"}
        payloads = self._all_gather_bytes(json.dumps(mine, separators=(",", ":")).encode(), name, group)
        recs = [json.loads(p) for p in payloads]
        names = {r["name"] for r in recs}
        if len(names) != 1:
            where = ", ".join(f"rank {i} in {r['name']!r}" for i, r in enumerate(recs))
            raise CollectiveError(
                f"ranks are out of step ({where}): every rank must call restore/save/maybe_save/"
                "wait/close in the same order with the same step",
                ranks=[i for i, r in enumerate(recs) if r["name"] != name],
            )
        failed = [i for i, r in enumerate(recs) if not r["ok"]]
        if failed:
            if error is not None:
                raise error
            first = failed[0]
            raise CollectiveError(
                f"{name}: rank {first} failed ({recs[first]['error']})"
                + (f", and ranks {failed[1:]} too" if len(failed) > 1 else "")
                + "; nothing was committed for this operation",
                ranks=failed,
            )
        return [r["value"] for r in recs]

    #: Bytes each rank sends in the first round of an exchange: a payload that fits (step,
    #: keys, flags: most exchanges) takes one all-gather; a longer one a second round.
    SLOT_BYTES = 4096

    def _all_gather_bytes(self, payload: bytes, name: str, group: str) -> list[bytes]:
        pg = self._groups[group]
        slot = self.SLOT_BYTES
        with self._locks[group]:
            return self._all_gather_locked(payload, name, pg, slot)

    def _all_gather_locked(self, payload: bytes, name: str, pg: Any, slot: int) -> list[bytes]:
        import torch.distributed as dist

        try:
            buf = torch.zeros(slot, dtype=torch.uint8)
            buf[:8] = torch.frombuffer(bytearray(len(payload).to_bytes(8, "little")), dtype=torch.uint8)
            head = payload[: slot - 8]
            if head:
                buf[8 : 8 + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
            outs = [torch.empty_like(buf) for _ in range(self.world_size)]
            dist.all_gather(outs, buf, group=pg)
            sizes = [int.from_bytes(o[:8].numpy().tobytes(), "little") for o in outs]
            if max(sizes) <= slot - 8:
                return [o[8 : 8 + n].numpy().tobytes() for o, n in zip(outs, sizes)]
            big = torch.zeros(max(sizes), dtype=torch.uint8)  # a second round, as long as the longest
            if payload:
                big[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            outs = [torch.empty_like(big) for _ in range(self.world_size)]
            dist.all_gather(outs, big, group=pg)
        except (RuntimeError, ValueError) as exc:
            raise CollectiveError(f"{name}: rank {self.rank} could not exchange with the other ranks "
                                  f"{_how_it_failed(exc, self.timeout_seconds)} ({type(exc).__name__}: "
                                  f"{str(exc)[:300]}); a rank died or stopped calling spotckpt in the same order "
                                  "-- nothing was committed for this operation", ranks=[]) from exc
        return [o[:n].numpy().tobytes() for o, n in zip(outs, sizes)]

    def broadcast_file(self, name: str, src: Path | None, dst: Path | None, nbytes: int,
                       *, chunk_bytes: int = 64 << 20, root: int = 0) -> FileEntry | None:
        """Collective over ``main``: rank ``root`` (default 0) sends the ``nbytes`` of file
        ``src``; each rank with a ``dst`` writes them there through the one durable write path
        (CRC32C in the same pass, fsynced) and gets its size and CRC32C back, to check against
        the manifest. How a host without a shared filesystem or S3 gets another host's files on
        restore (rank 0's replicated files; an adopted folder's files). A read error on the
        sending rank sends zeros, which that check then refuses."""
        import torch.distributed as dist

        from spotckpt.format import write_chunks_durably

        pg = self._groups["main"]
        fin = open(src, "rb", buffering=0) if (self.rank == root and src is not None) else None  # noqa: SIM115

        def parts() -> Iterator[memoryview]:
            buf = torch.empty(max(1, min(chunk_bytes, nbytes)), dtype=torch.uint8)
            off = 0
            while off < nbytes:
                n = min(chunk_bytes, nbytes - off)
                part = buf[:n]
                if fin is not None:
                    try:
                        got = fin.readinto(memoryview(part.numpy()))
                    except OSError:
                        got = 0
                    if got != n:
                        part.zero_()
                try:
                    dist.broadcast(part, src=root, group=pg)
                except (RuntimeError, ValueError) as exc:
                    raise CollectiveError(f"{name}: rank {self.rank} lost the transfer from rank {root} ({exc})") from exc
                yield memoryview(part.numpy())
                off += n

        try:
            with self._locks["main"]:
                if dst is not None:
                    return write_chunks_durably(dst, parts())
                for _ in parts():
                    pass
                return None
        finally:
            if fin is not None:
                fin.close()

    def close(self) -> None:
        import torch.distributed as dist

        for pg in self._groups.values():
            try:
                dist.destroy_process_group(pg)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                log.debug("spotckpt: destroying a process group failed", exc_info=True)
        self._groups.clear()


@dataclass(frozen=True)
class Request:
    """A save the ranks agreed to make: at ``step``, because of ``kind`` ("preempt" or "time")."""

    seq: int
    kind: str
    by_rank: int
    reason: str


_CHANNEL_SEQ = itertools.count()


class RequestChannel:
    """Ask every rank to save at one agreed step, without a collective on the hot path.

    Any rank may :meth:`post` a request (kind ``preempt`` on SIGTERM, ``time`` from rank 0's
    clock); it lands as key ``req/<seq>`` in the job's store (first writer wins, by
    ``compare_set``). A listener thread on every rank blocks on the next key and hands it to the
    training thread, which then only reads a local field each step. On seeing a request, each
    rank reports the step it is at (``rep/<seq>/<rank>``, one store write); once every rank has
    reported, the sync step is ``max(reported) + 1`` and every rank saves there.

    Why ``max + 1`` is never in a rank's past: ranks of a DDP/FSDP job are within one step of
    each other (each step's all-reduce needs every rank). A rank that first sees all reports at
    step ``c`` had not seen them at ``c - 1``, so the last report was made after that, by a rank
    already at step ``c - 1`` or later: ``max >= c - 1`` and ``max + 1 >= c``. Jobs whose ranks
    drift further apart have no such bound; a rank past the sync step raises CollectiveError.
    """

    def __init__(self, store: Any, rank: int, world_size: int, *, prefix: str | None = None) -> None:
        import torch.distributed as dist

        if prefix is None:
            # a key space per channel: a job that closes its manager and builds another one (every
            # rank in the same order) must not see the old channel's requests again
            prefix = f"spotckpt/{next(_CHANNEL_SEQ)}/"
        self._store = dist.PrefixStore(prefix, store)
        # the listener blocks on its own connection, so the training thread's store calls never
        # queue behind its wait
        self._listen_store = dist.PrefixStore(prefix, store.clone()) if hasattr(store, "clone") else self._store
        self.rank = rank
        self.world_size = world_size
        self._next_seq = 0  # the next request this rank has not processed
        self._lock = threading.Lock()
        self._seen: dict[int, Request] = {}
        self._stop = threading.Event()
        self._failed: str | None = None  # why the listener stopped, when it was not close()
        self._thread = threading.Thread(target=self._listen, name="spotckpt-requests", daemon=True)
        self._thread.start()

    # -- training thread -----------------------------------------------------------------
    def pending(self) -> Request | None:
        """The oldest request not yet processed by this rank (a local read). Raises
        CollectiveError once the listener has failed: requests of other ranks (a preemption)
        would no longer be seen, so training must not go on as if none came."""
        with self._lock:
            req = self._seen.get(self._next_seq)
            failed = self._failed
        if failed is not None and req is None:
            raise CollectiveError(
                f"rank {self.rank}: spotckpt's save-request listener stopped ({failed}); save requests from "
                "other ranks (preemption) can no longer be seen -- the job's store (torchrun's rendezvous) "
                "is gone or broken; restart the job", ranks=[self.rank])
        return None if req is None or req.kind == "close" else req

    def post(self, kind: str, reason: str) -> Request:
        """Ask for a save (idempotent per sequence number: a concurrent request wins)."""
        seq = self._next_seq
        payload = json.dumps({"kind": kind, "by": self.rank, "reason": reason}).encode()
        key = f"req/{seq}"
        got = self._store.compare_set(key, b"", payload)
        req = self._parse(seq, got)
        with self._lock:
            self._seen.setdefault(seq, req)
        return self._seen[seq]

    def report(self, req: Request, step: int) -> None:
        self._store.set(f"rep/{req.seq}/{self.rank}", str(step).encode())
        self._store.add(f"count/{req.seq}", 1)

    def sync_step(self, req: Request) -> int | None:
        """The agreed step once every rank reported, else None (one store read)."""
        if self._store.add(f"count/{req.seq}", 0) < self.world_size:
            return None
        keys = [f"rep/{req.seq}/{r}" for r in range(self.world_size)]
        steps = [int(v) for v in self._store.multi_get(keys)]
        return max(steps) + 1

    def done(self, req: Request) -> None:
        """This rank processed ``req``; the next one may be seen."""
        with self._lock:
            if self._next_seq == req.seq:
                self._next_seq += 1

    # -- listener thread -----------------------------------------------------------------
    def _listen(self) -> None:
        seq = 0
        while not self._stop.is_set():
            key = f"req/{seq}"
            try:
                # one long wait (no periodic timeouts: the store logs each one); close() wakes it
                # by posting a "close" request
                self._listen_store.wait([key], timedelta(days=30))
                raw = self._listen_store.get(key)
                req = self._parse(seq, raw)
            except Exception as exc:  # noqa: BLE001 - surfaced on the training thread by pending()
                if self._stop.is_set():
                    return  # closing: the store may already be gone
                why = f"{type(exc).__name__}: {exc}"
                log.error("spotckpt: rank %d: the save-request listener stopped: %s", self.rank, why)
                with self._lock:
                    self._failed = why
                return
            with self._lock:
                self._seen.setdefault(seq, req)
            if req.kind == "close":
                return
            log.info("spotckpt: rank %d saw save request %d (%s by rank %d: %s)",
                     self.rank, seq, req.kind, req.by_rank, req.reason)
            seq += 1

    @staticmethod
    def _parse(seq: int, raw: bytes) -> Request:
        doc = json.loads(raw)
        return Request(seq=seq, kind=str(doc["kind"]), by_rank=int(doc["by"]), reason=str(doc["reason"]))

    def close(self) -> None:
        """Stop the listener (collective use: every rank closes; the first "close" request
        posted after the last real one wakes every listener)."""
        self._stop.set()
        seq = self._next_seq
        while self._thread.is_alive():
            try:
                req = self._parse(seq, self._store.compare_set(
                    f"req/{seq}", b"", json.dumps({"kind": "close", "by": self.rank, "reason": "close"}).encode()))
            except Exception:  # noqa: BLE001 - store gone: the listener ends on its own error
                break
            if req.kind == "close":
                break
            seq += 1
        self._thread.join(timeout=10)


@dataclass(frozen=True)
class SaveCheck:
    """What every rank decided together about one save (:meth:`Coordinator.check_save`)."""

    skip: str | None  # why every rank skips it ("busy", "committed"), or None to save


def check_save(coord: Coordinator, *, step: int, keys: list[str], replicated: list[str], busy: bool,
               committed: bool, error: BaseException | None = None) -> SaveCheck:
    """Collective at the start of every save: every rank passes the same step and the same
    structure (else ConfigError on every rank, nothing saved); a policy save is skipped when a
    rank is still writing the last one; a step committed anywhere is not saved again."""
    recs = coord.exchange("save", {"step": step, "keys": keys, "replicated": replicated, "busy": busy,
                                   "committed": committed}, error=error)
    if len({r["step"] for r in recs}) > 1:
        raise ConfigError("ranks passed different steps to save(): "
                          + ", ".join(f"rank {i}: {r['step']}" for i, r in enumerate(recs))
                          + "; every rank must save the same step -- nothing was saved")
    for name in ("keys", "replicated"):
        odd = [i for i, r in enumerate(recs) if r[name] != recs[0][name]]
        if odd:
            raise ConfigError(f"ranks {odd} passed state with other {name} than rank 0 "
                              f"({recs[odd[0]][name]} vs {recs[0][name]}); every rank must pass the "
                              "same structure -- nothing was saved")
    if any(r["busy"] for r in recs):
        return SaveCheck("busy")
    if any(r["committed"] for r in recs):
        return SaveCheck("committed")
    return SaveCheck(None)


class SaveAgreement:
    """The training thread's side of :class:`RequestChannel`: call :meth:`due` every step; it
    returns the request to save for *now* (at the agreed step), else None. ``ask`` is the
    request this rank would post itself this step (kind, reason), if any."""

    def __init__(self, channel: RequestChannel) -> None:
        self.channel = channel
        self._reported: int | None = None
        self._sync: int | None = None

    def due(self, step: int, ask: tuple[str, str] | None) -> Request | None:
        ch = self.channel
        req = ch.pending()
        if req is None and ask is not None:
            req = ch.post(*ask)
        if req is None:
            return None
        if self._reported != req.seq:
            ch.report(req, step)
            self._reported, self._sync = req.seq, None
        if self._sync is None:
            self._sync = ch.sync_step(req)
        if self._sync is None or step < self._sync:
            return None
        if step > self._sync:
            raise CollectiveError(
                f"rank {ch.rank} is at step {step}, past step {self._sync} that the ranks agreed to save "
                "at: ranks drift more than a step apart (is there a per-step collective?)")
        ch.done(req)
        self._sync = None
        return req
