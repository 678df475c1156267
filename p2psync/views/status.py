"""What `p2psync status` and ``GET /status`` say about this site: the store in
figures, the running agent's own status (or None), and one row per peer."""

from __future__ import annotations

from typing import Any

from p2psync.api import Database
from p2psync.core.identity import short_id
from p2psync.views.peers import peer_rows


def site_status(db: Database, running: dict[str, Any] | None) -> dict[str, Any]:
    """``running``: the agent's status (``Agent.status``), None when it is not running."""
    authors = db.authors()
    store = {
        "entries": sum(a.seq for a in authors),
        "authors": len([a for a in authors if a.seq]),
        "conflicts": len(db.conflicts()),
        "held": db.store.held_count(),
        "last_change": db.last_change(),
    }
    # entries marked damaged (verify --repair, or found by a peer) that no sound
    # copy has mended yet: per author, the first damaged and the last held
    damaged = [
        {"author": short_id(author), "seq": first, "held_to": last}
        for author, (first, last) in sorted(db.store.held_back().items())
    ]
    rows = [row for row in peer_rows(db, running) if row["state"] != "discovered (not paired)"]
    return {
        "device_id": db.device_id,
        "name": db.home.name,
        "running": running is not None,
        "agent": running,
        "store": {**store, "damaged": damaged},
        "peers": rows,
    }
