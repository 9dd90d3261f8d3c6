"""The public surface: `__all__` is explicit and complete, and every error is a SpotCkptError."""

from __future__ import annotations

import spotckpt
from spotckpt import errors


def test_all_names_exist_and_nothing_else_is_advertised() -> None:
    for name in spotckpt.__all__:
        assert hasattr(spotckpt, name), name
    assert {"CheckpointManager", "RNGState", "SpotCkptError"} <= set(spotckpt.__all__)


def test_error_tree() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, spotckpt.SpotCkptError), name
        assert name in spotckpt.__all__, name
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.StateError, TypeError)
    assert issubclass(errors.PickleRefusedError, errors.CheckpointCorruptError)
    assert issubclass(errors.UploadError, errors.StorageError) and issubclass(errors.DownloadError, errors.StorageError)
    assert errors.CheckpointCorruptError("x", path="/p").path == "/p"
    assert errors.SaveError("x", step=3).step == 3 and errors.StorageError("x", key="k").key == "k"
