"""HTTP to the graft API: the bearer key on every request, JSON in and out, and every answer that is not a success
(an RFC 9457 problem+json body, another error body, or no answer at all) raised as one ApiError, which the
command line prints as graft prints its errors."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8000"  # where `graft serve` listens by default
TIMEOUT = 30.0
# Answers worth asking again while waiting: the job store or a proxy in front of the API is away for a moment.
TRANSIENT = (429, 502, 503, 504)


class ApiError(Exception):
    """A request that did not succeed, or could not be made. `status` is the HTTP status (None: no answer, or no
    request), `code` the problem's code (`unauthorized`, `validation_error`, ...), `errors` the fields it names."""

    def __init__(self, code: str, detail: str, *, status: int | None = None, errors: list[dict] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.code, self.detail, self.status = code, detail, status
        self.errors, self.retry_after = errors or [], retry_after

    @property
    def transient(self) -> bool:
        return self.status is None or self.status in TRANSIENT

    def lines(self) -> list[str]:
        """What the command line prints: graft's error line, then each named field the detail does not already
        spell out."""
        where = f" (HTTP {self.status})" if self.status else ""
        lines = [f"graft: error [{self.code}]{where}: {self.detail}"]
        for err in self.errors:
            text = f"{err.get('field', '?')}: {err.get('message', '')}"
            if text not in self.detail:
                lines.append(f"  {text}")
        return lines


@dataclass(frozen=True)
class Reply:
    status: int
    doc: Any  # the JSON body; None for an empty one
    location: str | None


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _refusal(resp: httpx.Response) -> ApiError:
    """The ApiError of an error answer: its problem+json fields, or the start of whatever else it sent."""
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("detail"), str):
        return ApiError(str(doc.get("code") or f"http_{resp.status_code}"), doc["detail"],
                           status=resp.status_code, errors=doc.get("errors") if isinstance(doc.get("errors"), list)
                           else None, retry_after=_retry_after(resp))
    text = " ".join(resp.text.split())[:300] or resp.reason_phrase
    return ApiError(f"http_{resp.status_code}", text, status=resp.status_code, retry_after=_retry_after(resp))


class Client:
    """One connection pool to one server, with one API key."""

    def __init__(self, server: str, api_key: str, *, timeout: float = TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.server = server.rstrip("/")
        self._http = httpx.Client(base_url=self.server, timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"})

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def call(self, method: str, path: str, *, body: Any = None, params: Mapping[str, Any] | None = None,
             headers: Mapping[str, str] | None = None) -> Reply:
        try:
            resp = self._http.request(method, path, json=body, params=params, headers=headers)
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            raise ApiError("server_unreachable", f"{self.server}: {str(exc) or type(exc).__name__}") from None
        if resp.status_code >= 400:
            raise _refusal(resp)
        try:
            doc = resp.json() if resp.content else None
        except ValueError:
            raise ApiError("invalid_response", f"{method} {path} answered {resp.status_code} with a body that "
                              "is not JSON", status=resp.status_code) from None
        return Reply(resp.status_code, doc, resp.headers.get("location"))

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self.call("GET", path, params=params).doc

    def pages(self, path: str, params: Mapping[str, Any]) -> Iterator[dict]:
        """Every page of a list route, following `last_id` while `has_more`."""
        params = dict(params)
        while True:
            page = self.get(path, params)
            yield page
            if not page.get("has_more") or not page.get("last_id"):
                return
            params["after"] = page["last_id"]
