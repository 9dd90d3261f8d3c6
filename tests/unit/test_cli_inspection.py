"""The command line as a newcomer meets it: inspection that never writes, `verify` that says when
nothing verifies, clear errors for mistyped arguments, help for every option, and a start-up
that does not import torch. Real subprocesses where the behaviour is about the process."""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from spotckpt import CheckpointManager, __version__
from spotckpt.tools.cli import build_parser, main
from tests.helpers import REPO, read_only, step_state


@pytest.fixture
def ro_ckpt(tmp_path: Path) -> Path:
    """Three committed steps in ``tmp_path/ro/ckpt``, every directory and file made read-only
    (0555 / 0444; tests run as root, where that does not stop writes -- hence the snapshots,
    and a read-only mount where the volume must refuse writes)."""
    d = tmp_path / "ro" / "ckpt"
    with CheckpointManager(d, keep_last=None, metrics=False) as mgr:
        for s in (10, 20, 30):
            mgr.save(s, step_state(s, numel=256))
    for p in sorted((tmp_path / "ro").rglob("*"), reverse=True):
        p.chmod(0o444 if p.is_file() else 0o555)
    return d


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root`` (hidden ones included) with its mode, size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def _cli(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "spotckpt.tools.cli", *args], env=e, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_ls_verify_and_restore_source_write_nothing(ro_ckpt: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(tmp_path / "ro")
    assert main(["ls", str(ro_ckpt)]) == 0
    assert main(["verify", str(ro_ckpt)]) == 0
    assert main(["restore", str(ro_ckpt), "--to", str(tmp_path / "out")]) == 0
    assert "restored step 30" in capsys.readouterr().out
    # nothing created, changed or removed: no `.ckpt.spotckpt-staging` next to the directory,
    # no `.spotckpt-staging` inside it
    assert _snapshot(tmp_path / "ro") == before
    # and the target side keeps only the step: no staging folder outlives the command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ro"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["step-000000000030"]


def test_inspection_works_on_a_read_only_volume(ro_ckpt: Path, tmp_path: Path) -> None:
    before = _snapshot(tmp_path / "ro")
    with read_only(tmp_path / "ro"):  # a real read-only mount (EROFS on every write) where we are root
        res = _cli(["ls", str(ro_ckpt)])
        assert res.returncode == 0, res.stderr
        assert "30" in res.stdout
        res = _cli(["verify", str(ro_ckpt)])
        assert res.returncode == 0, res.stderr
        assert res.stdout.count(" valid") == 3
        res = _cli(["restore", str(ro_ckpt), "--to", str(tmp_path / "out"), "--step", "20"])
        assert res.returncode == 0, res.stderr
    assert _snapshot(tmp_path / "ro") == before
    assert (tmp_path / "out" / "step-000000000020" / "manifest.json").is_file()


def test_failed_restore_removes_the_target_it_created(ro_ckpt: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "bad"
    with CheckpointManager(src, metrics=False) as mgr:
        mgr.save(5, step_state(5, numel=256))
    f = src / "step-000000000005" / "rank-00000.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    target = tmp_path / "new" / "deeper"
    assert main(["restore", str(src), "--to", str(target)]) == 1
    err = capsys.readouterr().err
    assert "no valid step" in err
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".new", ".deeper"))]


def test_verify_fails_when_there_is_no_step_or_none_verifies(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["verify", str(empty)]) == 1
    assert "no committed step" in capsys.readouterr().err
    d = tmp_path / "ckpt"
    with CheckpointManager(d, keep_last=None, metrics=False) as mgr:
        for s in (1, 2):
            mgr.save(s, step_state(s, numel=256))
    for s in (1, 2):
        (d / f"step-00000000000{s}" / "rank-00000.tree.json").write_text("x")
    assert main(["verify", str(d)]) == 1
    err = capsys.readouterr().err
    assert "no valid step" in err and "restore will use" not in err


def test_malformed_s3_uris_are_refused_not_read_as_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for uri in ("S3://bucket/job", "s3:/bucket/job", "s3:bucket/job"):
        for argv in (["ls", uri], ["verify", uri], ["restore", uri, "--to", "out"],
                     ["restore", str(tmp_path), "--to", uri]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert "malformed S3 URI" in err and "did you mean s3://bucket/job?" in err, (argv, err)
    assert list(tmp_path.iterdir()) == []  # nothing was created as a "local path"


def test_restore_errors_name_the_option_and_the_steps(ro_ckpt: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["restore", str(ro_ckpt), "--to", str(f)]) == 2
    assert "--to" in capsys.readouterr().err
    assert main(["restore", str(ro_ckpt), "--to", str(tmp_path / "out"), "--step", "25"]) == 1
    err = capsys.readouterr().err
    assert "step 25" in err and "10, 20, 30" in err
    assert not (tmp_path / "out").exists()


def test_version() -> None:
    res = _cli(["--version"])
    assert res.returncode == 0 and res.stdout.strip() == f"spotckpt {__version__}"


def _walk(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _walk(sub, f"{path} {name}")
    return out


def test_every_option_of_every_command_has_help() -> None:
    missing = []
    for path, parser in _walk(build_parser(), "spotckpt"):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


@pytest.mark.parametrize("command", ["ls", "verify", "run"])
def test_commands_do_not_import_torch(ro_ckpt: Path, command: str) -> None:
    argv = {"ls": ["ls", str(ro_ckpt)], "verify": ["verify", str(ro_ckpt)],
            "run": ["run", "--", sys.executable, "-c", "pass"]}[command]
    code = (f"import sys\nfrom spotckpt.tools.cli import main\nrc = main({argv!r})\n"
            "heavy = sorted(m for m in ('torch', 'boto3', 'matplotlib') if m in sys.modules)\n"
            "print('HEAVY', heavy, 'RC', rc)\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "HEAVY [] RC 0" in res.stdout, (res.stdout, res.stderr)


def test_no_staging_folder_outlives_the_manager(tmp_path: Path) -> None:
    """The demo's reference run (`train_toy.py --local-dir $(mktemp -d)`) left
    `.tmp.XXXX.spotckpt-staging` in the temp dir: a closed manager leaves only its steps."""
    with CheckpointManager(tmp_path / "ckpt", metrics=False) as mgr:
        mgr.save(1, step_state(1, numel=256))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-000000000001"]
