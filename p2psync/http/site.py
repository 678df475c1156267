"""What the HTTP API uses of the running agent (the agent satisfies it)."""

from __future__ import annotations

from typing import Any, Protocol

from p2psync.agent.connections import Registry
from p2psync.api import Database
from p2psync.net.storeio import ChangeFeed


class Site(Protocol):
    @property
    def db(self) -> Database: ...

    @property
    def feed(self) -> ChangeFeed: ...  # bumped when the store gains entries (any process)

    @property
    def rules_feed(self) -> ChangeFeed: ...  # bumped when the rules changed

    @property
    def registry(self) -> Registry: ...  # the connections; wait_change()

    def status(self) -> dict[str, Any]: ...  # what `p2psync status` shows of the agent

    def peers_changed(self) -> None: ...  # pairing changed here: reload the peers, dial
