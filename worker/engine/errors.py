"""Errors the engine raises: each carries a stable code for job records and a message for people."""

from __future__ import annotations


class GraftError(Exception):
    """A graft that cannot proceed; `code` is machine-readable, `str(err)` is for people."""

    def __init__(self, code: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}

    def to_dict(self) -> dict:
        out = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class GraftSuperseded(GraftError):
    """Another attempt now owns this graft's output: stop at once and touch nothing there (what this
    attempt wrote has the same names as what the new one writes)."""

    def __init__(self, message: str = "a newer attempt of this graft took over its output") -> None:
        super().__init__("superseded", message)


class GraftCancelled(GraftError):
    def __init__(self, message: str = "the graft was cancelled") -> None:
        super().__init__("cancelled", message)
