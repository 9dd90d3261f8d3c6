"""The failure-state matrix of docs/failure-states.md, row by row: the local directory (and the
S3 prefix) is put into each state, each single-process entry point is called, and the outcome
the table gives is asserted -- plus, after every test, the invariant that the newest step that
verified before still verifies (nowhere is a good step lost).

Layouts: ``state`` (CheckpointManager.save/restore), ``folder`` (adopt/restore_folder) and
``dcp`` (spotckpt.dcp StorageWriter/StorageReader). Every world starts as three good steps 10,
20, 30 (tiny: a few hundred bytes each), copied from a template built once per layout; the
state then damages step 30 (or more). Several ranks: see tests/ranks/ (referenced in the doc).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from spotckpt import AllStepsCorruptError, CheckpointManager
import spotckpt.tools.cli as cli
from spotckpt.dcp import StorageReader, StorageWriter
from spotckpt.errors import ConfigError, SaveError, StorageError
from spotckpt.format import MANIFEST_NAME, step_dirname
from spotckpt.core.local import LocalStore, read_step_manifest, scan_committed_steps, verify_files
from spotckpt.remote.s3 import S3Store, make_client
from tests.fault.test_s3_faults import FaultInjector

KW: dict[str, Any] = {"metrics": False, "keep_last": None, "install_signal_handlers": False}
STEPS = (10, 20, 30)
DATA = {"state": "rank-00000.safetensors", "dcp": "rank-00000.safetensors", "folder": "weights.bin"}


# -- the three layouts: how a step is written and read back ------------------------------------


def _state(step: int) -> dict[str, Any]:
    return {"w": torch.full((16,), float(step)), "epoch": step}


def _dcp_sd(step: int) -> dict[str, Any]:
    return {"w": torch.full((16,), float(step)), "meta": {"step": step}}


def _folder(tmp: Path, step: int) -> Path:
    d = tmp / f"checkpoint-{step}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "weights.bin").write_bytes(bytes([step % 256]) * 256)
    (d / "config.json").write_text(json.dumps({"step": step}))
    return d


def save_as(layout: str, mgr: CheckpointManager, step: int, tmp: Path, *, blocking: bool = True) -> None:
    """Save ``step`` through ``layout``'s writer."""
    if layout == "state":
        mgr.save(step, _state(step), blocking=blocking)
    elif layout == "folder":
        mgr.adopt(step, _folder(tmp / "src", step), blocking=blocking)
    else:
        dcp.save(_dcp_sd(step), storage_writer=StorageWriter(mgr), checkpoint_id=step)


def restore_as(layout: str, mgr: CheckpointManager, **kw: Any) -> int | None:
    """Restore through ``layout``'s reader and check what landed; the restored step or None."""
    if layout == "state":
        st = _state(0)
        got = mgr.restore(st, **kw)
        if got is not None:
            assert st["epoch"] == got and torch.equal(st["w"], torch.full((16,), float(got)))
        return got
    if layout == "folder":
        path = mgr.restore_folder(**kw)
        if path is None:
            return None
        step = int(json.loads((path / "config.json").read_text())["step"])
        assert (path / "weights.bin").read_bytes() == bytes([step % 256]) * 256
        return step
    sd = _dcp_sd(0)
    reader = StorageReader(mgr)
    dcp.load(sd, storage_reader=reader)
    assert sd["meta"]["step"] == reader.loaded_step and torch.equal(sd["w"], torch.full((16,), float(reader.loaded_step)))
    return reader.loaded_step


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in made:
            base = tmp_path_factory.mktemp(f"template-{layout}")
            with CheckpointManager(base / "ckpt", async_save=False, **KW) as mgr:
                for s in STEPS:
                    save_as(layout, mgr, s, base)
            made[layout] = base / "ckpt"
        return made[layout]

    return get


# -- the states ---------------------------------------------------------------------------------


