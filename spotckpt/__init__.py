"""spotckpt: checkpoints for preemptible (spot) training.

Atomic local commits under ``/opt/ml/checkpoints``, a watchdog-driven S3 uploader (data first,
manifest last, CRC32C end to end), SIGTERM turned into a final durable checkpoint, and a restore
that resumes exactly where training stopped.
"""

from spotckpt._version import __version__
from spotckpt.errors import (
    AllStepsCorruptError,
    CheckpointCorruptError,
    ClosedError,
    CollectiveError,
    ConfigError,
    DownloadError,
    FolderChangedError,
    LocalStepVanishedError,
    NoCheckpointError,
    PickleRefusedError,
    SaveError,
    SpotCkptError,
    StateError,
    StorageError,
    UploadError,
)

from typing import TYPE_CHECKING as _TYPE_CHECKING

if _TYPE_CHECKING:  # pragma: no cover
    from spotckpt.manager import CheckpointManager
    from spotckpt.core.torch_state import RNGState

# CheckpointManager and RNGState import torch: they are loaded on first use, so that the
# command line (``spotckpt ls``, ``verify``, ``sync``, ``run``) and other torch-free users of the
# package start in a fraction of a second.
_LAZY = {"CheckpointManager": "manager", "RNGState": "core.torch_state"}
# The public modules, the same way: ``spotckpt.policy.AutoInterval(...)`` works after a bare
# ``import spotckpt``, without importing the ones nobody uses.
_MODULES = ("autopilot", "data", "dcp", "events", "integrations", "policy")


def __getattr__(name: str) -> object:
    import importlib

    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'spotckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_MODULES))


__all__ = [
    "CheckpointManager",
    "RNGState",
    "SpotCkptError",
    "ConfigError",
    "StateError",
    "CheckpointCorruptError",
    "AllStepsCorruptError",
    "PickleRefusedError",
    "NoCheckpointError",
    "ClosedError",
    "CollectiveError",
    "SaveError",
    "FolderChangedError",
    "StorageError",
    "UploadError",
    "DownloadError",
    "LocalStepVanishedError",
    "__version__",
]
