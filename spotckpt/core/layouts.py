"""The layouts of a committed step -- what its files are and who loads them -- as one seam.

A step's manifest names its layout in ``extra["layout"]``; each layout answers the questions the
rest of spotckpt asks of a step, so nothing else tests the layout's name::

    layout      written by                              loaded by
    state       CheckpointManager.save()                restore(state)
    dcp         spotckpt.dcp.StorageWriter (dcp.save)   dcp.load(..., StorageReader(mgr))
    folder      CheckpointManager.adopt()               restore_folder() -> the framework loads it

- :meth:`Layout.needed_files` -- the files one rank reads (what a host fetches from S3);
- :meth:`Layout.reshardable` -- whether a step can be loaded onto another number of ranks;
- :meth:`Layout.require` -- a loader's check: ConfigError, naming the right loader, for a step of
  another layout (not damage, so a restore never falls back past it).
"""

from __future__ import annotations

from dataclasses import dataclass

from spotckpt.errors import ConfigError
from spotckpt.format import DCP_LAYOUT, FOLDER_LAYOUT, Manifest, data_file_names

__all__ = ["CHUNK_CRCS", "Layout", "STATE", "DCP", "FOLDER", "layout_of", "saved_world_size", "tensor_files"]


@dataclass(frozen=True)
class Layout:
    name: str  # the manifest's "layout" (state: no key)
    writer: str
    loader: str
    every_file: bool  # every rank (host) needs every file of the step

    def needed_files(self, manifest: Manifest, rank: int, world_size: int | None = None, *,
                     ranged: bool = False) -> set[str]:
        """The files ``rank`` reads to load ``manifest``'s step. State: its own, and rank 0's
        when the step holds replicated keys (written once, by rank 0); onto another world size
        (``world_size``) the per-rank values of saved rank ``rank % saved world size`` and every
        rank's tensor file (shards are resharded) -- unless ``ranged``: then the shards of other
        files are fetched as byte ranges from S3. DCP and folders: every file."""
        if self.every_file:
            return set(manifest.files)
        ws = saved_world_size(manifest)
        need = set(data_file_names(rank % ws))
        if manifest.extra.get("replicated"):
            need |= set(data_file_names(0))
        if manifest.extra.get("sharded") and world_size not in (None, ws) and not ranged:
            need |= set(tensor_files(manifest))
        return need

    def reshardable(self, manifest: Manifest) -> bool:
        """Whether the step loads onto another number of ranks: DCP plans resharded loads; a
        state resharded when it holds sharded tensors (DTensor)."""
        if self is DCP:
            return True
        return self is STATE and bool(manifest.extra.get("sharded"))

    def require(self, manifest: Manifest, where: object) -> None:
        """A loader of this layout refuses a step of another one, naming the right loader."""
        got = layout_of(manifest)
        if got is not self:
            raise ConfigError(f"{where}: step {manifest.step} was written by {got.writer}; load it with "
                              f"{got.loader}, not {self.loader}")


#: A manifest extra (true): every rank's tree records each tensor chunk's byte range in its file
#: and CRC32C (``tree["shards"]``), so a loader may fetch just the chunks it reads from S3 --
#: ranged reads, each verified -- instead of downloading whole files (DCP steps since it was added).
CHUNK_CRCS = "chunk_crc32c"


STATE = Layout("state", "CheckpointManager.save()", "CheckpointManager.restore(state)", every_file=False)
DCP = Layout(DCP_LAYOUT, "torch.distributed.checkpoint through spotckpt.dcp.StorageWriter",
             "dcp.load(state_dict, storage_reader=spotckpt.dcp.StorageReader(mgr))", every_file=True)
FOLDER = Layout(FOLDER_LAYOUT, "CheckpointManager.adopt() (another program's files)",
                "CheckpointManager.restore_folder() and the program that wrote it", every_file=True)
_BY_NAME = {DCP.name: DCP, FOLDER.name: FOLDER}


def layout_of(manifest: Manifest) -> Layout:
    """The layout a manifest names (no ``"layout"``: a state saved by ``save()``)."""
    name = manifest.extra.get("layout")
    if name is None:
        return STATE
    got = _BY_NAME.get(name) if isinstance(name, str) else None
    if got is None:
        raise ConfigError(f"step {manifest.step} has layout {name!r}, which this spotckpt does not know; it was "
                          "written by a newer spotckpt -- upgrade spotckpt to load it")
    return got


def saved_world_size(manifest: Manifest) -> int:
    try:
        return max(1, int(manifest.extra.get("world_size", 1)))
    except (TypeError, ValueError):
        return 1


def tensor_files(manifest: Manifest) -> list[str]:
    """Every rank's tensor file of a step."""
    return sorted(f for f in manifest.files if f.startswith("rank-") and f.endswith(".safetensors"))
