"""A small HTTP client for the agent's API over real sockets (the standard
library's http.client): JSON calls, and a reader of server-sent events."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from p2psync.agent.process import AgentProcess


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


class Api:
    def __init__(self, url: str, key: str | None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.key = key

    @classmethod
    def of(cls, url: str, home: Path) -> Api:
        return cls(url, (home / "http.key").read_text().strip())

    @classmethod
    def of_agent(cls, agent: AgentProcess) -> Api:
        """The API of an agent started with ``--http``, with its key."""
        assert agent.http_url is not None, "the agent was started without --http"
        return cls.of(agent.http_url, agent.home)

    def connect(self, timeout: float = 30) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        key: str | None = "default",
        timeout: float = 30,
    ) -> Answer:
        sent = dict(headers or {})
        given = self.key if key == "default" else key
        if given is not None:
            sent.setdefault("X-API-Key", given)
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        conn = self.connect(timeout)
        try:
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            payload = response.read()
            text = payload.decode() if payload else ""
            try:
                parsed = json.loads(text) if text else None
            except json.JSONDecodeError:
                parsed = text
            return Answer(response.status, parsed, dict(response.getheaders()))
        finally:
            conn.close()

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        answer = self.call(method, path, body)
        assert answer.status in (200, 201), (method, path, answer)
        return answer.body


class EventStream:
    """``GET /events`` read event by event."""

    def __init__(self, api: Api, path: str = "/events", headers: dict[str, str] | None = None):
        self.conn = api.connect(timeout=30)
        sent = {"X-API-Key": api.key or "", "Accept": "text/event-stream", **(headers or {})}
        self.conn.request("GET", path, headers=sent)
        self.response = self.conn.getresponse()
        self.status = self.response.status

    def next(self, timeout: float = 10) -> tuple[str, Any, str | None]:
        """The next event: (kind, data, id); comments are skipped."""
        assert self.conn.sock is not None
        self.conn.sock.settimeout(timeout)
        kind, data, ident = "message", "", None
        while True:
            line = self.response.readline().decode()
            if not line:
                raise EOFError("the event stream ended")
            line = line.rstrip("\n")
            if not line:
                if data:
                    return kind, json.loads(data), ident
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(": ")
            if field == "event":
                kind = value
            elif field == "data":
                data += value
            elif field == "id":
                ident = value

    def until(self, wanted: Any, timeout: float = 10) -> tuple[str, Any, str | None]:
        """Events until one for which ``wanted(kind, data)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("the awaited event did not come")
            event = self.next(left)
            if wanted(event[0], event[1]):
                return event

    def close(self) -> None:
        self.conn.close()
