"""The S3 side of a simulated job: where checkpoints go, and the environment CMD gets for it.

Three cases, in this order:

- ``s3_uri`` given (``--s3``): ``<s3_uri>/<job>``; the endpoint and credentials come from the
  AWS configuration (``$AWS_ENDPOINT_URL``, profiles, ...), nothing is created.
- ``$AWS_ENDPOINT_URL`` set: a bucket ``spotckpt-simulate`` is created there if needed.
- otherwise moto's server is started on 127.0.0.1 (a free port; :class:`spotckpt.tools.s3server.S3Server`,
  the one local S3 starter of tests, benchmarks and simulate), with a bucket and credentials
  that CMD gets in its environment; :meth:`SimS3.close` stops it, data and all.

Used from the simulator's thread only (the server runs in a child process that dies with it).
"""

from __future__ import annotations

import os
from typing import Any

from spotckpt.errors import ConfigError, SpotCkptError, StorageError

__all__ = ["SimS3", "BUCKET"]

BUCKET = "spotckpt-simulate"


class SimS3:
    def __init__(self, s3_uri: str | None, *, job: str) -> None:
        if s3_uri is not None:
            from spotckpt.remote.s3 import parse_s3_uri  # boto3: loaded when needed, not at ``spotckpt`` start-up

            parse_s3_uri(s3_uri)  # ConfigError with what to fix, before anything starts
        self.uri_arg = s3_uri
        self.job = job
        self.s3_uri = ""
        self.endpoint: str | None = None
        self.env: dict[str, str] = {}  # the environment CMD starts from
        self._server: Any = None

    def start(self) -> None:
        env = dict(os.environ)
        if self.uri_arg:
            self.s3_uri = self.uri_arg.rstrip("/") + "/" + self.job
            self.endpoint = env.get("AWS_ENDPOINT_URL")
        elif env.get("AWS_ENDPOINT_URL"):
            self.endpoint = env["AWS_ENDPOINT_URL"]
            self._create_bucket(BUCKET)
            self.s3_uri = f"s3://{BUCKET}/{self.job}"
        else:
            from spotckpt.tools.s3server import S3Server, S3ServerError

            try:
                self._server = S3Server.start("moto", buckets=[BUCKET])
            except S3ServerError as exc:
                raise ConfigError(
                    f"the embedded S3 did not start ({exc}); install moto's server (pip install 'moto[server]'), "
                    "or point AWS_ENDPOINT_URL at an S3 endpoint, or pass --s3 s3://bucket/prefix") from exc
            self.endpoint = self._server.endpoint_url
            env = self._server.apply_env(env)
            self.s3_uri = f"s3://{BUCKET}/{self.job}"
        self.env = env

    @property
    def embedded(self) -> bool:
        """Whether the S3 server is simulate's own (stopped, data and all, by close)."""
        return self._server is not None

    def _client(self) -> Any:
        if self._server is not None:
            return self._server.client()
        import boto3

        return boto3.client("s3", **({"endpoint_url": self.endpoint} if self.endpoint else {}))

    def _create_bucket(self, name: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client().create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise SpotCkptError(f"cannot create bucket {name!r} at {self.endpoint}: {exc}") from exc
        except BotoCoreError as exc:
            raise SpotCkptError(f"cannot reach S3 at {self.endpoint} to create bucket {name!r}: {exc}") from exc

    def committed_steps(self) -> list[int] | None:
        """The job's committed steps in S3 (ascending), or None when they cannot be listed."""
        from spotckpt.remote.s3 import S3Store

        try:
            with S3Store(self.s3_uri, client=self._client()) as store:
                return store.list_steps()
        except (StorageError, ConfigError):
            return None

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()