def _flip(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _stale_staging(root: Path) -> None:
    staging = root.parent / f".{root.name}.spotckpt-staging"
    staging.mkdir(exist_ok=True)
    d = staging / f"{_dead_pid()}-0123456789ab-{step_dirname(40)}"
    d.mkdir()
    (d / "rank-00000.safetensors").write_bytes(b"half a save")


def _other_world_size(root: Path) -> None:
    """Step 40 of another run, saved by 2 ranks (not sharded): rank 0's and rank 1's files."""
    src, dst = root / step_dirname(30), root / step_dirname(40)
    shutil.copytree(src, dst)
    man = json.loads((dst / MANIFEST_NAME).read_text())
    man["step"], man["world_size"] = 40, 2
    for f in ("rank-00000.safetensors", "rank-00000.tree.json"):
        g = f.replace("00000", "00001")
        shutil.copy(dst / f, dst / g)
        man["files"][g] = man["files"][f]
    (dst / MANIFEST_NAME).write_text(json.dumps(man))


def _s30(root: Path) -> Path:
    return root / step_dirname(30)


STATES: dict[str, Callable[[Path, str], None]] = {
    "good": lambda root, lay: None,
    "empty": lambda root, lay: [shutil.rmtree(root / step_dirname(s)) for s in STEPS],  # type: ignore[dict-item]
    "no_manifest": lambda root, lay: (_s30(root) / MANIFEST_NAME).unlink(),
    "wrong_step_manifest": lambda root, lay: shutil.copy(root / step_dirname(20) / MANIFEST_NAME,
                                                         _s30(root) / MANIFEST_NAME),
    "damaged_manifest": lambda root, lay: (_s30(root) / MANIFEST_NAME).write_text("{not json"),
    "file_in_place": lambda root, lay: (shutil.rmtree(_s30(root)), _s30(root).write_bytes(b"x")),  # type: ignore[dict-item]
    "missing_file": lambda root, lay: (_s30(root) / DATA[lay]).unlink(),
    "truncated_file": lambda root, lay: os.truncate(_s30(root) / DATA[lay], 7),
    "bit_flip": lambda root, lay: _flip(_s30(root) / DATA[lay]),
    "stale_staging": lambda root, lay: _stale_staging(root),
    "all_corrupt": lambda root, lay: [_flip(root / step_dirname(s) / DATA[lay]) for s in STEPS],  # type: ignore[dict-item]
    "all_damaged_manifests": lambda root, lay: [(root / step_dirname(s) / MANIFEST_NAME).write_text("{")  # type: ignore[dict-item]
                                                for s in STEPS],
    "other_world_size": lambda root, lay: _other_world_size(root),
}
INCOMPLETE = ("no_manifest", "wrong_step_manifest", "damaged_manifest", "file_in_place")
CORRUPT = ("missing_file", "truncated_file", "bit_flip")


@dataclass
class World:
    root: Path
    layout: str
    tmp: Path
    good: list[int] = field(default_factory=list)  # the steps that verify once the state is applied

    def mgr(self, **kw: Any) -> CheckpointManager:
        return CheckpointManager(self.root, **{**KW, **kw})

    @property
    def staging(self) -> Path:
        return self.root.parent / f".{self.root.name}.spotckpt-staging"

    def quarantined(self) -> list[str]:
        return sorted(p.name.split("-quarantine-")[1] for p in self.staging.glob("*-quarantine-*"))


def _good_steps(root: Path) -> list[int]:
    store = LocalStore(root, create=False, cleanup=False)
    return [s for s in store.committed_steps() if store.verify_step(s).ok]


@pytest.fixture
def make_world(tmp_path: Path, templates: Callable[[str], Path]) -> Iterator[Callable[..., World]]:
    """``make_world(layout, state)``: a checkpoint directory in that state. At teardown, the
    invariant: the newest step that verified then still verifies now (or a newer one does)."""
    worlds: list[World] = []

    def make(layout: str, state: str, root: Path | None = None) -> World:
        root = root or tmp_path / "ckpt"
        shutil.copytree(templates(layout), root)
        STATES[state](root, layout)
        w = World(root, layout, tmp_path, _good_steps(root))
        worlds.append(w)
        return w

    yield make
    for w in worlds:
        assert_good_kept(w)


def assert_good_kept(w: World) -> None:
    """The invariant: the newest step that verified once the state was applied still verifies,
    or a newer step verifies (a restore-then-save replaced it)."""
    if not w.good or not w.root.is_dir():
        return
    root = w.root
    newest_good = max(w.good)
    problems = verify_files(root / step_dirname(newest_good), read_step_manifest(root, newest_good)) \
        if newest_good in scan_committed_steps(root) else ["not committed any more"]
    newer = [s for s in scan_committed_steps(root) if s > newest_good
             and not verify_files(root / step_dirname(s), read_step_manifest(root, s))]
    assert not problems or newer, f"good step {newest_good} lost: {problems}"


def _warned(caplog: pytest.LogCaptureFixture, *needles: str) -> bool:
    return any(all(n in r.getMessage() for n in needles) for r in caplog.records if r.levelno >= logging.WARNING)


# -- listing: latest_step() / all_steps() -------------------------------------------------------

LISTED = {"empty": [], **dict.fromkeys(INCOMPLETE, [10, 20]), **dict.fromkeys(CORRUPT, [10, 20, 30]),
          "stale_staging": [10, 20, 30], "all_corrupt": [10, 20, 30], "all_damaged_manifests": [],
          "other_world_size": [10, 20, 30, 40]}


@pytest.mark.parametrize("state", list(LISTED))
def test_listing_counts_committed_steps_only(make_world: Callable[..., World], state: str) -> None:
    w = make_world("state", state)
    with w.mgr() as mgr:
        assert mgr.all_steps() == LISTED[state]
        assert mgr.latest_step() == (LISTED[state][-1] if LISTED[state] else None)
    if state == "stale_staging":  # the next LocalStore removed the dead process's staging entry
        assert not any(w.staging.glob("*-step-000000000040"))


# -- restore (and its twins: restore_folder, the DCP reader) ------------------------------------

ALL_BAD = ("all_corrupt", "all_damaged_manifests")
RESTORED: dict[str, Any] = {"empty": None, **dict.fromkeys(INCOMPLETE, 20), **dict.fromkeys(CORRUPT, 20),
                            "stale_staging": 30, **dict.fromkeys(ALL_BAD, AllStepsCorruptError)}


def _restore_cases() -> list[Any]:
    cases = []
    for layout in ("state", "folder", "dcp"):
        for state, want in RESTORED.items():
            marks: list[Any] = []
            cases.append(pytest.param(layout, state, want, marks=marks, id=f"{layout}-{state}"))
    return cases


@pytest.mark.parametrize(("layout", "state", "want"), _restore_cases())
def test_restore(make_world: Callable[..., World], caplog: pytest.LogCaptureFixture, layout: str, state: str,
                 want: Any) -> None:
    w = make_world(layout, state)
    with w.mgr() as mgr:
        if isinstance(want, type):
            with pytest.raises((want, CheckpointException)) as info:
                restore_as(layout, mgr)
            msg = str(info.value)
            assert "none verifies" in msg and "start_fresh_if_corrupt=True" in msg and "nothing was deleted" in msg
            for s in STEPS:
                assert f"step {s}:" in msg
            if state == "all_corrupt":
                assert mgr.all_steps() == [10, 20, 30]  # nothing moved, nothing deleted
            return
        if layout == "dcp" and want is None:
            with pytest.raises(CheckpointException, match="start fresh instead of calling dcp.load"):
                restore_as(layout, mgr)
            return
        assert restore_as(layout, mgr) == want
        if state in CORRUPT:
            assert _warned(caplog, "skipping", "30")
            # the restore chose 20: the newer committed step 30 is rolled back (moved aside, kept)
            assert mgr.all_steps() == [10, 20] and w.quarantined() == [step_dirname(30)]
        if state in INCOMPLETE:
            assert mgr.all_steps() == [10, 20]  # left where it is until a save of step 30 replaces it


@pytest.mark.parametrize("layout", ["state", "dcp"])
def test_restore_refuses_before_anything_lands(make_world: Callable[..., World], layout: str) -> None:
    """All or nothing: a refused restore leaves the live values untouched."""
    w = make_world(layout, "all_corrupt")
    with w.mgr() as mgr:
        if layout == "state":
            st = _state(0)
            with pytest.raises(AllStepsCorruptError):
                mgr.restore(st)
            assert st["epoch"] == 0 and torch.equal(st["w"], torch.zeros(16))
        else:
            sd = _dcp_sd(0)
            with pytest.raises(CheckpointException, match="none verifies"):
                dcp.load(sd, storage_reader=StorageReader(mgr))
            assert sd["meta"] == {"step": 0} and torch.equal(sd["w"], torch.zeros(16))


@pytest.mark.parametrize("state", ALL_BAD)
def test_start_fresh_if_corrupt_moves_the_bad_steps_aside(make_world: Callable[..., World], state: str) -> None:
    w = make_world("state", state)
    with w.mgr(async_save=False) as mgr:
        assert mgr.restore(_state(0), start_fresh_if_corrupt=True) is None
        assert mgr.all_steps() == []
        mgr.save(10, _state(10))  # the fresh run's own step 10
        assert mgr.local.verify_step(10).ok
    if state == "all_corrupt":  # committed steps: moved aside, not deleted (keep_last=None: kept as evidence)
        assert w.quarantined() == [step_dirname(s) for s in STEPS]
    else:  # damaged manifests are not committed: they stay until a save of that step moves them aside
        assert sorted(p.name for p in w.root.iterdir()) == [step_dirname(s) for s in STEPS]
        assert w.quarantined() == [step_dirname(10)]


def test_restore_of_another_world_size_is_refused_as_with_several_ranks(make_world: Callable[..., World]) -> None:
    w = make_world("state", "other_world_size")
    with w.mgr() as mgr, pytest.raises(ConfigError, match="same number of ranks"):
        mgr.restore(_state(0))


def test_resume_then_save_replaces_a_corrupt_newest_step(make_world: Callable[..., World]) -> None:
    """The normal loop over a corrupt newest step: restore -> 20 (30 rolled back), the run
    reaches step 30 again and saves it: a good 30 is committed."""
    w = make_world("state", "bit_flip")
    with w.mgr(async_save=False) as mgr:
        assert restore_as("state", mgr) == 20
        mgr.save(30, _state(30))
        assert mgr.all_steps() == [10, 20, 30] and mgr.local.verify_step(30).ok


# -- save of step 30 (sync, async; adopt; the DCP writer) ---------------------------------------

SAVE_OUTCOME = {"empty": "commits", **dict.fromkeys(INCOMPLETE, "moves aside, commits"),
                **dict.fromkeys(CORRUPT, "no-op"), "all_corrupt": "no-op", "all_damaged_manifests": "moves aside, commits"}
# save(), adopt() and the DCP writer share one "committed" (the commit pipeline): a step an earlier
# run committed is CRC-checked before it is trusted; a corrupt one is moved aside and written again
CORRUPT_REWRITTEN = ("state", "folder", "dcp")


def _save_cases() -> list[Any]:
    cases = []
    for layout, modes in (("state", ("sync", "async")), ("folder", ("sync", "async")), ("dcp", ("sync",))):
        for mode in modes:
            for state in SAVE_OUTCOME:
                cases.append(pytest.param(layout, mode, state, id=f"{layout}-{mode}-{state}"))
    return cases


@pytest.mark.parametrize(("layout", "mode", "state"), _save_cases())
def test_save_of_step_30(make_world: Callable[..., World], caplog: pytest.LogCaptureFixture, layout: str, mode: str,
                         state: str) -> None:
    w = make_world(layout, state)
    with w.mgr() as mgr:
        save_as(layout, mgr, 30, w.tmp, blocking=mode == "sync")
        mgr.wait()
        outcome = SAVE_OUTCOME[state]
        if outcome == "no-op" and layout in CORRUPT_REWRITTEN:
            outcome = "moves aside, commits"
        if outcome == "no-op":
            # committed by an earlier run: never replaced, said with a warning (restore first: see above)
            assert _warned(caplog, "step 30 is already committed", "never replaced")
            assert not mgr.local.verify_step(30).ok
            return
        assert mgr.local.verify_step(30).ok and 30 in mgr.all_steps()
        if outcome == "moves aside, commits":
            assert _warned(caplog, "moved", "aside", step_dirname(30))
            assert w.quarantined() == [step_dirname(30)]
    if layout != "dcp":  # and it restores (the DCP reader: test_restore)
        with w.mgr() as mgr:
            assert restore_as(layout, mgr) == 30


# -- the preemption save: maybe_save after watcher.request() (SIGTERM: test_trust.py) -----------



@pytest.mark.parametrize("state", ["empty", *INCOMPLETE, *CORRUPT])
def test_preemption_save_ends_durable_or_raises(make_world: Callable[..., World], state: str) -> None:
    w = make_world("state", state)
    with w.mgr(grace_seconds=30) as mgr:
        mgr.watcher.request("test")
        try:
            mgr.maybe_save(30, _state(30))
        except SaveError as exc:  # the other allowed ending
            assert "resume point" in str(exc) or "save fewer bytes" in str(exc)
            return
        assert mgr.preempted
        assert mgr.local.verify_step(30).ok, "preempted, but the final checkpoint does not verify"


# -- read-only directory and full disk (real mounts; skipped where mounting is not allowed) ------


def _mount(args: list[str]) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here: {r.stderr.strip()}")


@pytest.fixture
def read_only_world(make_world: Callable[..., World], tmp_path: Path) -> Iterator[World]:
    w = make_world("state", "bit_flip", tmp_path / "src")
    ro = tmp_path / "ro"
    ro.mkdir()
    _mount(["--bind", str(w.root), str(ro)])
    try:
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        yield World(ro, "state", tmp_path, w.good)
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_read_only_directory(read_only_world: World) -> None:
    w = read_only_world
    with pytest.raises(ConfigError, match=r"not writable|cannot create a staging directory.*writable"):
        CheckpointManager(w.root, **KW)
    # reading needs no write -- but on main even LocalStore(create=False) makes a staging folder and
    # fails here (the CLI work adds a read-only LocalStore); the scan and the checks themselves work
    assert scan_committed_steps(w.root) == [10, 20, 30]
    for s, ok in ((20, True), (30, False)):
        assert (not verify_files(w.root / step_dirname(s), read_step_manifest(w.root, s))) == ok


def _fill(mnt: Path) -> None:
    """Fill the file system of ``mnt`` up to the last byte."""
    with open(mnt / "filler", "ab", buffering=0) as f:
        for chunk in (65536, 512, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
                    f.flush()
            except OSError:
                pass


@pytest.fixture
def full_disk(tmp_path: Path, make_world: Callable[..., World]) -> Iterator[World]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)])
    try:
        w = make_world("state", "empty", mnt / "ckpt")
        for layout in ("state",):
            with w.mgr(async_save=False) as mgr:
                for s in (10, 20):
                    save_as(layout, mgr, s, tmp_path)
        w.good = [10, 20]
        _fill(mnt)
        yield w
        assert_good_kept(w)  # before the tmpfs goes
        w.good = []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("entry", ["save-sync", "save-async", "preemption", "adopt", "dcp-writer", "restore"])
