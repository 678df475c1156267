"""Pairing, rules and peers: ``pair …``, ``rule …``, ``peers``."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, TypeVar

import click
import trio

from p2psync import pairing
from p2psync.agent import sockets
from p2psync.api import Database
from p2psync.cli import output
from p2psync.cli.context import State, pass_state
from p2psync.core.identity import device_id, parse_device_id, short_id
from p2psync.core.messages import lag
from p2psync.core.rules import Direction, Mode, Route, Rule, RuleState, Terms
from p2psync.errors import InvalidDeviceID, P2PSyncError, UsageError
from p2psync.home import now_ms
from p2psync.net.address import parse_address
from p2psync.net.oneshot import sync_once
from p2psync.store.peers import Peer, PeerState

F = TypeVar("F", bound=Callable[..., Any])


def rule_options(narrowing: bool = False) -> Callable[[F], F]:
    """--collection/--direction/--mode/--route; defaults: everything, both, online, auto."""

    def decorate(function: F) -> F:
        help_suffix = " (default: as proposed)" if narrowing else ""
        for option in reversed(
            [
                click.option(
                    "--collection",
                    "-c",
                    "collections",
                    multiple=True,
                    metavar="GLOB",
                    help=f"Collections the rule covers (repeatable; default *){help_suffix}.",
                ),
                click.option(
                    "--direction",
                    type=click.Choice([d.value for d in Direction]),
                    help="From the proposer's view: send, receive or both (default both).",
                ),
                click.option(
                    "--mode",
                    type=click.Choice([m.value for m in Mode]),
                    help="online: live while connected; on-demand: only on `p2psync sync`.",
                ),
                click.option(
                    "--route",
                    type=click.Choice([r.value for r in Route]),
                    help="direct, relay or auto (default auto).",
                ),
            ]
        ):
            function = option(function)
        return function

    return decorate


def make_terms(
    collections: tuple[str, ...],
    direction: str | None,
    mode: str | None,
    route: str | None,
    base: Terms | None = None,
) -> Terms:
    base = base or Terms()
    return Terms.make(
        list(collections) or list(base.collections),
        Direction(direction) if direction else base.direction,
        Mode(mode) if mode else base.mode,
        Route(route) if route else base.route,
    )


def resolve_peer(db: Database, text: str) -> Peer:
    """A known peer by device ID, its first characters (4 or more), or name."""
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
        raise UsageError(f"no peer called {text!r}; see `p2psync peers`") from None
    for peer in peers:
        if peer.key == key:
            return peer
    raise UsageError(f"{short_id(key)} is not a known peer; see `p2psync peers`")


def resolve_rule(db: Database, text: str) -> Rule:
    if not re.fullmatch(r"[0-9a-fA-F]{4,64}", text):
        raise UsageError(f"{text!r} is not a rule ID (hex, at least 4 characters)")
    matches = [r for r in db.store.rules() if r.id.hex().startswith(text.lower())]
    if len(matches) != 1:
        raise UsageError(f"{len(matches) or 'no'} rules match {text!r}; see `p2psync rule list`")
    return matches[0]


def notify(state: State) -> None:
    sockets.notify(state.home, sockets.CHANGED_PEERS)


def relationship(me: bytes, peer: Peer, rules: list[Rule]) -> str:
    """paired / pending / rejected / removed, in words."""
    if peer.state is PeerState.REMOVED:
        return "removed"
    live = [r for r in rules if r.state is RuleState.ACCEPTED]
    if live:
        return "paired"
    if any(r.state is RuleState.PROPOSED and r.acceptor == me for r in rules):
        return "pending: awaiting your answer (p2psync pair pending)"
    if any(r.state is RuleState.PROPOSED and r.proposer == me for r in rules):
        return "pending: awaiting their answer"
    rejected = [r for r in rules if r.state is RuleState.REJECTED]
    if rejected:
        who = "you" if rejected[-1].acceptor == me else "them"
        return f"rejected by {who}: {rejected[-1].reason}"
    return "not paired"


# ---------------------------------------------------------------- pair


@click.group()
def pair() -> None:
    """Pair with other agents: add, invite, join, pending, accept, reject, remove."""


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
@rule_options()
@pass_state
def pair_add(
    state: State,
    device_id: str,
    addresses: tuple[str, ...],
    name: str | None,
    collections: tuple[str, ...],
    direction: str | None,
    mode: str | None,
    route: str | None,
) -> None:
    """Ask DEVICE_ID to pair, proposing a sync rule; nothing flows until it accepts
    (or has added this agent too)."""
    key = parse_device_id(device_id)
    for address in addresses:
        try:
            parse_address(address)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    terms = make_terms(collections, direction, mode, route)
    with state.open() as db:
        rules = pairing.propose(db, key, terms, name=name or short_id(key), addresses=addresses)
        peer = db.store.peer(key)
        own = db.device_id
        me = db.identity.public_key
    notify(state)
    assert peer is not None
    where = f" at {', '.join(peer.addresses)}" if peer.addresses else " (no address yet)"
    who = output.safe(peer.name or "?")
    click.echo(f"proposed to {who} ({short_id(key)}){where}: {terms.describe()}")
    click.echo(f"{output.safe(peer.name or '?')}: {relationship(me, peer, rules)}")
    if relationship(me, peer, rules) != "paired":
        click.echo(f"on that agent, run: p2psync pair add {own}  (or: p2psync pair accept)")


@pair.command(name="invite")
@rule_options()
@click.option(
    "--expires",
    default="10m",
    show_default=True,
    help="How long the code works: e.g. 90s, 10m, 2h, 1d.",
)
@click.option(
    "--address",
    "addresses",
    multiple=True,
    metavar="HOST:PORT",
    help="Where joiners reach this agent (default: its listen addresses).",
)
@pass_state
def pair_invite(
    state: State,
    collections: tuple[str, ...],
    direction: str | None,
    mode: str | None,
    route: str | None,
    expires: str,
    addresses: tuple[str, ...],
) -> None:
    """Print a one-time code that pairs another agent with this rule (code on the last line)."""
    seconds = parse_duration(expires)
    terms = make_terms(collections, direction, mode, route)
    hints = list(addresses) or listen_hints(state)
    if not hints:
        raise UsageError(
            "no address to put in the code: start the agent (p2psync run) or give --address"
        )
    with state.open() as db:
        code = pairing.create_invite(db, terms, seconds, hints)
    click.echo(
        f"invite for: {terms.describe()}; works once, for {expires}; "
        f"reaches this agent at {', '.join(hints)}"
    )
    click.echo("on the other agent, run: p2psync pair join CODE")
    click.echo(code)


@pair.command(name="join")
@click.argument("code")
@click.option("--name", help="A name for the inviting peer (default: the name it gives).")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait.")
@pass_state
def pair_join(state: State, code: str, name: str | None, timeout: float) -> None:
    """Pair with the agent that printed CODE (no further approval), then sync once."""
    invite = pairing.parse_invite(code)
    if invite.expires < now_ms():
        raise P2PSyncError("this invite code has expired; ask for a new one")
    with state.open() as db:
        if invite.inviter == db.identity.public_key:
            raise UsageError("this code was made by this agent; run `pair join` on the other one")
        db.store.add_peer(invite.inviter, name, list(invite.addresses), now_ms())
        pairing.remember_join(db, invite)
        outcomes = trio.run(
            functools.partial(sync_once, db, [invite.inviter], None, timeout=timeout)
        )
        rules = db.store.rules(invite.inviter)
        peer = db.store.peer(invite.inviter)
        me = db.identity.public_key
    notify(state)
    assert peer is not None
    status = relationship(me, peer, rules)
    if status != "paired":
        pairing_error = outcomes[0].error if outcomes else "no answer"
        raise P2PSyncError(f"pairing with {short_id(invite.inviter)} failed: {pairing_error}")
    accepted = next(r for r in rules if r.state is RuleState.ACCEPTED)
    click.echo(
        f"paired with {output.safe(peer.name or short_id(peer.key))} ({short_id(peer.key)}): "
        f"{accepted.terms_for(me).describe()}"
    )
    if outcomes and outcomes[0].synced:
        click.echo(f"in sync (received {outcomes[0].received}, sent {outcomes[0].sent})")


@pair.command(name="pending")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def pair_pending(state: State, as_json: bool) -> None:
    """Pairing requests and rule proposals waiting for an answer."""
    with state.open() as db:
        me = db.identity.public_key
        waiting = [r for r in db.store.rules() if r.state is RuleState.PROPOSED]
        names = {p.key: p.name for p in db.store.peers()}
    rows = [rule_row(me, r, names) for r in waiting]
    if as_json:
        output.emit_json(rows)
        return
    if not rows:
        click.echo("nothing pending")
    for row in rows:
        who = output.safe(row["peer_name"] or row["peer"][:7])
        if row["awaiting"] == "you":
            click.echo(f"{who} asks: {row['terms']}  (rule {row['id'][:12]})")
            click.echo(
                f"    p2psync pair accept {row['peer'][:7]}   or   "
                f"p2psync pair reject {row['peer'][:7]} --reason TEXT"
            )
        else:
            click.echo(
                f"you asked {who}: {row['terms']}  (rule {row['id'][:12]}); "
                "waiting for their answer"
            )


@pair.command(name="accept")
@click.argument("peer")
@rule_options(narrowing=True)
@pass_state
def pair_accept(
    state: State,
    peer: str,
    collections: tuple[str, ...],
    direction: str | None,
    mode: str | None,
    route: str | None,
) -> None:
    """Accept PEER's pairing request, optionally narrowed (options in this agent's
    view, as `pair pending` shows it)."""
    with state.open() as db:
        found = resolve_peer(db, peer)
        rule = _waiting_from(db, found)
        mine = _accept(db, rule, collections, direction, mode, route)
        db.store.add_peer(found.key, None, [], now_ms())
    notify(state)
    click.echo(f"paired with {output.safe(found.name or '')} ({short_id(found.key)}): "
               f"{mine.describe()}")


def _accept(
    db: Database, rule: Rule, collections: tuple[str, ...], direction: str | None,
    mode: str | None, route: str | None,
) -> Terms:
    """Accept ``rule`` with options given in the acceptor's view; returns the terms
    in that view."""
    mine = make_terms(collections, direction, mode, route, base=rule.proposed.flipped())
    pairing.accept(db, rule, mine.flipped())  # rules are signed in the proposer's view
    return mine


@pair.command(name="reject")
@click.argument("peer")
@click.option("--reason", required=True, help="Why (the requester sees it).")
@pass_state
def pair_reject(state: State, peer: str, reason: str) -> None:
    """Reject PEER's pairing request, saying why."""
    with state.open() as db:
        found = resolve_peer(db, peer)
        pairing.reject(db, _waiting_from(db, found), reason)
    notify(state)
    click.echo(f"rejected {output.safe(found.name or '')} ({short_id(found.key)}): {reason}")


