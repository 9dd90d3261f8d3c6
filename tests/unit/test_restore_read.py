"""The restore read path: CRC32C combine, multi-threaded verification and reads, and the safety
property it must keep -- a step that fails verification never touches the live state."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch

from spotckpt import AllStepsCorruptError
from torch import nn

import spotckpt.format.checksums as checksums
from spotckpt import CheckpointManager
from spotckpt.errors import CheckpointCorruptError, StateError
from spotckpt.format import (
    SafetensorsFile,
    crc32c_combine,
    file_crc32c,
    file_crc32c_parallel,
    write_safetensors,
)
from spotckpt.core.local import LocalStore

# ----------------------------------------------------------------------------- CRC combine


@pytest.mark.parametrize("len_a", [0, 1, 7, 4096, 100_003])
@pytest.mark.parametrize("len_b", [0, 1, 3, 8, 65_537, 1_000_001])
def test_crc32c_combine_matches_concatenation(len_a: int, len_b: int) -> None:
    rng = np.random.default_rng(len_a * 31 + len_b)
    a = rng.integers(0, 256, len_a, dtype=np.uint8).tobytes()
    b = rng.integers(0, 256, len_b, dtype=np.uint8).tobytes()
    assert crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)


@pytest.mark.parametrize("len_b", [(1 << 29) + 3, (1 << 32) + 1])
def test_crc32c_combine_large_second_part(len_b: int) -> None:
    # zlib wraps its x^(2^k) table at 32 entries; for Castagnoli that is wrong from 512 MiB on.
    a = b"spotckpt"
    if len_b > 1 << 30:
        # A 4 GiB buffer is too much for a unit test: build crc(zeros(len_b)) from halves and
        # check associativity, which a wrong table breaks too.
        half = len_b // 2
        z1 = crc32c.crc32c(bytes(half))
        zb = crc32c_combine(z1, crc32c.crc32c(bytes(len_b - half)), len_b - half)
        assert crc32c_combine(crc32c_combine(crc32c.crc32c(a), z1, half), crc32c.crc32c(bytes(len_b - half)),
                              len_b - half) == crc32c_combine(crc32c.crc32c(a), zb, len_b)
        return
    zeros = bytes(len_b)  # calloc'ed: reading it maps the shared zero page
    assert crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(zeros), len_b) == crc32c.crc32c(zeros, crc32c.crc32c(a))


def test_crc32c_combine_rejects_negative_length() -> None:
    with pytest.raises(ValueError):
        crc32c_combine(0, 0, -1)


# ------------------------------------------------------------------ parallel file checksum


@pytest.mark.parametrize("size", [0, 1, 4095, 4097, (3 << 20) + 11])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_file_crc32c_parallel_equals_sequential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, threads: int
) -> None:
    # Small windows and threshold so that ranges and windows start at unaligned offsets.
    monkeypatch.setattr(checksums, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr(checksums, "VERIFY_WINDOW_BYTES", 1 << 20)
    p = tmp_path / "f.bin"
    p.write_bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())
    assert file_crc32c_parallel(p, threads=threads) == file_crc32c(p) == (size, crc32c.crc32c(p.read_bytes()))


def test_file_crc32c_parallel_falls_back_to_pread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_mmap(*a: object, **k: object) -> None:
        raise OSError(errno.ENODEV, "mmap not supported here")

    monkeypatch.setattr(checksums, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr(checksums, "map_readonly", no_mmap)  # this module's seam only
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom((2 << 20) + 5))
    assert file_crc32c_parallel(p, threads=2) == file_crc32c(p)


# ---------------------------------------------------------------------- parallel reads


def test_read_into_in_parallel_slices_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksums, "PARALLEL_MIN_BYTES", 1)
    g = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randn(3 * 1024 * 1024 + 17, generator=g),  # ~12 MiB, odd length
        "b": torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g),
        "c": torch.randn(0),
        "d": torch.randn(1000, 513, generator=g).to(torch.bfloat16),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors)
    with SafetensorsFile(tmp_path / "x.safetensors", threads=3) as r:
        for name, want in tensors.items():
            target = torch.full_like(want, 7)
            r.read_into(name, target)
            assert torch.equal(target, want), name
            assert torch.equal(r.read(name), want), name
    assert not [t for t in threading.enumerate() if t.name.startswith("spotckpt-restore-read")]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_read_many_is_exact_across_run_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    # Several tensors of odd sizes: the runs of the threads start and end inside tensors.
    monkeypatch.setattr(checksums, "PARALLEL_MIN_BYTES", 1)
    g = torch.Generator().manual_seed(5)
    tensors = {f"t{i}": torch.randn(300_000 + 77 * i, generator=g) for i in range(7)}
    tensors["empty"] = torch.randn(0)
    tensors["bf16"] = torch.randn(999, 3, generator=g).to(torch.bfloat16)
    write_safetensors(tmp_path / "x.safetensors", tensors)
    targets = {n: torch.full_like(t, 7) for n, t in tensors.items()}
    targets["t3"] = torch.full((tensors["t3"].numel() * 2,), 7.0)[::2]  # non-contiguous: read_into
    with SafetensorsFile(tmp_path / "x.safetensors", threads=threads) as r:
        r.read_many(reversed(list(targets.items())))
    for n, want in tensors.items():
        assert torch.equal(targets[n], want), n
    assert not [t for t in threading.enumerate() if t.name.startswith("spotckpt-restore-read")]


def test_read_many_checks_every_shape_before_writing(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(1000), "b": torch.randn(10)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    a, b = torch.zeros(1000), torch.zeros(11)  # b is the wrong shape
    with SafetensorsFile(tmp_path / "x.safetensors") as r:
        with pytest.raises(StateError, match="'b'"):
            r.read_many([("a", a), ("b", b)])
        with pytest.raises(CheckpointCorruptError, match="missing"):
            r.read_many([("a", a), ("nope", b)])
    assert not a.any() and not b.any()


def test_truncation_seen_by_a_helper_thread_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksums, "PARALLEL_MIN_BYTES", 1)
    t = torch.randn(4 * 1024 * 1024)  # 16 MiB: the last slice is read by a helper
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"t": t})
    with SafetensorsFile(p, threads=2) as r:
        os.truncate(p, p.stat().st_size - 1024)
        with pytest.raises(CheckpointCorruptError, match="truncated"):
            r.read_into("t", torch.empty_like(t))


# ------------------------------------------------------------- verify before any write


class _Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6 * 1024 * 1024))  # 24 MiB: split across threads
        self.b = nn.Parameter(torch.randn(10))


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _saved_steps(tmp_path: Path, older_step: bool) -> tuple[_Big, dict[str, object], dict[str, torch.Tensor]]:
    """A model saved as step 2 (and, ``older_step``, as step 1 before a change: its values are
    returned); the model's state dict is what the tests corrupt and restore into."""
    model = _Big()
    state: dict[str, object] = {"model": model}
    step1: dict[str, torch.Tensor] = {}
    with CheckpointManager(tmp_path, async_save=False, install_signal_handlers=False, metrics=False) as mgr:
        if older_step:
            mgr.save(1, state, blocking=True)
            step1 = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.w.add_(1.0)
        mgr.save(2, state, blocking=True)
    return model, state, step1


