"""Where bytes live: URIs and the table of their schemes (schemes/: one module each, file, s3, hf), the stores
that read inputs and the sinks that write outputs (stores.py, sinks.py: what every scheme shares; one module
per backend: local_files, s3_store, s3_sink, hub_store), ranged-read lanes, the safetensors format and
resolved models (headers only). The lowest layer of the engine: it imports nothing of the engine but errors
and config."""
