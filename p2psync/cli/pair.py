"""`p2psync pair`: add, invite, invites, uninvite, join, pending, accept, reject,
remove."""

from __future__ import annotations

import functools
import ipaddress
from collections import Counter
from typing import Any

import click

from p2psync import pairing
from p2psync.api import Database
from p2psync.cli import output
from p2psync.cli.context import State, home_option, pass_state
from p2psync.cli.lookup import (
    Discovered,
    agent_status,
    discovered_agents,
    listen_hints,
    notify,
    resolve_invite,
    resolve_peer,
)
from p2psync.cli.rule import say_proposal
from p2psync.cli.terms import (
    RuleOptions,
    accept_in_view,
    parse_duration,
    rule_options,
    timeout_option,
)
from p2psync.clock import now_ms
from p2psync.core.identity import device_id, parse_device_id, short_id
from p2psync.core.rules import Route, Rule, RuleState
from p2psync.errors import (
    InvalidDeviceID,
    NotFoundError,
    P2PSyncError,
    StateError,
    UsageError,
)
from p2psync.net.address import parse_address
from p2psync.store.peers import Peer, PeerState
from p2psync.store.rules import MAX_STRANGERS, Invite
from p2psync.views.rules import pending


@click.group()
@home_option
def pair() -> None:
    """Pair with other agents: add, invite, join, pending, accept, reject, remove."""


@pair.command(name="add")
@click.argument("peer")
@click.option(
    "--address",
    "addresses",
    multiple=True,
    metavar="HOST:PORT",
    help="Where the peer listens (repeatable).",
)
@click.option("--name", help="A name for the peer (default: its short ID).")
@click.option(
    "--relay",
    "relay",
    metavar="RELAY_ID",
    help="Leave the request at this relay now (one of `p2psync relay list`, or the "
    "first characters of its ID), for a peer that is offline or out of reach.",
)
@rule_options()
@pass_state
def pair_add(
    state: State,
    peer: str,
    addresses: tuple[str, ...],
    name: str | None,
    relay: str | None,
    options: RuleOptions,
) -> None:
    """Ask PEER to pair, proposing a sync rule; nothing flows until it accepts (or
    has added this agent too). PEER: a device ID, or the name or first characters
    of an agent `p2psync peers` lists (a known peer, or one found on the LAN).

    With --relay (or later, by the running agent or `p2psync sync`, when the rule's
    route is relay or auto) the request goes through a relay, sealed to PEER; its
    answer comes back the same way."""
    for address in addresses:
        try:
            parse_address(address)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    terms = options.terms()
    if relay is not None and terms.route is Route.DIRECT:
        raise UsageError("--relay: this rule's route is direct; give --route relay or auto")
    with state.open() as db:
        via = _relay_named(db, relay) if relay is not None else None
        try:
            key = parse_device_id(peer)
        except InvalidDeviceID:
            try:
                found = resolve_peer(db, peer, lambda: discovered_agents(state))
            except NotFoundError:
                if agent_status(state) is not None:
                    raise
                raise NotFoundError(
                    f"no peer called {peer!r}, and the agent is not running, so agents on "
                    "the LAN are not listed: start it (p2psync run) or give the device ID"
                ) from None
            key = found.key
            if isinstance(found, Discovered):  # reachable where it said, until proven
                addresses = (*addresses, *found.addresses)
                name = name or found.name
        known = db.store.peer(key)
        default = None if known is not None and known.name else short_id(key)
        result = pairing.propose(db, key, terms, name=name or default, addresses=addresses)
        added = db.store.peer(key)
        own = db.device_id
        me = db.identity.public_key
    notify(state)
    assert added is not None
    say_proposal(result, added, me, own)
    if via is not None:
        _leave_at_relay(state, key, via)


def _relay_named(db: Database, relay: str) -> bytes:
    from p2psync.cli.relays import relay_named  # noqa: PLC0415

    try:
        return relay_named(db, relay)
    except NotFoundError as exc:
        raise NotFoundError(f"--relay: {exc}") from None


def _leave_at_relay(state: State, key: bytes, relay: bytes) -> None:
    from p2psync.cli.relaysync import through_relay  # noqa: PLC0415 - trio only here

    with state.open() as db:
        outcomes, error = through_relay(db, [key], timeout=30.0, first=relay)
    if error:
        raise P2PSyncError(f"the request could not be left at a relay: {error}")
    for outcome in outcomes:
        click.echo(outcome.line)


