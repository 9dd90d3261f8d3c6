"""The requests under :class:`spotckpt.remote.s3.S3Store`: one bucket's client, its retries with
backoff (jitter from a private generator), the ``TransferManager`` that moves many objects in
parallel, and the translation of boto errors into StorageErrors that say what to do."""

from __future__ import annotations

import errno
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import botocore.exceptions as bce
from s3transfer.manager import TransferConfig, TransferManager
from s3transfer.subscribers import BaseSubscriber

from spotckpt.errors import DownloadError, LocalStepVanishedError, StorageError, UploadError
from spotckpt.remote.s3.failures import _NOT_FOUND, _classify, _error_code, _is_retryable
from spotckpt.remote.s3.settings import PrivateRandomOSUtils, _add_part_crc32c, private_retry_jitter

log = logging.getLogger(__name__)


class _Subscriber(BaseSubscriber):
    def __init__(self, size: int | None, progress: Callable[[int], None] | None) -> None:
        self._size = size
        self._progress = progress

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        if self._size is not None:
            future.meta.provide_transfer_size(self._size)

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress(bytes_transferred)


@dataclass(frozen=True)
class Transfer:
    """One object to move: ``key`` <-> the local ``path`` (``size`` bytes), with the
    ``extra_args`` s3transfer passes on (checksums)."""

    key: str
    path: Any
    size: int
    extra_args: dict[str, Any]