@pair.command(name="remove")
@click.argument("peer")
@pass_state
def pair_remove(state: State, peer: str) -> None:
    """Stop syncing with PEER (its rules are revoked); its records stay."""
    with state.open() as db:
        found = resolve_peer(db, peer)
        for rule in db.store.rules(found.key):
            if rule.state in (RuleState.PROPOSED, RuleState.ACCEPTED):
                pairing.revoke(db, rule)
        db.store.set_peer_state(found.key, PeerState.REMOVED)
    notify(state)
    click.echo(
        f"removed {output.safe(found.name or '')} ({short_id(found.key)}); "
        "records it sent are kept"
    )


def _waiting_from(db: Database, peer: Peer) -> Rule:
    me = db.identity.public_key
    waiting = [
        r for r in db.store.rules(peer.key) if r.state is RuleState.PROPOSED and r.acceptor == me
    ]
    if not waiting:
        raise UsageError(f"{output.safe(peer.name or '?')} has no request waiting for an answer")
    if len(waiting) > 1:
        ids = ", ".join(r.id.hex()[:12] for r in waiting)
        raise UsageError(
            f"{output.safe(peer.name or '?')} has {len(waiting)} requests waiting ({ids}); "
            "see `p2psync pair "
            "pending` and answer one with `p2psync rule accept ID` or `rule reject ID`"
        )
    return waiting[0]


