"""RFC 9457 problem details: every 4xx/5xx body is `application/problem+json`."""

from __future__ import annotations

import orjson
import redis
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

PROBLEM_JSON = "application/problem+json"
TITLES = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
          409: "Conflict", 413: "Content Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content",
          429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable",
          504: "Gateway Timeout"}
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "body_too_large"}


class Problem(Exception):
    """Raise anywhere in a handler; becomes a problem+json response."""

    def __init__(self, status: int, code: str, detail: str, *, errors: list[dict] | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.errors, self.headers = status, code, detail, errors, headers


def problem_response(status: int, code: str, detail: str, *, instance: str | None = None,
                     errors: list[dict] | None = None, headers: dict | None = None) -> Response:
    body = {"type": f"/problems/{code}", "title": TITLES.get(status, "Error"), "status": status,
            "detail": detail, "code": code}
    if instance:
        body["instance"] = instance
    if errors:
        body["errors"] = errors
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM_JSON, headers=headers)


def field_error(field: str, message: str, type_: str = "invalid") -> Problem:
    return Problem(422, "validation_error", f"{field}: {message}",
                   errors=[{"field": field, "message": message, "type": type_}])


async def _problem(request: Request, exc: Problem) -> Response:
    return problem_response(exc.status, exc.code, exc.detail, instance=request.url.path, errors=exc.errors,
                            headers=exc.headers)


async def _validation(request: Request, exc: RequestValidationError) -> Response:
    errors = []
    malformed = False
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:] if loc[0] == "body" else loc
        # Only the body itself not being an object is "malformed"; a field of the wrong type is named.
        if err.get("type") == "json_invalid" or (err.get("type") == "model_attributes_type" and not loc):
            malformed = True
        errors.append({"field": ".".join(loc) or "body", "message": err.get("msg", "invalid"),
                       "type": err.get("type", "invalid")})
    if malformed:
        return problem_response(400, "malformed_body", "the body is not a JSON object", instance=request.url.path,
                                errors=errors)
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return problem_response(422, "validation_error", detail, instance=request.url.path, errors=errors)


async def _http(request: Request, exc: StarletteHTTPException) -> Response:
    code = HTTP_CODES.get(exc.status_code, "http_error")
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    return problem_response(exc.status_code, code, str(exc.detail), instance=request.url.path, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path: Starlette's 405 names only the first route that matched
    (and routers included by FastAPI do not expose their methods), so each method is tried."""
    return [m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
            if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in request.app.routes)]


async def _unavailable(request: Request, exc: Exception) -> Response:
    retry = str(request.app.state.settings.unavailable_retry_after)
    return problem_response(503, "unavailable", "the job store (Redis) is unreachable; retry later",
                            instance=request.url.path, headers={"Retry-After": retry})


async def _unhandled(request: Request, exc: Exception) -> Response:
    # Starlette's ServerErrorMiddleware sends this body (and still logs and re-raises the exception).
    return problem_response(500, "internal_error", "the server failed to handle the request",
                            instance=request.url.path)


def install(app) -> None:
    app.add_exception_handler(Exception, _unhandled)
    for exc_type in (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        app.add_exception_handler(exc_type, _unavailable)
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