def test_full_disk(full_disk: World, entry: str) -> None:
    w = full_disk
    big = {"w": torch.zeros(1 << 16), "epoch": 30}  # 256 KiB: does not fit
    with w.mgr() as mgr:
        if entry == "restore":  # a local restore writes nothing
            assert restore_as("state", mgr) == 20
            return
        with pytest.raises((SaveError, CheckpointException)) as info:
            if entry == "save-sync":
                mgr.save(30, big, blocking=True)
            elif entry == "save-async":
                mgr.save(30, big, blocking=False)
                mgr.wait()
            elif entry == "preemption":
                mgr.watcher.request("test")
                mgr.maybe_save(30, big)
            elif entry == "adopt":
                src = w.tmp / "big"
                src.mkdir()
                (src / "weights.bin").write_bytes(b"\1" * (1 << 18))
                mgr.adopt(30, src)
            else:
                dcp.save({"w": torch.zeros(1 << 16)}, storage_writer=StorageWriter(mgr), checkpoint_id=30)
        msg = str(info.value)
        assert "disk is full" in msg and "earlier checkpoints are intact" in msg and "free space" in msg
        assert mgr.all_steps() == [10, 20] and not mgr.preempted
        assert not [p for p in mgr.local.staging_root.iterdir() if "quarantine" not in p.name]  # nothing partial


