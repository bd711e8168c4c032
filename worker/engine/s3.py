"""One place that builds boto3 S3 clients, so every part talks to the same endpoint the same way."""

from __future__ import annotations

import os
from functools import lru_cache

import boto3
from botocore.config import Config


@lru_cache(maxsize=8)
def s3_client(endpoint_url: str | None = None):
    endpoint = endpoint_url or os.environ.get("GRAFT_S3_ENDPOINT_URL") or None
    # Several S3-compatible stores reject botocore's default CRC32 headers; we keep our own sha256.
    config = Config(
        max_pool_connections=32,
        retries={"max_attempts": 5, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
