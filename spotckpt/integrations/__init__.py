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

from ..errors import ConfigError

__all__ = ["refuse_several_ranks"]


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
