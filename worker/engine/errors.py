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


class GraftCancelled(GraftError):
    def __init__(self, message: str = "the graft was cancelled") -> None:
        super().__init__("cancelled", message)
