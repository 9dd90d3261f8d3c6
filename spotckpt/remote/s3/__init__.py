"""S3 transfer layer: one step directory <-> ``<s3_uri>/step-XXXXXXXXXXXX/`` over s3transfer.

This is the only spotckpt package that imports boto3 / botocore / s3transfer: ``settings``
(URI, client, transfer settings), ``failures`` (the error table), ``requests`` (one bucket's
requests: retries, parallel transfers, errors that say what to do), ``early`` (upload while
writing: a file's parts from memory during its local write) and ``store`` (:class:`S3Store`,
the steps on top of them).

Layout and commit protocol: a step exists in S3 only when its ``manifest.json``
exists. :meth:`S3Store.upload_step` uploads every data file first, then the manifest, with
``If-None-Match: *`` so two writers can never silently replace a committed step;
:meth:`S3Store.delete_step` deletes the manifest first, then the data. Every object carries the
CRC32C computed at write time (``ChecksumCRC32C``; full-object checksum for multipart uploads),
and every download is verified again client-side (size and CRC32C), because S3-compatible test
servers do not always check.

Threads: an :class:`S3Store` may be used from several threads (the boto3 client and the
s3transfer ``TransferManager`` are thread-safe); the uploader thread uploads and deletes while
the restore path downloads. Transfers run on the ``TransferManager``'s own worker threads.
"""

from __future__ import annotations

from spotckpt.errors import LocalStepVanishedError
from spotckpt.remote.s3.failures import _classify, _is_retryable  # noqa: F401 - for tests and tools
from spotckpt.remote.s3.settings import (  # noqa: F401 - the tunables, importable as spotckpt.remote.s3.X
    CONCURRENCY_CEILING,
    MAX_CONCURRENCY,
    MIN_CONCURRENCY,
    MULTIPART_THRESHOLD_BYTES,
    PART_SIZE_BYTES,
    REQUESTS_PER_CPU,
    default_concurrency,
    default_transfer_config,
    make_client,
    parse_s3_uri,
    usable_cpus,
)
from spotckpt.remote.s3.store import S3Store

__all__ = [
    "parse_s3_uri",
    "make_client",
    "default_transfer_config",
    "S3Store",
    "LocalStepVanishedError",
    "PART_SIZE_BYTES",
    "MAX_CONCURRENCY",
    "usable_cpus",
    "default_concurrency",
]
