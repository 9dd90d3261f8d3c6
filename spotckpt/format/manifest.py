"""Names and the commit marker: step directory names, data file names, ``manifest.json``.

A committed step directory is ``step-NNNNNNNNNNNN`` (12 digits, so name order is step order) and
holds ``manifest.json``, written last, listing every data file of the step with its size and
CRC32C (base64 of the big-endian value, as S3's ``ChecksumCRC32C``).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from spotckpt.errors import CheckpointCorruptError, StateError
from spotckpt.format.checksums import crc32c_b64, file_crc32c_parallel

__all__ = [
    "DCP_LAYOUT",
    "FOLDER_LAYOUT",
    "FORMAT",
    "MANIFEST_NAME",
    "MAX_JSON_BYTES",
    "MAX_STEP",
    "STEP_DIGITS",
    "FileEntry",
    "Manifest",
    "data_file_names",
    "parse_step_dirname",
    "safe_relpath",
    "step_dirname",
    "utc_now_iso",
    "verify_files",
]

FORMAT = "spotckpt/1"
#: ``"layout"`` in a manifest's extras of a step adopted from a folder another program wrote
#: (``CheckpointManager.adopt``): its files are that program's, loaded by that program.
FOLDER_LAYOUT = "folder"
#: ``"layout"`` of a step written through ``torch.distributed.checkpoint`` (:mod:`spotckpt.dcp`).
DCP_LAYOUT = "dcp"
MANIFEST_NAME = "manifest.json"
STEP_DIGITS = 12
MAX_STEP = 10**STEP_DIGITS - 1
_STEP_RE = re.compile(r"^step-(\d{12})$")

#: Upper bound of a manifest or tree file we parse.
MAX_JSON_BYTES = 256 * 1024 * 1024


def step_dirname(step: int) -> str:
    """``step-000000001200`` for 1200: zero-padded so name order is step order."""
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise StateError(f"step must be an int in [0, {MAX_STEP}], got {step!r}")
    return f"step-{step:0{STEP_DIGITS}d}"


def parse_step_dirname(name: str) -> int | None:
    """The step of a committed step directory's name, or None for any other name."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def data_file_names(rank: int) -> tuple[str, str]:
    """The two data files one writer produces: its tensors and its tree."""
    return f"rank-{rank:05d}.safetensors", f"rank-{rank:05d}.tree.json"


@dataclass(frozen=True)
class FileEntry:
    """Size and CRC32C (base64, big-endian) of one data file."""

    size: int
    crc32c: str


def safe_relpath(rel: object, *, source: str = "") -> str:
    """Return ``rel`` if it is a safe relative POSIX path inside a step directory, else raise.

    Refused: non-strings, empty, absolute, ``..`` or ``.`` components, backslashes, NUL, empty
    components and the manifest's own name. Other ``.``-leading names are plain files: an
    adopted torch.distributed.checkpoint folder holds ``.metadata`` (Lightning's sharded
    strategies, the Trainer's and Accelerate's FSDP ``SHARDED_STATE_DICT``).
    """
    bad = CheckpointCorruptError(
        f"{source or 'manifest'}: refusing file path {rel!r}: paths must be relative, inside the "
        "step directory, without '..'; this checkpoint was not written by spotckpt or was "
        "tampered with -- delete it or restore an older step",
        path=source,
    )
    if not isinstance(rel, str) or not rel or len(rel) > 1024:
        raise bad
    if "\\" in rel or "\x00" in rel or rel.startswith("/"):
        raise bad
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise bad
    if PurePosixPath(rel).is_absolute() or rel == MANIFEST_NAME:
        raise bad
    return rel