@pytest.mark.parametrize("older_step", [False, True])
def test_corrupt_second_half_never_touches_live_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, older_step: bool
) -> None:
    monkeypatch.setattr(checksums, "io_threads", lambda: 2)  # split even on a 1-CPU runner
    monkeypatch.setattr(checksums, "VERIFY_WINDOW_BYTES", 4 << 20)
    torch.manual_seed(0)
    model, state, step1 = _saved_steps(tmp_path, older_step)
    st_file = tmp_path / "step-000000000002" / "rank-00000.safetensors"
    size = st_file.stat().st_size
    _flip_byte(st_file, size * 3 // 4)  # in the range the second verify thread checksums

    check = LocalStore(tmp_path).verify_step(2)
    assert not check.ok and "CRC32C" in check.problems[0]

    with torch.no_grad():
        model.w.fill_(-3.0)
        model.b.fill_(-3.0)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with CheckpointManager(tmp_path, async_save=False, install_signal_handlers=False, metrics=False) as mgr:
        if older_step:
            got = mgr.restore(state)
        else:  # the only step is corrupt: that is not "no checkpoint"
            with pytest.raises(AllStepsCorruptError, match=r"step 2: local: .*CRC32C") as info:
                mgr.restore(state)
            assert list(info.value.problems) == [2]
    if older_step:
        assert got == 1
        for k, v in model.state_dict().items():
            assert torch.equal(v, step1[k]), k
    else:
        for k, v in model.state_dict().items():
            assert torch.equal(v, live[k]), k  # not one byte written
    assert not [t for t in threading.enumerate() if t.name.startswith(("spotckpt-verify", "spotckpt-restore-read"))]


def test_restore_of_a_large_split_step_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksums, "io_threads", lambda: 3)
    torch.manual_seed(1)
    model = _Big()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"model": model, "extra": torch.randn(3 * 1024 * 1024)}
    extra = state["extra"].clone()
    with CheckpointManager(tmp_path, async_save=False, install_signal_handlers=False, metrics=False) as mgr:
        mgr.save(4, state, blocking=True)
    with torch.no_grad():
        model.w.zero_()
        state["extra"].zero_()
    with CheckpointManager(tmp_path, async_save=False, install_signal_handlers=False, metrics=False) as mgr:
        assert mgr.restore(state) == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert torch.equal(state["extra"], extra)


