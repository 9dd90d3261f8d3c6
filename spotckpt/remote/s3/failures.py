"""What an S3 failure means: one table from exception type, S3 error code and HTTP status to
whether to retry and what to tell the user."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import botocore.exceptions as bce
from s3transfer.exceptions import RetriesExceededError as S3TransferRetriesExceededError



log = logging.getLogger(__name__)

def _error_code(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, bce.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
        return str(err.get("Code", "")), int(status)
    return "", 0


# ------------------------------------------------------------------ S3 failures, as a table
#
# Every failure the S3 layer can meet is looked up here once, and the entry says both whether
# it is worth retrying and what the user should do about it (like httpx's mapping of transport
# exceptions to its own). Lookup order: exception type (first match wins, so specific before
# general), then the S3 error code of a ClientError, then its HTTP status; anything else is an
# unexplained, non-retryable failure. Advice is formatted with ``where`` (the s3:// URL),
# ``endpoint``, ``bucket``, ``code`` and ``exc``.


@dataclass(frozen=True)
class _Failure:
    advice: str
    retryable: bool = False


_NO_CREDENTIALS = _Failure(
    "no usable AWS credentials for {where} ({exc}); set AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance/execution role"
)
_UNREACHABLE = _Failure(
    "cannot reach the S3 endpoint {endpoint} for {where} ({exc}); check AWS_ENDPOINT_URL, "
    "AWS_REGION and the network (VPC endpoint / NAT)",
    retryable=True,
)
_CONNECTION_LOST = _Failure(
    "the connection to the S3 endpoint {endpoint} broke during a request for {where} ({exc}); "
    "check the network and the endpoint's health",
    retryable=True,
)
_SERVER_TROUBLE = _Failure(
    "S3 kept failing for {where}: {code} ({exc}); the service is throttling or unwell -- spread "
    "the load over more prefixes, or try again later",
    retryable=True,
)
_NO_BUCKET = _Failure("bucket {bucket!r} does not exist at {endpoint}; create it or fix the S3 URI")
_NOT_FOUND = _Failure("{where} does not exist ({code})")
_ACCESS_DENIED = _Failure(
    "access denied to {where} ({code}); grant s3:ListBucket, s3:GetObject, s3:PutObject, "
    "s3:DeleteObject and s3:AbortMultipartUpload on the bucket/prefix, or check the credentials"
)
_EXPIRED = _Failure("the AWS credentials for {where} have expired ({code}); refresh the session token or role")
_CLOCK_SKEW = _Failure(
    "S3 refused {where} because this machine's clock is off ({code}); sync the clock (NTP / chrony)",
    retryable=True,
)
_CHECKSUM_MISMATCH = _Failure(
    "S3 refused {where}: the bytes it received do not match their CRC32C ({code}); the local file "
    "changed or was damaged during the upload (or something on the way altered it). Nothing of "
    "this step was committed -- check the local disk and save again"
)
_CONFLICT = _Failure(
    "{where}: a conditional write lost ({code}): another writer got there first; use a separate "
    "S3 prefix per job/run"
)
_UNSUPPORTED = _Failure(
    "the S3 endpoint {endpoint} does not support a request spotckpt needs for {where} ({code}: "
    "{exc}); spotckpt needs conditional writes (If-None-Match) and CRC32C checksums"
)
_NO_UPLOAD = _Failure(
    "the multipart upload of {where} was aborted meanwhile ({code}), e.g. by "
    "cleanup_incomplete_uploads on another host; it is retried",
    retryable=True,
)

_EXCEPTION_TABLE: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], _Failure], ...] = (
    ((bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError), _NO_CREDENTIALS),
    ((bce.EndpointConnectionError, bce.ConnectTimeoutError), _UNREACHABLE),
    ((bce.ConnectionClosedError, bce.ReadTimeoutError, bce.IncompleteReadError, bce.HTTPClientError,
      bce.ConnectionError), _CONNECTION_LOST),
    (S3TransferRetriesExceededError, _CONNECTION_LOST),  # s3transfer gave up re-reading a download stream
    ((ConnectionError, TimeoutError), _CONNECTION_LOST),  # builtin: ConnectionResetError & co.
)

_CODE_TABLE: dict[str, _Failure] = {
    "NoSuchBucket": _NO_BUCKET,
    "NoSuchKey": _NOT_FOUND,
    "NoSuchUpload": _NO_UPLOAD,
    **dict.fromkeys(
        ("AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
         "AccountProblem"), _ACCESS_DENIED),
    **dict.fromkeys(("ExpiredToken", "TokenRefreshRequired", "InvalidToken"), _EXPIRED),
    **dict.fromkeys(("RequestTimeTooSkewed",), _CLOCK_SKEW),
    **dict.fromkeys(("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "XAmzContentChecksumMismatch"),
                    _CHECKSUM_MISMATCH),
    **dict.fromkeys(("PreconditionFailed", "ConditionalRequestConflict"), _CONFLICT),
    **dict.fromkeys(("NotImplemented", "InvalidArgument"), _UNSUPPORTED),
    **dict.fromkeys(
        ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
         "ThrottlingException", "RequestLimitExceeded", "BadGateway", "GatewayTimeout", "OperationAborted"),
        _SERVER_TROUBLE),
}

_UNEXPLAINED = _Failure("S3 request for {where} failed: {code} ({exc})")


def _classify(exc: BaseException, *, has_key: bool = True) -> _Failure | None:
    """The table entry for ``exc``; None for exceptions that are not S3's (a local OSError, a
    bug) -- those are neither retried nor rephrased."""
    if isinstance(exc, bce.ClientError):
        code, status = _error_code(exc)
        found = _CODE_TABLE.get(code)
        if found is not None:
            return found
        if status == 404:  # HEAD answers carry no error code, only the status
            return _NOT_FOUND if has_key else _NO_BUCKET
        if status == 403:
            return _ACCESS_DENIED
        if status == 412:
            return _CONFLICT
        if status >= 500:
            return _SERVER_TROUBLE
        return _UNEXPLAINED
    for types, failure in _EXCEPTION_TABLE:
        if isinstance(exc, types):
            return failure
    if isinstance(exc, bce.BotoCoreError):
        return _UNEXPLAINED
    return None


def _is_retryable(exc: BaseException) -> bool:
    """5xx, throttling and connection-level failures; never 4xx or local-file problems."""
    failure = _classify(exc)
    return failure is not None and failure.retryable


