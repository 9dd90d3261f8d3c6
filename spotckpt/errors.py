"""The exception tree of spotckpt.

Every error spotckpt raises derives from :class:`SpotCkptError`, and its message says what to do::

    SpotCkptError
    ├── ConfigError (also ValueError)         a bad argument, flag, URI or environment variable
    ├── StateError (also TypeError)           a value in ``state`` that cannot be checkpointed
    │                                         (``.key_path`` names it)
    ├── CheckpointCorruptError                a checkpoint that does not verify (``.path``)
    │   └── AllStepsCorruptError              checkpoints exist and none verifies: restore
    │                                         refuses to start fresh (``.problems``)
    ├── PickleRefusedError                    a checkpoint that would need unpickling, and the
    │                                         caller did not opt in (a policy refusal, not damage)
    ├── NoCheckpointError                     restore asked for a step that does not exist (``.step``)
    ├── ClosedError (also RuntimeError)       a closed CheckpointManager (or its stager) was used
    ├── CollectiveError                       another rank failed, died or is out of step
    │                                         (``.ranks`` names them); raised on every rank
    ├── SaveError                             a save that could not complete (``.step``);
    │   │                                     earlier checkpoints are untouched
    │   └── FolderChangedError                a folder being adopted changed meanwhile;
    │                                         nothing was committed
    └── StorageError                          S3 or the local disk failed (``.key``)
        ├── UploadError                       an object could not be uploaded (``.key``)
        ├── DownloadError                     an object could not be downloaded (``.key``)
        └── LocalStepVanishedError            a local step vanished during its upload (retention)

Errors raised by background threads (persist, uploader) are kept and raised again, chained, on the
next ``save()`` / ``wait()`` of the manager.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
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
]


class SpotCkptError(Exception):
    """Root of every error spotckpt raises."""


class ConfigError(SpotCkptError, ValueError):
    """A bad argument, command-line flag, URI or ``SPOTCKPT_*`` environment variable."""


class StateError(SpotCkptError, TypeError):
    """A value in the checkpointed ``state`` that spotckpt cannot store.

    ``key_path`` is the path of the value inside ``state``, e.g. ``"optim/state/0/step"``.
    """

    def __init__(self, message: str, *, key_path: str = "") -> None:
        super().__init__(message)
        self.key_path = key_path


class CheckpointCorruptError(SpotCkptError):
    """A checkpoint file or step that does not verify; ``path`` names it (a file, a step
    directory or an S3 key)."""

    def __init__(self, message: str, *, path: str | Path = "") -> None:
        super().__init__(message)
        self.path = str(path)


class AllStepsCorruptError(CheckpointCorruptError):
    """Committed steps exist (locally or in S3) and none verifies. ``restore()`` raises this
    instead of returning None, so a job never silently starts over on top of damaged
    checkpoints; ``problems`` maps each step to why it was refused. Pass
    ``restore(state, start_fresh_if_corrupt=True)`` to start from scratch anyway (the damaged
    steps are moved aside, not deleted)."""

    def __init__(self, message: str, *, problems: dict[int, str] | None = None, path: str | Path = "") -> None:
        super().__init__(message, path=path)
        self.problems = dict(problems or {})

    def __copy__(self) -> AllStepsCorruptError:
        return AllStepsCorruptError(self.args[0], problems=self.problems, path=self.path)


class PickleRefusedError(SpotCkptError):
    """Loading would unpickle data, and the caller did not opt in with ``allow_pickle=True``.

    Not corruption: the step is intact, so a restore does not fall back to an older step; it
    stops and says how to opt in. ``path`` names the file."""

    def __init__(self, message: str, *, path: str | Path = "") -> None:
        super().__init__(message)
        self.path = str(path)


class ClosedError(SpotCkptError, RuntimeError):
    """A :class:`~spotckpt.CheckpointManager` (or a part of it) was used after ``close()``."""


class NoCheckpointError(SpotCkptError):
    """A specific step was asked for and no valid checkpoint of it exists."""

    def __init__(self, message: str, *, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class CollectiveError(SpotCkptError):
    """Several ranks: an operation failed on another rank, a rank did not arrive within the
    timeout, or ranks called spotckpt out of step. ``ranks`` lists the ranks at fault (empty
    when unknown, e.g. a rank that died). Nothing was committed for that operation."""

    def __init__(self, message: str, *, ranks: list[int] | None = None) -> None:
        super().__init__(message)
        self.ranks = list(ranks or [])


class SaveError(SpotCkptError):
    """A save failed; ``step`` is the step that was being saved. Earlier checkpoints are intact."""

    def __init__(self, message: str, *, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class FolderChangedError(SaveError):
    """A folder (or file) given to ``CheckpointManager.adopt`` changed while it was being copied
    -- a save still running, or the framework deleting it. Nothing was committed; ``step`` is
    the step it was to become. Adopt it once the writer has finished."""


class StorageError(SpotCkptError):
    """The storage (S3 or the local disk) failed; ``key`` names the object or path."""

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class UploadError(StorageError):
    """An object could not be uploaded to S3."""


class DownloadError(StorageError):
    """An object could not be downloaded from S3."""


class LocalStepVanishedError(StorageError):
    """A local step directory disappeared while it was being uploaded (local retention removed
    it); nothing of it is committed in S3. The uploader treats this as expected and moves on."""
