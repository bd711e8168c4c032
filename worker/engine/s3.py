"""One place that builds boto3 S3 clients, so every part talks to the same endpoint the same way."""

from __future__ import annotations

import os
from functools import lru_cache

import boto3
from botocore.config import Config

DEFAULT_TIMEOUT = 30.0


def s3_client(endpoint_url: str | None = None, timeout: float = DEFAULT_TIMEOUT):
    """One shared client per endpoint and timeout. `timeout` bounds both the connect and each wait for the
    next bytes of an answer: a stalled connection raises instead of hanging, and faults.StorageRetry
    decides what happens next."""
    return _client(endpoint_url or os.environ.get("GRAFT_S3_ENDPOINT_URL") or None, float(timeout))


@lru_cache(maxsize=8)
def _client(endpoint: str | None, timeout: float):
    # Several S3-compatible stores reject botocore's default CRC32 headers; we keep our own sha256.
    # botocore's own retries stay short (one quick retry): the longer, budgeted retrying is StorageRetry's,
    # which knows which operations may be repeated.
    config = Config(
        max_pool_connections=32,
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"max_attempts": 2, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
