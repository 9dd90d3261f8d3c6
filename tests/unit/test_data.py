"""Exact data-order resume: interrupted + resumed batches == uninterrupted batches, bit for bit."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from spotckpt.data import ResumableDataLoader, ResumableSampler, derive_seed
from spotckpt.errors import ConfigError, StateError


class AugmentedDataset(Dataset):
    """Every sample draws from torch, python random and numpy: an "augmentation"."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        noise = torch.rand(3)
        extra = torch.tensor([random.random(), float(np.random.rand())])
        return torch.cat([torch.tensor([float(i)]), noise, extra])


def _run(loader_factory, total_batches: int, cuts: list[int]) -> list[torch.Tensor]:
    """Consume ``total_batches`` batches, 'crashing' after each cut and resuming from JSON state."""
    out: list[torch.Tensor] = []
    loader = loader_factory()
    state = None
    cuts = sorted(cuts)
    while len(out) < total_batches:
        if state is not None:
            loader = loader_factory()  # a brand-new process would build a brand-new loader
            loader.load_state_dict(json.loads(state))
        stop = next((c for c in cuts if c > len(out)), total_batches)
        it = iter(loader)
        while len(out) < stop:
            try:
                out.append(next(it))
            except StopIteration:
                it = iter(loader)  # next epoch
        state = json.dumps(loader.state_dict())  # the checkpoint: JSON-like only
        del it
    return out


@pytest.mark.parametrize("num_workers,persistent", [(0, False), (2, False), (2, True)])
def test_interrupted_equals_uninterrupted(num_workers: int, persistent: bool) -> None:
    ds = AugmentedDataset(23)  # 23 / bs 4 -> 6 batches per epoch, last one short

    def factory() -> ResumableDataLoader:
        return ResumableDataLoader(ds, batch_size=4, shuffle=True, seed=7, num_workers=num_workers,
                                   persistent_workers=persistent)

    total = 6 * 3 + 2  # across two epoch boundaries
    reference = _run(factory, total, [])
    rng = random.Random(1234 + num_workers)
    cuts = rng.sample(range(1, total), 4) + [6, 12]  # random, plus exactly at epoch ends
    resumed = _run(factory, total, cuts)
    assert len(reference) == len(resumed) == total
    for a, b in zip(reference, resumed):
        assert torch.equal(a, b)
    # Sanity: the data really is shuffled per epoch and really is random inside __getitem__.
    ep0 = torch.cat([b[:, 0] for b in reference[:6]])
    ep1 = torch.cat([b[:, 0] for b in reference[6:12]])
    assert sorted(ep0.tolist()) == sorted(ep1.tolist()) == [float(i) for i in range(23)]
    assert not torch.equal(ep0, ep1)
    assert ep0.tolist() != sorted(ep0.tolist())
    noise = torch.cat(reference)[:, 1:]
    assert len({tuple(row) for row in noise.tolist()}) == len(noise)  # every sample drew its own


def test_augmentations_independent_of_worker_count() -> None:
    ds = AugmentedDataset(10)
    a = list(ResumableDataLoader(ds, batch_size=3, seed=3, num_workers=0))
    b = list(ResumableDataLoader(ds, batch_size=3, seed=3, num_workers=2))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 4


@pytest.mark.parametrize("num_workers", [0, 2])
def test_main_process_rng_is_not_disturbed(num_workers: int) -> None:
    """Iterating (per-sample seeding; base_seed drawn from the loader's own generator) must not
    move the training loop's RNGs."""
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    expect = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    loader = ResumableDataLoader(AugmentedDataset(8), batch_size=4, seed=1, num_workers=num_workers)
    for _ in loader:
        pass
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(expect[0], got[0]) and expect[1:] == got[1:]


