"""One run of CMD on a simulated instance: started in its own process group, its output copied,
stopped like a spot instance (SIGTERM, then SIGKILL to the whole group after the grace).

Threads: the simulator's thread calls every method; one ``spotckpt-sim-output`` thread per
process copies CMD's output, whole line by whole line, to the instance's log file and (unless
``echo`` is None) to ``echo`` prefixed with ``  | ``. CMD's stdout and stderr are one pipe, so
its lines come out in the order it wrote them (two pipes read by two threads could print a
``durable_s3`` metric line, written to stderr, after the ``preempted ... durable`` line the
trainer printed to stdout after it). The copier only copies: the simulator follows the trainer
through its events file, not its output.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TextIO

from spotckpt.errors import ConfigError
from spotckpt.remote.sidecar import forward_signal

__all__ = ["TrainerProcess", "HostGroup", "free_port", "host_commands"]

_POLL_SECONDS = 0.05


_TAIL_LINES = 20


class _Copier:
    def __init__(self, pipe: IO[bytes], log_file: IO[bytes], echo: TextIO | None, lock: threading.Lock) -> None:
        self._pipe, self._log, self._echo, self._lock = pipe, log_file, echo, lock
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)  # the last lines
        self.thread = threading.Thread(target=self._run, name="spotckpt-sim-output", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for raw in iter(self._pipe.readline, b""):
            with self._lock:
                self.tail.append(raw.decode("utf-8", "replace").rstrip())
                self._log.write(raw)
                if self._echo is not None:
                    try:
                        self._echo.write(f"  | {raw.decode('utf-8', 'replace').rstrip()}\n")
                        self._echo.flush()
                    except (OSError, ValueError):
                        pass
        self._pipe.close()


class TrainerProcess:
    """CMD, started at construction (ConfigError when it cannot be started)."""

    def __init__(self, cmd: list[str], *, env: dict[str, str], log_path: Path, echo: TextIO | None,
                 lock: threading.Lock) -> None:
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in wait()
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            self._log.close()
            raise ConfigError(f"cannot start {cmd[0]!r}: {exc}; check the command after '--'") from exc
        assert self.proc.stdout is not None
        self._copier = _Copier(self.proc.stdout, self._log, echo, lock)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def output_tail(self) -> list[str]:
        """The last lines CMD wrote, stdout and stderr together (call after :meth:`wait`)."""
        return list(self._copier.tail)

    def stop(self, grace_s: float, *, while_waiting: Callable[[], None]) -> bool:
        """SIGTERM to CMD (and through a shell to its children), SIGKILL to its whole group if it
        is still running ``grace_s`` later -- like a container runtime stopping the instance.
        ``while_waiting`` is called on every poll meanwhile. Returns whether SIGKILL was needed."""
        forward_signal(self.proc.pid, signal.SIGTERM)
        kill_at = time.monotonic() + grace_s
        while self.proc.poll() is None and time.monotonic() < kill_at:
            while_waiting()  # a trainer may go on training during the grace
            try:
                self.proc.wait(timeout=min(_POLL_SECONDS, max(0.001, kill_at - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
        killed = self.proc.poll() is None
        if killed:
            self.kill_group()
            self.proc.wait()
        # Whatever CMD spawned in its group goes too: the "instance" is gone.
        self.kill_group()
        return killed

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:  # the group leader's pid was reused; fall back to the process
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self) -> int:
        """CMD's exit status once it and the output copiers are done (negative: died of a signal)."""
        rc = self.proc.wait()
        self._copier.thread.join()
        self._log.close()
        return rc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the simulated hosts' rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def host_commands(cmd: list[str], hosts: int, *, port: int) -> list[list[str]]:
    """CMD for each of ``hosts`` simulated hosts: one torchrun agent per host, made into the
    nodes of one job (``--nnodes``, ``--node_rank``, rendezvous on 127.0.0.1:``port``). One host:
    CMD unchanged. ConfigError when several hosts are asked for a command that is not torchrun."""
    if hosts == 1:
        return [list(cmd)]
    from spotckpt.remote.sidecar import torchrun_arg_index

    at = torchrun_arg_index(cmd)
    if at is None:
        raise ConfigError("--hosts needs a torchrun command (e.g. -- torchrun --nproc_per_node 2 train.py): "
                          "each simulated host runs one torchrun agent")
    taken = {"--nnodes", "--node_rank", "--node-rank", "--master_addr", "--master-addr", "--master_port",
             "--master-port", "--rdzv_endpoint", "--rdzv-endpoint"}
    clash = [a for a in cmd[at:] if a.split("=", 1)[0] in taken]
    if clash:
        raise ConfigError(f"with --hosts, simulate sets {', '.join(sorted(taken))} itself; drop {clash}")
    return [[*cmd[:at], f"--nnodes={hosts}", f"--node_rank={h}", "--master_addr=127.0.0.1",
             f"--master_port={port}", *cmd[at:]] for h in range(hosts)]


class HostGroup:
    """Several simulated hosts of one instance (one job), with :class:`TrainerProcess`'s
    interface: the job runs until every host's CMD exited; an interruption SIGTERMs some hosts
    (``interrupt``: the host indices spot capacity takes away) and SIGKILLs every host still
    running when the grace is over."""

    def __init__(self, procs: list[TrainerProcess]) -> None:
        self.hosts = procs
        self.proc = procs[0].proc
        self.interrupt: list[int] = list(range(len(procs)))

    @property
    def pid(self) -> int:
        return self.hosts[0].pid

    def poll(self) -> int | None:
        codes = [p.poll() for p in self.hosts]
        if any(c is None for c in codes):
            return None
        return next((c for c in codes if c), 0)

    def stop(self, grace_s: float, *, while_waiting: Callable[[], None]) -> bool:
        for i in self.interrupt:
            forward_signal(self.hosts[i].pid, signal.SIGTERM)
        kill_at = time.monotonic() + grace_s
        while self.poll() is None and time.monotonic() < kill_at:
            while_waiting()
            time.sleep(_POLL_SECONDS)
        killed = self.poll() is None
        for p in self.hosts:
            p.kill_group()
        return killed

    def kill_group(self) -> None:
        for p in self.hosts:
            p.kill_group()

    def output_tail(self) -> list[str]:
        return [f"host {h}: {ln}" for h, p in enumerate(self.hosts) for ln in p.output_tail()]

    def wait(self) -> int:
        codes = [p.wait() for p in self.hosts]
        return next((c for c in codes if c), 0)
