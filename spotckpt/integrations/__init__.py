"""Framework integrations: spot-safe training for code that does not write its own loop.

- :mod:`spotckpt.integrations.transformers` -- a Hugging Face ``TrainerCallback``
- :mod:`spotckpt.integrations.lightning` -- a PyTorch Lightning ``Callback`` and ``CheckpointIO``
- :mod:`spotckpt.integrations.accelerate` -- ``accelerator.save_state`` / ``load_state`` loops

All three let the framework write its checkpoint as it always does, then commit it with
:meth:`spotckpt.CheckpointManager.adopt` (CRC32C, atomic rename, retention, S3 upload), and
resume from :meth:`spotckpt.CheckpointManager.restore_folder` -- the newest committed step that
verifies, local or from S3 -- which the framework then loads itself. Importing this package
imports no framework; each module imports its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotckpt.core.config import resolve_local_dir
from spotckpt.errors import ConfigError

if TYPE_CHECKING:
    from spotckpt.manager import CheckpointManager

__all__ = ["ManagerSlot"]


class ManagerSlot:
    """The manager a callback uses: the caller's (kept open), or one built from
    ``manager_kwargs`` when first needed (``every_steps=None``: the framework decides when to
    save) and closed by the callback when training ends (``_owns``).

    Several ranks (torchrun): the manager is built on every rank, after torch.distributed is
    initialised (``hint`` says how, for this framework); before that, ConfigError says so."""

    def _set_manager(self, framework: str, manager: CheckpointManager | None, *, hint: str,
                     **manager_kwargs: Any) -> None:
        self._framework = framework
        self._hint = hint
        self._manager = manager
        self._owns = manager is None
        self._kwargs = manager_kwargs

    @property
    def manager(self) -> CheckpointManager:
        if self._manager is None:
            from spotckpt.manager import CheckpointManager

            try:
                self._manager = CheckpointManager(every_steps=None, **self._kwargs)
            except ConfigError as exc:
                if "not initialised" not in str(exc):
                    raise
                raise ConfigError(f"spotckpt's {self._framework} integration under torchrun: {exc}; {self._hint}") from exc
        return self._manager

    @property
    def local_dir(self) -> Path:
        """Where steps are committed on this host (without building the manager: usable before
        torch.distributed is initialised, e.g. to put the framework's scratch dir next to it)."""
        if self._manager is not None:
            return self._manager.local_dir
        return resolve_local_dir(self._kwargs.get("local_dir")).absolute()