# ------------------------------------------------------------ verify while reading


_PATHS = ["mapped windows", "verified mapping", "verified, no mapping", "pread", "mapping refused"]


@pytest.mark.parametrize("path", _PATHS)
def test_every_read_path_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """The ways bytes reach a tensor: mapped windows (small here, so runs cross them), the
    mapping a verifying reader checksummed, the windowed checksum when the whole file is not
    mapped, plain preadv, and pread for a window the kernel refuses to map."""
    monkeypatch.setattr(checksums, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr(checksums, "VERIFY_WINDOW_BYTES", 1 << 20)
    if path == "verified, no mapping":
        monkeypatch.setattr(checksums, "whole_map_limit", lambda: 0)
    elif path == "pread":
        monkeypatch.setattr(checksums, "mapped_reads_ok", lambda: False)
    elif path == "mapping refused":
        def no_mmap(*a: object, **k: object) -> None:
            raise OSError(errno.ENODEV, "mmap not supported here")
        monkeypatch.setattr(checksums, "map_readonly", no_mmap)
    g = torch.Generator().manual_seed(9)
    tensors = {f"t{i}": torch.randn(200_000 + 1031 * i, generator=g) for i in range(6)}
    tensors["bf16"] = torch.randn(999, 3, generator=g).to(torch.bfloat16)
    tensors["empty"] = torch.randn(0)
    p = tmp_path / "x.safetensors"
    entry = write_safetensors(p, tensors)
    targets = {n: torch.full_like(t, 7) for n, t in tensors.items()}
    targets["t2"] = torch.full((tensors["t2"].numel() * 2,), 7.0)[::2]  # non-contiguous: read_into
    with SafetensorsFile(p, threads=3, expect=entry if path.startswith("verified") else None) as r:
        assert (r._mapped is not None) == (path == "verified mapping")
        r.read_many(list(targets.items()))
        assert torch.equal(r.read("t4"), tensors["t4"])
    for n, want in tensors.items():
        assert torch.equal(targets[n], want), n
    assert not [t for t in threading.enumerate() if t.name.startswith(("spotckpt-restore-read", "spotckpt-verify"))]


@pytest.mark.parametrize("mapped", [True, False])
def test_a_verifying_reader_refuses_a_corrupt_file_before_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: bool) -> None:
    monkeypatch.setattr(checksums, "PARALLEL_MIN_BYTES", 1)
    if not mapped:
        monkeypatch.setattr(checksums, "whole_map_limit", lambda: 0)
    p = tmp_path / "x.safetensors"
    entry = write_safetensors(p, {"t": torch.randn(1 << 20)})
    _flip_byte(p, p.stat().st_size // 2)
    with pytest.raises(CheckpointCorruptError, match=r"CRC32C .* != .* in manifest \(corrupt\)"):
        SafetensorsFile(p, threads=2, expect=entry)
    with pytest.raises(CheckpointCorruptError, match="manifest says"):
        SafetensorsFile(p, expect=type(entry)(entry.size + 1, entry.crc32c))
    assert not [t for t in threading.enumerate() if t.name.startswith("spotckpt-restore-read")]


@pytest.mark.parametrize("older_step", [False, True])
def test_corrupt_byte_mid_tensor_is_caught_while_reading_and_lands_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, older_step: bool) -> None:
    """The restore verifies the tensor file as it reads it (one mapping, checksummed by two
    threads, then copied from): a byte flipped in the middle of a large tensor is caught before
    a byte of that step lands -- the live state keeps its values, or gets the older step whole."""
    monkeypatch.setattr(checksums, "io_threads", lambda: 2)  # split even on a 1-CPU runner
    verified: list[tuple[str, bool]] = []  # (step dir, through a mapping) of each verifying reader
    real = SafetensorsFile._verify

    def spy(self: SafetensorsFile, expect: object) -> None:
        try:
            real(self, expect)  # type: ignore[arg-type]
        finally:
            verified.append((Path(self.path).parent.name, self._mapped is not None))

    monkeypatch.setattr(SafetensorsFile, "_verify", spy)
    crc_checked: list[str] = []
    real_verify = checksums.file_crc32c_parallel
    monkeypatch.setattr("spotckpt.format.manifest.file_crc32c_parallel",
                        lambda p, **k: (crc_checked.append(Path(p).name), real_verify(p, **k))[1])
    torch.manual_seed(2)
    model, state, step1 = _saved_steps(tmp_path, older_step)
    st_file = tmp_path / "step-000000000002" / "rank-00000.safetensors"
    with SafetensorsFile(st_file) as r:  # the middle of the large tensor's bytes
        spec = r.specs["model/w"]
        middle = r._data_start + (spec.start + spec.end) // 2
    _flip_byte(st_file, middle)
    with torch.no_grad():
        model.w.fill_(-3.0)
        model.b.fill_(-3.0)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with CheckpointManager(tmp_path, async_save=False, install_signal_handlers=False, metrics=False) as mgr:
        if older_step:
            assert mgr.restore(state) == 1
        else:
            with pytest.raises(AllStepsCorruptError, match=r"step 2: local: .*CRC32C") as info:
                mgr.restore(state)
            assert list(info.value.problems) == [2]
    want = step1 if older_step else live
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert verified[0] == ("step-000000000002", True)  # caught through the mapping the load reads ...
    assert "rank-00000.safetensors" not in crc_checked  # ... not by a checksum pass before the load
    assert not [t for t in threading.enumerate() if t.name.startswith(("spotckpt-verify", "spotckpt-restore-read"))]


def test_crc32c_update_matches_the_reference_whichever_implementation() -> None:
    """crc32c_update uses awscrt's CRC32C when it imports (faster), else the crc32c package:
    either way the same values, for every buffer shape the library hands it."""
    rng = np.random.default_rng(4)
    for n in (0, 1, 7, 4096, (1 << 20) + 3):
        b = rng.integers(0, 256, n, dtype=np.uint8)
        want = crc32c.crc32c(b.tobytes(), 5)
        assert checksums.crc32c_update(5, b) == want, n
        assert checksums.crc32c_update(5, memoryview(b)) == want, n
        assert checksums.crc32c_update(5, b.tobytes()) == want, n
    f = torch.randn(1000).numpy()  # a float view, as a tensor's bytes reach it
    assert checksums.crc32c_update(0, f) == crc32c.crc32c(f.tobytes())
    assert checksums.CRC32C_IMPL in ("awscrt", "crc32c")