class GaussDataset(Dataset):
    """Draws Gaussians from numpy's and python's legacy generators, which cache every second one."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), float(np.random.randn()), random.gauss(0.0, 1.0),
                             float(torch.randn(()))])


def _main_draws() -> tuple:
    return (float(np.random.randn()), random.gauss(0.0, 1.0), random.random(),
            float(np.random.rand()), float(torch.randn(())))


def _gaussians() -> tuple:
    # alternately generates a pair (the generator's state moves) and takes the cached one (only
    # the cache changes): the loader must notice both
    return (float(np.random.randn()), random.gauss(0.0, 1.0))


@pytest.mark.parametrize("draw_between", [True, False])
def test_main_process_rng_is_not_disturbed_with_cached_gaussians(draw_between: bool) -> None:
    """With num_workers=0 the loop's RNGs are put back around every batch, including the pending
    Gaussians of numpy and python, whether or not the loop draws between batches."""

    def run(with_loader: bool) -> list[tuple]:
        np.random.seed(11)
        random.seed(11)
        torch.manual_seed(11)
        draws = [_main_draws()]  # one numpy randn: a Gaussian is now cached
        if with_loader:
            loader = ResumableDataLoader(GaussDataset(10), batch_size=3, seed=2)
            for _ in loader:  # batch of 3 leaves a Gaussian cached inside the fetch too
                if draw_between:
                    draws.append(_gaussians())
        elif draw_between:
            draws += [_gaussians() for _ in range(4)]
        draws.append(_main_draws())
        return draws

    assert run(with_loader=True) == run(with_loader=False)


def test_main_rng_fast_path_is_used_here() -> None:
    """On CPython with numpy's MT19937 the raw states are readable, so an untouched generator is
    not copied through Python objects before every batch (the loader's per-batch cost)."""
    from spotckpt import data

    main = data._MainRNG()
    main.save()
    main.restore()
    assert main._np_addr is not None and main._py_addr is not None
    full_np, full_py = main._np_full, main._py_full
    main.save()  # nothing drew in between: the full states taken before are reused
    assert main._np_full is full_np and main._py_full is full_py
    main.restore()
    np.random.rand()
    random.random()
    main.save()  # both drew: taken again
    assert main._np_full is not full_np and main._py_full is not full_py
    main.restore()


def test_augmentations_are_seeded_per_batch_and_exact() -> None:
    """The same batch (epoch, start) gives the same values in any loader, whichever batch came
    before; a different epoch gives different draws."""
    ds = AugmentedDataset(12)
    a = ResumableDataLoader(ds, batch_size=4, seed=9)
    full = list(a)
    b = ResumableDataLoader(ds, batch_size=4, seed=9)
    b.load_state_dict({**b.state_dict(), "position": 8})
    assert torch.equal(next(iter(b)), full[2])
    second = list(a)  # epoch 1
    assert not torch.equal(torch.cat(full)[:, 1:], torch.cat(second)[:, 1:])


class BatchedDataset(AugmentedDataset):
    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.calls: list[list[int]] = []

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        self.calls.append(list(indices))
        return [self[i] for i in indices]


def test_a_dataset_with_getitems_is_fetched_a_batch_at_a_time() -> None:
    ds = BatchedDataset(10)
    batches = list(ResumableDataLoader(ds, batch_size=4, seed=0))
    assert [len(c) for c in ds.calls] == [4, 4, 2]
    assert [b[:, 0].tolist() for b in batches] == [[float(i) for i in c] for c in ds.calls]
    plain = list(ResumableDataLoader(AugmentedDataset(10), batch_size=4, seed=0))
    assert all(torch.equal(x, y) for x, y in zip(batches, plain))


def test_epoch_advances_and_set_epoch_keeps_position() -> None:
    loader = ResumableDataLoader(AugmentedDataset(8), batch_size=4, seed=0)
    it = iter(loader)
    next(it)
    assert (loader.epoch, loader.position) == (0, 4)
    loader.set_epoch(0)  # what a resumed `for epoch in range(start, n)` loop does
    assert loader.position == 4
    next(it)
    with pytest.raises(StopIteration):
        next(it)
    assert (loader.epoch, loader.position) == (1, 0)
    loader.set_epoch(3)
    assert (loader.epoch, loader.position) == (3, 0)


def test_checkpoint_after_last_batch_before_stopiteration() -> None:
    ds = AugmentedDataset(8)
    loader = ResumableDataLoader(ds, batch_size=4, seed=0)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == (0, 8)
    fresh = ResumableDataLoader(ds, batch_size=4, seed=0)
    fresh.load_state_dict(state)
    first = next(iter(fresh))
    ref = ResumableDataLoader(ds, batch_size=4, seed=0)
    ref.set_epoch(1)
    assert torch.equal(first, next(iter(ref)))


def test_drop_last_epoch_length() -> None:
    loader = ResumableDataLoader(AugmentedDataset(10), batch_size=4, seed=0, drop_last=True)
    assert len(list(loader)) == 2 and loader.epoch == 1
    assert len(loader) == 2


def test_state_is_json_like_and_refuses_other_setup() -> None:
    loader = ResumableDataLoader(AugmentedDataset(8), batch_size=4, seed=0)
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state
    with pytest.raises(StateError, match="seed"):
        ResumableDataLoader(AugmentedDataset(8), batch_size=4, seed=1).load_state_dict(state)
    with pytest.raises(StateError, match="dataset_len"):
        ResumableDataLoader(AugmentedDataset(9), batch_size=4, seed=0).load_state_dict(state)
    with pytest.raises(StateError):
        loader.load_state_dict({**state, "position": 99})
    with pytest.raises(StateError):
        loader.load_state_dict({**state, "version": 99})


def test_reserved_arguments_refused() -> None:
    with pytest.raises(ConfigError):
        ResumableDataLoader(AugmentedDataset(4), batch_size=2, sampler=None)
    with pytest.raises(ConfigError):
        ResumableDataLoader(AugmentedDataset(4), batch_size=0)


def test_sampler_resumes_exactly_and_across_epochs() -> None:
    ref = ResumableSampler(17, seed=9)
    expected = list(ref) + list(ref)
    s = ResumableSampler(17, seed=9)
    got: list[int] = []
    it = iter(s)
    for _ in range(11):
        got.append(next(it))
    state = json.loads(json.dumps(s.state_dict()))
    assert state["position"] == 11 and state["epoch"] == 0
    s2 = ResumableSampler(17, seed=9)
    s2.load_state_dict(state)
    got += list(s2)  # the rest of epoch 0
    assert s2.epoch == 1 and s2.position == 0
    got += list(s2)
    assert got == expected
    assert sorted(expected[:17]) == list(range(17)) and expected[:17] != expected[17:]


def test_sampler_permutation_depends_on_seed_and_epoch() -> None:
    a = ResumableSampler(50, seed=1)
    assert a.indices(0) == ResumableSampler(50, seed=1).indices(0)
    assert a.indices(0) != a.indices(1)
    assert a.indices(0) != ResumableSampler(50, seed=2).indices(0)
    assert ResumableSampler(5, shuffle=False).indices() == [0, 1, 2, 3, 4]


def test_sampler_replicas_partition() -> None:
    parts = [ResumableSampler(10, seed=0, num_replicas=3, rank=r).indices(0) for r in range(3)]
    assert all(len(p) == 4 for p in parts)
    assert set().union(*parts) == set(range(10))
    dropped = [ResumableSampler(10, seed=0, num_replicas=3, rank=r, drop_last=True).indices(0) for r in range(3)]
    flat = [i for p in dropped for i in p]
    assert all(len(p) == 3 for p in dropped) and len(set(flat)) == 9


def test_derive_seed_is_stable() -> None:
    # A fixed value: must not change between processes or releases (it defines the data order).
    assert derive_seed(0, 0) == 2812178212566171247
    assert derive_seed(7, 1, 5) == 8061592504560216421
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert 0 <= derive_seed(-1, 2**70) < 2**63


def test_torchdata_stateful_loader_resumes() -> None:
    """torchdata's StatefulDataLoader is accepted as-is; check its own contract on our kind of data."""
    tdl = pytest.importorskip("torchdata.stateful_dataloader")
    ds = AugmentedDataset(12)

    def make():
        g = torch.Generator()
        g.manual_seed(0)
        return tdl.StatefulDataLoader(ds, batch_size=4, shuffle=True, generator=g)

    ref = [b[:, 0] for b in make()]
    loader = make()
    it = iter(loader)
    first = next(it)[:, 0]
    sd = loader.state_dict()
    loader2 = make()
    loader2.load_state_dict(sd)
    rest = [b[:, 0] for b in loader2]
    assert [first.tolist()] + [r.tolist() for r in rest] == [r.tolist() for r in ref]


def _manager(tmp_path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    import spotckpt

    monkeypatch.delenv("SPOTCKPT_S3_URI", raising=False)
    monkeypatch.delenv("SPOTCKPT_EVENTS_FILE", raising=False)
    return spotckpt.CheckpointManager(local_dir=tmp_path / "ckpt", s3_uri=None, every_steps=None,
                                      async_save=False, install_signal_handlers=False, metrics=False)


@pytest.mark.parametrize("kind", ["resumable", "torchdata"])
def test_loader_as_checkpoint_state(kind: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both loaders go through a real checkpoint (JSON tree + safetensors) and resume exactly."""
    ds = AugmentedDataset(20)

    def make():  # type: ignore[no-untyped-def]
        if kind == "resumable":
            return ResumableDataLoader(ds, batch_size=3, seed=5, num_workers=2)
        tdl = pytest.importorskip("torchdata.stateful_dataloader")
        g = torch.Generator()
        g.manual_seed(5)
        return tdl.StatefulDataLoader(ds, batch_size=3, shuffle=True, generator=g, num_workers=2)

    reference = [b[:, 0] for b in make()]
    loader = make()
    it = iter(loader)
    seen = [next(it)[:, 0] for _ in range(3)]
    with _manager(tmp_path, monkeypatch) as mgr:
        mgr.save(3, {"loader": loader})
    del it
    fresh = make()
    with _manager(tmp_path, monkeypatch) as mgr:
        assert mgr.restore({"loader": fresh}) == 3
    rest = [b[:, 0] for b in fresh]
    assert len(seen) + len(rest) == len(reference) == 7
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, reference))


def test_workers_survive_sigterm_to_the_group() -> None:
    """A preemption SIGTERMs the whole process group; the loader's workers must not die of it."""
    import os
    import signal

    psutil = pytest.importorskip("psutil")
    calls = []
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    loader = ResumableDataLoader(AugmentedDataset(40), batch_size=4, seed=0, num_workers=2,
                                 worker_init_fn=calls.append)  # the user's fn still runs (in workers)
    reference = list(ResumableDataLoader(AugmentedDataset(40), batch_size=4, seed=0))
    it = iter(loader)
    got = [next(it), next(it)]  # one batch from each worker: both have run their init
    workers = [p for p in me.children() if p.pid not in before]
    assert len(workers) == 2
    for w in workers:
        os.kill(w.pid, signal.SIGTERM)
    got += list(it)  # no "DataLoader worker ... killed by signal: Terminated"
    assert len(got) == len(reference) == 10
    assert all(torch.equal(a, b) for a, b in zip(got, reference))
