"""The public surface: `__all__` is exactly what is advertised, and every error is a SpotCkptError."""

from __future__ import annotations

import inspect

import spotckpt
from spotckpt import errors

PUBLIC = {
    "CheckpointManager", "RNGState", "__version__",
    "SpotCkptError", "ConfigError", "StateError", "CheckpointCorruptError", "AllStepsCorruptError", "PickleRefusedError",
    "NoCheckpointError", "ClosedError", "CollectiveError", "SaveError", "StorageError", "UploadError", "DownloadError",
    "LocalStepVanishedError", "FolderChangedError",
}


def test_all_is_exactly_the_public_surface() -> None:
    assert set(spotckpt.__all__) == PUBLIC
    assert len(spotckpt.__all__) == len(PUBLIC)  # no duplicates
    for name in spotckpt.__all__:
        assert hasattr(spotckpt, name), name
    # nothing public-looking is importable from the package without being in __all__,
    # except its submodules
    exported = {n for n in vars(spotckpt) if not n.startswith("_") and not inspect.ismodule(getattr(spotckpt, n))}
    assert exported <= PUBLIC, exported - PUBLIC


def test_error_tree() -> None:
    classes = {n: getattr(errors, n) for n in errors.__all__}
    assert set(classes) <= set(spotckpt.__all__)
    for name, cls in classes.items():
        assert issubclass(cls, spotckpt.SpotCkptError), name
        assert getattr(spotckpt, name) is cls, name
        assert name in (errors.__doc__ or ""), f"{name} is not drawn in errors.py's docstring"
    # every SpotCkptError subclass defined in errors.py is exported
    defined = {n for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, errors.SpotCkptError)}
    assert defined == set(classes)
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.StateError, TypeError)
    assert issubclass(errors.ClosedError, RuntimeError)
    # a refusal by policy is not corruption: restore must not fall back past it
    assert not issubclass(errors.PickleRefusedError, errors.CheckpointCorruptError)
    assert issubclass(errors.UploadError, errors.StorageError) and issubclass(errors.DownloadError, errors.StorageError)
    assert issubclass(errors.LocalStepVanishedError, errors.StorageError)
    assert issubclass(errors.FolderChangedError, errors.SaveError)  # nothing committed, earlier steps intact
    assert errors.CheckpointCorruptError("x", path="/p").path == "/p"
    assert errors.PickleRefusedError("x", path="/q").path == "/q"
    assert errors.SaveError("x", step=3).step == 3 and errors.StorageError("x", key="k").key == "k"
    assert errors.NoCheckpointError("x", step=4).step == 4