@pair.command(name="invite")
@rule_options()
@click.option(
    "--expires",
    default=None,
    help="How long the code works: 10s to 30d, e.g. 90s, 10m, 2h, 1d "
    "(default: 10m; 7d with --relay).",
)
@click.option(
    "--address",
    "addresses",
    multiple=True,
    metavar="HOST:PORT",
    help="Where joiners reach this agent (default: its listen addresses).",
)
@click.option(
    "--relay",
    metavar="RELAY_ID",
    help="A relay of this agent's (`relay list`) where a joiner may leave its request "
    "while this agent is offline; the rule's route must be relay or auto.",
)
@pass_state
def pair_invite(
    state: State,
    options: RuleOptions,
    expires: str | None,
    addresses: tuple[str, ...],
    relay: str | None,
) -> None:
    """Print a one-time code that pairs another agent with this rule (code on the last
    line). `pair invites` lists the codes made, `pair uninvite ID` withdraws one.

    With --relay the code also names the relay: a joiner that cannot reach this agent
    leaves its request there, and the pairing completes when this agent next
    collects from the relay (while it runs, or at `p2psync sync`) and the joiner
    collects the answer."""
    expires = expires or ("7d" if relay is not None else "10m")
    seconds = parse_duration(expires, "--expires")
    if not INVITE_SECONDS[0] <= seconds <= INVITE_SECONDS[1]:
        raise UsageError(
            f"--expires {expires}: an invite code works for 10s to 30d (e.g. --expires 10m)"
        )
    terms = options.terms()
    if relay is not None and terms.route is Route.DIRECT:
        raise UsageError("--relay: this rule's route is direct; give --route relay or auto")
    hints = list(addresses) or listen_hints(state)
    if not hints and relay is None:
        raise StateError(
            "no address to put in the code: start the agent (p2psync run), give --address, "
            "or --relay RELAY_ID"
        )
    with state.open() as db:
        via = _invite_relay(db, relay) if relay is not None else None
        code = pairing.create_invite(db, terms, seconds, hints, relay=via)
    parsed = pairing.parse_invite(code)
    invite = parsed.invite.hex()
    reach = [f"reaches this agent at {', '.join(parsed.addresses)}"] if parsed.addresses else []
    if parsed.relay is not None:
        reach.append(f"or through relay {short_id(parsed.relay[0])}")
    click.echo(
        f"invite {invite} for: {terms.describe()}; works once, for {expires}; "
        f"{' '.join(reach)}"
    )
    click.echo(f"to withdraw it: p2psync pair uninvite {invite}")
    click.echo("on the other agent, run: p2psync pair join CODE")
    click.echo(code)


def _invite_relay(db: Database, text: str) -> tuple[bytes, list[str]]:
    """The relay named for an invite code, with the addresses a joiner may dial (IP
    addresses only fit in a code)."""
    from p2psync.store import relays as relays_mod  # noqa: PLC0415

    key = _relay_named(db, text)
    (relay,) = [r for r in relays_mod.load(db.store) if r.key == key]
    packed = []
    for address in relay.addresses:
        try:
            ipaddress.ip_address(parse_address(address)[0])
        except ValueError:
            continue
        packed.append(address)
    if not packed:
        raise UsageError(
            f"--relay: relay {short_id(key)} has no IP address to put in a code "
            f"({', '.join(relay.addresses)}); joiners would need `relay add` first. Add "
            "its IP address: p2psync relay add RELAY_ID --address IP:PORT"
        )
    return key, packed


#: Shortest and longest life of an invite code, in seconds.
INVITE_SECONDS = (10, 30 * 86400)


@pair.command(name="invites")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def pair_invites(state: State, as_json: bool) -> None:
    """Invite codes this agent made: terms (this agent's view), expiry, and whether
    they are open, used (by whom), expired or withdrawn."""
    with state.open() as db:
        names = {p.key: p.name for p in db.store.peers()}
        rows = [invite_row(i, names, now_ms()) for i in db.store.invites()]
    if as_json:
        output.emit_json(rows)
        return
    if not rows:
        click.echo("no invites")
    for row in rows:
        if row["state"] == "used":
            who = output.safe(row["used_by_name"] or row["used_by"][:7])
            status = f"used by {who} ({row['used_by'][:7]})"
        elif row["state"] == "withdrawn":
            status = f"withdrawn {output.describe_ms(row['withdrawn'])}"
        elif row["state"] == "expired":
            status = f"expired {output.describe_ms(row['expires'])}"
        else:
            status = f"open until {output.describe_ms(row['expires'])}"
        click.echo(f"{row['id']}  {status}: {row['terms']}")


