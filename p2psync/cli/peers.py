"""`p2psync peers`: known and discovered peers — and the one place that decides
what `peers` and `status` say about each peer (connected?, in step?, behind and
ahead, last in sync, what is wrong), so the two never disagree.

While the agent runs, a connected peer's figures come from its live session;
otherwise from what the store kept of the last contact.
"""

from __future__ import annotations

from typing import Any

import click

from p2psync import pairing
from p2psync.api import Database
from p2psync.cli import output
from p2psync.cli.context import State, pass_state
from p2psync.cli.delivery import delivery, describe_delivery
from p2psync.cli.lookup import (
    agent_status,
    relationship,
)
from p2psync.clock import now_ms
from p2psync.core.identity import device_id
from p2psync.core.messages import lag
from p2psync.mail.mailer import Mailer


def _ms(value: int | None) -> str:
    return output.describe_hlc(value << 16) if value else "never"


def peer_rows(db: Database, running: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per known peer, then the agents only discovered on the LAN."""
    me = db.identity.public_key
    live = {
        c["device_id"]: c
        for c in (running or {}).get("connections", [])
        if c.get("kind", "live") == "live"
    }
    lan = {d["device_id"]: d for d in (running or {}).get("discovered", [])}
    ours = {a: h.seq for a, h in db.store.heads().items()}
    incomplete = db.store.incomplete()
    link = (running or {}).get("relay") or {}
    carried = Mailer(db).peers() if link.get("relay_id") else frozenset()
    rows: list[dict[str, Any]] = []
    for peer in db.store.peers():
        text_id = device_id(peer.key)
        conn = live.get(text_id)
        state = relationship(me, peer, db.store.rules(peer.key))
        if conn is not None:
            behind, ahead = conn["behind"], conn["ahead"]
            in_sync: bool | None = conn["synced"] if state.startswith("paired") else None
            last_sync = conn.get("last_sync") or peer.last_sync
            problem = f"cannot get in step: {conn['stuck']}" if conn.get("stuck") else None
        else:
            known = db.store.peer_heads(peer.key)
            behind = ahead = None
            if known:
                allowed = pairing.permissions(db, peer.key, live=False)
                behind, ahead = lag(ours, known)
                behind, ahead = behind if allowed.receive else 0, ahead if allowed.send else 0
            in_sync, last_sync, problem = None, peer.last_sync, peer.last_error
        seen = lan.get(text_id)
        path = _path(conn, link if peer.key in carried else None)
        allowed = pairing.permissions(db, peer.key, live=False)
        missing = {c: n for c, n in incomplete.items() if allowed.may_receive(c)}
        rows.append(
            {
                "name": peer.name,
                "device_id": text_id,
                "state": state,
                "addresses": list(peer.addresses),
                "lan_addresses": list(seen["addresses"]) if seen else [],
                "connected": conn is not None,
                "connected_from": conn["address"] if conn and conn["direction"] == "in" else None,
                **path,
                "in_sync": in_sync,
                "begun": bool(conn.get("begun", True)) if conn is not None else False,
                "problem": problem,
                "last_seen": now_ms()
                if conn is not None
                else max(peer.last_seen or 0, seen["last_seen"] if seen else 0) or None,
                "last_sync": last_sync,
                "last_error": peer.last_error,
                "behind": behind,
                "ahead": ahead,
                # ops in collections this peer may send us that reached us without
                # their payload by another path: they will not come from it either
                "incomplete": missing,
                "delivery": delivery(db, peer.key, now_ms()),
            }
        )
    listed = {row["device_id"] for row in rows}
    for found in lan.values():
        if found["device_id"] not in listed:
            rows.append(
                {
                    "name": found["name"],
                    "device_id": found["device_id"],
                    "state": "discovered (not paired)",
                    "addresses": found["addresses"],  # as advertised (unproven)
                    "lan_addresses": found["addresses"],
                    "connected": False,
                    "connected_from": None,
                    **_path(None, None),
                    "in_sync": None,
                    "begun": False,
                    "problem": None,
                    "last_seen": found["last_seen"],
                    "last_sync": None,
                    "last_error": None,
                    "behind": None,
                    "ahead": None,
                    "incomplete": {},
                    "delivery": None,
                }
            )
    return rows


def _path(conn: dict[str, Any] | None, link: dict[str, Any] | None) -> dict[str, Any]:
    """The path in use with a peer, and since when: ``direct``, ``relay`` (live,
    spliced through the relay ``path_relay``), ``mailbox`` (no live connection; the
    running agent's relay link carries what the rules let it), or None."""
    if conn is not None:
        relay = conn.get("relay")
        return {
            "path": "relay" if relay else "direct",
            "path_relay": relay,
            "path_since": conn.get("since"),
        }
    if link:
        return {"path": "mailbox", "path_relay": link["relay_id"], "path_since": link["since_ms"]}
    return {"path": None, "path_relay": None, "path_since": None}


def describe_path(row: dict[str, Any]) -> str | None:
    """The path line of `peers`: how this agent reaches the peer now, since when."""
    since = _ms(row["path_since"])
    if row["path"] == "direct":
        return f"direct since {since}"
    if row["path"] == "relay":
        return f"via relay {row['path_relay'][:7]} (live) since {since}"
    if row["path"] == "mailbox":
        return f"mailbox at relay {row['path_relay'][:7]} since {since}"
    return None


def describe_link(row: dict[str, Any], *, why: bool = True) -> str:
    """connected?, in step? and the lag, in the words `peers` and `status` share
    (``why``: with the reason it cannot get in step, else the caller shows it)."""
    if not row["connected"]:
        lagging = (
            f"{row['behind']} behind, {row['ahead']} ahead at last contact"
            if row["behind"] is not None
            else "lag unknown"
        )
        mailbox = (
            f" (mailbox at relay {row['path_relay'][:7]})" if row.get("path") == "mailbox" else ""
        )
        return f"not connected{mailbox}; {lagging}"
    if row["problem"]:
        step = row["problem"] if why else row["problem"].split(":", 1)[0]
    elif not row["state"].startswith("paired"):
        return "connected, exchanging pairing requests (nothing flows until a rule is in force)"
    elif not row["begun"]:
        return "connected, exchanging rules"
    elif row["in_sync"]:
        step = "in sync"
    else:
        step = "syncing"
    via = f" via relay {row['path_relay'][:7]}" if row.get("path") == "relay" else ""
    return f"connected{via}; {step}; {row['behind']} behind, {row['ahead']} ahead"


def describe_incomplete(missing: dict[str, int]) -> str:
    """Ops that arrived without their contents, in words (asked for at each sync)."""
    shown = sorted(missing)[:5]
    names = ", ".join(repr(c) for c in shown)
    if len(missing) > len(shown):
        names += f" and {len(missing) - len(shown)} more collections"
    count = output.plural(sum(missing.values()), "change")
    return (
        f"{count} to {names} arrived here without {'its' if count.startswith('1 ') else 'their'}"
        " contents (a rule on their way left that out); each sync asks the peers whose "
        "rules let them come, until one holds them (README: What flows where)"
    )


def describe_addresses(row: dict[str, Any]) -> str:
    shown = [
        *row["addresses"],
        *(f"{a} (LAN)" for a in row["lan_addresses"] if a not in row["addresses"]),
    ]
    if shown:
        return ", ".join(shown)
    if row["connected_from"]:
        return f"- (it connects to this agent, from {row['connected_from']})"
    return "-"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def peers(state: State, as_json: bool) -> None:
    """Known and discovered peers: pairing state, addresses, last seen, behind/ahead."""
    running = agent_status(state)
    with state.open() as db:
        rows = peer_rows(db, running)
    if as_json:
        output.emit_json(rows)
        return
    if not rows:
        click.echo(
            "no peers yet: p2psync pair add DEVICE_ID --address HOST:PORT, or p2psync pair invite"
        )
    for row in rows:
        click.echo(f"{output.safe(row['name'] or '?')}  {row['device_id']}")
        click.echo(f"    {output.safe(row['state'])}; {describe_link(row, why=False)}")
        click.echo(f"    addresses: {output.safe(describe_addresses(row))}")
        path = describe_path(row)
        if path is not None:
            click.echo(f"    path: {path}")
        click.echo(f"    last seen: {_ms(row['last_seen'])}; last in sync: {_ms(row['last_sync'])}")
        if row["problem"] and row["connected"]:  # only what is wrong now
            click.echo(f"    why: {output.safe(row['problem'].split(': ', 1)[-1])}")
        elif row["problem"]:
            click.echo(f"    last problem: {output.safe(row['problem'])}")
        if row["incomplete"]:
            click.echo(f"    note: {output.safe(describe_incomplete(row['incomplete']))}")
        for line in describe_delivery(row["delivery"]) if row["delivery"] else ():
            click.echo(f"    {line}")


COMMANDS = (peers,)
