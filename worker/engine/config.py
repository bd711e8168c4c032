"""The engine's own settings: how it streams, reads and writes. Every knob comes from the environment with
the GRAFT_ prefix. The engine reads nothing else; the service's Settings (worker/service/settings.py) extends this
class, so a service Settings object is an engine one, and the CLI passes either."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRAFT_", extra="ignore")

    block_bytes: int = Field(16 << 20, description="output bytes per streamed work block")
    prefetch_blocks: int = Field(3, description="blocks read ahead of the compute")
    io_threads: int = Field(4, description="threads issuing ranged reads")
    max_header_bytes: int = Field(100 << 20, description="cap on a safetensors JSON header")
    remote_window_bytes: int = Field(16 << 20, description="remote inputs are fetched in aligned windows this "
                                     "large, one ranged GET per window (or per run of adjacent windows)")
    remote_windows: int = Field(0, description="windows held per remote input, read-ahead included; 0 or fewer "
                                "than GRAFT_REMOTE_LANES + 1: lanes + 1 (memory: windows x window bytes per input)")
    remote_span_windows: int = Field(1, description="adjacent windows one ranged GET may cover when there are "
                                     "more windows to fetch than idle lanes (for servers that pay for the whole "
                                     "object on each ranged GET; a span delays the windows at its end)")
    remote_lanes: int = Field(8, description="ranged GETs in flight at once per remote input (S3 and hf://), each "
                              "on a pooled connection; storage serves each connection at a capped rate")
    remote_stall_seconds: float = Field(10.0, description="a ranged GET that receives no bytes for this long is "
                                        "re-issued from where it stopped (0: only GRAFT_STORAGE_TIMEOUT_SECONDS)")
    s3_endpoint_url: str | None = None
    s3_part_bytes: int = Field(8 << 20, description="multipart upload part size (raised to stay under 10,000 "
                               "parts); small parts start sooner and leave a shorter tail when the stream ends")
    s3_parts_in_flight: int = Field(16, description="multipart upload parts sent at once (memory: (parts + 1) x "
                                    "part bytes, 136 MiB by default); twice an input's lanes: the upload keeps the "
                                    "pace of the reads with room to spare, and the last parts go side by side")
    trace: str = Field("", description="a file to write the job's storage timeline to (JSON): every ranged GET, "
                       "wait of the stream on a window, upload part and completion, with start/end seconds, bytes "
                       "and lane; empty: nothing is recorded")
    storage_retry_seconds: float = Field(30.0, description="seconds one S3/hub operation keeps retrying storage "
                                         "faults (refused, reset, timed out, 5xx, throttled) before the attempt "
                                         "fails with storage_error; 0: no retry")
    storage_timeout_seconds: float = Field(30.0, description="seconds one storage request may wait to connect or "
                                           "for the next bytes of an answer (a stalled connection is a fault)")
    hash_inputs: bool = Field(True, description="sha256 of local input files for the manifest")
    cache_dir: str = Field(os.path.join(os.path.expanduser("~"), ".cache", "graft"),
                           description="remembered input digests and kept artifact shards; empty to disable")
    artifact_cache_bytes: int = Field(4 << 30, ge=0, description="disk the verified local copies of remote diff "
                                      "artifacts' shards may take under cache_dir (least recently used evicted): "
                                      "an S3 artifact is read over the link once per version, its check's bytes "
                                      "are what the stream applies; 0: none kept, shards read from S3 each time")
    # Running the models (the function-level probe, the evaluation of a graft, an alpha sweep's scoring).
    eval_memory_bytes: int = Field(8 << 30, description="memory the models loaded at once for a function-level "
                                   "probe or an evaluation may take (float32 parameters); past it the probe or "
                                   "evaluation is refused with model_too_large (lowered to 80% of available memory)")
    eval_seconds: float = Field(600.0, description="wall-clock budget of one function-level probe or evaluation; "
                                "past it the work stops with eval_timeout")
    probe_max_tokens: int = Field(2048, description="tokens of a probe text used at most (the rest is ignored)")
    scratch_dir: str = Field("", description="where an alpha sweep builds its candidates (two at most at a time, "
                             "each the size of the output); empty: the system's temporary directory")
    eval_isolation: Literal["process", "inline"] = Field(
        "process", description="process: an evaluation's and a function-level probe's forward passes run in a "
        "child process under an address-space limit (GRAFT_EVAL_MEMORY_BYTES and a slack, on CPU), killed at a "
        "cancel, so that no model can take the worker down; inline: in the job's own process")
    eval_max_new_tokens: int = Field(64, description="cap on the greedy sample's length per prompt")