def utc_now_iso() -> str:
    """Now, as the manifest's ``created`` field writes it (ISO-8601 UTC, milliseconds, ``Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Manifest:
    """The commit marker of one step: ``manifest.json``.

    ``files`` maps every data file's path relative to the step directory to its size and CRC32C.
    ``extra`` holds optional writer information (world size, wall time of the save, ...).
    """

    step: int
    files: Mapping[str, FileEntry]
    created: str = field(default_factory=utc_now_iso)
    format: str = FORMAT
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "format": self.format,
            "step": self.step,
            "created": self.created,
            "files": {k: {"size": v.size, "crc32c": v.crc32c} for k, v in sorted(self.files.items())},
        }
        doc.update({k: v for k, v in self.extra.items() if k not in doc})
        return (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "manifest.json") -> Manifest:
        """Parse and validate a manifest; raise :class:`CheckpointCorruptError` on anything off."""

        def bad(why: str) -> CheckpointCorruptError:
            return CheckpointCorruptError(
                f"{source}: {why}; this step is not usable -- an older step will be used",
                path=source,
            )

        if len(data) > MAX_JSON_BYTES:
            raise bad(f"manifest is {len(data)} bytes, more than {MAX_JSON_BYTES}")
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"not valid JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise bad("not a JSON object")
        fmt = doc.get("format")
        if fmt != FORMAT:
            raise bad(
                f"unknown format {fmt!r} (this spotckpt reads {FORMAT!r}); upgrade spotckpt to "
                "read it"
            )
        step = doc.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
            raise bad(f"'step' must be an int in [0, {MAX_STEP}], got {step!r}")
        created = doc.get("created")
        if not isinstance(created, str):
            raise bad("'created' must be an ISO-8601 string")
        files_doc = doc.get("files")
        if not isinstance(files_doc, dict) or not files_doc:
            raise bad("'files' must be a non-empty object")
        files: dict[str, FileEntry] = {}
        for rel, ent in files_doc.items():
            safe_relpath(rel, source=source)
            if not isinstance(ent, dict):
                raise bad(f"entry of {rel!r} is not an object")
            size, crc = ent.get("size"), ent.get("crc32c")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad(f"size of {rel!r} must be a non-negative int, got {size!r}")
            if not isinstance(crc, str):
                raise bad(f"crc32c of {rel!r} must be a base64 string")
            try:
                raw = base64.b64decode(crc, validate=True)
            except ValueError as exc:
                raise bad(f"crc32c of {rel!r} is not base64") from exc
            if len(raw) != 4:
                raise bad(f"crc32c of {rel!r} is not 4 bytes")
            files[rel] = FileEntry(size=size, crc32c=crc)
        extra = {k: v for k, v in doc.items() if k not in ("format", "step", "created", "files")}
        return cls(step=step, files=files, created=created, format=fmt, extra=extra)


def verify_files(step_dir: Path, manifest: Manifest, *, checksums: bool = True,
                 only: Collection[str] | None = None) -> list[str]:
    """Problems with the data files of ``step_dir`` against ``manifest`` (empty list = valid).

    Sizes first (every file), then CRC32C of every file of the right size, each file checksummed
    by several threads over disjoint byte ranges of read-only mappings (see
    :func:`spotckpt.format.file_crc32c_parallel`; figures in benchmarks/README.md). A file that
    cannot be read (I/O error) is a problem, not an exception, so a restore falls back to an
    older step or the S3 copy. With ``only``, just those files (several hosts).
    """
    problems = []
    sized = []
    for rel, ent in manifest.files.items():
        if only is not None and rel not in only:
            continue
        p = step_dir / rel
        try:
            st = p.stat()
        except FileNotFoundError:
            problems.append(f"{p}: missing")
            continue
        if st.st_size != ent.size:
            problems.append(f"{p}: size {st.st_size}, manifest says {ent.size} (truncated?)")
            continue
        sized.append((p, ent))
    if checksums:
        for p, ent in sized:
            try:
                size, crc = file_crc32c_parallel(p)
            except OSError as exc:
                problems.append(f"{p}: unreadable ({exc.strerror or exc})")
                continue
            if size != ent.size:
                problems.append(f"{p}: size {size}, manifest says {ent.size} (changed while verifying)")
            elif crc32c_b64(crc) != ent.crc32c:
                problems.append(f"{p}: CRC32C {crc32c_b64(crc)} != {ent.crc32c} in manifest (corrupt)")
    return problems
