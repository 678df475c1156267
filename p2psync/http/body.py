"""Reading what a request sends: a JSON body within the size limit, the record a
path names (percent-decoded segment by segment, so a ``/`` inside a name is
``%2F``), query numbers in range."""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import unquote

import trio
from starlette.requests import Request

from p2psync.core.entry import check_collection, check_key
from p2psync.errors import HttpError, UsageError
from p2psync.http.connections import STALL_SECONDS
from p2psync.http.guard import MAX_BODY

#: The headers of an answer after which the connection closes.
CLOSE = {"connection": "close"}


async def read_body(
    request: Request,
    limit: int,
    *,
    what: str = "the body",
    stall: float | None = None,
    deadline: float | None = None,
) -> bytes:
    """The body, whole: 413 beyond ``limit`` bytes (counted as they come, so a
    chunked body cannot get round it); 408 when nothing of it comes for ``stall``
    seconds (:data:`STALL_SECONDS` unless given: a client that hung mid-request
    would hold its connection for ever) or, with a ``deadline``, when it is not
    all there within that many seconds (for forms anyone may send: a byte every
    29 s would pass any stall). The 408 says the connection closes, as it does."""
    stall = STALL_SECONDS if stall is None else stall
    chunks: list[bytes] = []
    size = 0
    arriving = aiter(request.stream())
    with trio.move_on_after(math.inf if deadline is None else deadline):
        while True:
            with trio.move_on_after(stall) as waiting:
                try:
                    chunk = await anext(arriving)
                except StopAsyncIteration:
                    return b"".join(chunks)
            if waiting.cancelled_caught:
                raise HttpError(
                    408, f"nothing of {what} for {stall:g} s: send it whole, promptly",
                    headers=CLOSE,
                )
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"{what} is over {limit:,} bytes")
            chunks.append(chunk)
    raise HttpError(408, f"{what} did not arrive within {deadline:g} s", headers=CLOSE)


async def read_json(request: Request, limit: int = MAX_BODY, stall: float | None = None) -> Any:
    """The body as JSON (read by :func:`read_body`: 413, 408), 400 when it is
    not JSON."""
    data = await read_body(request, limit, stall=stall)
    if not data.strip():
        raise UsageError("the request has no body: send a JSON document")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("the body is not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"the body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise UsageError("the body nests too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise UsageError(f"the body is not acceptable JSON: {exc}") from None


def segments(request: Request, prefix: str) -> list[str]:
    """The percent-decoded segments of the raw path after ``prefix``."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    path = raw.decode("latin-1").split("?", 1)[0]
    rest = path[len(prefix) :].strip("/")
    try:
        return [unquote(part, errors="strict") for part in rest.split("/")] if rest else []
    except UnicodeDecodeError:
        raise UsageError("the path is not UTF-8 once percent-decoded") from None


def record_target(request: Request) -> tuple[str, str]:
    """``/records/COLLECTION/KEY``: the key may hold ``/`` (as is or as %2F), the
    collection only as %2F."""
    parts = segments(request, "/records")
    if len(parts) < 2:
        raise UsageError("name a record: /records/COLLECTION/KEY")
    return check_collection(parts[0]), check_key("/".join(parts[1:]))


def number(request: Request, name: str, default: int, low: int, high: int) -> int:
    """Query parameter ``name`` as an integer in ``low..high``."""
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{name}={text!r} is not a whole number") from None
    if not low <= value <= high:
        raise UsageError(f"{name}={value} is out of range: give {low} to {high}")
    return value


def seconds(request: Request, name: str, default: float, high: float) -> float:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{name}={text!r} is not a number of seconds") from None
    if not 0 <= value <= high:  # NaN is refused too: it compares false
        raise UsageError(f"{name}={text} is out of range: give 0 to {high:g} seconds")
    return value