def invite_row(invite: Invite, names: dict[bytes, str | None], now: int) -> dict[str, Any]:
    if invite.withdrawn is not None:
        state = "withdrawn"
    elif invite.used_by is not None:
        state = "used"
    elif invite.expires < now:
        state = "expired"
    else:
        state = "open"
    return {
        "id": invite.id.hex(),
        "state": state,
        "terms": invite.terms.describe(),
        "collections": list(invite.terms.collections),
        "direction": invite.terms.direction.value,
        "mode": invite.terms.mode.value,
        "route": invite.terms.route.value,
        "created": invite.created,
        "expires": invite.expires,
        "used_by": device_id(invite.used_by) if invite.used_by else None,
        "used_by_name": names.get(invite.used_by) if invite.used_by else None,
        "withdrawn": invite.withdrawn,
    }


@pair.command(name="uninvite")
@click.argument("invite_id", metavar="ID")
@pass_state
def pair_uninvite(state: State, invite_id: str) -> None:
    """Withdraw an unused invite (ID from `pair invites`, or its first characters):
    its code works no more."""
    with state.open() as db:
        found = resolve_invite(db, invite_id)
        pairing.withdraw_invite(db, found.id)
    click.echo(f"withdrew invite {found.id.hex()}: its code works no more")


@pair.command(name="unjoin")
@click.argument("invite_id", metavar="ID")
@pass_state
def pair_unjoin(state: State, invite_id: str) -> None:
    """Forget a join of an invite code through a relay (ID from `pair pending`, or
    its first characters): refused, expired, or no longer wanted. A proposal the
    inviter makes for it later then waits in `pair pending` like any request."""
    wanted = invite_id.strip().lower()
    with state.open() as db:
        found = [j for j in db.store.relay_joins() if j.invite.hex().startswith(wanted)]
        if not wanted or not found:
            raise NotFoundError(
                f"no join of an invite {output.safe(invite_id)} (see `p2psync pair pending`)"
            )
        if len(found) > 1:
            raise UsageError(f"{output.safe(invite_id)} names several joins: give more of the ID")
        (join,) = found
        db.store.drop_relay_join(join.inviter, join.invite)
    click.echo(f"forgot your join of invite {join.invite.hex()}")


@pair.command(name="join")
@click.argument("code")
@click.option("--name", help="A name for the inviting peer (default: the name it gives).")
@timeout_option(30.0)
@pass_state
def pair_join(state: State, code: str, name: str | None, timeout: float) -> None:
    """Pair with the agent that printed CODE (no further approval), then sync once.

    Works whether this agent runs or not. A code the inviter refuses (used, expired,
    withdrawn) changes nothing here. When the code names a relay and the inviter
    cannot be reached, the request is left at the relay: the pairing completes when
    the inviter collects it and this agent collects the answer (`p2psync run`, or
    `p2psync sync`)."""
    invite = pairing.parse_invite(code)
    if invite.expires < now_ms():
        raise P2PSyncError("this invite code has expired; ask the inviter for a new one")
    with state.open() as db:
        if invite.inviter == db.identity.public_key:
            raise StateError(
                "this code was made by this agent; run `p2psync pair join CODE` on the other one"
            )
        known = db.store.peer(invite.inviter)
        addresses = [*invite.addresses, *(known.addresses if known else ())]
        import trio  # noqa: PLC0415 - a record command starts faster without trio

        from p2psync.net.oneshot import join_once  # noqa: PLC0415

        ticket = pairing.JoinTicket.of(invite)
        dial = list(dict.fromkeys(addresses))
        if not dial and invite.relay is not None:
            _join_through_relay(state, db, invite, name, timeout, why="")
            return
        outcome = trio.run(functools.partial(join_once, db, ticket, dial, timeout=timeout))
        if (
            outcome.rule is None
            and not outcome.reached
            and not outcome.refused
            and invite.relay is not None
        ):
            _join_through_relay(state, db, invite, name, timeout, why=outcome.error or "")
            return
        if outcome.rule is not None:
            db.store.add_peer(invite.inviter, name, list(invite.addresses), now_ms())
        peer = db.store.peer(invite.inviter)
        me = db.identity.public_key
    short = short_id(invite.inviter)
    known_as = name or (peer.name if peer is not None else None)
    who = f"{output.safe(known_as)} ({short})" if known_as else short
    if outcome.rule is None:
        if outcome.refused:
            advice = "; ask the inviter for a new code"
        elif outcome.reached:
            advice = ""
        else:
            advice = (
                f"; check that the inviter's agent runs (p2psync run) and that this machine "
                f"can reach {', '.join(invite.addresses) or 'it'}"
            )
        raise P2PSyncError(
            f"pairing with {who} failed: {output.safe(outcome.error or 'no answer')}{advice}"
        )
    notify(state)
    rule = outcome.rule
    terms = rule.terms_for(me).describe()
    if outcome.already:
        click.echo(
            f"already paired with {who} for: {terms} (rule {rule.id.hex()[:12]}); nothing new"
        )
        return
    sync = outcome.sync
    if not outcome.confirmed or sync is None:  # we accepted; the inviter may not know yet
        raise P2PSyncError(
            f"accepted {who}'s rule {rule.id.hex()[:12]} ({terms}), but {who} has not "
            f"confirmed it: {output.safe((sync.error if sync else None) or 'no answer')}; "
            f"the pairing completes when the two agents next connect "
            f"(or run `p2psync sync {short_id(invite.inviter)}`)"
        )
    click.echo(f"paired with {who}: {terms} (rule {rule.id.hex()[:12]})")
    if not sync.synced:  # confirmed, but its rules go only through a relay
        click.echo("its rules go only through a relay: see `p2psync relay list`")
        return
    click.echo(f"in sync (received {sync.received}, sent {sync.sent})")