# ---------------------------------------------------------------- rule


@click.group()
def rule() -> None:
    """Sync rules with paired peers: propose, list, accept, reject, revoke."""


@rule.command(name="propose")
@click.argument("peer")
@rule_options()
@pass_state
def rule_propose(
    state: State,
    peer: str,
    collections: tuple[str, ...],
    direction: str | None,
    mode: str | None,
    route: str | None,
) -> None:
    """Propose another rule to PEER."""
    terms = make_terms(collections, direction, mode, route)
    with state.open() as db:
        found = resolve_peer(db, peer)
        pairing.propose(db, found.key, terms)
    notify(state)
    click.echo(f"proposed to {output.safe(found.name or '?')}: {terms.describe()}")


@rule.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def rule_list(state: State, as_json: bool) -> None:
    """Every rule with its state."""
    with state.open() as db:
        me = db.identity.public_key
        rows = [
            rule_row(me, r, {p.key: p.name for p in db.store.peers()}) for r in db.store.rules()
        ]
    if as_json:
        output.emit_json(rows)
        return
    if not rows:
        click.echo("no rules")
    for row in rows:
        who = output.safe(row["peer_name"] or row["peer"][:7])
        reason = f" ({output.safe(row['reason'])})" if row["reason"] else ""
        click.echo(f"{row['id'][:12]}  {who}  {row['state']}{reason}: {row['terms']}")


