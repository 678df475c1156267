"""`p2psync rule`: propose, list, accept, reject, revoke."""

from __future__ import annotations

import click

from p2psync import pairing
from p2psync.cli import output
from p2psync.cli.context import State, home_option, pass_state
from p2psync.cli.lookup import (
    Discovered,
    discovered_agents,
    notify,
    resolve_peer,
    resolve_rule,
)
from p2psync.cli.terms import RuleOptions, accept_in_view, rule_options
from p2psync.core.identity import short_id
from p2psync.core.rules import RuleState
from p2psync.errors import StateError
from p2psync.store.peers import Peer
from p2psync.views.rules import rule_row, waiting_for_us


@click.group()
@home_option
def rule() -> None:
    """Sync rules with paired peers: propose, list, accept, reject, revoke."""


@rule.command(name="propose")
@click.argument("peer")
@rule_options()
@pass_state
def rule_propose(
    state: State,
    peer: str,
    options: RuleOptions,
) -> None:
    """Propose another rule to PEER: a known peer, or an agent the running agent
    found on the LAN (by device ID, its first characters, or name)."""
    terms = options.terms()
    with state.open() as db:
        found = resolve_peer(db, peer, lambda: discovered_agents(state))
        if isinstance(found, Discovered):  # it becomes known, reachable where it said
            result = pairing.propose(
                db, found.key, terms, name=found.name, addresses=found.addresses
            )
        else:
            result = pairing.propose(db, found.key, terms)
        known = db.store.peer(found.key)
        me = db.identity.public_key
    notify(state)
    assert known is not None
    say_proposal(result, known, me, "")


def say_proposal(result: pairing.Proposal, peer: Peer, me: bytes, own: str) -> None:
    """What `pair add` and `rule propose` did, in one or two lines."""
    rule = result.rule
    who = f"{output.safe(peer.name or '?')} ({short_id(peer.key)})"
    terms = f"{rule.terms_for(me).describe()} (rule {rule.id.hex()[:12]})"
    if rule.state is RuleState.ACCEPTED and result.new:
        click.echo(f"paired with {who}: {terms}; they had asked for this too")
    elif rule.state is RuleState.ACCEPTED:
        click.echo(f"already paired with {who} for: {terms}; nothing new proposed")
    elif not result.new:
        click.echo(f"already proposed to {who}: {terms}; waiting for their answer")
    else:
        where = f" at {', '.join(peer.addresses)}" if peer.addresses else " (no address yet)"
        click.echo(f"proposed to {who}{where}: {terms}")
        if own:
            click.echo(
                f"on that agent, run: p2psync pair add {own}  "
                f"(or: p2psync rule accept {rule.id.hex()[:12]})"
            )


@rule.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def rule_list(state: State, as_json: bool) -> None:
    """Every rule with its state; terms in this agent's view (send = this agent sends)."""
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
    options: RuleOptions,
) -> None:
    """Accept a proposed rule, optionally narrowed (options in this agent's view)."""
    with state.open() as db:
        found = waiting_for_us(db, resolve_rule(db, rule_id), "`p2psync rule list`")
        mine = accept_in_view(db, found, options)
    notify(state)
    click.echo(f"accepted rule {found.id.hex()[:12]}: {mine.describe()}")


@rule.command(name="reject")
@click.argument("rule_id")
@click.option("--reason", required=True, help="Why (the proposer sees it).")
@pass_state
def rule_reject(state: State, rule_id: str, reason: str) -> None:
    """Reject a proposed rule."""
    with state.open() as db:
        found = waiting_for_us(db, resolve_rule(db, rule_id), "`p2psync rule list`")
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
        if found.state is RuleState.REVOKED:
            raise StateError(f"rule {found.id.hex()[:12]} is already revoked")
        pairing.revoke(db, found)
    notify(state)
    click.echo(f"revoked rule {found.id.hex()[:12]}")


COMMANDS = (rule,)
