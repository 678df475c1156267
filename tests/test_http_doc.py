"""The HTTP API's routes, its OpenAPI document and docs/http-api.md agree: every
route the app serves is in the OpenAPI document with its method, and every path
of the document is described in the doc (``METHOD /path``)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from starlette.routing import Route

from p2psync.http import admin, feed, records
from p2psync.http.events import Hub
from p2psync.http.openapi import PATHS, document
from p2psync.http.site import Site

pytestmark = pytest.mark.pure

DOC = Path(__file__).parent.parent / "docs" / "http-api.md"


def served() -> set[tuple[str, str]]:
    """(method, OpenAPI path) of every API route (the routes only read ``site``
    when called: a placeholder stands in to build them)."""
    site = cast(Site, SimpleNamespace(db=None))
    hub = cast(Hub, object())
    routes: list[Any] = [*admin.routes(site), *records.routes(site), *feed.routes(site, hub)]
    found = {("get", "/openapi.json")}
    for route in routes:
        assert isinstance(route, Route)
        methods = {m.lower() for m in route.methods or ()} - {"head"}
        paths = [route.path]
        if route.path == "/records/{rest:p2psync_rest}":  # one route, both forms
            paths = ["/records/{collection}", "/records/{collection}/{key}"]
        for path in paths:
            for method in methods:
                if path == "/records/{collection}" and method != "get":
                    continue
                found.add((method, path))
    return found


def test_every_route_is_in_the_openapi_document_and_nothing_else() -> None:
    listed = {(method, path) for path, ops in PATHS.items() for method in ops}
    assert served() == listed
    assert document()["paths"] is PATHS


def test_every_path_is_described_in_the_doc() -> None:
    text = DOC.read_text()
    described = set(re.findall(r"`(GET|PUT|DELETE|POST) (/[^`?\s]*)", text))
    for path, ops in PATHS.items():
        for method in ops:
            assert (method.upper(), path) in described, f"{method.upper()} {path} not in the doc"
