"""Save and retention policies: small objects, validated once, the same decisions locally and in S3."""

from __future__ import annotations

import pytest

from spotckpt.errors import ConfigError
from spotckpt.policy import (
    AnySavePolicy,
    EveryNSeconds,
    EveryNSteps,
    KeepAll,
    KeepLast,
    SaveContext,
    doomed,
    retention_from,
    save_policy_from,
)


def _ctx(step: int, since: float = 0.0) -> SaveContext:
    return SaveContext(step=step, seconds_since_last_save=since)


def test_save_policies() -> None:
    assert [s for s in range(1, 11) if EveryNSteps(3).should_save(_ctx(s))] == [3, 6, 9]
    assert not EveryNSeconds(60).should_save(_ctx(1, 59.9)) and EveryNSeconds(60).should_save(_ctx(1, 60.0))
    both = save_policy_from(5, 30.0)
    assert both.should_save(_ctx(5)) and both.should_save(_ctx(7, 31.0)) and not both.should_save(_ctx(7, 1.0))
    assert not save_policy_from(None, None).should_save(_ctx(500, 1e9))  # only preemption saves
    assert AnySavePolicy([]).policies == ()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_bad_policy_arguments_are_config_errors(bad: object) -> None:
    with pytest.raises(ConfigError, match="every_steps"):
        EveryNSteps(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="keep_last"):
        KeepLast(bad)  # type: ignore[arg-type]


def test_bad_seconds() -> None:
    for bad in (0, -1.0, True, "10"):
        with pytest.raises(ConfigError, match="every_seconds"):
            EveryNSeconds(bad)  # type: ignore[arg-type]


def test_retention() -> None:
    steps = [10, 20, 30, 40]
    assert KeepLast(2).kept(steps) == {30, 40}
    assert KeepAll().kept(steps) == set(steps)
    assert doomed(KeepLast(2), steps) == [10, 20]
    assert doomed(KeepLast(1), steps, protect=(20, None)) == [10, 30]
    assert doomed(KeepAll(), steps) == []
    assert retention_from(None) == KeepAll() and retention_from(3) == KeepLast(3)
