"""The one settings object: every knob comes from the environment with the GRAFT_ prefix."""

from __future__ import annotations

import os
from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRAFT_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    api_keys: str = ""
    allowed_roots: str = ""
    output_uri: str = ""
    s3_endpoint_url: str | None = None
    allowed_buckets: str = ""
    webhook_secret: str = ""
    hf_enabled: bool = True
    dev_mode: bool = False
    queue_name: str = "graft"
    max_attempts: int = 3

    # Engine tuning: sizes are bytes.
    block_bytes: int = Field(16 << 20, description="output bytes per streamed work block")
    prefetch_blocks: int = Field(3, description="blocks read ahead of the compute")
    io_threads: int = Field(4, description="threads issuing ranged reads")
    max_header_bytes: int = Field(100 << 20, description="cap on a safetensors JSON header")
    s3_part_bytes: int = Field(64 << 20, description="multipart upload part size")
    hash_inputs: bool = Field(True, description="sha256 of local input files for the manifest")
    cache_dir: str = Field(os.path.join(os.path.expanduser("~"), ".cache", "graft"),
                           description="remembered input digests; empty to disable")

    @property
    def api_key_list(self) -> list[str]:
        return _split(self.api_keys)

    @property
    def allowed_root_list(self) -> list[str]:
        return _split(self.allowed_roots)

    @property
    def allowed_bucket_list(self) -> list[str]:
        return _split(self.allowed_buckets)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
