"""Job statuses and the groups the layers reason about: declared once, shared by the API, the worker and the job
records (the API schema's enum comes from here too). Job kinds are a table of their own: worker/service/kinds."""

from __future__ import annotations

from enum import StrEnum


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