def _join_through_relay(
    state: State,
    db: Database,
    invite: pairing.InviteCode,
    name: str | None,
    timeout: float,
    why: str,
) -> None:
    """Leave the join at the relay the code names (added to this agent's relays if
    new) and say what happens next."""
    from p2psync.cli.relaysync import through_relay  # noqa: PLC0415 - trio only here
    from p2psync.store import relays as relays_mod  # noqa: PLC0415

    assert invite.relay is not None
    key, addresses = invite.relay
    mine = next((r for r in relays_mod.load(db.store) if r.key == key), None)
    if mine is None:
        if not addresses:
            raise StateError(
                f"the code names relay {short_id(key)} without an address; add it first: "
                "p2psync relay add RELAY_ID --address HOST:PORT"
            )
        relays_mod.put(db.store, relays_mod.Relay(key, addresses))
        click.echo(f"added relay {short_id(key)} at {', '.join(addresses)} (from the code)")
    pairing.leave_join(db, invite, key)
    if name is not None or db.store.peer(invite.inviter) is None:
        db.store.add_peer(invite.inviter, name, [], now_ms())
    who = short_id(invite.inviter)
    if why:
        click.echo(f"{who} not reachable directly ({output.safe(why)}); trying the relay")
    notify(state)
    outcomes, error = through_relay(db, [invite.inviter], timeout=timeout, first=key)
    left = [o for o in outcomes if o.peer == invite.inviter and o.ok and "left at" in o.line]
    if not left:
        problem = error or "; ".join(o.line for o in outcomes) or "no relay answered"
        raise P2PSyncError(
            f"the join request for {who} is not at relay {short_id(key)} yet: "
            f"{output.safe(problem)}; it goes when the relay admits this agent "
            f"(device ID {device_id(db.identity.public_key)}: ask the relay's operator), "
            "while `p2psync run` runs, or at `p2psync sync`"
        )
    click.echo(
        f"join request for {who} left at relay {short_id(key)}; the pairing completes when "
        f"{who} collects it (its agent running, or `p2psync sync` there) and this agent "
        "collects the answer (`p2psync run`, or `p2psync sync`); `p2psync pair pending` "
        "shows it waiting"
    )


