"""Internal: remote storage -- no stable API.

    s3        the S3 transfer layer (boto3/s3transfer: multipart, CRC32C, retries, conditional writes)
    memory    an in-memory RemoteStore: the protocol's reference, and a store for tests
    uploader  keeps an S3 prefix in step with the committed local steps (watchdog + scans)
    sidecar   ``spotckpt run`` / ``sync``: uploads beside a trainer, signal forwarding

Implements :class:`spotckpt.core.protocols.RemoteStore`; imports the core, never the manager.
"""