# -- S3 -------------------------------------------------------------------------------------------


@dataclass
class S3World:
    local: World
    store: S3Store
    uri: str
    good: list[int]


def _upload(store: S3Store, root: Path, steps: tuple[int, ...]) -> None:
    src = LocalStore(root, create=False, cleanup=False)
    for s in steps:
        store.upload_step(s, src.step_path(s))


def _replace_object(store: S3Store, step: int, rel: str) -> None:
    """The same size, other bytes: what S3 holds no longer matches the manifest's CRC32C."""
    key = store.step_key(step, rel)
    body = bytearray(store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    store.client.put_object(Bucket=store.bucket, Key=key, Body=bytes(body))


S3_STATES: dict[str, Callable[[S3Store], None]] = {
    "not_uploaded_yet": lambda st: None,  # local 10, 20, 30; S3 10, 20
    "manifest_without_data": lambda st: st.client.delete_object(Bucket=st.bucket, Key=st.step_key(30, DATA["state"])),
    "data_without_manifest": lambda st: st.uncommit_step(30),
    "wrong_crc32c": lambda st: _replace_object(st, 30, DATA["state"]),
    "all_wrong_crc32c": lambda st: [_replace_object(st, s, DATA["state"]) for s in STEPS],  # type: ignore[dict-item]
}


@pytest.fixture
def make_s3_world(make_world: Callable[..., World], templates: Callable[[str], Path],
                  bucket: str) -> Iterator[Callable[[str], S3World]]:
    """``make_s3_world(state)``: an S3 prefix in that state, and the local directory of a fresh
    machine (empty) -- or, for ``not_uploaded_yet``, one holding 10, 20, 30 of which S3 has 10, 20.
    At teardown, the invariant in S3: the newest step that verified there still does (or a newer)."""
    worlds: list[S3World] = []

    def make(state: str) -> S3World:
        w = make_world("state", "good" if state == "not_uploaded_yet" else "empty")
        uri = f"s3://{bucket}/{state}"
        store = S3Store(uri)
        _upload(store, templates("state"), (10, 20) if state == "not_uploaded_yet" else STEPS)
        S3_STATES[state](store)
        sw = S3World(w, store, uri, [s for s in store.list_steps() if not store.verify_step(s)])
        worlds.append(sw)
        return sw

    yield make
    for sw in worlds:
        if sw.good:
            newest = max(sw.good)
            assert [s for s in sw.store.list_steps() if s >= newest and not sw.store.verify_step(s)], \
                f"good S3 step {newest} lost"
        sw.store.close()


S3_RESTORED: dict[str, Any] = {"not_uploaded_yet": 30, "manifest_without_data": 20, "data_without_manifest": 20,
                               "wrong_crc32c": 20, "all_wrong_crc32c": AllStepsCorruptError}


@pytest.mark.parametrize("state", list(S3_RESTORED))
def test_s3_restore(make_s3_world: Callable[[str], S3World], caplog: pytest.LogCaptureFixture, state: str) -> None:
    sw = make_s3_world(state)
    want = S3_RESTORED[state]
    with sw.local.mgr(s3_uri=sw.uri) as mgr:
        if want is AllStepsCorruptError:
            with pytest.raises(AllStepsCorruptError, match="start_fresh_if_corrupt=True") as info:
                restore_as("state", mgr)
            assert sorted(info.value.problems) == list(STEPS) and "CRC32C" in str(info.value)
            assert sw.store.list_steps() == list(STEPS)  # nothing un-committed or deleted
            return
        assert restore_as("state", mgr) == want
        if state in ("manifest_without_data", "wrong_crc32c"):
            assert _warned(caplog, "skipping S3 step 30")
            assert sw.store.list_steps() == [10, 20]  # rolled back: un-committed, written again later
        mgr.wait()  # what restore chose is in S3 once wait() returns
        assert want in sw.store.list_steps() and not sw.store.verify_step(want)


@pytest.mark.parametrize("state", ["not_uploaded_yet", "manifest_without_data", "data_without_manifest",
                                   "wrong_crc32c"])
def test_s3_save_then_wait_and_close(make_s3_world: Callable[[str], S3World], state: str) -> None:
    """After restore, the run saves step 40: wait() returns once it is in S3; close() flushes
    every local step (the not-yet-uploaded 30 too)."""
    sw = make_s3_world(state)
    with sw.local.mgr(s3_uri=sw.uri, async_save=True) as mgr:
        got = mgr.restore(_state(0))
        mgr.save(40, _state(40))
        assert mgr.wait() is True
        assert 40 in sw.store.list_steps() and not sw.store.verify_step(40)
    in_s3 = sw.store.list_steps()
    assert in_s3[-1] == 40 and all(not sw.store.verify_step(s) for s in in_s3)
    assert (30 in in_s3) == (got == 30)


def test_s3_start_fresh_over_all_bad(make_s3_world: Callable[[str], S3World]) -> None:
    sw = make_s3_world("all_wrong_crc32c")
    with sw.local.mgr(s3_uri=sw.uri) as mgr:
        assert mgr.restore(_state(0), start_fresh_if_corrupt=True) is None
        assert mgr.all_steps() == []  # un-committed in S3 (data kept), nothing local


@pytest.fixture
def faulty(bucket: str, tmp_path: Path) -> Iterator[tuple[S3Store, FaultInjector]]:
    client = make_client(max_attempts=2)
    faults = FaultInjector(0.0)
    client.meta.events.register("before-send.s3", faults)
    store = S3Store(f"s3://{bucket}/storm", client=client, retry_attempts=2, retry_backoff_seconds=0.01)
    yield store, faults
    faults.fraction = 0.0




@pytest.mark.parametrize("entry", ["save+wait", "preemption", "restore",
                                   "all_steps", "close"])
def test_s3_503_storm(make_world: Callable[..., World], faulty: tuple[S3Store, FaultInjector], entry: str) -> None:
    store, faults = faulty
    w = make_world("state", "empty")
    mgr = w.mgr(remote_store=store, async_save=False, grace_seconds=20)
    try:
        mgr.save(10, _state(10))
        assert mgr.wait() is True
        faults.fraction = 1.0  # every request now fails: 503 SlowDown, 500, or a reset
        if entry == "preemption":
            mgr.watcher.request("test")
            with pytest.raises(SaveError, match="did not reach"):
                mgr.maybe_save(20, _state(20))
            return
        if entry == "close":
            mgr.save(20, _state(20))
            with pytest.raises(StorageError, match="try again later|check the network"):
                mgr.close()
            assert mgr.local.verify_step(20).ok  # committed locally; the next run's uploader sends it
            return
        with pytest.raises(StorageError, match="try again later|check the network") as info:
            if entry == "save+wait":
                mgr.save(20, _state(20))
                assert mgr.local.verify_step(20).ok  # durable locally before the upload fails
                mgr.wait()
            elif entry == "restore":
                mgr.restore(_state(0))  # S3 must be listed to know the newest step: nothing loaded
            else:
                mgr.all_steps()
        assert info.value.key
    finally:
        faults.fraction = 0.0
        try:
            mgr.close()
        except StorageError:
            pass
    in_s3 = store.list_steps()  # once the storm is over, close() may have sent 20 too
    assert 10 in in_s3 and all(not store.verify_step(s) for s in in_s3)


class _Deny:
    """Every S3 request answered 403 AccessDenied."""

    def __call__(self, request: Any, **_: object) -> Any:
        from botocore.awsrequest import AWSResponse

        from tests.fault.test_s3_faults import _Raw

        body = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>denied</Message></Error>"
        return AWSResponse(request.url, 403, {"Content-Type": "application/xml"}, _Raw(body))


@pytest.mark.parametrize("entry", ["check_access", "restore", "save+wait"])
def test_s3_403(make_world: Callable[..., World], bucket: str, entry: str) -> None:
    client = make_client()
    client.meta.events.register("before-send.s3", _Deny())
    store = S3Store(f"s3://{bucket}/denied", client=client)
    w = make_world("state", "bit_flip")
    match = "access denied.*grant s3:ListBucket"
    if entry == "check_access":  # what the manager runs at construction for s3_uri=
        with pytest.raises(StorageError, match=match):
            store.check_access()
        return
    mgr = w.mgr(remote_store=store, async_save=False)
    try:
        with pytest.raises(StorageError, match=match):
            if entry == "restore":
                mgr.restore(_state(0))
            else:
                mgr.save(40, _state(40))
                assert mgr.local.verify_step(40).ok
                mgr.wait()
    finally:
        mgr.close(abandon=True)  # without flushing to the denied bucket


def test_s3_missing_bucket(make_world: Callable[..., World], s3_env: str) -> None:
    w = make_world("state", "bit_flip")
    with pytest.raises(StorageError, match="does not exist.*create it or fix the S3 URI"):
        w.mgr(s3_uri="s3://no-such-bucket-spotckpt/x")
    assert not any(w.staging.glob("*-quarantine-*"))  # construction touched no step


# -- the CLI: only what main's CLI already does (the rest: "see the CLI section") -----------------


@pytest.mark.parametrize("state", [*INCOMPLETE, "bit_flip"])
def test_cli_ls_verify_restore(make_world: Callable[..., World], capsys: pytest.CaptureFixture[str],
                               state: str) -> None:
    w = make_world("state", state)
    assert cli.main(["ls", str(w.root)]) == 0
    listed = [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[1:]]
    assert listed == (["10", "20"] if state in INCOMPLETE else ["10", "20", "30"])
    assert cli.main(["verify", str(w.root)]) == (1 if state == "bit_flip" else 0)
    capsys.readouterr()
    assert cli.main(["restore", str(w.root), "--to", str(w.tmp / "to")]) == 0
    assert "restored step 20" in capsys.readouterr().out
    assert LocalStore(w.tmp / "to", create=False, cleanup=False).committed_steps() == [20]


def test_full_disk_restore_from_s3(full_disk: World, templates: Callable[[str], Path], bucket: str) -> None:
    """A fresh machine with a full checkpoint volume: the download of the S3 step fails, and the
    error names the full disk; nothing is committed locally, nothing changes in S3."""
    w = full_disk
    for s in (10, 20):
        shutil.rmtree(w.root / step_dirname(s))
    _fill(w.root.parent)
    w.good = []
    store = S3Store(f"s3://{bucket}/full")
    _upload(store, templates("state"), (10, 20, 30))
    with w.mgr(s3_uri=f"s3://{bucket}/full") as mgr:
        with pytest.raises(StorageError) as info:
            mgr.restore({"w": torch.zeros(16), "epoch": 0})
        assert mgr.local.committed_steps() == [] and store.list_steps() == [10, 20, 30]
        assert not [p for p in mgr.local.staging_root.iterdir()]  # the partial download is gone
    store.close()
    assert "No space left" in str(info.value)
    assert "free space" in str(info.value)  # what to do