class S3Requests:
    """The requests of one bucket, from any thread (the boto3 client and the
    ``TransferManager`` are thread-safe). Each request is retried with backoff (on top of
    botocore's own retries) on 5xx, throttling and connection resets, ``attempts`` times in all."""

    def __init__(self, uri: str, bucket: str, client: Any, config: TransferConfig, *, attempts: int,
                 backoff_seconds: float) -> None:
        self.uri = uri
        self.bucket = bucket
        self.client = client
        self.client.meta.events.register("before-parameter-build.s3.UploadPart", _add_part_crc32c)
        # hands off the training's RNGs: retry jitter and temp names draw from this generator
        self._rng = random.Random()
        private_retry_jitter(self.client, self._rng)
        self.config = config
        self._attempts = attempts
        self._backoff = backoff_seconds
        self._tm: TransferManager | None = None
        self._lock = threading.Lock()
        self._closed = False

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # -- errors and retries ----------------------------------------------------------------
    def storage_error(self, exc: BaseException, key: str, cls: type[StorageError] = StorageError) -> StorageError:
        """Translate a boto error into a message that says which problem and what to set
        (see the table in :mod:`spotckpt.remote.s3.failures`)."""
        where = self.url(key) if key else f"s3://{self.bucket}"
        endpoint = getattr(self.client.meta, "endpoint_url", "?")
        code, status = _error_code(exc)
        failure = _classify(exc, has_key=bool(key))
        if failure is None:
            msg = f"S3 request for {where} failed: {type(exc).__name__}: {exc}"
        else:
            msg = failure.advice.format(where=where, endpoint=endpoint, bucket=self.bucket,
                                        code=code or status or type(exc).__name__, exc=exc)
        return cls(msg, key=key)

    def sleep_backoff(self, attempt: int) -> None:
        delay = min(self._backoff * (2 ** (attempt - 1)), 20.0)
        time.sleep(delay * (0.5 + self._rng.random() / 2))

    def retry(self, fn: Callable[[], Any], key: str, cls: type[StorageError]) -> Any:
        """``fn()``, retried on what is worth retrying; ``cls`` (a StorageError) when it fails."""
        for attempt in range(1, self._attempts + 1):
            try:
                return fn()
            except (bce.BotoCoreError, bce.ClientError, OSError) as exc:
                if not _is_retryable(exc) or attempt == self._attempts:
                    if isinstance(exc, OSError) and not _is_retryable(exc):
                        raise
                    err = self.storage_error(exc, key, cls)
                    if attempt > 1:
                        err.args = (f"{err.args[0]} (after {attempt} attempts)",)
                    raise err from exc
                log.warning("S3 %s: %s; retrying (attempt %s of %s)", key, exc, attempt + 1, self._attempts)
                self.sleep_backoff(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- single requests -------------------------------------------------------------------
    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(o["Key"] for o in page.get("Contents", []))
        except (bce.BotoCoreError, bce.ClientError) as exc:
            raise self.storage_error(exc, prefix) from exc
        return keys

    def get_bytes(self, key: str, *, byte_range: tuple[int, int] | None = None) -> bytes | None:
        """An object's bytes (or ``[start, end)`` of them), or None when it does not exist
        (retried)."""
        extra = {} if byte_range is None else {"Range": f"bytes={byte_range[0]}-{byte_range[1] - 1}"}

        def get() -> bytes | None:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=key, **extra)["Body"].read()
            except bce.ClientError as exc:
                if _classify(exc) is _NOT_FOUND:
                    return None
                raise

        return self.retry(get, key, DownloadError)  # type: ignore[no-any-return]

    def head(self, key: str, cls: type[StorageError], *, checksum: bool = False) -> dict[str, Any] | None:
        """``HeadObject`` (with the stored checksum: ``checksum``), retried; None if absent."""
        extra = {"ChecksumMode": "ENABLED"} if checksum else {}

        def head() -> dict[str, Any] | None:
            try:
                return self.client.head_object(Bucket=self.bucket, Key=key, **extra)  # type: ignore[no-any-return]
            except bce.ClientError as exc:
                if _classify(exc) is _NOT_FOUND:
                    return None
                raise

        return self.retry(head, key, cls)  # type: ignore[no-any-return]

    # -- many objects in parallel ------------------------------------------------------------
    def _manager(self) -> TransferManager:
        with self._lock:
            if self._closed:
                raise StorageError(f"S3 store for {self.uri} is closed", key=self.uri)
            if self._tm is None:
                self._tm = TransferManager(self.client, self.config, osutil=PrivateRandomOSUtils(self._rng))
            return self._tm

    def transfer_all(self, jobs: Sequence[Transfer], *, download: bool,
                     progress: Callable[[int], None] | None = None) -> None:
        """Run all jobs in parallel on the TransferManager; retry failed ones in rounds with
        backoff; on a non-retryable failure cancel the rest and raise Upload/DownloadError."""
        cls: type[StorageError] = DownloadError if download else UploadError
        tm = self._manager()
        pending = list(jobs)
        attempt = 0
        while pending:
            attempt += 1
            futures = []
            try:
                for job in pending:
                    sub = _Subscriber(job.size, progress)
                    if download:
                        fut = tm.download(self.bucket, job.key, str(job.path), extra_args=job.extra_args, subscribers=[sub])
                    else:
                        fut = tm.upload(str(job.path), self.bucket, job.key, extra_args=dict(job.extra_args), subscribers=[sub])
                    futures.append((job, fut))
                retry: list[tuple[Transfer, BaseException]] = []
                fatal: tuple[Transfer, BaseException] | None = None
                for job, fut in futures:
                    try:
                        fut.result()
                    except Exception as exc:  # noqa: BLE001 - sorted below
                        if fatal is None and _is_retryable(exc) and attempt < self._attempts:
                            retry.append((job, exc))
                        elif fatal is None:
                            fatal = (job, exc)
                            for _, other in futures:
                                other.cancel()
            except BaseException:
                for _, fut in futures:
                    fut.cancel()
                raise
            if fatal is not None:
                job, exc = fatal
                raise self._transfer_error(job, exc, download=download, cls=cls, attempt=attempt) from exc
            if retry:
                log.warning(
                    "S3: %d of %d transfers failed (%s); retrying them (attempt %d of %d)",
                    len(retry), len(pending), retry[0][1], attempt + 1, self._attempts,
                )
                self.sleep_backoff(attempt)
            pending = [job for job, _ in retry]

    def _transfer_error(self, job: Transfer, exc: BaseException, *, download: bool, cls: type[StorageError],
                        attempt: int) -> StorageError:
        if isinstance(exc, FileNotFoundError) and not download:
            err: StorageError = LocalStepVanishedError(f"{job.path} vanished during its upload", key=job.key)
        elif isinstance(exc, (bce.BotoCoreError, bce.ClientError)) or _is_retryable(exc):
            err = self.storage_error(exc, job.key, cls)
        else:
            advice = ""
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                advice = ("; the local disk is full -- free space on the checkpoint volume (or lower "
                          "keep_last); nothing was committed")
            err = cls(f"{'download' if download else 'upload'} of {self.url(job.key)} failed: "
                      f"{type(exc).__name__}: {exc}{advice}", key=job.key)
        if attempt > 1 and not isinstance(err, LocalStepVanishedError):
            err.args = (f"{err.args[0]} (after {attempt} attempts)",)
        return err

    def close(self) -> None:
        """Shut down the transfer threads (waits for transfers in flight)."""
        with self._lock:
            self._closed = True
            tm, self._tm = self._tm, None
        if tm is not None:
            tm.shutdown()
