"""spotckpt: checkpoints for preemptible (spot) training.

Atomic local commits under ``/opt/ml/checkpoints``, a watchdog-driven S3 uploader (data first,
manifest last, CRC32C end to end), SIGTERM turned into a final durable checkpoint, and a restore
that resumes exactly where training stopped.
"""

from ._version import __version__
from .errors import (
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
from .manager import CheckpointManager
from .torch_state import RNGState

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
