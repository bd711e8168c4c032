"""One place that builds boto3 S3 clients, so every part talks to the same endpoint the same way."""

from __future__ import annotations

import os
from functools import lru_cache

import boto3
from botocore.config import Config

DEFAULT_TIMEOUT = 30.0
# Pooled connections per client: the lanes of three inputs and the parts in flight at their defaults, with
# room to spare. Only idle connections are kept, so a larger pool costs nothing until it is used.
DEFAULT_CONNECTIONS = 64


def s3_client(endpoint_url: str | None = None, timeout: float = DEFAULT_TIMEOUT, *,
              read_timeout: float | None = None, connections: int = DEFAULT_CONNECTIONS):
    """One shared client per endpoint and settings, whose pool of open connections every request with those
    settings draws on. `timeout` bounds the connect and, unless `read_timeout` says otherwise, each wait for
    the next bytes of an answer: a stalled connection raises instead of hanging, and faults.StorageRetry
    decides what happens next. `connections`: how many are kept open for reuse (a request beyond them opens
    one that is closed afterwards, paying the connect again); never fewer than DEFAULT_CONNECTIONS."""
    return _client(endpoint_url or os.environ.get("GRAFT_S3_ENDPOINT_URL") or None, float(timeout),
                   float(read_timeout or timeout), max(DEFAULT_CONNECTIONS, int(connections)))


@lru_cache(maxsize=16)
def _client(endpoint: str | None, timeout: float, read_timeout: float, connections: int):
    # Several S3-compatible stores reject botocore's default CRC32 headers; we keep our own sha256.
    # botocore's own retries stay short (one quick retry): the longer, budgeted retrying is StorageRetry's,
    # which knows which operations may be repeated.
    config = Config(
        max_pool_connections=connections,
        connect_timeout=timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": 2, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
    )
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
    for operation in ("PutObject", "UploadPart"):
        client.meta.events.register(f"request-created.s3.{operation}", _no_expect_continue)
    return client


def _no_expect_continue(request, **kwargs) -> None:
    """botocore asks before sending an upload's body (Expect: 100-continue) and, unanswered, waits a second
    before sending it anyway: on every try of every part against a stalled connection, before its timeout
    even starts. Sent at once, a refused upload costs at most one part's bytes."""
    if "Expect" in request.headers:
        del request.headers["Expect"]
