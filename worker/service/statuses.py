"""Job statuses, the groups the layers reason about, and job kinds: declared once, shared by the API, the worker
and the job records (the API schema's enums come from here too)."""

from __future__ import annotations

from enum import StrEnum


class JobKind(StrEnum):  # each kind's runner is registered in worker/service/kinds.py
    """What a job does: a graft, or a preflight (a compatibility check of a graft's inputs)."""

    GRAFT = "graft"
    PREFLIGHT = "preflight"


class JobStatus(StrEnum):
    QUEUED = "queued"
    VALIDATING = "validating"
    RUNNING = "running"
    COMMITTING = "committing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


STATUSES = tuple(s.value for s in JobStatus)
# A job a worker holds (cancelling included: its process may still be running).
ACTIVE = ("validating", "running", "committing", "cancelling")
TERMINAL = ("succeeded", "failed", "cancelled")
# Not ended: what a tenant's in-flight quota counts.
UNFINISHED = ("queued", *ACTIVE)