@pair.command(name="pending")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def pair_pending(state: State, as_json: bool) -> None:
    """Pairing requests and rule proposals waiting for an answer, and invite codes
    joined through a relay waiting for the inviter."""
    with state.open() as db:
        rows, joined, strangers = pending(db)
    if as_json:
        output.emit_json(rows + joined)
        return
    if not rows and not joined:
        click.echo("nothing pending")
    for join in joined:
        who = output.safe(join["peer_name"] or join["peer"][:7])
        relay = join["relay"][:7]
        if join["refused"] is not None:
            click.echo(
                f"{who} refused your join of its invite {join['invite']}: "
                f"{output.safe(join['refused'])}; ask for a new code "
                f"(`p2psync pair unjoin {join['invite']}` clears this)"
            )
        elif join["expired"]:
            click.echo(
                f"your join of {who}'s invite {join['invite']} (left at relay {relay}) was "
                "not answered before the code expired; ask for a new code "
                f"(`p2psync pair unjoin {join['invite']}` clears this)"
            )
        else:
            click.echo(
                f"you joined {who}'s invite {join['invite']} through relay {relay}; waiting "
                f"for {who} to collect it (the code works until "
                f"{output.short_time(join['expires'])})"
            )
    asking = Counter(row["peer"] for row in rows if row["awaiting"] == "you")
    for row in rows:
        who = output.safe(row["peer_name"] or row["peer"][:7])
        if row["awaiting"] == "you":
            click.echo(f"{who} asks: {row['terms']}  (rule {row['id'][:12]})")
            if asking[row["peer"]] > 1:  # `pair accept PEER` would not know which
                click.echo(
                    f"    p2psync rule accept {row['id'][:12]}   or   "
                    f"p2psync rule reject {row['id'][:12]} --reason TEXT"
                )
            else:
                click.echo(
                    f"    p2psync pair accept {row['peer'][:7]}   or   "
                    f"p2psync pair reject {row['peer'][:7]} --reason TEXT"
                )
        else:
            click.echo(
                f"you asked {who}: {row['terms']}  (rule {row['id'][:12]}); "
                "waiting for their answer"
            )
    if strangers >= MAX_STRANGERS:
        click.echo(
            f"{strangers} agents not paired with you have requests waiting: the most this "
            "agent keeps; requests from others are refused until you answer or reject some"
        )
    if strangers > 2:
        click.echo(
            "reject every request from agents not paired with you (nor asked by you) with "
            "`p2psync pair reject --all-pending --reason TEXT`; such requests are "
            "forgotten 7 days after they first came, answered or not"
        )


@pair.command(name="accept")
@click.argument("peer")
@rule_options(narrowing=True)
@pass_state
def pair_accept(
    state: State,
    peer: str,
    options: RuleOptions,
) -> None:
    """Accept PEER's pairing request, optionally narrowed (options in this agent's
    view, as `pair pending` shows it)."""
    with state.open() as db:
        found = resolve_peer(db, peer)
        rule = _waiting_from(db, found)
        mine = accept_in_view(db, rule, options)
        db.store.add_peer(found.key, None, [], now_ms())
    notify(state)
    click.echo(
        f"paired with {output.safe(found.name or '')} ({short_id(found.key)}): {mine.describe()}"
    )


@pair.command(name="reject")
@click.argument("peer", required=False)
@click.option("--reason", required=True, help="Why (the requester sees it).")
@click.option(
    "--all-pending",
    is_flag=True,
    help="Reject every pairing request from agents not paired with this one and not "
    "asked by it (proposals from paired or asked peers stay for `rule accept`/`rule reject`).",
)
@pass_state
def pair_reject(state: State, peer: str | None, reason: str, all_pending: bool) -> None:
    """Reject PEER's pairing request (or, with --all-pending, every one), saying why."""
    if (peer is None) == (not all_pending):
        raise UsageError("give either PEER or --all-pending")
    with state.open() as db:
        if all_pending:
            rejected, kept = pairing.reject_strangers(db, reason)
            names = {p.key: p.name for p in db.store.peers()}
        else:
            found = resolve_peer(db, peer or "")
            pairing.reject(db, _waiting_from(db, found), reason)
    notify(state)
    if not all_pending:
        click.echo(f"rejected {output.safe(found.name or '')} ({short_id(found.key)}): "
                   f"{output.safe(reason)}")
        return
    for rule in rejected:
        who = names.get(rule.proposer) or ""
        click.echo(f"rejected {output.safe(who)} ({short_id(rule.proposer)}): {rule.id.hex()[:12]}")
    click.echo(f"{output.count(len(rejected), 'pairing request')} rejected: {output.safe(reason)}")
    if kept:
        click.echo(
            f"{output.count(kept, 'proposal')} from paired peers, or peers you asked, left for "
            "`p2psync rule accept ID` or `p2psync rule reject ID --reason TEXT`"
        )


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
        f"removed {output.safe(found.name or '')} ({short_id(found.key)}); records it sent are kept"
    )


def _waiting_from(db: Database, peer: Peer) -> Rule:
    me = db.identity.public_key
    waiting = [
        r for r in db.store.rules(peer.key) if r.state is RuleState.PROPOSED and r.acceptor == me
    ]
    if not waiting:
        raise StateError(f"{output.safe(peer.name or '?')} has no request waiting for an answer")
    if len(waiting) > 1:
        ids = ", ".join(r.id.hex()[:12] for r in waiting)
        raise StateError(
            f"{output.safe(peer.name or '?')} has {len(waiting)} requests waiting ({ids}); "
            "answer each with `p2psync rule accept ID` or "
            "`p2psync rule reject ID --reason TEXT` (see `p2psync pair pending`)"
        )
    return waiting[0]


COMMANDS = (pair,)
