"""Where S3 is and how spotckpt talks to it: the URI, the boto3 client, the transfer settings
(part size and concurrency, sized from the machine), and the part-CRC32C hook."""

from __future__ import annotations

import logging
import os
import random
import re
import string
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions as bce
from boto3.s3.transfer import TransferConfig as Boto3TransferConfig
from botocore.config import Config
from s3transfer.manager import TransferConfig, TransferManager
from s3transfer.utils import OSUtils

from spotckpt.errors import (
    ConfigError,
)
from spotckpt.format import (
    crc32c_b64,
    crc32c_update,
)

log = logging.getLogger(__name__)


MiB = 1024 * 1024

# Transfer settings, chosen for real S3 and checked by measurement (benchmarks/bench_s3.py,
# against SeaweedFS, a server that verifies checksums; README "S3 transfers" has the figures).
#
# Part size: 16 MiB parts / ranges. AWS's guidance for byte-range GETs is 8-16 MB; a 1 GiB file
# is 64 parts (enough to keep every connection busy to the end), a 100 GiB file 6,400 (under
# S3's 10,000-part limit; s3transfer enlarges parts beyond that), and a retried part resends at
# most 16 MiB. boto3's 8 MiB default doubles the requests (signing, a part checksum, a round
# trip and S3's per-prefix request-rate budget each) for no extra parallelism.
#
# Concurrency: REQUESTS_PER_CPU (8) requests in flight per usable CPU (affinity mask, cgroup
# quota), at least MIN_CONCURRENCY (16), at most CONCURRENCY_CEILING (64);
# $SPOTCKPT_S3_CONCURRENCY overrides it. Why:
# - Concurrency hides latency: one S3 connection moves roughly 50-100 MB/s, so filling a NIC
#   takes about one request in flight per 85 MB/s of bandwidth. Even a 2-vCPU instance bursts
#   to ~10 Gb/s, hence the floor of 16 (16 x ~80 MB/s ~ 10 Gb/s).
# - Each request costs client CPU: ~1.5 CPU-s per GiB through botocore (HTTP, signing, part
#   CRC32C; measured), so one core feeds about 5-8 connections at S3's per-connection speed;
#   beyond 8 per CPU, requests would queue for the CPU rather than for the network.
# - Ceiling 64: one Python process is GIL-bound at a few GB/s whatever the core count (the
#   per-chunk Python work of every connection takes the GIL); 64 x ~80 MB/s ~ 5 GB/s (40 Gb/s)
#   is past that, and more threads only add contention and memory: the worst case is about
#   concurrency x part size in flight (1 GiB at 64), usually far less (upload parts are read
#   from the file as they are sent; downloads buffer at most ``max_io_queue`` 256 KiB chunks).
# This 2-core VM: 2 x 8 = 16 -> 16 requests x 16 MiB. With the server on the same two cores,
# 4/8/16 were within the run-to-run noise (benchmarks/out/s3.json); 16 is the real-S3 choice.
# A 100 Gb/s instance (e.g. 64+ vCPUs): 8 x 64 = 512 -> ceiling 64, ~5 GB/s at best from one
# process, i.e. ~40% of the NIC. Filling it takes several processes (each rank of a job
# uploads its own files with its own S3Store, so 8 ranks bring 8 x 64 connections) or the CRT
# transfer client, which spotckpt does not use because it ignores custom endpoints.
PART_SIZE_BYTES = 16 * MiB
#: Requests in flight per usable CPU, and the floor and ceiling of the total (see "Concurrency"
#: in the comment above).
REQUESTS_PER_CPU = 8
MIN_CONCURRENCY = 16
CONCURRENCY_CEILING = 64


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, further limited by a cgroup v2 CPU quota
    (``cpu.max``, as containers get), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_concurrency(cpus: int | None = None) -> int:
    """Concurrent requests per transfer: ``$SPOTCKPT_S3_CONCURRENCY`` if set, else
    ``REQUESTS_PER_CPU`` per usable CPU, between ``MIN_CONCURRENCY`` and ``CONCURRENCY_CEILING``."""
    env = os.environ.get("SPOTCKPT_S3_CONCURRENCY")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if not 1 <= n <= 1024:
            raise ConfigError(f"SPOTCKPT_S3_CONCURRENCY={env!r}: expected an integer from 1 to 1024")
        return n
    cpus = usable_cpus() if cpus is None else cpus
    return min(CONCURRENCY_CEILING, max(MIN_CONCURRENCY, REQUESTS_PER_CPU * cpus))


#: This machine's choice from its CPUs, computed once at import (``default_transfer_config()``
#: also honours ``$SPOTCKPT_S3_CONCURRENCY``).
MAX_CONCURRENCY = min(CONCURRENCY_CEILING, max(MIN_CONCURRENCY, REQUESTS_PER_CPU * usable_cpus()))
#: Objects up to this size go up in one PUT (one request, no multipart bookkeeping).
MULTIPART_THRESHOLD_BYTES = 16 * MiB

