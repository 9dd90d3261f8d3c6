"""The durable write path at the disk's floor: CRC32C on a helper thread beside the write, the
disk's writeback started while the file is still being written, and the stager's copy of a small
state on the calling thread. Each is checked for exactness, since a wrong checksum here would
commit a step that never verifies."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch

import spotckpt.core.stage as stage_mod
import spotckpt.format.checksums as checksums
from spotckpt.core.stage import Stager
from spotckpt.format import copy_file_durably, crc32c_b64, write_chunks_durably, write_safetensors


def _crc_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("spotckpt-crc")]


@pytest.mark.parametrize("stable", [False, True])
def test_checksum_beside_the_write_is_exact_with_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         stable: bool) -> None:
    # small parts so that a few MiB make many parts, some cut at the marks, all on the helper
    monkeypatch.setattr(checksums, "IO_CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(checksums, "BACKGROUND_CRC_MIN_BYTES", 1)
    monkeypatch.setattr(checksums, "io_threads", lambda: 2)
    rng = np.random.default_rng(7)
    chunks = [rng.integers(0, 256, n, dtype=np.uint8) for n in (5, (3 << 20) + 11, 0, 77, (1 << 20) - 3, 4096)]
    data = b"".join(c.tobytes() for c in chunks)
    ranges = {"a": (5, (3 << 20) + 16), "b": (100, 200), "c": (len(data) - 4096, len(data))}
    entry = write_chunks_durably(tmp_path / "f", iter(chunks), ranges=ranges, stable=stable)
    assert (tmp_path / "f").read_bytes() == data
    assert (entry.size, entry.crc32c) == (len(data), crc32c_b64(crc32c.crc32c(data)))
    for key, (a, b, crc) in ranges.items():
        assert crc == crc32c_b64(crc32c.crc32c(data[a:b])), key
    assert not _crc_threads()


def test_a_buffer_refilled_between_chunks_is_checksummed_before_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """copy_file_durably (and the file transfer between ranks) hand over one buffer refilled for
    every chunk: the helper must be done with it before the next chunk is produced."""
    monkeypatch.setattr(checksums, "IO_CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(checksums, "io_threads", lambda: 2)
    src = tmp_path / "src"
    src.write_bytes(np.random.default_rng(3).integers(0, 256, (5 << 20) + 123, dtype=np.uint8).tobytes())
    got = copy_file_durably(src, tmp_path / "dst", chunk_bytes=(2 << 20) + 1)
    data = src.read_bytes()
    assert (tmp_path / "dst").read_bytes() == data
    assert got.crc32c == crc32c_b64(crc32c.crc32c(data))

    buf = bytearray(2 << 20)

    def refilled() -> Iterator[memoryview]:
        for i in range(4):
            buf[:] = bytes([i]) * len(buf)
            yield memoryview(buf)

    entry = write_chunks_durably(tmp_path / "g", refilled())
    want = b"".join(bytes([i]) * len(buf) for i in range(4))
    assert entry.crc32c == crc32c_b64(crc32c.crc32c(want))


def test_writeback_starts_while_the_file_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if checksums._sync_file_range is None:
        pytest.skip("sync_file_range(2) is Linux-only")
    monkeypatch.setattr(checksums, "WRITEBACK_BYTES", 1 << 20)
    monkeypatch.setattr(checksums, "IO_CHUNK_BYTES", 1 << 20)
    calls: list[tuple[int, int]] = []
    real = checksums.start_writeback

    def spy(fd: int, offset: int, nbytes: int) -> bool:
        calls.append((offset, nbytes))
        return real(fd, offset, nbytes)

    monkeypatch.setattr(checksums, "start_writeback", spy)
    t = torch.randn(5 << 18)  # 5 MiB
    write_safetensors(tmp_path / "x.safetensors", {"t": t})
    # consecutive stretches from the start, each started before the next was written
    assert len(calls) >= 4 and calls[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:]))
    calls.clear()
    write_safetensors(tmp_path / "y.safetensors", {"t": t}, fsync=False)  # not made durable: no writeback
    assert calls == []


def test_a_failed_write_ends_the_helper_and_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksums, "IO_CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(checksums, "io_threads", lambda: 2)

    def chunks() -> Iterator[bytes]:
        yield bytes(3 << 20)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_chunks_durably(tmp_path / "f", chunks(), stable=True)
    assert not _crc_threads()


@pytest.mark.parametrize("serial_below", [stage_mod.SERIAL_COPY_BYTES, 0])
def test_stager_copies_every_byte_small_or_large(monkeypatch: pytest.MonkeyPatch, serial_below: int) -> None:
    """A small state is copied by the calling thread (numpy memcpys for tensors above torch's
    grain, one batched call for the rest); a large one by torch's batched copy. Both exact."""
    monkeypatch.setattr(stage_mod, "SERIAL_COPY_BYTES", serial_below)
    g = torch.Generator().manual_seed(11)
    tensors = {
        "big": torch.randn(64 * 1024, generator=g),  # 256 KiB: above the grain
        "small": torch.randn(100, generator=g),
        "half": torch.randn(40, 30, generator=g).to(torch.bfloat16),
        "ints": torch.randint(0, 1 << 30, (20_000,), generator=g),
        "strided": torch.randn(300, 200, generator=g).t(),  # not contiguous
        "empty": torch.randn(0),
    }
    st = Stager(pin_memory=False)
    for _ in range(2):  # the second save reuses the layout and the buffer
        staged = st.stage(tensors)
        for spec in staged.specs:
            got = staged.data[spec.start:spec.end].view(spec.dtype).reshape(spec.shape)
            assert torch.equal(got, tensors[spec.name]), spec.name
        st.release(staged)
        with torch.no_grad():
            for t in tensors.values():
                t.mul_(2) if t.dtype != torch.int64 else t.add_(1)
