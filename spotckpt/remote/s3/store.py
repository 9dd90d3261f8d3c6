"""S3Store: one step directory <-> ``<s3_uri>/step-XXXXXXXXXXXX/`` (see the package docstring)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import botocore.exceptions as bce
from s3transfer.manager import TransferConfig

from spotckpt.errors import (
    CheckpointCorruptError,
    ConfigError,
    DownloadError,
    LocalStepVanishedError,
    StorageError,
    UploadError,
)
from spotckpt.format import (
    MANIFEST_NAME,
    Manifest,
    crc32c_b64,
    crc32c_update,
    file_crc32c,
    file_crc32c_parallel,
    parse_step_dirname,
    safe_relpath,
    step_dirname,
)
from spotckpt.format import fsync_path as _fsync_path
from spotckpt.format import write_file_durably

from spotckpt.remote.s3.early import EarlyUpload, EarlyUploads
from spotckpt.remote.s3.failures import _CONFLICT, _NOT_FOUND, _classify
from spotckpt.remote.s3.requests import S3Requests, Transfer
from spotckpt.remote.s3.settings import (
    MiB,
    _full_object_checksums_supported,
    default_transfer_config,
    make_client,
    parse_s3_uri,
)

log = logging.getLogger(__name__)

class S3Store:
    """Steps of one ``s3://bucket/prefix``.

    Methods may be called from any thread; transfers of several objects run in parallel on the
    TransferManager's threads, and each object is retried with backoff (on top of botocore's
    own retries) on 5xx, throttling and connection resets, ``retry_attempts`` times in all.
    """

    def __init__(
        self,
        uri: str,
        *,
        client: Any = None,
        transfer_config: TransferConfig | None = None,
        retry_attempts: int = 5,
        retry_backoff_seconds: float = 0.5,
    ) -> None:
        self.uri = uri
        self.bucket, self.prefix = parse_s3_uri(uri)
        if retry_attempts < 1 or retry_backoff_seconds < 0:
            raise ConfigError("retry_attempts must be >= 1 and retry_backoff_seconds >= 0")
        self.requests = S3Requests(uri, self.bucket, client if client is not None else make_client(),
                                   transfer_config or default_transfer_config(), attempts=retry_attempts,
                                   backoff_seconds=retry_backoff_seconds)
        self.early = EarlyUploads(self.requests)

    @classmethod
    def open(cls, uri: str) -> S3Store:
        """A store for ``uri`` whose bucket was checked reachable (:meth:`check_access`), so a
        bad bucket or credentials fail now with what to do; closed again when the check fails."""
        store = cls(uri)
        try:
            store.check_access()
        except BaseException:
            store.close()
            raise
        return store

    @property
    def client(self) -> Any:
        return self.requests.client

    # ------------------------------------------------------------------------------ keys

    def key(self, *parts: str) -> str:
        rel = "/".join(parts)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def step_key(self, step: int, rel: str = "") -> str:
        return self.key(step_dirname(step), rel) if rel else self.key(step_dirname(step)) + "/"

    # ------------------------------------------------------------------------ diagnostics

    def check_access(self) -> None:
        """``HeadBucket``; StorageError naming the problem (no credentials, unreachable
        endpoint, missing bucket, access denied) and what to set."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (bce.BotoCoreError, bce.ClientError) as exc:
            raise self.requests.storage_error(exc, "") from exc

    # ---------------------------------------------------------------------------- listing

    def list_steps(self) -> list[int]:
        """Committed steps (those whose ``manifest.json`` exists), ascending."""
        base = self.key("step-") if self.prefix else "step-"
        strip = len(self.prefix) + 1 if self.prefix else 0
        steps = set()
        for key in self.requests.list_keys(base):
            parts = key[strip:].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST_NAME:
                step = parse_step_dirname(parts[0])
                if step is not None:
                    steps.add(step)
        return sorted(steps)

    def read_range(self, step: int, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of file ``rel`` of ``step`` (one ranged GET, retried); the
        caller verifies them. DownloadError when the object is missing or shorter."""
        key = self.step_key(step, rel)
        if end <= start:
            return b""

        data = self.requests.get_bytes(key, byte_range=(start, end))
        if data is None or len(data) != end - start:
            raise DownloadError(f"{self.requests.url(key)}: bytes {start}-{end - 1} could not be read "
                                f"({'missing' if data is None else f'{len(data)} bytes came back'})", key=key)
        return data

    def read_range_into(self, step: int, rel: str, start: int, out: memoryview) -> None:
        """Fill ``out`` with bytes ``[start, start + len(out))`` of file ``rel`` of ``step``: one
        ranged GET read straight into ``out`` (no intermediate copy), retried; the caller
        verifies them. CheckpointCorruptError when the object is missing or shorter (the step
        is damaged), DownloadError when S3 fails."""
        key = self.step_key(step, rel)
        n = len(out)
        if n == 0:
            return

        def get() -> int:
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key,
                                              Range=f"bytes={start}-{start + n - 1}")["Body"]
            except bce.ClientError as exc:
                if _classify(exc) is _NOT_FOUND:
                    return -1
                raise
            got = 0
            with body:
                while got < n:
                    k = body.readinto(out[got:])
                    if not k:
                        break
                    got += k
            return got

        got = self.requests.retry(get, key, DownloadError)
        if got != n:  # what the manifest lists is not there: the step in S3 is damaged, not S3 down
            raise CheckpointCorruptError(
                f"{self.requests.url(key)}: bytes {start}-{start + n - 1} could not be read "
                f"({'the object is missing' if got < 0 else f'{got} bytes came back'}); step {step} in S3 is "
                "incomplete -- an older step will be used", path=self.requests.url(key))

    def read_manifest(self, step: int) -> Manifest:
        """The S3 manifest of ``step``, strictly validated; CheckpointCorruptError if bad,
        NoCheckpointError-like StorageError if missing."""
        key = self.step_key(step, MANIFEST_NAME)
        data = self.requests.get_bytes(key)
        if data is None:
            raise DownloadError(f"{self.requests.url(key)} does not exist: step {step} is not committed in S3", key=key)
        man = Manifest.from_bytes(data, source=self.requests.url(key))
        if man.step != step:
            raise CheckpointCorruptError(
                f"{self.requests.url(key)} says step {man.step}, its directory says {step}; this step is "
                "not usable -- an older step will be used",
                path=self.requests.url(key),
            )
        return man

    # ----------------------------------------------------------------------------- upload

    def start_upload(self, step: int, rel: str, chunks: Any) -> EarlyUpload | None:
        """Upload while writing (:mod:`spotckpt.remote.s3.early`): start uploading file ``rel``
        of ``step`` from ``chunks`` (its bytes in memory, in order) while the caller writes the
        same bytes locally. The caller then
        calls ``committed(path)`` once the local step is committed, or ``abort()`` when its
        write failed; :meth:`upload_step` finishes the object and writes the manifest last."""
        safe_relpath(rel, source="start_upload")
        return self.early.start(step, rel, self.step_key(step, rel), self.step_key(step, MANIFEST_NAME), chunks)

    def discard_early(self, step: int) -> None:
        """Abort the uploads while writing of ``step`` nobody will finish (superseded, dropped)."""
        self.early.discard(step)

    def upload_step(self, step: int, src_dir: Path, manifest: Manifest | None = None, *,
                    files: Collection[str] | None = None, commit: bool = True) -> bool:
        """Upload a committed local step: every data file, then ``manifest.json`` last with
        ``If-None-Match: *``.

        Several hosts: ``files`` limits the upload to the files this host holds, and
        ``commit=False`` uploads no manifest (one rank commits the step with
        :meth:`commit_manifest` once :meth:`missing_objects` finds every host's files in S3).

        Returns True when this call committed the step, False when S3 already held the same
        manifest (nothing is uploaded then) or ``commit`` is False. Raises UploadError if S3
        holds a *different* manifest for this step (another writer),
        :class:`LocalStepVanishedError` when ``src_dir`` disappears meanwhile,
        CheckpointCorruptError when a local file does not match its manifest entry.
        """
        src_dir = Path(src_dir)
        local_manifest = src_dir / MANIFEST_NAME
        if manifest is None:
            try:
                man_bytes = local_manifest.read_bytes()
            except FileNotFoundError as exc:
                raise LocalStepVanishedError(f"{src_dir} has no manifest.json (gone?)", key=str(src_dir)) from exc
            manifest = Manifest.from_bytes(man_bytes, source=str(local_manifest))
        else:
            man_bytes = local_manifest.read_bytes() if local_manifest.exists() else manifest.to_bytes()
            if Manifest.from_bytes(man_bytes, source=str(local_manifest)) != manifest:
                man_bytes = manifest.to_bytes()
        if manifest.step != step:
            raise CheckpointCorruptError(f"{local_manifest} is for step {manifest.step}, not {step}", path=local_manifest)
        man_key = self.step_key(step, MANIFEST_NAME)
        early = self.early.take(step)  # files uploaded while they were written: finished below
        try:
            existing = self.requests.get_bytes(man_key)
            if existing is not None:
                if self._same_manifest(existing, man_bytes):
                    log.debug("step %s is already committed in %s", step, self.uri)
                    return False
                raise UploadError(
                    f"{self.requests.url(man_key)} already holds a different manifest: another writer committed "
                    f"step {step}; use a separate S3 prefix per job/run, or delete that step first",
                    key=man_key,
                )
            jobs = self._upload_jobs(step, src_dir, manifest, files)
            self.requests.transfer_all([j for rel, j in jobs if rel not in early], download=False)
            late = [j for rel, j in jobs if rel in early and not early.pop(rel).finish(manifest.files[rel])]
            self.requests.transfer_all(late, download=False)  # those that did not finish while writing
        finally:
            for up in early.values():  # not listed, or an error came first
                up.abort()

        if not src_dir.exists():
            raise LocalStepVanishedError(f"{src_dir} vanished during its upload; not committing it", key=man_key)
        if not commit:
            return False
        return self.commit_manifest(step, manifest, man_bytes)

    def _upload_jobs(self, step: int, src_dir: Path, manifest: Manifest,
                     files: Collection[str] | None) -> list[tuple[str, Transfer]]:
        """(file, transfer) for each file of ``manifest`` to upload, its local copy checked
        against its entry (size; the CRC32C too where S3 will not check it)."""
        full_object = _full_object_checksums_supported()
        jobs = []
        local_manifest = src_dir / MANIFEST_NAME
        for rel, ent in sorted(manifest.files.items()):
            safe_relpath(rel, source=str(local_manifest))
            if files is not None and rel not in files:
                continue
            path = src_dir / rel
            try:
                size = path.stat().st_size
            except FileNotFoundError as exc:
                if not src_dir.exists():
                    raise LocalStepVanishedError(f"{src_dir} vanished before its upload", key=str(src_dir)) from exc
                raise CheckpointCorruptError(f"{path} is listed in the manifest but missing", path=path) from exc
            if size != ent.size:
                raise CheckpointCorruptError(
                    f"{path} is {size} bytes, its manifest says {ent.size}; the local step is damaged "
                    "and is not uploaded", path=path,
                )
            if not full_object:
                # Older s3transfer: parts carry their own CRC32C, the object as a whole does not,
                # so check the local bytes against the manifest here.
                _, crc = file_crc32c(path)
                if crc32c_b64(crc) != ent.crc32c:
                    raise CheckpointCorruptError(f"{path} does not match its CRC32C in the manifest", path=path)
                extra: dict[str, Any] = {"ChecksumAlgorithm": "CRC32C"}
                if ent.size <= self.requests.config.multipart_threshold:
                    extra = {"ChecksumCRC32C": ent.crc32c}
            else:
                extra = {"ChecksumCRC32C": ent.crc32c}
            jobs.append((rel, Transfer(self.step_key(step, rel), path, size, extra)))
        return jobs

    def missing_objects(self, step: int, manifest: Manifest) -> list[str]:
        """The files of ``manifest`` that are not in S3 yet with the right size and CRC32C
        (empty: the step can be committed). The CRC32C comes from ``HeadObject`` where S3 keeps
        it; where it does not (small single-part objects on some servers), from the bytes."""
        missing = []
        for rel, ent in sorted(manifest.files.items()):
            key = self.step_key(step, rel)
            h = self.requests.head(key, UploadError, checksum=True)
            if h is None or int(h.get("ContentLength", -1)) != ent.size:
                missing.append(rel)
                continue
            crc = h.get("ChecksumCRC32C")
            if crc is None:
                body = self.requests.get_bytes(key)
                crc = None if body is None else crc32c_b64(crc32c_update(0, body))
            if crc != ent.crc32c:
                missing.append(rel)
        return missing

    def commit_manifest(self, step: int, manifest: Manifest, man_bytes: bytes | None = None) -> bool:
        """Write ``manifest.json`` of ``step`` with ``If-None-Match: *``: the step counts from
        now on. True when this call committed it, False when S3 already held the same manifest;
        UploadError when it holds a different one (another writer)."""
        if man_bytes is None:
            man_bytes = manifest.to_bytes()
        man_key = self.step_key(step, MANIFEST_NAME)
        crc = crc32c_b64(crc32c_update(0, man_bytes))

        def put() -> bool:
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=man_key,
                    Body=man_bytes,
                    IfNoneMatch="*",
                    ChecksumCRC32C=crc,
                    ContentType="application/json",
                )
                return True
            except bce.ClientError as exc:
                if _classify(exc) is not _CONFLICT:
                    raise
                now = self.requests.get_bytes(man_key)
                if now is not None and self._same_manifest(now, man_bytes):
                    return False  # e.g. our own earlier attempt went through
                raise UploadError(
                    f"{self.requests.url(man_key)}: another writer committed step {step} with a different "
                    "manifest at the same time; use a separate S3 prefix per job/run",
                    key=man_key,
                ) from exc

        done: bool = self.requests.retry(put, man_key, UploadError)
        log.info("step %s committed to %s (%d bytes)", step, self.uri, manifest.total_bytes)
        return done

    @staticmethod
    def _same_manifest(a: bytes, b: bytes) -> bool:
        if a == b:
            return True
        try:
            return Manifest.from_bytes(a) == Manifest.from_bytes(b)
        except CheckpointCorruptError:
            return False

    def cleanup_incomplete_uploads(self, *, older_than_seconds: float = 3600.0) -> int:
        """Abort multipart uploads under the prefix started more than ``older_than_seconds``
        ago (left by a killed uploader); returns how many were aborted. Uploads younger than
        that may belong to a live writer on another host and are left alone."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than_seconds)
        n = 0
        prefix = self.key("") if self.prefix else ""
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
                for up in page.get("Uploads", []):
                    initiated = up.get("Initiated")
                    if older_than_seconds > 0 and initiated is not None and initiated > cutoff:
                        continue
                    if up["Key"] in self.early.live_keys():  # this process's, while writing: asked after
                        continue                              # the listing, so none started before it is missed
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    n += 1
        except (bce.BotoCoreError, bce.ClientError) as exc:
            raise self.requests.storage_error(exc, prefix) from exc
        if n:
            log.info("aborted %d incomplete multipart upload(s) under %s", n, self.uri)
        return n

    # --------------------------------------------------------------------------- download

    def download_step(
        self,
        step: int,
        dest_dir: Path,
        manifest: Manifest | None = None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> Manifest:
        """Download ``step`` into ``dest_dir`` (e.g. a staging directory), verify the size and
        CRC32C of every file, fsync them, then write ``manifest.json`` last (so ``dest_dir``
        can be committed by rename). ``progress(bytes_delta)`` is called from transfer threads.

        Refuses manifest paths that are unsafe or resolve outside ``dest_dir``, before anything
        is written. CheckpointCorruptError when an object's size or CRC32C does not match.
        """
        if manifest is None:
            manifest = self.read_manifest(step)
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        root = dest_dir.resolve()
        source = self.requests.url(self.step_key(step, MANIFEST_NAME))
        targets: list[tuple[str, Path]] = []
        for rel in sorted(manifest.files):
            safe_relpath(rel, source=source)
            target = root / rel
            real = Path(os.path.realpath(target))
            if os.path.commonpath([str(root), str(real)]) != str(root) or real == root:
                raise CheckpointCorruptError(
                    f"{source}: file path {rel!r} resolves outside {root}; refusing to download this step",
                    path=source,
                )
            targets.append((rel, target))

        jobs = []
        for rel, target in targets:
            ent = manifest.files[rel]
            key = self.step_key(step, rel)
            h = self.requests.head(key, DownloadError)
            head = None if h is None else int(h["ContentLength"])
            if head is None:
                raise CheckpointCorruptError(f"{self.requests.url(key)} is missing; step {step} in S3 is incomplete", path=self.requests.url(key))
            if head != ent.size:
                raise CheckpointCorruptError(
                    f"{self.requests.url(key)} is {head} bytes, the manifest says {ent.size} (truncated or "
                    "replaced); this step is not usable -- an older step will be used",
                    path=self.requests.url(key),
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            if os.path.commonpath([str(root), os.path.realpath(target.parent)]) != str(root):
                raise CheckpointCorruptError(f"{source}: {rel!r} escapes {root}; refusing", path=source)
            jobs.append(Transfer(key, target, ent.size, {}))
        self.requests.transfer_all(jobs, download=True, progress=progress)

        with ThreadPoolExecutor(1, thread_name_prefix="spotckpt-fsync") as flush:
            for rel, target in targets:  # each file flushed to disk while its bytes are checked
                ent = manifest.files[rel]
                synced = flush.submit(_fsync_path, target)
                size, crc = file_crc32c_parallel(target)
                synced.result()
                if size != ent.size or crc32c_b64(crc) != ent.crc32c:
                    target.unlink(missing_ok=True)
                    raise CheckpointCorruptError(
                        f"{self.requests.url(self.step_key(step, rel))}: downloaded {size} bytes with CRC32C "
                        f"{crc32c_b64(crc)}, the manifest says {ent.size} bytes / {ent.crc32c}; the "
                        "object is corrupt -- an older step will be used",
                        path=self.requests.url(self.step_key(step, rel)),
                    )
        dirs = {t.parent for _, t in targets} | {root}
        man_path = root / MANIFEST_NAME
        write_file_durably(man_path, manifest.to_bytes())
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            _fsync_path(d, directory=True)
        log.info("step %s downloaded from %s (%d bytes, verified)", step, self.uri, manifest.total_bytes)
        return manifest

    def verify_step(self, step: int, manifest: Manifest | None = None) -> list[str]:
        """Check every object of a committed step without keeping it: sizes by HEAD, and the
        CRC32C by the full-object checksum S3 stored at upload when there is one, else by
        streaming the object through CRC32C. Returns the problems found (empty: valid)."""
        if manifest is None:
            manifest = self.read_manifest(step)
        problems: list[str] = []
        for rel, ent in sorted(manifest.files.items()):
            key = self.step_key(step, rel)
            h = self.requests.head(key, DownloadError, checksum=True)
            if h is None:
                problems.append(f"{rel}: missing")
                continue
            if int(h["ContentLength"]) != ent.size:
                problems.append(f"{rel}: {h['ContentLength']} bytes, manifest says {ent.size}")
                continue
            stored = h.get("ChecksumCRC32C") if h.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT" else None
            if stored is not None and "-" not in stored:
                if stored != ent.crc32c:
                    problems.append(f"{rel}: CRC32C {stored} in S3, manifest says {ent.crc32c}")
                continue

            def stream(key: str = key) -> tuple[int, int]:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
                crc = n = 0
                for chunk in body.iter_chunks(8 * MiB):
                    crc = crc32c_update(crc, chunk)
                    n += len(chunk)
                return n, crc

            n, crc = self.requests.retry(stream, key, DownloadError)
            if n != ent.size or crc32c_b64(crc) != ent.crc32c:
                problems.append(f"{rel}: read {n} bytes with CRC32C {crc32c_b64(crc)}, manifest says {ent.size} / {ent.crc32c}")
        return problems

    # ----------------------------------------------------------------------------- delete

    def uncommit_step(self, step: int) -> None:
        """Delete only a step's manifest: the step stops counting, its data objects stay (as
        evidence; a later upload of the same step overwrites them)."""
        man_key = self.step_key(step, MANIFEST_NAME)
        self.requests.retry(lambda: self.client.delete_object(Bucket=self.bucket, Key=man_key), man_key, StorageError)

    def delete_step(self, step: int) -> None:
        """Delete a step: its manifest first (the step stops counting), then its data."""
        man_key = self.step_key(step, MANIFEST_NAME)
        self.requests.retry(lambda: self.client.delete_object(Bucket=self.bucket, Key=man_key), man_key, StorageError)
        keys = self.requests.list_keys(self.step_key(step))
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            key = batch[0]

            def delete(batch: Iterable[str] = batch) -> None:
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
                if resp.get("Errors"):
                    e = resp["Errors"][0]
                    raise StorageError(f"cannot delete {self.requests.url(e.get('Key', ''))}: {e.get('Code')} {e.get('Message')}", key=e.get("Key", ""))

            self.requests.retry(delete, key, StorageError)
        log.info("step %s deleted from %s", step, self.uri)

    def close(self) -> None:
        """Abort unfinished uploads while writing; shut down the transfer threads (waits for
        transfers in flight)."""
        self.early.close()
        self.requests.close()

    def __enter__(self) -> S3Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

