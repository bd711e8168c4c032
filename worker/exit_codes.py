"""The exit statuses of the `graft` command, declared once: `graft run` exits with them, and the service's client
(`graft jobs wait`) exits as `graft run` would have for the same graft."""

OK = 0
INTERNAL_ERROR = 1  # a bug of ours (an unexpected exception, a lost worker), not the user's input
FAILED = 2  # nothing was made: `graft: error [code]: message` (bad input, storage, a request the server refused)
NOT_REQUIRED_VERDICT = 3  # graft inspect --require: the verdict is not the one required
INTERRUPTED = 130  # stopped before publishing (Ctrl-C, a cancelled job): nothing was published
