"""Upload while writing: a step's data file goes to S3 from the memory it is being written from,
while the local write and fsync run, instead of being read back after the local commit.

How one file goes up (:class:`EarlyUpload`)::

    save()      start(): the file's bytes as chunks in memory (the safetensors header and the
                tensors a blocking save holds still, or the staging buffer of an async save)
    pool        CreateMultipartUpload (CRC32C, FULL_OBJECT) -> UploadPart of each 16 MiB part,
                in file order, with its own CRC32C, read from memory ... (a part replaces nothing
                in S3 until the upload is completed; a small file's single PUT does, so it first
                checks with HEAD that the step has no manifest in S3)
    commit      committed(path): ... and, once the local step is committed (the memory may
                change from then on: save() returns, the staging buffer is reused), the parts
                not read yet come from the committed file instead
    uploader    finish(entry) from S3Store.upload_step: wait for the parts; the object's CRC32C
                (the parts' CRCs combined) and size must equal the manifest's entry, then
                CompleteMultipartUpload with that CRC32C as the FULL_OBJECT checksum, which S3
                checks. Only then does upload_step write the manifest (last, as always).
    failure     abort(): the local write failed -- no more reads of the memory once it returns,
                the multipart upload aborted (a small single-PUT object deleted); nothing of the
                step is left in S3. A failed or mismatching early upload is aborted too, and
                upload_step uploads that file from the committed file as before.

Files up to the multipart threshold go up in one PUT (with their CRC32C) as soon as their bytes
are read. Parts are copied out of the memory (so no request holds it) and checksummed once.

Threads: ``start``/``committed``/``abort`` come from the thread that saves (training or persist
thread), ``finish``/``abort`` from the uploader's; the work runs on the
``spotckpt-s3-early`` pool (as many threads as the store's transfer concurrency).
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from spotckpt.errors import UploadError
from spotckpt.format import FileEntry, crc32c_b64, crc32c_combine, crc32c_update
from spotckpt.remote.s3.failures import _NO_UPLOAD, _classify

__all__ = ["EarlyUpload", "EarlyUploads"]

log = logging.getLogger(__name__)


class _Stopped(Exception):
    """The upload was aborted: stop reading."""


class _Bytes:
    """The object's bytes: ``chunks`` in memory until :meth:`to_file`, the committed file after.
    :meth:`to_file` and :meth:`close` return only when no copy out of the memory is running."""

    def __init__(self, chunks: Sequence[Any]) -> None:
        self._views: list[np.ndarray] = []
        self._starts: list[int] = []
        off = 0
        for c in chunks:
            arr = np.frombuffer(c, dtype=np.uint8) if not isinstance(c, np.ndarray) else c.reshape(-1).view(np.uint8)
            if arr.size:
                self._views.append(arr)
                self._starts.append(off)
                off += arr.size
        self.size = off
        self._cond = threading.Condition()
        self._readers = 0
        self._path: Path | None = None
        self._closed = False

    def read_into(self, start: int, out: bytearray) -> None:
        """Fill ``out`` with the bytes from ``start`` on."""
        end = start + len(out)
        with self._cond:
            if self._closed:
                raise _Stopped()
            path = self._path
            if path is None:
                self._readers += 1
        if path is not None:
            with open(path, "rb", buffering=0) as f:
                view, pos = memoryview(out), start
                while view:
                    n = os.preadv(f.fileno(), [view], pos)
                    if n <= 0:
                        raise UploadError(f"{path} ended at byte {pos}, expected {end}", key=str(path))
                    view, pos = view[n:], pos + n
            return
        try:
            dst = np.frombuffer(out, dtype=np.uint8)
            i = bisect.bisect_right(self._starts, start) - 1
            pos = start
            while pos < end:
                arr, base = self._views[i], self._starts[i]
                n = min(end, base + arr.size) - pos
                np.copyto(dst[pos - start : pos - start + n], arr[pos - base : pos - base + n])
                pos += n
                i += 1
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    def to_file(self, path: Path) -> None:
        with self._cond:
            self._path = path
            while self._readers:
                self._cond.wait()
            self._views = []

    def close(self) -> None:
        with self._cond:
            self._closed = True
            while self._readers:
                self._cond.wait()
            self._views = []


class _Buffers:
    """Part-sized buffers reused from part to part (a fresh 16 MiB buffer per part costs its page
    faults and zeroing, more than the copy into it); at most one per pool thread is kept, and
    none once no upload is left (:meth:`drop`)."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self._keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> bytearray:
        if n == self.size:
            with self._lock:
                if self._free:
                    return self._free.pop()
        return bytearray(n)

    def give(self, buf: bytearray) -> None:
        if len(buf) == self.size:
            with self._lock:
                if len(self._free) < self._keep:
                    self._free.append(buf)

    def drop(self) -> None:
        with self._lock:
            self._free.clear()


