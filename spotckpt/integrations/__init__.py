"""Framework integrations: spot-safe training for code that does not write its own loop.

- :mod:`spotckpt.integrations.transformers` -- a Hugging Face ``TrainerCallback``
- :mod:`spotckpt.integrations.lightning` -- a PyTorch Lightning ``Callback`` and ``CheckpointIO``

Both let the framework write its checkpoint as it always does, then commit it with
:meth:`spotckpt.CheckpointManager.adopt` (CRC32C, atomic rename, retention, S3 upload), and
resume from :meth:`spotckpt.CheckpointManager.restore_folder` -- the newest committed step that
verifies, local or from S3 -- which the framework then loads itself. Importing this package
imports neither framework; each module imports its own.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..manager import CheckpointManager

__all__ = ["refuse_several_ranks", "ManagerSlot"]


class ManagerSlot:
    """The manager a callback uses: the caller's (kept open), or one built from
    ``manager_kwargs`` when first needed (``every_steps=None``: the framework decides when to
    save) and closed by the callback when training ends (``_owns``)."""

    def _set_manager(self, framework: str, manager: CheckpointManager | None, **manager_kwargs: Any) -> None:
        refuse_several_ranks(framework)
        self._manager = manager
        self._owns = manager is None
        self._kwargs = manager_kwargs

    @property
    def manager(self) -> CheckpointManager:
        if self._manager is None:
            from ..manager import CheckpointManager

            self._manager = CheckpointManager(every_steps=None, **self._kwargs)
        return self._manager


def refuse_several_ranks(framework: str) -> None:
    """The integrations commit from one process. Under torchrun (``WORLD_SIZE`` > 1) each rank
    would adopt its own copy and save at its own step; refuse before anything starts."""
    ws = os.environ.get("WORLD_SIZE", "1")
    if ws.isdigit() and int(ws) > 1:
        raise ConfigError(
            f"spotckpt's {framework} integration supports one process; WORLD_SIZE={ws}. Several "
            "ranks need every rank to agree on the preemption step, which this integration does not "
            "do yet: train on one process, or write the loop with CheckpointManager.save/maybe_save"
        )
