"""spotckpt: checkpoints for preemptible (spot) training.

Atomic local commits under ``/opt/ml/checkpoints``, a watchdog-driven S3 uploader (data first,
manifest last, CRC32C end to end), SIGTERM turned into a final durable checkpoint, and a restore
that resumes exactly where training stopped.
"""

from .errors import (
    CheckpointCorruptError,
    ConfigError,
    DownloadError,
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

__version__ = "0.1.0"

__all__ = [
    "CheckpointManager",
    "RNGState",
    "SpotCkptError",
    "ConfigError",
    "StateError",
    "CheckpointCorruptError",
    "PickleRefusedError",
    "NoCheckpointError",
    "SaveError",
    "StorageError",
    "UploadError",
    "DownloadError",
    "__version__",
]
