"""How the S3 backend talks to S3: the client's settings, the managed transfer's, the model cache.

Kept apart from :mod:`ingest.storage.s3` because these are tuning and wiring, not storage rules;
boto3 and botocore are imported only when a client is made.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def make_client(endpoint_url: str | None, max_pool_connections: int) -> S3Client:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=5,
        read_timeout=60,
        # A threaded worker shares this client: one connection per thread and spare.
        max_pool_connections=max_pool_connections,
        signature_version="s3v4",
        s3={
            # Custom endpoints (MinIO, moto) usually have no per-bucket DNS names.
            "addressing_style": "path" if endpoint_url else "auto",
            # Every object body S3Storage.put() sends carries a SHA256 header that the store
            # verifies and that is itself signed. Signing the payload as well would hash every
            # byte once more: botocore signs the payload of any request whose checksum is not
            # sent in a trailer (always over http, and over https for a checksum we supply).
            "payload_signing_enabled": False,
        },
        # S3Storage.put() supplies the checksums (its own, or SHA256 per part); without this
        # the SDK would add a CRC32 of every request body it was not given one for.
        request_checksum_calculation="when_required",
        # Every request is built here from checked values (validate_key, sizes, hex
        # sha256); botocore's client-side model walk was a large share of the worker's
        # CPU per stored object. The service still rejects a malformed request.
        parameter_validation=False,
    )
    session = boto3.session.Session(botocore_session=_botocore_session())
    return session.client("s3", endpoint_url=endpoint_url, config=config)


def transfer_config(threshold: int, chunksize: int) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=threshold,
        multipart_chunksize=chunksize,
        # Parts go one after another, in the calling thread. A worker already runs many
        # downloads at once, each in its own thread: a pool per upload (ten threads by default)
        # would multiply threads and connections (past max_pool_connections) and keep parts
        # in flight at once, without adding throughput to a worker that is already busy.
        use_threads=False,
        # The classic transfer sends its requests through the storage's client, so the
        # IfNoneMatch hook and the client's checksum settings apply; the CRT transfer, which
        # boto3 may pick when awscrt is installed, sends requests of its own.
        preferred_transfer_client="classic",
    )


_loader_lock = threading.Lock()
_loader: Any = None


def _botocore_session() -> Any:
    """A fresh botocore session (own credentials) sharing one parsed copy of the API models.

    Parsing the S3 model is slow, and services, tests and benchmarks build many clients.
    """
    global _loader
    import botocore.session
    from botocore.loaders import create_loader

    with _loader_lock:
        if _loader is None:
            _loader = create_loader()
        session = botocore.session.get_session()
        session.register_component("data_loader", _loader)
    return session
