"""Peer commands: pair add / pair remove, peers."""

from __future__ import annotations

from typing import Any

import click

from p2psync.agent import sockets
from p2psync.agent.agent import parse_address
from p2psync.api import Database
from p2psync.cli import output
from p2psync.cli.context import State, pass_state
from p2psync.core.identity import device_id, parse_device_id, short_id
from p2psync.core.messages import lag
from p2psync.errors import InvalidDeviceID, UsageError
from p2psync.home import now_ms
from p2psync.store.peers import Peer


def resolve_peer(db: Database, text: str) -> Peer:
    """A paired peer by device ID, short ID (prefix) or name."""
    peers = db.store.peers()
    try:
        key = parse_device_id(text)
    except InvalidDeviceID:
        cleaned = text.replace("-", "").upper()
        matches = [
            p
            for p in peers
            if p.name == text
            or (len(cleaned) >= 4 and device_id(p.key).replace("-", "").startswith(cleaned))
        ]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise UsageError(
                f"{text!r} matches {len(matches)} peers; give the full device ID"
            ) from None
        raise UsageError(f"no paired peer called {text!r}; see `p2psync peers`") from None
    for peer in peers:
        if peer.key == key:
            return peer
    raise UsageError(f"{short_id(key)} is not a paired peer; see `p2psync peers`")


@click.group()
def pair() -> None:
    """Trust other agents (both sides must add each other)."""


@pair.command(name="add")
@click.argument("device_id")
@click.option(
    "--address",
    "addresses",
    multiple=True,
    metavar="HOST:PORT",
    help="Where the peer listens (repeatable).",
)
@click.option("--name", help="A name for the peer (default: its short ID).")
@pass_state
def pair_add(state: State, device_id: str, addresses: tuple[str, ...], name: str | None) -> None:
    """Trust DEVICE_ID and sync with it."""
    key = parse_device_id(device_id)
    for address in addresses:
        try:
            parse_address(address)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    with state.open() as db:
        if key == db.identity.public_key:
            raise UsageError("that is this agent's own device ID")
        peer = db.store.add_peer(key, name or short_id(key), list(addresses), now_ms())
        own = db.device_id
    sockets.notify(state.home, sockets.CHANGED_PEERS)
    where = f" at {', '.join(peer.addresses)}" if peer.addresses else " (no address yet)"
    click.echo(f"trusting {peer.name} ({short_id(key)}){where}")
    click.echo(f"on that agent, run: p2psync pair add {own}")


@pair.command(name="remove")
@click.argument("peer")
@pass_state
def pair_remove(state: State, peer: str) -> None:
    """Stop trusting PEER (device ID, short ID or name); its data stays."""
    with state.open() as db:
        found = resolve_peer(db, peer)
        db.store.remove_peer(found.key)
    sockets.notify(state.home, sockets.CHANGED_PEERS)
    click.echo(f"removed {found.name} ({short_id(found.key)}); records it sent are kept")


def _ms(value: int | None) -> str:
    return output.describe_hlc(value << 16) if value else "never"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def peers(state: State, as_json: bool) -> None:
    """List peers with state, addresses, last seen and entries behind/ahead."""
    with state.open() as db:
        ours = {a: h.seq for a, h in db.store.heads().items()}
        rows: list[dict[str, Any]] = []
        for peer in db.store.peers():
            known = db.store.peer_heads(peer.key)
            behind, ahead = lag(ours, known) if known else (None, None)
            rows.append(
                {
                    "name": peer.name,
                    "device_id": device_id(peer.key),
                    "state": peer.state.value,
                    "addresses": list(peer.addresses),
                    "last_seen": peer.last_seen,
                    "last_sync": peer.last_sync,
                    "last_error": peer.last_error,
                    "behind": behind,
                    "ahead": ahead,
                }
            )
    connected = _connected(state)
    for row in rows:
        row["connected"] = row["device_id"] in connected
    if as_json:
        output.emit_json(rows)
        return
    if not rows:
        click.echo("no peers yet; add one with: p2psync pair add DEVICE_ID --address HOST:PORT")
    for row in rows:
        link = "connected" if row["connected"] else "not connected"
        lagging = (
            f"{row['behind']} behind, {row['ahead']} ahead"
            if row["behind"] is not None
            else "lag unknown"
        )
        click.echo(f"{row['name']}  {row['device_id']}  {row['state']}, {link}, {lagging}")
        click.echo(f"    addresses: {', '.join(row['addresses']) or '-'}")
        click.echo(f"    last seen: {_ms(row['last_seen'])}; last in sync: {_ms(row['last_sync'])}")
        if row["last_error"]:
            click.echo(f"    last error: {row['last_error']}")


def _connected(state: State) -> set[str]:
    try:
        status = sockets.request(state.home, {"op": "status"}, timeout=2)
    except (sockets.AgentNotRunning, OSError, ValueError):
        return set()
    return {c["device_id"] for c in status.get("connections", [])}


COMMANDS = (pair, peers)
