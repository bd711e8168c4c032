"""Publishing what a job writes: claim the output's location, stage every file, commit the manifest last; on
any failure nothing becomes visible. One context manager for every kind of job that writes (a graft, a
preflight's report; next, a diff artifact or an adapter), so that none of them repeats the claim, the fence
check and the cleanup."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from worker.engine.config import EngineSettings
from worker.engine.errors import GraftCancelled, GraftSuperseded
from worker.engine.storage.faults import StorageRetry
from worker.engine.storage.sinks import Sink, open_sink
from worker.engine.storage.uris import Location

if TYPE_CHECKING:
    from worker.engine.planning.request import GraftRequest

log = logging.getLogger("graft.engine")


def storage_retry(settings: EngineSettings) -> StorageRetry:
    return StorageRetry(budget=settings.storage_retry_seconds, timeout=settings.storage_timeout_seconds)


@contextmanager
def publishing(output: Location, request: GraftRequest, settings: EngineSettings,
               should_cancel: Callable[[], bool] | None = None, *, manifest_name: str | None = None,
               split: str = "") -> Iterator[Sink]:
    """The output's sink, claimed now (an occupied location fails here, before any input is read), for the
    body to write into and commit. Whatever the body raises leaves nothing visible: what was staged is
    aborted, unless a newer attempt of the same job has taken the output over (GraftSuperseded, or the fence
    says so once more after another failure), whose objects carry the same names: then nothing is touched.
    `request`: anything with the writer and the roots (a graft's, a diff extraction's); `manifest_name`: the
    file committed last (a diff artifact's diff-manifest.json); `split`: a split graft's task (sinks.open_sink)."""
    sink = open_sink(output, endpoint_url=settings.s3_endpoint_url, part_bytes=settings.s3_part_bytes,
                     parts_in_flight=settings.s3_parts_in_flight, writer=request.writer,
                     allowed_roots=request.allowed_roots, denied_roots=request.denied_roots,
                     retry=storage_retry(settings), manifest_name=manifest_name, split=split)
    try:
        yield sink
    except GraftSuperseded:
        sink.abandon()
        raise
    except BaseException as failure:
        if _superseded(should_cancel, failure):
            sink.abandon()
            raise GraftSuperseded() from failure
        try:
            sink.abort()
        except Exception as exc:  # the original failure is the one to report
            log.warning("cleaning up %s after a failure failed too: %s", output, exc)
        raise


def _superseded(should_cancel: Callable[[], bool] | None, failure: BaseException) -> bool:
    """The fence, asked once more before a failed attempt cleans up: a newer attempt of the same job may
    have taken the output over while this one failed (a storage fault, say)."""
    if should_cancel is None or isinstance(failure, GraftCancelled | KeyboardInterrupt):
        return False
    try:
        should_cancel()
    except GraftSuperseded:
        return True
    except Exception:  # the check itself failing says nothing about who owns the output
        return False
    return False
