"""Where a graft (or an inspection) is: the engine reports it, the worker maps it to job statuses, events
name it. No torch here: the worker's job module imports it."""

from enum import StrEnum


class Phase(StrEnum):
    """Where a graft is: the engine reports it, the worker maps it to job statuses, events name it."""

    RESOLVING = "resolving"
    STATISTICS = "statistics"  # a recipe's magnitude thresholds, read before the compute pass
    STREAMING = "streaming"  # the compute pass: every output byte is written here
    INSPECTING = "inspecting"  # a weights-level check of the inputs (an inspection, or `require: compatible`)
    EVALUATING = "evaluating"  # the written output run on a probe text and prompts, before it is published
    COMMITTING = "committing"
    DONE = "done"