class EarlyUpload:
    """One file of one step on its way to S3 while it is written locally (see the module doc)."""

    def __init__(self, requests: Any, pool: ThreadPoolExecutor, key: str, man_key: str, chunks: Sequence[Any], *,
                 part_size: int, threshold: int, buffers: _Buffers,
                 on_settled: Callable[[EarlyUpload], None] | None = None) -> None:
        self._req = requests
        self._buffers = buffers
        self._on_settled = on_settled
        self._pool = pool
        self.key = key
        self._man_key = man_key
        self._src = _Bytes(chunks)
        self.size = self._src.size
        if self.size > threshold:
            starts = range(0, self.size, part_size)
            self._parts = [(i + 1, s, min(s + part_size, self.size)) for i, s in enumerate(starts)]
        else:
            self._parts = []  # one PUT
        self._cond = threading.Condition()
        self._tasks = 1  # the beginning, then one per part
        self._stop = False
        self._error: BaseException | None = None
        self._upload_id: str | None = None
        self._put_crc: int | None = None  # one PUT: the CRC32C it was stored with
        self._put_sent = False
        self._done: dict[int, tuple[str, int]] = {}  # part number -> (ETag, CRC32C)
        self._settled = False  # completed, or being cleaned up
        self._cleaned = threading.Event()  # ... and done with that

    # -- the saving thread ----------------------------------------------------------------
    def start(self) -> None:
        self._pool.submit(self._begin)

    def committed(self, path: Path) -> None:
        """The local step is committed and ``path`` is the file: the memory is not read again."""
        self._src.to_file(Path(path))

    def abort(self) -> None:
        """The local write failed, or nobody will finish this upload (the step was superseded or
        dropped): stop, and remove what reached S3 (returns once the memory is no longer read and
        the multipart upload is aborted)."""
        with self._cond:
            self._stop = True
        self._src.close()
        self._wait_tasks()
        self._clean_up()

    # -- the uploader's thread --------------------------------------------------------------
    def finish(self, entry: FileEntry) -> bool:
        """Wait for the parts; complete the object when its size and CRC32C are ``entry``'s.
        True: the object is in S3 as the manifest lists it. False: it is not (the caller
        uploads the committed file), and nothing of this upload is left."""
        self._wait_tasks()
        err = self._error
        if err is None and not self._stop:
            crc = self._object_crc()
            if crc < 0:
                err = UploadError(f"{self._req.url(self.key)}: a part is missing", key=self.key)
            elif self.size != entry.size or crc32c_b64(crc) != entry.crc32c:
                err = UploadError(f"{self._req.url(self.key)}: the bytes uploaded while writing ({self.size} bytes, "
                                  f"CRC32C {crc32c_b64(crc)}) are not the file the manifest lists ({entry.size} bytes, "
                                  f"{entry.crc32c}); uploading the committed file instead", key=self.key)
            elif self._parts:
                try:
                    self._complete(entry)
                    self._completed()
                    return True
                except Exception as exc:  # noqa: BLE001 - falls back to the file
                    err = exc
            else:
                self._completed()
                return True
        if err is not None:
            log.warning("spotckpt: upload while writing of %s did not finish (%s); uploading the committed file",
                        self._req.url(self.key), err)
        self._clean_up()
        return False

    # -- the pool ---------------------------------------------------------------------------
    def _begin(self) -> None:
        try:
            with self._cond:
                if self._stop:
                    return
            if not self._parts:
                # a PUT replaces the object at once: never one of a step committed in S3 (parts of a
                # multipart upload replace nothing until upload_step, having found no manifest, completes them)
                if self._req.head(self._man_key, UploadError) is not None:
                    raise UploadError(f"{self._req.url(self._man_key)} exists: the step is committed in S3 already; "
                                      "not touching its objects", key=self._man_key)
                self._put_one()
            else:
                resp = self._call(lambda: self._req.client.create_multipart_upload(
                    Bucket=self._req.bucket, Key=self.key, ChecksumAlgorithm="CRC32C", ChecksumType="FULL_OBJECT"))
                with self._cond:
                    self._upload_id = resp["UploadId"]
                    stop = self._stop
                if not stop:
                    with self._cond:
                        self._tasks += len(self._parts)
                    for part in self._parts:
                        self._pool.submit(self._part, *part)
        except BaseException as exc:  # noqa: BLE001 - kept for finish()
            self._fail(exc)
        finally:
            self._task_done()

    def _put_one(self) -> None:
        data = bytearray(self.size)
        self._src.read_into(0, data)
        crc = crc32c_update(0, data)
        with self._cond:
            self._put_sent = True  # from now on a clean-up deletes the object
        self._call(lambda: self._req.client.put_object(
            Bucket=self._req.bucket, Key=self.key, Body=data, ChecksumCRC32C=crc32c_b64(crc)))
        with self._cond:
            self._put_crc = crc

    def _part(self, num: int, start: int, end: int) -> None:
        try:
            with self._cond:
                if self._stop or self._error is not None:
                    return
                upload_id = self._upload_id
            data = self._buffers.take(end - start)
            try:
                self._src.read_into(start, data)
                crc = crc32c_update(0, data)
                resp = self._call(lambda: self._req.client.upload_part(
                    Bucket=self._req.bucket, Key=self.key, UploadId=upload_id, PartNumber=num, Body=data,
                    ChecksumAlgorithm="CRC32C", ChecksumCRC32C=crc32c_b64(crc)))
            finally:
                self._buffers.give(data)
            with self._cond:
                self._done[num] = (resp["ETag"], crc)
        except BaseException as exc:  # noqa: BLE001 - kept for finish()
            self._fail(exc)
        finally:
            self._task_done()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None and not isinstance(exc, _Stopped):
                self._error = exc
            self._stop = True

    def _task_done(self) -> None:
        with self._cond:
            self._tasks -= 1
            self._cond.notify_all()
            failed = not self._tasks and self._error is not None
        if failed:  # nothing will complete it: abort it now, not when the registry lets it go
            self._clean_up()

    def _wait_tasks(self) -> None:
        with self._cond:
            while self._tasks:
                self._cond.wait()

    # -- S3 ---------------------------------------------------------------------------------
    def _object_crc(self) -> int:
        if not self._parts:
            return self._put_crc if self._put_crc is not None else -1
        crc = 0
        for num, start, end in self._parts:
            got = self._done.get(num)
            if got is None:
                return -1
            crc = crc32c_combine(crc, got[1], end - start)
        return crc

    def _complete(self, entry: FileEntry) -> None:
        parts = [{"ETag": self._done[n][0], "PartNumber": n, "ChecksumCRC32C": crc32c_b64(self._done[n][1])}
                 for n, _, _ in self._parts]
        self._call(lambda: self._req.client.complete_multipart_upload(
            Bucket=self._req.bucket, Key=self.key, UploadId=self._upload_id, MultipartUpload={"Parts": parts},
            ChecksumCRC32C=entry.crc32c, ChecksumType="FULL_OBJECT"))

    def _settle(self) -> bool:
        """Mark the upload finished (completed or cleaned up); False when it was already."""
        with self._cond:
            if self._settled:
                return False
            self._settled = True
        if self._on_settled is not None:
            self._on_settled(self)
        return True

    def _completed(self) -> None:
        self._settle()
        self._cleaned.set()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` with the store's retries, except for an upload that is gone (NoSuchUpload:
        aborted by someone else), which no retry brings back."""
        def once() -> Any:
            try:
                return fn()
            except Exception as exc:
                if _classify(exc) is _NO_UPLOAD:
                    raise UploadError(f"{self._req.url(self.key)}: the multipart upload was aborted meanwhile",
                                      key=self.key) from exc
                raise

        return self._req.retry(once, self.key, UploadError)

    def _clean_up(self) -> None:
        """Abort the multipart upload, or delete the object of a single PUT (once)."""
        with self._cond:
            upload_id, put = self._upload_id, self._put_sent
        if not self._settle():
            self._cleaned.wait()  # another thread is at it: its requests end before this returns
            return
        try:
            if upload_id is not None:
                try:
                    self._call(lambda: self._req.client.abort_multipart_upload(
                        Bucket=self._req.bucket, Key=self.key, UploadId=upload_id))
                except UploadError as exc:
                    if not isinstance(exc.__cause__, Exception) or _classify(exc.__cause__) is not _NO_UPLOAD:
                        raise
            elif put:
                self._call(lambda: self._req.client.delete_object(Bucket=self._req.bucket, Key=self.key))
        except Exception as exc:  # noqa: BLE001 - left for cleanup_incomplete_uploads / a later upload
            log.warning("spotckpt: could not remove the partial upload of %s: %s", self._req.url(self.key), exc)
        finally:
            self._cleaned.set()


class EarlyUploads:
    """The early uploads of one store, by (step, file); their pool."""

    def __init__(self, requests: Any) -> None:
        self._req = requests
        self._lock = threading.Lock()
        self._uploads: dict[tuple[int, str], EarlyUpload] = {}
        self._live: dict[int, EarlyUpload] = {}  # not settled yet, by id (taken ones included)
        cfg = requests.config
        self._buffers = _Buffers(int(cfg.multipart_chunksize), max(1, int(cfg.max_concurrency)))
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    def start(self, step: int, rel: str, key: str, man_key: str, chunks: Sequence[Any]) -> EarlyUpload | None:
        cfg = self._req.config
        with self._lock:
            if self._closed:
                return None
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max(1, int(cfg.max_concurrency)), thread_name_prefix="spotckpt-s3-early")
            old = self._uploads.pop((step, rel), None)
            up = EarlyUpload(self._req, self._pool, key, man_key, chunks, part_size=int(cfg.multipart_chunksize),
                             threshold=int(cfg.multipart_threshold), buffers=self._buffers,
                             on_settled=self._settled)
            self._uploads[(step, rel)] = up
            self._live[id(up)] = up
        if old is not None:
            old.abort()
        up.start()
        return up

    def _settled(self, up: EarlyUpload) -> None:
        with self._lock:
            self._live.pop(id(up), None)
            idle = not self._live
        if idle:
            self._buffers.drop()  # no memory kept between saves

    def live_keys(self) -> set[str]:
        """Keys with an upload in flight (cleanup_incomplete_uploads leaves them alone)."""
        with self._lock:
            return {up.key for up in self._live.values()}

    def take(self, step: int) -> dict[str, EarlyUpload]:
        """The early uploads of ``step``, by file, for the caller to finish (they leave the registry)."""
        with self._lock:
            mine = {rel: self._uploads.pop((s, rel)) for s, rel in list(self._uploads) if s == step}
        return mine

    def discard(self, step: int) -> None:
        for up in self.take(step).values():
            up.abort()

    def close(self) -> None:
        """Abort every unfinished early upload; stop the pool."""
        with self._lock:
            self._closed = True
            left, self._uploads = list(self._uploads.values()), {}
            pool, self._pool = self._pool, None
        for up in left:
            up.abort()
        if pool is not None:
            pool.shutdown(wait=True)
