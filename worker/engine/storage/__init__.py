"""Where bytes live: URIs, the stores that read inputs (local, S3, the Hugging Face Hub), the sinks that write
outputs, ranged-read lanes, the safetensors format and resolved models (headers only). The lowest layer of
the engine: it imports nothing of the engine but errors and config."""
