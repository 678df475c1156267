"""What ``relay status`` shows: the running node's state file (when it runs) and
what the mailbox holds."""

from __future__ import annotations

import json
from typing import Any

from p2psync.clock import now_ms
from p2psync.core.identity import device_id
from p2psync.errors import StoreError
from p2psync.relay.backend import open_admission, open_mailbox, shown
from p2psync.relay.home import STATE_FILE, RelayHome
from p2psync.relay.lock import serving


def relay_status(home: RelayHome) -> dict[str, Any]:
    running: dict[str, Any] | None = None
    if serving(home.path):
        try:
            running = json.loads((home.path / STATE_FILE).read_text())
        except (OSError, ValueError):
            running = None
    head = {
        "device_id": home.identity.device_id,
        "name": home.name,
        "home": str(home.path),
        "store": shown(home.store),
        "backend": "sqlite" if home.store is None else "postgresql",
        "running": running,
    }
    try:
        mailbox = open_mailbox(home, 1)
    except StoreError as exc:  # the database is away: say so, and what this home knows
        if home.store is None:
            raise
        return {**head, "error": str(exc)}
    try:
        summary = mailbox.summary(now_ms())
        nodes, replication = _shared(home, mailbox)
    finally:
        mailbox.close()
    admission = open_admission(home)
    now = now_ms()
    return {
        "device_id": home.identity.device_id,
        "name": home.name,
        "home": str(home.path),
        "store": shown(home.store),
        "backend": "sqlite" if home.store is None else "postgresql",
        "nodes": nodes,
        "replication": replication,
        "running": running,
        "mailbox": {
            "mailboxes": summary.mailboxes,
            "envelopes": summary.envelopes,
            "bytes": summary.bytes,
            "oldest_until": summary.oldest_until_ms,
            "notices": summary.notices,
        },
        "quota": {
            "count": summary.fullest_count,
            "count_limit": home.limits.mailbox_count,
            "bytes": summary.fullest_bytes,
            "bytes_limit": home.limits.mailbox_bytes,
        },
        "limits": {
            "mailbox_count": home.limits.mailbox_count,
            "mailbox_bytes": home.limits.mailbox_bytes,
            "pair_bytes": home.limits.pair_bytes,
            "sender_bytes": home.limits.sender_bytes,
            "ttl_default_ms": home.limits.ttl_default_ms,
            "ttl_max_ms": home.limits.ttl_max_ms,
        },
        "admitted": [
            {"device_id": device_id(key), "since": row.get("since"), "how": row.get("how")}
            for key, row in sorted(admission.allowed().items())
        ],
        "tokens": sum(t.usable(now) for t in admission.tokens()),
    }


def _shared(home: RelayHome, mailbox: object) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """On PostgreSQL: the relay's nodes seen lately, and what the database says
    of its replication; on SQLite: nothing (one node, no replication)."""
    if home.store is None:
        return [], {}
    from p2psync.relay.cluster import Cluster  # noqa: PLC0415

    cluster = Cluster(mailbox.pool, home.name)  # type: ignore[attr-defined]
    return [n.describe() for n in cluster.nodes()], cluster.replication()
