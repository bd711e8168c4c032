"""The service's client: `graft jobs ...`, `graft diffs ...` and `graft loras ...` against a running API
(`--server`, the key from GRAFT_API_KEY). HTTP only, no torch and no engine: it starts in a fraction of a second
and runs anywhere httpx does. api.py speaks HTTP (problem+json answers become ApiError), follow.py waits for a
job with a progress bar and maps its end to graft run's exit statuses, commands.py is the command line."""
