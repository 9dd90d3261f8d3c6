"""Helpers shared by tests: deterministic states whose content is a function of the step,
the invariant every fault test asserts, and reading a child process's output until a line."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from spotckpt.core.local import LocalStore
from spotckpt.tools.simulate.process import free_port  # noqa: F401 - one definition, shared with simulate


REPO = Path(__file__).resolve().parents[1]


def read_lines_until(
    proc: subprocess.Popen[str], done: Callable[[list[str]], bool], *, timeout: float = 120.0, what: str = "",
) -> list[str]:
    """Read ``proc``'s stdout line by line until ``done(lines)`` holds; the lines read so far.
    AssertionError (with the last lines) when the child closes stdout or ``timeout`` passes
    first -- a test never hangs on a child that stopped talking."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if done(lines):
            return lines
    raise AssertionError(f"child never printed {what or 'the expected line'}: {lines[-5:]}")


def count_prefix(prefix: str, count: int = 1) -> Callable[[list[str]], bool]:
    """A ``done`` for :func:`read_lines_until`: ``count`` lines starting with ``prefix`` seen."""
    return lambda lines: sum(1 for ln in lines if ln.startswith(prefix)) >= count


def step_state(step: int, *, numel: int = 1 << 16, n: int = 4) -> dict[str, object]:
    """A state whose every value is determined by ``step`` (so a restore can be checked)."""
    g = torch.Generator().manual_seed(step)
    return {
        "weights": {f"w{i}": torch.randn(numel, generator=g) for i in range(n)},
        "step_tensor": torch.full((3,), float(step)),
        "meta": {"step": step, "name": f"s{step}"},
    }


def empty_state(*, numel: int = 1 << 16, n: int = 4) -> dict[str, object]:
    return {
        "weights": {f"w{i}": torch.zeros(numel) for i in range(n)},
        "step_tensor": torch.zeros(3),
        "meta": None,
    }


def assert_state_is_step(state: dict[str, object], step: int, *, numel: int = 1 << 16, n: int = 4) -> None:
    want = step_state(step, numel=numel, n=n)
    assert state["meta"] == want["meta"], (state["meta"], step)
    assert torch.equal(state["step_tensor"], want["step_tensor"])  # type: ignore[arg-type]
    for k, v in want["weights"].items():  # type: ignore[union-attr]
        assert torch.equal(state["weights"][k], v), k  # type: ignore[index]


def assert_all_steps_verify(root: Path) -> list[int]:
    """The invariant of every fault test: each committed step verifies completely."""
    store = LocalStore(root, create=False, cleanup=False)
    steps = store.committed_steps()
    for s in steps:
        check = store.verify_step(s)
        assert check.ok, (s, check.problems)
    return steps


def write_step(root: Path, step: int, nbytes: int = 64 * 1024, *, seed: int = 0, nfiles: int = 1):  # type: ignore[no-untyped-def]
    """Write a committed step of random bytes the way the real writer does (staging dir,
    fsync, rename into ``root``); ``nfiles`` safetensors files plus a tree. Returns its Manifest."""
    import os
    import tempfile

    from spotckpt.format import MANIFEST_NAME, FileEntry, Manifest, crc32c_b64, file_crc32c, step_dirname
    from spotckpt.format import write_safetensors

    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=root.parent, prefix=".stage-"))
    g = torch.Generator().manual_seed(seed * 1000 + step)
    files = {}
    for r in range(nfiles):
        name = f"rank-{r:05d}.safetensors"
        files[name] = write_safetensors(stage / name, {"w": torch.randint(0, 255, (nbytes,), dtype=torch.uint8, generator=g)})
    (stage / "rank-00000.tree.json").write_bytes(b'{"step": %d}' % step)
    size, crc = file_crc32c(stage / "rank-00000.tree.json")
    files["rank-00000.tree.json"] = FileEntry(size, crc32c_b64(crc))
    man = Manifest(step=step, files=files)
    with open(stage / MANIFEST_NAME, "wb") as f:
        f.write(man.to_bytes())
        os.fsync(f.fileno())
    os.rename(stage, root / step_dirname(step))
    return man


def launch_ranks(
    argv_of: Callable[[int], list[str]], world_size: int, *, env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> list[subprocess.Popen[str]]:
    """Start ``world_size`` processes of one torch.distributed job on 127.0.0.1 (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set as torchrun sets them); ``argv_of(rank)`` is
    each one's command line. stdout and stderr are pipes (text)."""
    import os

    port = free_port()
    procs = []
    for r in range(world_size):
        e = dict(os.environ, **(env or {}))
        e.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SPOTCKPT_METRICS=e.get("SPOTCKPT_METRICS", "0"))
        procs.append(subprocess.Popen(argv_of(r), env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=cwd or REPO))
    return procs


def finish_ranks(procs: list[subprocess.Popen[str]], *, timeout: float = 300.0) -> list[tuple[int, str, str]]:
    """Wait for every rank (killing all of them if one outlives ``timeout``); (code, out, err)."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def result_of(out: str) -> dict:  # type: ignore[type-arg]
    """The ``result {json}`` line a rank child printed."""
    import json

    lines = [ln for ln in out.splitlines() if ln.startswith("result ")]
    assert lines, out[-2000:]
    return json.loads(lines[-1][len("result "):])  # type: ignore[no-any-return]


def done_lines(results: list[tuple[int, str, str]]) -> list[str]:
    """Each rank's ``... done at step N; weights ...; losses ...`` line of an example trainer
    (after its ``tag: ``), asserting every rank exited 0 and printed exactly one."""
    lines = []
    for code, out, err in results:
        assert code == 0, err[-3000:]
        done = [ln for ln in out.splitlines() if " done at step " in ln]
        assert len(done) == 1, out[-2000:]
        lines.append(done[0].split(": ", 1)[1])
    return lines


def interrupted_under_run(example: list[str], uri: str, local: Path, *, env: dict[str, str], tag: str,
                          at_step: int = 25) -> tuple[list[int], str]:
    """Run an example trainer (``example``: its argv) under ``spotckpt run --s3 uri``, SIGTERM it
    once it printed ``{tag}: step {at_step} ``, assert it exited 0 with a preemption save in S3;
    return the committed steps in S3 and its stderr."""
    import signal
    import subprocess
    import sys

    from spotckpt.remote.s3 import S3Store

    run = subprocess.Popen([sys.executable, "-m", "spotckpt.tools.cli", "run", "--s3", uri, "--local", str(local),
                            "--", *example], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=REPO)
    try:
        read_lines_until(run, count_prefix(f"{tag}: step {at_step} "), what=f"step {at_step}")
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err[-3000:]
    in_s3 = S3Store(uri).list_steps()
    assert in_s3 and at_step <= in_s3[-1], in_s3
    assert f"preempted at step {in_s3[-1]}" in err
    return in_s3, err


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` (a directory) really read-only for this block: as root, a read-only bind mount
    of it on itself (root ignores modes); otherwise mode 0555. Skips the test where neither
    works -- never a patched ``os`` function."""
    import os

    import pytest

    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    bind = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, text=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {ro.stderr.strip()}")
        yield
    finally:
        subprocess.run(["umount", str(path)], check=False, capture_output=True)