@rule.command(name="accept")
@click.argument("rule_id")
@rule_options(narrowing=True)
@pass_state
def rule_accept(
    state: State,
    rule_id: str,
    collections: tuple[str, ...],
    direction: str | None,
    mode: str | None,
    route: str | None,
) -> None:
    """Accept a proposed rule, optionally narrowed (options in this agent's view)."""
    with state.open() as db:
        found = resolve_rule(db, rule_id)
        mine = _accept(db, found, collections, direction, mode, route)
    notify(state)
    click.echo(f"accepted rule {found.id.hex()[:12]}: {mine.describe()}")


@rule.command(name="reject")
@click.argument("rule_id")
@click.option("--reason", required=True, help="Why (the proposer sees it).")
@pass_state
def rule_reject(state: State, rule_id: str, reason: str) -> None:
    """Reject a proposed rule."""
    with state.open() as db:
        found = resolve_rule(db, rule_id)
        pairing.reject(db, found, reason)
    notify(state)
    click.echo(f"rejected rule {found.id.hex()[:12]}: {reason}")


@rule.command(name="revoke")
@click.argument("rule_id")
@pass_state
def rule_revoke(state: State, rule_id: str) -> None:
    """Revoke a rule: flow under it stops on both sides."""
    with state.open() as db:
        found = resolve_rule(db, rule_id)
        pairing.revoke(db, found)
    notify(state)
    click.echo(f"revoked rule {found.id.hex()[:12]}")


def rule_row(me: bytes, rule: Rule, names: dict[bytes, str | None]) -> dict[str, Any]:
    peer = rule.acceptor if rule.proposer == me else rule.proposer
    return {
        "id": rule.id.hex(),
        "peer": device_id(peer),
        "peer_name": names.get(peer),
        "proposed_by": "you" if rule.proposer == me else "them",
        "awaiting": (
            None
            if rule.state is not RuleState.PROPOSED
            else "you"
            if rule.acceptor == me
            else "them"
        ),
        "state": rule.state.value,
        "reason": rule.reason,
        "terms": rule.terms_for(me).describe(),
        "collections": list(rule.terms.collections),
        "direction": rule.terms_for(me).direction.value,
        "mode": rule.terms.mode.value,
        "route": rule.terms.route.value,
    }


# ---------------------------------------------------------------- peers


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


def agent_status(state: State) -> dict[str, Any] | None:
    try:
        return sockets.request(state.home, {"op": "status"}, timeout=2)
    except (sockets.AgentNotRunning, OSError, ValueError):
        return None


def listen_hints(state: State) -> list[str]:
    """The running agent's listen addresses, usable by others (0.0.0.0 expanded)."""
    status = agent_status(state)
    if status is None:
        return []
    hints: list[str] = []
    for address in status.get("listen", []):
        host, port = parse_address(address)
        if host in ("0.0.0.0", "::"):
            hints.extend(f"{ip}:{port}" for ip in status.get("interfaces", []))
        else:
            hints.append(address)
    return hints


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match:
        raise UsageError(f"{text!r} is not a duration like 90s, 10m, 2h or 1d")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


COMMANDS = (pair, rule, peers)
