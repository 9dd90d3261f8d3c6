"""`spotckpt ls` / `verify` / `restore` on local directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotckpt import CheckpointManager
from spotckpt.tools.cli import main
from tests.helpers import assert_state_is_step, empty_state, step_state


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    with CheckpointManager(d, keep_last=None, metrics=False) as mgr:
        for s in (10, 20, 30):
            mgr.save(s, step_state(s, numel=256))
    return d


def test_ls_and_verify_valid(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "STEP" in out and "CREATED" in out
    rows = [ln.split() for ln in out.splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [10, 20, 30]
    assert main(["verify", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert out.count(" valid") == 3


def test_verify_exits_1_when_newest_is_corrupt(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = ckpt / "step-000000000030" / "rank-00000.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    assert main(["ls", str(ckpt)]) == 0  # sizes still match: ls does not read data
    capsys.readouterr()
    assert main(["verify", str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert "corrupt" in out.splitlines()[-1] and "CRC32C" in out
    # an older corrupt step does not fail verify
    f.write_bytes(bytes(raw[:-1]) + bytes([raw[-1] ^ 0xFF]))
    (ckpt / "step-000000000010" / "rank-00000.tree.json").write_text("x")
    assert main(["verify", str(ckpt)]) == 0
    assert main(["ls", str(ckpt)]) == 0


def test_restore_copies_newest_valid_step(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ckpt / "step-000000000030" / "manifest.json").write_text("{broken")
    dest = tmp_path / "dest"
    assert main(["restore", str(ckpt), "--to", str(dest)]) == 0
    assert "restored step 20" in capsys.readouterr().out
    target = empty_state(numel=256)
    with CheckpointManager(dest, metrics=False) as mgr:
        assert mgr.restore(target) == 20
    assert_state_is_step(target, 20, numel=256)


def test_bad_input_gives_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(tmp_path / "missing")]) == 2
    assert "missing does not exist; pass the checkpoint directory" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert main(["ls", str(tmp_path / "a-file")]) == 2
    assert "a-file is not a directory" in capsys.readouterr().err
    assert main(["verify", "s3//bucket/job"]) == 2  # a slash short of an S3 URI
    assert "an S3 URI is written s3://bucket/job" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        main(["ls"])
    assert ei.value.code == 2
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        main(["ls", "--bogus", str(tmp_path)])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and "usage: spotckpt ls " in err and "unrecognized arguments: --bogus" in err, err
    assert main(["restore", str(tmp_path), "--to", str(tmp_path / "a-file" / "sub")]) == 2
    assert "a-file is a file, so nothing can be created under it" in capsys.readouterr().err
    assert main(["sync", "--once", "--keep-last", "0", "--s3", "s3://bucket/job", "--local", str(tmp_path)]) == 2
    assert "--keep-last must be >= 1, got 0" in capsys.readouterr().err


def test_bench_options_reach_the_benchmark_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["bench", "--help"])
    assert ei.value.code == 0
    assert "--sizes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as ei:
        main(["ls", "/tmp", "--sizes", "1"])  # options of one command are refused by the others
    assert ei.value.code == 2


def test_restoring_an_older_step_beside_a_newer_one_says_which_a_resume_picks(
        ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "dest"
    assert main(["restore", str(ckpt), "--to", str(dest)]) == 0  # step 30
    assert "note:" not in capsys.readouterr().err
    for _ in range(2):  # restored, then already there: the same note
        assert main(["restore", str(ckpt), "--to", str(dest), "--step", "10"]) == 0
        err = capsys.readouterr().err
        assert "also holds newer step(s) 30" in err and "restores step 30, not 10" in err, err
    with CheckpointManager(dest, metrics=False) as mgr:  # what the note says
        assert mgr.restore(empty_state(numel=256)) == 30
