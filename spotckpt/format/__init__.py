"""The on-disk format ``spotckpt/1``: manifest, CRC32C, streamed safetensors files, JSON trees.

A committed step directory holds, per writer (rank), ``rank-NNNNN.safetensors`` (every tensor, in
the safetensors layout, readable by any safetensors reader) and ``rank-NNNNN.tree.json`` (the
structure of the state with every non-tensor value, tensors referenced by name), and one
``manifest.json`` listing every data file with its size and CRC32C (base64 of the big-endian
value, as S3's ``ChecksumCRC32C``). The manifest is the commit marker: written last, read first.

Modules (this package re-exports their public names; import from ``spotckpt.format``):

- :mod:`.checksums` -- CRC32C: incremental, combine, whole files (parallel), :class:`CrcWriter`
- :mod:`.manifest` -- step and data file names, :class:`FileEntry`, :class:`Manifest`
- :mod:`.durable` -- the one write + CRC32C + fsync path, the one fsync helper
- :mod:`.safetensors` -- plan, write and strictly read safetensors files
- :mod:`.tree` -- the JSON tree codec for non-tensor values

Nothing here unpickles unless the caller opts in. :mod:`.safetensors` and :mod:`.tree` import
torch, on first use of one of their names (manifests and CRC32C need no torch); nothing else is
heavy, and nothing from other spotckpt modules except :mod:`spotckpt.errors`. Tuning knobs
(``PARALLEL_MIN_BYTES``, ``VERIFY_WINDOW_BYTES``, ``io_threads``) are read from
:mod:`.checksums` at call time: change them there, not on this package.
"""

from __future__ import annotations

# The constants are importable from here as before, but are not part of __all__.
from spotckpt.format.checksums import (
    IO_CHUNK_BYTES,
    PARALLEL_MIN_BYTES,
    VERIFY_WINDOW_BYTES,
    CrcWriter,
    crc32c_b64,
    crc32c_combine,
    crc32c_update,
    file_crc32c,
    file_crc32c_parallel,
    io_threads,
)
from spotckpt.format.durable import copy_file_durably, fsync_dir, fsync_path, write_chunks_durably, write_file_durably
from spotckpt.format.manifest import (
    DCP_LAYOUT,
    FOLDER_LAYOUT,
    FORMAT,
    MANIFEST_NAME,
    MAX_JSON_BYTES,
    MAX_STEP,
    STEP_DIGITS,
    FileEntry,
    Manifest,
    data_file_names,
    parse_step_dirname,
    safe_relpath,
    step_dirname,
    utc_now_iso,
    verify_files,
)

from typing import TYPE_CHECKING as _TYPE_CHECKING

if _TYPE_CHECKING:  # pragma: no cover
    from spotckpt.format.safetensors import (
        MAX_HEADER_BYTES,
        SafetensorsFile,
        TensorSpec,
        plan_safetensors,
        tensor_byte_view,
        tensor_ranges,
        write_safetensors,
    )
    from spotckpt.format.tree import decode_tree, encode_tree, parse_tree_json

# The safetensors and tree modules import torch; they load on first use of one of their names,
# so reading manifests and checking CRC32C (``spotckpt ls``/``verify``, the uploader) needs no torch.
_LAZY = {
    **dict.fromkeys(("MAX_HEADER_BYTES", "SafetensorsFile", "TensorSpec", "plan_safetensors", "tensor_byte_view",
                     "tensor_ranges", "write_safetensors"), "safetensors"),
    **dict.fromkeys(("decode_tree", "encode_tree", "parse_tree_json"), "tree"),
}


def __getattr__(name: str) -> object:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "DCP_LAYOUT",
    "FOLDER_LAYOUT",
    "FORMAT",
    "MANIFEST_NAME",
    "FileEntry",
    "Manifest",
    "step_dirname",
    "utc_now_iso",
    "verify_files",
    "parse_step_dirname",
    "crc32c_update",
    "crc32c_b64",
    "file_crc32c",
    "file_crc32c_parallel",
    "crc32c_combine",
    "io_threads",
    "safe_relpath",
    "SafetensorsFile",
    "TensorSpec",
    "CrcWriter",
    "plan_safetensors",
    "write_safetensors",
    "tensor_byte_view",
    "tensor_ranges",
    "encode_tree",
    "parse_tree_json",
    "decode_tree",
    "data_file_names",
    "fsync_path",
    "fsync_dir",
    "write_chunks_durably",
    "write_file_durably",
]