_URI_RE = re.compile(r"^s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?$")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``; ConfigError otherwise."""
    if not isinstance(uri, str):
        raise ConfigError(f"S3 URI must be a string like 's3://bucket/prefix', got {uri!r}")
    m = _URI_RE.match(uri.strip())
    if not m:
        raise ConfigError(
            f"malformed S3 URI {uri!r}: expected 's3://bucket/prefix' (lower-case bucket name, "
            "3-63 characters); fix it where it was given (a command's argument, --s3, s3_uri= or SPOTCKPT_S3_URI)"
        )
    bucket, prefix = m.group(1), (m.group(2) or "").strip("/")
    if "//" in prefix or any(p in (".", "..") for p in prefix.split("/") if prefix):
        raise ConfigError(f"malformed S3 URI {uri!r}: the prefix must not contain '//', '.' or '..'")
    return bucket, prefix


def make_client(*, max_pool_connections: int | None = None, max_attempts: int = 8) -> Any:
    """A boto3 S3 client from the standard chain (credentials, region, ``AWS_ENDPOINT_URL``,
    profiles), with botocore's ``standard`` retry mode and a pool that covers the concurrency.

    Payloads are not SHA256-signed (``s3={"payload_signing_enabled": False}``): every object
    and part spotckpt sends carries its CRC32C in a signed header, which S3 checks before it
    stores anything, and the manifest is checked again on download. botocore itself skips the
    SHA256 over HTTPS when a checksum is present; over ``http://`` (a local S3-compatible
    server) it would hash every byte, ~0.6 client CPU-s per GiB on the 2-core VM
    (benchmarks/README.md, "Payload signing"). The CRT transfer path is deliberately not
    used: it ignores custom endpoints.
    """
    session = boto3.session.Session()  # sessions are not thread-safe: one per client
    cfg = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        max_pool_connections=max(max_pool_connections or 0, default_concurrency() + 8),
        connect_timeout=10,
        read_timeout=60,
        tcp_keepalive=True,
        s3={"payload_signing_enabled": False},
    )
    try:
        return session.client("s3", config=cfg)
    except bce.BotoCoreError as exc:
        raise ConfigError(f"cannot create an S3 client ({exc}); check AWS_REGION / AWS_PROFILE") from exc


def private_retry_jitter(client: Any, rng: random.Random) -> bool:
    """Make botocore's retry backoff of ``client`` draw its jitter from ``rng`` instead of the
    process-global ``random`` module, which the training loop owns (a retried request would
    otherwise shift every number the loop draws afterwards). botocore has no public knob for
    it: the ``standard`` mode's handler is found through the client's event system by its
    documented unique id and its backoff's generator replaced. Returns whether it was found
    (a test checks it, so a botocore that changes this is noticed)."""
    try:
        name = client.meta.service_model.service_id.hyphenize()
        emitter = getattr(client.meta.events, "_emitter", client.meta.events)
        entry = emitter._unique_id_handlers.get(f"retry-config-{name}")
        backoff = entry["handler"].__self__._retry_policy._retry_backoff
    except (AttributeError, KeyError, TypeError):
        log.warning("spotckpt: could not give botocore's retry backoff its own random generator; S3 retries "
                    "may draw from the global random module")
        return False
    backoff._random = rng.random
    return True


class PrivateRandomOSUtils(OSUtils):
    """s3transfer's OS helper, naming the temporary file of a download from a private
    generator instead of the process-global ``random`` module."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self._rng = rng

    def get_temp_filename(self, filename: str) -> str:
        suffix = os.extsep + "".join(self._rng.choice(string.hexdigits) for _ in range(8))
        path, name = os.path.split(filename)
        return os.path.join(path, name[: self._MAX_FILENAME_LEN - len(suffix)] + suffix)


def default_transfer_config() -> TransferConfig:
    """The measured settings above (see the comment on :data:`PART_SIZE_BYTES`)."""
    return Boto3TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD_BYTES,
        multipart_chunksize=PART_SIZE_BYTES,
        max_concurrency=default_concurrency(),
        max_io_queue=1000,
        use_threads=True,
        preferred_transfer_client="classic",  # the CRT client ignores custom endpoints
    )


def _full_object_checksums_supported() -> bool:
    return "ChecksumType" in TransferManager.ALLOWED_UPLOAD_ARGS



def _add_part_crc32c(params: dict[str, Any], **_: Any) -> None:
    """``before-parameter-build.s3.UploadPart``: send each part's CRC32C computed with the
    ``crc32c`` package, so botocore needs no awscrt for CRC32C (it skips its own computation
    when the checksum header is already present). Runs on a TransferManager worker thread."""
    if params.get("ChecksumAlgorithm", "").upper() != "CRC32C" or "ChecksumCRC32C" in params:
        return
    body = params.get("Body")
    if body is None or not hasattr(body, "read") or not hasattr(body, "seek"):
        return
    start = body.tell()
    crc = 0
    while True:  # ReadFileChunk reports progress on read and takes it back on seek: net zero
        chunk = body.read(8 * MiB)
        if not chunk:
            break
        crc = crc32c_update(crc, chunk)
    body.seek(start)
    params["ChecksumCRC32C"] = crc32c_b64(crc)


