"""Agent commands: run, sync, status."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import click

from p2psync.agent.lock import agent_lock
from p2psync.cli import output
from p2psync.cli.context import State, pass_state
from p2psync.cli.lookup import resolve_peer
from p2psync.cli.terms import timeout_option
from p2psync.clock import now_ms
from p2psync.core.identity import device_id, parse_device_id, short_id
from p2psync.errors import AgentNotRunning, InvalidDeviceID, P2PSyncError, UsageError
from p2psync.net import agentsockets
from p2psync.net.address import parse_address

if TYPE_CHECKING:
    from p2psync.api import Database
    from p2psync.cli.relaysync import RelayOutcome
    from p2psync.net.oneshot import SyncOutcome

# trio, zeroconf and the agent are imported by the commands that use them (the
# agent's lock needs neither): a record command (`put`, `get`...) starts in half
# the time without them.

DEFAULT_LISTEN = "0.0.0.0:7717"
DEFAULT_HTTP = "127.0.0.1:7718"  # (p2psync.http.server's; not imported: see the top)


@click.command()
@click.option(
    "--listen",
    "listen",
    multiple=True,
    metavar="HOST:PORT",
    help=f"Address to listen on (repeatable; default {DEFAULT_LISTEN}; port 0 = any).",
)
@click.option("--no-discovery", is_flag=True, help="Do not use mDNS discovery.")
@click.option(
    "--discovery-interface",
    multiple=True,
    metavar="IP",
    help="Limit discovery to these interfaces (repeatable).",
)
@click.option(
    "--http",
    "http",
    metavar="HOST:PORT",
    help=f"Serve the HTTP API and web console here (default {DEFAULT_HTTP}: this machine "
    "only; port 0 = any). Every request needs the key in HOME/http.key.",
)
@click.option("--no-http", is_flag=True, help="Do not serve the HTTP API.")
@click.option(
    "--http-host",
    multiple=True,
    metavar="NAME",
    help="A host name the HTTP API answers to besides IP addresses and localhost "
    "(repeatable; others are refused against DNS rebinding).",
)
@click.option("--quiet", is_flag=True, help="Log warnings only.")
@pass_state
def run(
    state: State,
    listen: tuple[str, ...],
    no_discovery: bool,
    discovery_interface: tuple[str, ...],
    http: str | None,
    no_http: bool,
    http_host: tuple[str, ...],
    quiet: bool,
) -> None:
    """Run the agent in the foreground until SIGINT or SIGTERM."""
    from p2psync.agent.agent import Agent, AgentConfig, Service  # noqa: PLC0415
    from p2psync.cli.foreground import run_until_signal  # noqa: PLC0415
    if no_http and (http or http_host):
        raise UsageError("--no-http turns the HTTP API off: give it without --http/--http-host")
    try:
        addresses = [parse_address(a) for a in (listen or (DEFAULT_LISTEN,))]
        http_address = None if no_http else parse_address(http or DEFAULT_HTTP)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    services: list[Service] = []
    if http_address is not None:
        from p2psync.http.server import HttpService  # noqa: PLC0415 - see the top

        names = frozenset(name.strip().lower() for name in http_host if name.strip())
        services.append(HttpService(*http_address, allowed_hosts=names).serve)
    if not quiet and not state.debug:
        logging.getLogger("p2psync").setLevel(logging.INFO)
    with state.open() as db, agent_lock(db.path):
        config = AgentConfig(
            discovery=not no_discovery, discovery_interfaces=tuple(discovery_interface)
        )
        agent = Agent(db, addresses, config)

        run_until_signal(
            partial(agent.run, services=services),
            lambda: [f"HTTP API and console on {url}/" for url in agent.urls],
        )
    click.echo("stopped")


@click.command()
@click.argument("peer", required=False)
@click.option("--address", metavar="HOST:PORT", help="Dial this address (skips the agent).")
@timeout_option(60.0)
@pass_state
def sync(state: State, peer: str | None, address: str | None, timeout: float) -> None:
    """Sync now with PEER (or every paired peer); exit 0 once in step (through a
    relay: once what the peer lacks is left there; a signed receipt, seen in
    `p2psync peers`, says when it arrived).

    A peer out of direct reach whose rules allow the relay (route relay or auto)
    is synced through the first relay that admits this agent (`p2psync relay
    add`): what it lacks is left there, what waits for us is fetched and applied."""
    from p2psync.cli.relaysync import through_relay  # noqa: PLC0415 - see the note at the top

    outcomes, error = _sync_direct(state, peer, address, timeout)
    relayed: list[RelayOutcome] = []
    relay_error = None
    if address is None:
        with state.open() as db:
            missed = _relay_candidates(db, peer, outcomes)
            if missed or peer is None:  # with no peer named, collect what waits for us
                relayed, relay_error = through_relay(db, missed, timeout=timeout)
    done = {device_id(r.peer) for r in relayed}
    outcomes = [o for o in outcomes if o.synced or o.peer not in done]
    _warn_incomplete(state, outcomes)
    with state.open() as db:
        paired = bool(db.store.peers_in_force_modes())
    _report(outcomes, error, relayed, relay_error, paired=paired)


def _sync_direct(
    state: State, peer: str | None, address: str | None, timeout: float
) -> tuple[list[SyncOutcome], str | None]:
    import trio  # noqa: PLC0415 - see the note at the top

    from p2psync.net.oneshot import sync_once  # noqa: PLC0415

    if address is None:
        try:
            answer = agentsockets.request(
                state.home,
                {"op": "sync", "peer": _peer_id(state, peer), "timeout": timeout},
                timeout=timeout + 5,
            )
        except AgentNotRunning:
            pass
        except (OSError, ValueError) as exc:
            raise P2PSyncError(f"the running agent did not answer: {exc}") from exc
        else:
            return [_from_agent(r) for r in answer.get("peers", [])], answer.get("error")
    try:
        target = parse_address(address) if address else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with state.open() as db:
        db.store.expire_requests(db.identity.public_key, now_ms())  # no agent sweeps them
        keys = [resolve_peer(db, peer).key] if peer else None
        if keys and target is None and keys[0] not in db.store.peers_in_force_modes(direct=True):
            from p2psync.mail.mailer import Mailer  # noqa: PLC0415 - see the note at the top

            if keys[0] in Mailer(db).peers():
                return [], None  # its rules go only through the relay
        show = sys.stderr.isatty()

        def progress(who: bytes, received: int, total: int, sent: int) -> None:
            if show:
                click.echo(
                    f"\r{short_id(who)}: received {received}/"
                    f"{output.plural(total, 'entry', 'entries')}, sent {sent}",
                    err=True,
                    nl=False,
                )

        outcomes = trio.run(lambda: sync_once(db, keys, target, timeout=timeout, progress=progress))
        if show:
            click.echo("", err=True)
    return outcomes, None


def _relay_candidates(db: Database, peer: str | None, outcomes: list[SyncOutcome]) -> list[bytes]:
    """Peers to try through the relay: the one named (or every peer the relay
    carries anything for) that a direct sync did not get in step."""
    from p2psync.mail.mailer import Mailer  # noqa: PLC0415 - see the note at the top

    synced = {o.peer for o in outcomes if o.synced}
    keys = [resolve_peer(db, peer).key] if peer else sorted(Mailer(db).targets())
    return [k for k in keys if device_id(k) not in synced]


def _warn_incomplete(state: State, outcomes: list[SyncOutcome]) -> None:
    """In sync, but with changes that arrived without their contents by another path
    in collections these peers may send: say so (stderr), the sync still counts."""
    from p2psync import pairing  # noqa: PLC0415 - see the note at the top
    from p2psync.cli.peers import describe_incomplete  # noqa: PLC0415

    with state.open() as db:
        incomplete = db.store.incomplete()
        if not incomplete:
            return
        for outcome in outcomes:
            try:
                key = parse_device_id(outcome.peer)
            except InvalidDeviceID:
                continue
            allowed = pairing.permissions(db, key, live=False)
            missing = {c: n for c, n in incomplete.items() if allowed.may_receive(c)}
            if missing:
                click.echo(f"{_who(outcome)}: note: {describe_incomplete(missing)}", err=True)


def _peer_id(state: State, peer: str | None) -> str | None:
    if peer is None:
        return None
    with state.open() as db:
        return device_id(resolve_peer(db, peer).key)


def _from_agent(row: dict[str, Any]) -> SyncOutcome:
    from p2psync.net.oneshot import SyncOutcome  # noqa: PLC0415 - see the note at the top

    return SyncOutcome(
        row["device_id"], bool(row["synced"]), row.get("error"), 0, 0, name=row.get("name")
    )


def _who(outcome: SyncOutcome) -> str:
    """``name (SHORT-ID)`` for a peer, or the address dialled when it is not known."""
    try:
        short = short_id(parse_device_id(outcome.peer))
    except InvalidDeviceID:
        return output.safe(outcome.peer)
    return f"{output.safe(outcome.name)} ({short})" if outcome.name else short


def _report(
    outcomes: list[SyncOutcome],
    error: str | None,
    relayed: Sequence[RelayOutcome] = (),
    relay_error: str | None = None,
    *,
    paired: bool = True,
) -> None:
    """Say what the sync did, peer by peer; ``paired``: some rule is in force (else
    a sync that only collected from a relay is not a failure)."""
    synced_with = bool(outcomes) or any(not r.note for r in relayed)
    if error and not synced_with:
        raise P2PSyncError(error)
    if not synced_with and (paired or not relayed):
        for note in relayed:
            click.echo(note.line)
        if relay_error:
            raise P2PSyncError(f"no relay served this sync: {relay_error}")
        raise P2PSyncError("no paired peer with an address to sync with; see `p2psync peers`")
    for outcome in outcomes:
        who = _who(outcome)
        if outcome.synced:
            click.echo(f"{who}: in sync (received {outcome.received}, sent {outcome.sent})")
        else:
            click.echo(f"{who}: NOT in sync: {output.safe(outcome.error or '')}")
    for relayed_one in relayed:
        click.echo(relayed_one.line)
    if relay_error:
        click.echo(f"no relay served this sync: {output.safe(relay_error)}", err=True)
    failed = [o for o in outcomes if not o.synced] + [r for r in relayed if not r.ok]
    if failed:
        total = len(outcomes) + len(relayed)
        are = "is" if len(failed) == 1 else "are"
        raise P2PSyncError(f"{len(failed)} of {output.plural(total, 'peer')} {are} not in sync")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def status(state: State, as_json: bool) -> None:
    """Show the agent, its connections, per-peer lag and errors."""
    from p2psync.cli.delivery import describe_delivery  # noqa: PLC0415 - see the top
    from p2psync.cli.peers import (  # noqa: PLC0415 - see the top
        describe_incomplete,
        describe_link,
    )
    from p2psync.views.status import site_status  # noqa: PLC0415 - see the top

    try:
        running: dict[str, Any] | None = agentsockets.request(state.home, {"op": "status"}, 3)
    except (AgentNotRunning, OSError, ValueError):
        running = None
    with state.open() as db:
        document = site_status(db, running)
    me = {"device_id": document["device_id"], "name": document["name"]}
    store, rows = document["store"], document["peers"]
    if as_json:
        output.emit_json(document)
        return
    click.echo(f"{me['name']}  {me['device_id']}")
    if running is None:
        click.echo("agent: not running (start it with `p2psync run`)")
    else:
        click.echo(
            f"agent: running, pid {running['pid']}, listening on {', '.join(running['listen'])}"
        )
        for url in running.get("http") or []:
            click.echo(f"HTTP API and console: {url}/ (`p2psync console` for a login link)")
    click.echo(
        f"store: {output.plural(store['entries'], 'entry', 'entries')} from "
        f"{output.plural(store['authors'], 'author')}, "
        f"{output.plural(store['conflicts'], 'conflict')}, {store['held']} held, "
        f"last change {store['last_change']} (`p2psync watch --since N`)"
    )
    for hurt in store["damaged"]:
        click.echo(
            f"store: entry {hurt['seq']} of {hurt['author']} is damaged here and waits for a "
            f"sound copy from a peer; until then entries {hurt['seq']}-{hurt['held_to']} of "
            f"{hurt['author']} are not sent (`p2psync verify`)"
        )
    connections = {
        c["device_id"]: c
        for c in (running or {}).get("connections", [])
        if c.get("kind") == "live"
    }
    for row in rows:
        line = f"  {output.safe(row['name'] or row['device_id'][:7])}: {describe_link(row)}"
        conn = connections.get(row["device_id"])
        if conn is not None:
            line += (
                f" ({conn['direction']}, {conn['address']}; sent {conn['entries_sent']}, "
                f"received {conn['entries_received']})"
            )
        click.echo(output.safe(line))
        when = output.describe_hlc(row["last_sync"] << 16) if row["last_sync"] else "never"
        extra = f"    last in sync: {when}"
        if not row["connected"] and row["problem"]:
            extra += f"; last error: {output.safe(row['problem'])}"
        click.echo(extra)
        if row["incomplete"]:
            click.echo(f"    note: {output.safe(describe_incomplete(row['incomplete']))}")
        for line in describe_delivery(row["delivery"]) if row["delivery"] else ():
            click.echo(f"    {line}")
    link = (running or {}).get("relay")
    if link and link.get("relay"):
        click.echo(f"relay: connected to {link['relay']} at {link['address']}")
    elif link and link.get("error"):
        click.echo(f"relay: not connected: {output.safe(link['error'])}")


@click.command()
@click.option("--keep", is_flag=True, help="Keep the demo's homes (their path is printed).")
def demo(keep: bool) -> None:
    """Three agents on this machine: live sync, a conflict, catching up."""
    from p2psync import demo as demo_mod  # noqa: PLC0415 - only this command needs it

    bold = sys.stdout.isatty()

    def say(text: str) -> None:
        click.echo("")
        click.secho(f"== {text}", bold=bold)

    def shell(text: str) -> None:
        click.echo(f"   {text}")

    started = time.monotonic()
    demo_mod.run(say, shell, keep=keep)
    click.echo(f"\n(the demo took {time.monotonic() - started:.0f} s)")


COMMANDS = (run, sync, status, demo)
