"""JSON errors: ``{"error": "one sentence", "status": CODE}`` with the status code
that says what kind of failure it was, from p2psync's one exception tree."""

from __future__ import annotations

import json
import logging

from starlette.requests import Request
from starlette.responses import Response

from p2psync.errors import (
    HttpError,
    NotFoundError,
    P2PSyncError,
    StateError,
    StoreError,
    UsageError,
)

log = logging.getLogger(__name__)

__all__ = ["HttpError", "error_body", "problem", "status_of"]


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


def problem(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        error_body(status, message),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def status_of(exc: P2PSyncError) -> int:
    """The status code of a p2psync error."""
    if isinstance(exc, HttpError):
        return exc.status
    if isinstance(exc, UsageError):
        return 400  # a malformed request: bad JSON, a bad name, a value out of range
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, StateError):
        return 409  # refused in the current state (e.g. a rule already answered)
    if isinstance(exc, StoreError):
        return 503  # the store is busy or cannot be written now
    return 500


async def p2psync_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, P2PSyncError)
    status = status_of(exc)
    if status >= 500:
        log.warning("HTTP request failed: %s", exc)
    return problem(status, str(exc), exc.headers if isinstance(exc, HttpError) else None)


async def internal_error(request: Request, exc: Exception) -> Response:
    """Anything else is a bug: logged with its traceback, one sentence to the client."""
    log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
    return problem(500, f"internal error in the agent: {exc.__class__.__name__}: {exc}")
