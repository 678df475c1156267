"""`p2psync peers`: known and discovered peers."""

from __future__ import annotations

from typing import Any

import click

from p2psync.cli import output
from p2psync.cli.context import State, pass_state
from p2psync.cli.lookup import (
    agent_status,
    relationship,
)
from p2psync.core.identity import device_id
from p2psync.core.messages import lag


def _ms(value: int | None) -> str:
    return output.describe_hlc(value << 16) if value else "never"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def peers(state: State, as_json: bool) -> None:
    """Known and discovered peers: pairing state, addresses, last seen, behind/ahead."""
    running = agent_status(state)
    connected = {c["device_id"] for c in (running or {}).get("connections", [])}
    with state.open() as db:
        me = db.identity.public_key
        ours = {a: h.seq for a, h in db.store.heads().items()}
        rows: list[dict[str, Any]] = []
        for peer in db.store.peers():
            known = db.store.peer_heads(peer.key)
            behind, ahead = lag(ours, known) if known else (None, None)
            rows.append(
                {
                    "name": peer.name,
                    "device_id": device_id(peer.key),
                    "state": relationship(me, peer, db.store.rules(peer.key)),
                    "addresses": list(peer.addresses),
                    "connected": device_id(peer.key) in connected,
                    "last_seen": peer.last_seen,
                    "last_sync": peer.last_sync,
                    "last_error": peer.last_error,
                    "behind": behind,
                    "ahead": ahead,
                }
            )
        listed = {row["device_id"] for row in rows}
    for found in (running or {}).get("discovered", []):
        if found["device_id"] not in listed:
            rows.append(
                {
                    "name": found["name"],
                    "device_id": found["device_id"],
                    "state": "discovered (not paired)",
                    "addresses": found["addresses"],
                    "connected": False,
                    "last_seen": found["last_seen"],
                    "last_sync": None,
                    "last_error": None,
                    "behind": None,
                    "ahead": None,
                }
            )
    if as_json:
        output.emit_json(rows)
        return
    if not rows:
        click.echo(
            "no peers yet: p2psync pair add DEVICE_ID --address HOST:PORT, or p2psync pair invite"
        )
    for row in rows:
        link = "connected" if row["connected"] else "not connected"
        lagging = (
            f"{row['behind']} behind, {row['ahead']} ahead"
            if row["behind"] is not None
            else "lag unknown"
        )
        click.echo(f"{output.safe(row['name'] or '?')}  {row['device_id']}")
        click.echo(f"    {output.safe(row['state'])}; {link}; {lagging}")
        click.echo(f"    addresses: {', '.join(row['addresses']) or '-'}")
        click.echo(f"    last seen: {_ms(row['last_seen'])}; last in sync: {_ms(row['last_sync'])}")
        if row["last_error"]:
            click.echo(f"    last error: {output.safe(row['last_error'])}")


COMMANDS = (peers,)
