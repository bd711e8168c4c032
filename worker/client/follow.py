"""Waiting for a job: its record polled until a terminal status (the API has no event stream: the events route
returns the list so far), its progress drawn on stderr, and its end as the exit status `graft run` would have
had for the same graft."""

from __future__ import annotations

import time
from typing import IO, Any

from worker import exit_codes
from worker.service.statuses import TERMINAL, JobStatus

from .api import ApiError, Client

# How long a wait rides out an unreachable server or job store (503 with Retry-After) before it gives up.
GRACE_SECONDS = 120.0
# Failures that are not the request's: what graft run reports as a bug of its own (exit 1).
NOT_THE_INPUT = ("internal_error", "worker_lost")


def exit_status(job: dict) -> int:
    """graft run's exit status for the graft this job ran: 0 published, 130 cancelled (nothing published), 2 a
    failure with its code (1 when the code says the fault was the service's, not the request's)."""
    status = job.get("status")
    if status == JobStatus.SUCCEEDED:
        return exit_codes.OK
    if status == JobStatus.CANCELLED:
        return exit_codes.INTERRUPTED
    code = (job.get("error") or {}).get("code")
    return exit_codes.INTERNAL_ERROR if code in NOT_THE_INPUT else exit_codes.FAILED


class Bar:
    """A job's progress as one tqdm bar: the current phase's fraction (from the record), the job and its phase
    before it, the tensors after. Drawn again only when the record moved (a log gets a line per change, not per
    poll); tqdm is imported on the first record drawn."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._bar: Any = None
        self._shown: tuple | None = None

    def show(self, job: dict) -> None:
        progress = job.get("progress") or {}
        status = job.get("status")
        phase = progress.get("phase") if status not in ("queued", *TERMINAL) else None
        desc = f"{job.get('id', 'job')} {phase or status}"
        eta = progress.get("eta_seconds")
        parts = [f"{progress['tensors_done']}/{progress['tensors_total']} tensors"] if progress else []
        postfix = ", ".join(parts + ([f"eta {eta:.0f}s"] if eta else []))
        percent = round(100 * float(progress.get("fraction") or 0), 1)
        if (desc, postfix, percent) == self._shown:
            return
        self._shown = (desc, postfix, percent)
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=100, file=self.stream, dynamic_ncols=True, mininterval=0, desc=desc,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}")
        self._bar.set_description_str(desc, refresh=False)
        self._bar.set_postfix_str(postfix, refresh=False)  # tqdm puts ", " before it
        self._bar.n = percent
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def wait_for(client: Client, path: str, *, interval: float = 1.0, bar: Bar | None = None,
             grace: float = GRACE_SECONDS) -> dict:
    """Poll the record at `path` until its status is terminal and return it. A server or job store that is away
    (no answer, 429, 5xx) is asked again after its Retry-After, for up to `grace` seconds in a row; any other
    refusal (401, 404) is raised at once."""
    away_since: float | None = None
    while True:
        try:
            job = client.get(path)
        except ApiError as err:
            now = time.monotonic()
            away_since = away_since if away_since is not None else now
            if not err.transient or now - away_since > grace:
                raise
            time.sleep(min(err.retry_after or interval, grace))
            continue
        away_since = None
        if bar is not None:
            bar.show(job)
        if job.get("status") in TERMINAL:
            return job
        time.sleep(interval)
