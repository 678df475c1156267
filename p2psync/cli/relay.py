"""`p2psync relay ...`: run a relay node, and choose the relays an agent uses.

A relay node's commands (``init``, ``serve``, ``status``, ``allow``, ``deny``,
``token``, ``purge``) act on a *relay* home: ``--home`` when given, else
``$P2PSYNC_RELAY_HOME``, else ``~/.local/share/p2psync-relay``. The agent's
commands (``add``, ``list``, ``remove``, in ``cli/relays.py``) act on the
agent's home as every other command does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
from typing import Any

import click

from p2psync.cli import output
from p2psync.cli.context import State, pass_relay_state
from p2psync.cli.relays import AGENT_COMMANDS
from p2psync.cli.terms import parse_duration
from p2psync.clock import now_ms
from p2psync.core.identity import device_id, parse_device_id, short_id
from p2psync.core.relaywire import parse_token
from p2psync.errors import UsageError
from p2psync.net.address import parse_address
from p2psync.relay import home as relay_home
from p2psync.relay.admission import Admission

DEFAULT_LISTEN = "0.0.0.0:7718"


def _home(state: State) -> relay_home.RelayHome:
    return relay_home.load(relay_home.resolve(state.home_arg))


def _admission(home: relay_home.RelayHome) -> Admission:
    """The home's admission list (its file, or the database the nodes share)."""
    from p2psync.relay.backend import open_admission  # noqa: PLC0415

    return open_admission(home)


STORE_HELP = (
    "Where the mailbox (and, on PostgreSQL, the admission list) lives: sqlite (the "
    "default: a file in the home), a postgresql://... URI, postgresql:KEY=VALUE... "
    "(a libpq connection string), or postgresql (the PG* environment variables)."
)


@click.group(name="relay")
def relay() -> None:
    """Run a relay node (init, serve, status, allow, deny, token, purge), or
    choose the relays this agent uses (add, list, remove)."""


@relay.command(name="init")
@click.option("--name", help="Display name of this relay (default: derived from its ID).")
@click.option("--store", "store_arg", metavar="STORE", help=STORE_HELP)
@click.option(
    "--node-of",
    "node_of",
    metavar="HOME",
    type=click.Path(file_okay=False),
    help="Make this home another node of the relay in HOME (same identity, settings "
    "and PostgreSQL store) instead of a new relay.",
)
@pass_relay_state
def init(state: State, name: str | None, store_arg: str | None, node_of: str | None) -> None:
    """Create a relay home with a new identity; prints the relay's device ID first."""
    from pathlib import Path  # noqa: PLC0415

    from p2psync.relay.backend import parse_store, shown  # noqa: PLC0415

    store = parse_store(store_arg) if store_arg is not None else None
    like = Path(node_of).expanduser() if node_of is not None else None
    target = store if store is not None or like is None else relay_home.load(like).store
    if target is not None:  # reach the database (and make its tables) before the home
        from p2psync.store.pgmailbox import PgMailbox  # noqa: PLC0415

        PgMailbox(target, connections=1).close()
    created = relay_home.init(relay_home.resolve(state.home_arg), name, store=store, like=like)
    click.echo(created.identity.device_id)
    what = "another node of relay" if like is not None else "relay"
    click.echo(
        f"initialised {what} {created.name!r} at {created.path}, mailbox in "
        f"{shown(created.store)}"
    )
    home = f" --home {shlex.quote(state.home_arg)}" if state.home_arg else ""
    click.echo(
        f"admit agents with `p2psync relay allow{home} DEVICE_ID` or "
        f"`p2psync relay token create{home}`, then run `p2psync relay serve{home}`"
    )


@relay.command(name="serve")
@click.option(
    "--listen",
    "listen",
    metavar="HOST:PORT",
    multiple=True,
    help=f"Address to listen on (repeatable; default {DEFAULT_LISTEN}; port 0 picks one).",
)
@click.option(
    "--advertise",
    metavar="HOST:PORT",
    multiple=True,
    help="Address agents reach this node at, told to the other nodes of the relay "
    "(repeatable; default: the listen addresses).",
)
@click.option("--store", "store_arg", metavar="STORE", help=STORE_HELP)
@click.option("--quiet", is_flag=True, help="Log warnings only.")
@pass_relay_state
def serve(
    state: State,
    listen: tuple[str, ...],
    advertise: tuple[str, ...],
    store_arg: str | None,
    quiet: bool,
) -> None:
    """Run the relay in the foreground until SIGINT or SIGTERM."""
    from p2psync.cli.foreground import run_until_signal  # noqa: PLC0415 - trio only here
    from p2psync.relay.backend import parse_store, shown  # noqa: PLC0415
    from p2psync.relay.lock import serve_lock  # noqa: PLC0415
    from p2psync.relay.node import Node  # noqa: PLC0415

    try:
        addresses = [parse_address(a) for a in (listen or (DEFAULT_LISTEN,))]
        for a in advertise:
            parse_address(a)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not quiet and not state.debug:
        logging.getLogger("p2psync").setLevel(logging.INFO)
    home = _home(state)
    switching = False
    if store_arg is not None:
        store = parse_store(store_arg)
        if store != home.store and home.store is not None:
            raise UsageError(
                f"this relay's mailbox is in {shown(home.store)} (relay.json); a node "
                "cannot move it (edit relay.json if the database is reached another way)"
            )
        if store != home.store:
            _check_sqlite_empty(home)
            switching = True
            home = dataclasses.replace(home, store=store)
    with serve_lock(home.path):
        node = Node(home, addresses, list(advertise))  # reaches the database first
        if switching and home.store is not None:  # so allow, deny, status act there too
            try:
                home = relay_home.set_store(home, home.store)
            except BaseException:
                node.close()
                raise

        try:
            run_until_signal(node.run)
        finally:
            node.close()
    click.echo("stopped")


def _check_sqlite_empty(home: relay_home.RelayHome) -> None:
    """Moving a relay to PostgreSQL leaves its SQLite mailbox behind: refused while
    that still holds envelopes (their senders would wait for ever)."""
    if not home.mailbox_path.exists():
        return
    from p2psync.store.mailbox import SqliteMailbox  # noqa: PLC0415

    mailbox = SqliteMailbox(home.mailbox_path, home.limits)
    try:
        held = mailbox.summary(now_ms()).envelopes
    finally:
        mailbox.close()
    if held:
        raise UsageError(
            f"this relay's SQLite mailbox still holds {output.count(held, 'envelope')}, "
            "which a PostgreSQL store would not have; serve it on SQLite until it is "
            "empty (or `relay purge` the mailboxes), then move"
        )


@relay.command(name="status")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_relay_state
def status(state: State, as_json: bool) -> None:
    """Sessions, mailboxes, envelopes, bytes, oldest expiry and quota use."""
    from p2psync.relay.status import relay_status  # noqa: PLC0415

    document = relay_status(_home(state))
    if as_json:
        output.emit_json(document)
        return
    for line in _status_lines(document):
        click.echo(line)


def _status_lines(d: dict[str, Any]) -> list[str]:
    lines = [f"relay {d['name']!r} {d['device_id']}", f"mailbox store: {d['store']}"]
    if "error" in d:  # the database is away
        lines.append(f"cannot reach the mailbox store: {d['error']}")
        running = d["running"]
        lines.append(
            "serve: not running" if running is None
            else f"serve: running, pid {running['pid']}, listening on "
            f"{', '.join(running['listen'])}, {len(running['sessions'])} sessions"
        )
        return lines
    if d["backend"] == "postgresql":
        lines.append(f"relay nodes on this database: {len(d['nodes'])}")
        for n in d["nodes"]:
            lines.append(
                f"  {n['name']} node {n['node']} on {n['host']} pid {n['pid']}, at "
                f"{', '.join(n['addresses']) or '?'}, seen {n['seen_ms_ago'] / 1000:.0f} s ago"
            )
        lines.extend(_replication_lines(d["replication"]))
    running = d["running"]
    if running is None:
        lines.append("serve: not running")
    else:
        lines.append(
            f"serve: running, pid {running['pid']}, listening on {', '.join(running['listen'])}"
        )
        sessions = running["sessions"]
        lines.append(
            f"sessions: {len(sessions)} ({running['half_open']} connecting; "
            f"{running['counters']['refused']} refused, "
            f"{running['half_open_evicted']} half-open evicted since start)"
        )
        for s in sessions:
            lines.append(
                f"  {s['short_id']} from {s['address']} since {output.short_time(s['since'])}: "
                f"{s['deposits']} deposits, {s['fetched']} fetched, "
                f"{s['bytes_in']:,} bytes in, {s['bytes_out']:,} out"
            )
        splices = running.get("splices", [])
        lines.append(f"live splices: {len(splices)}")
        for live in splices:
            lines.append(
                f"  {live['asker']} <-> {live['target']} since "
                f"{output.short_time(live['since'])}: {live['bytes_to_target']:,} bytes one "
                f"way, {live['bytes_to_asker']:,} the other"
            )
    m = d["mailbox"]
    oldest = (
        ""
        if m["oldest_until"] is None
        else (f", oldest expires {output.short_time(m['oldest_until'])}")
    )
    lines.append(
        f"mailboxes: {m['mailboxes']} holding {output.count(m['envelopes'], 'envelope')}, "
        f"{m['bytes']:,} bytes{oldest}"
    )
    q = d["quota"]
    lines.append(
        f"fullest mailbox: {q['count']:,} of {q['count_limit']:,} envelopes, "
        f"{q['bytes']:,} of {q['bytes_limit']:,} bytes"
    )
    lines.append(f"expiry notices waiting: {m['notices']}")
    lines.append(f"admitted devices: {len(d['admitted'])}; usable tokens: {d['tokens']}")
    for row in d["admitted"]:
        lines.append(
            f"  {row['device_id']}  since {output.short_time(row['since'])} ({row['how']})"
        )
    return lines


def _replication_lines(r: dict[str, Any]) -> list[str]:
    if "error" in r:
        return [f"database: {r['error']}"]
    role = "primary" if r["primary"] else "standby (read only)"
    lines = [f"database: {role} at {r['server']}, synchronous_commit={r['synchronous_commit']}"]
    if not r["standbys"]:
        names = r["synchronous_standby_names"]
        lines.append(
            "  replication: no standby connected"
            + (f" (waiting for {names}: commits wait too)" if names else " (none configured)")
        )
    for sb in r["standbys"]:
        lines.append(
            f"  standby {sb['name']}: {sb['state']}, {sb['sync_state']}, "
            f"{sb['flush_lag_bytes']:,} bytes behind"
        )
    return lines


@relay.command(name="allow")
@click.argument("device")
@pass_relay_state
def allow(state: State, device: str) -> None:
    """Admit the agent DEVICE (its device ID) to this relay."""
    home = _home(state)
    key = parse_device_id(device)
    new = _admission(home).allow(key, now_ms())
    click.echo(f"{'allowed' if new else 'already allowed'}: {device_id(key)}")


@relay.command(name="deny")
@click.argument("device")
@pass_relay_state
def deny(state: State, device: str) -> None:
    """Stop admitting DEVICE: its open sessions end within seconds, it is refused
    from then on (a token will not bring it back; `relay allow` does). What it
    deposited stays until fetched or expired."""
    home = _home(state)
    key = parse_device_id(device)
    was = _admission(home).deny(key)
    click.echo(f"denied: {device_id(key)}{'' if was else ' (it was not allowed)'}")


@relay.group(name="token")
def token() -> None:
    """Admission tokens: hand one to an agent's operator for `relay add --token`."""


@token.command(name="create")
@click.option(
    "--uses",
    type=click.IntRange(1, 1_000_000),
    default=1,
    show_default=True,
    help="How many agents it admits.",
)
@click.option(
    "--expires",
    metavar="DURATION",
    default="7d",
    show_default=True,
    help="How long it stays usable (90s, 10m, 2h, 1d).",
)
@pass_relay_state
def token_create(state: State, uses: int, expires: str) -> None:
    """Create a token; prints it (give it to the agent's operator, privately)."""
    home = _home(state)
    seconds = parse_duration(expires, "--expires")
    if seconds <= 0:
        raise UsageError("--expires: give a duration above 0")
    until = now_ms() + int(seconds * 1000)
    text = _admission(home).create_token(uses, until, now_ms())
    click.echo(text)
    ident = parse_token(text)[0].hex()
    click.echo(
        f"token {ident} admits {output.count(uses, 'agent')} until "
        f"{output.short_time(until)}: "
        f"`p2psync relay add {home.identity.device_id} --address HOST:PORT --token {text}`",
        err=True,
    )


@token.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_relay_state
def token_list(state: State, as_json: bool) -> None:
    """The tokens made on this relay (their ids, never their secrets)."""
    tokens = _admission(_home(state)).tokens()
    now = now_ms()
    rows: list[dict[str, Any]] = [
        {
            "id": t.ident.hex(),
            "uses": t.uses,
            "used": t.used,
            "expires": t.expires_ms,
            "revoked": t.revoked,
            "usable": t.usable(now),
        }
        for t in tokens
    ]
    if as_json:
        output.emit_json({"tokens": rows})
        return
    if not rows:
        click.echo("no tokens (create one with `p2psync relay token create`)")
    for r in rows:
        state_text = (
            "revoked" if r["revoked"] else "usable" if r["usable"] else "used up or expired"
        )
        expires = "never" if r["expires"] is None else output.short_time(r["expires"])
        click.echo(f"{r['id']}  {r['used']}/{r['uses']} used, expires {expires}, {state_text}")


@token.command(name="revoke")
@click.argument("token_id")
@pass_relay_state
def token_revoke(state: State, token_id: str) -> None:
    """Make the token TOKEN_ID (from `relay token list`) unusable."""
    revoked = _admission(_home(state)).revoke_token(token_id.strip().lower())
    click.echo(f"revoked token {revoked}")


@relay.command(name="purge")
@click.argument("device")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_relay_state
def purge(state: State, device: str, yes: bool) -> None:
    """Drop DEVICE's mailbox: every envelope waiting for it goes (their senders are
    told, as for an expiry, and send again). Logged in relay.log."""
    from p2psync.relay.backend import open_mailbox  # noqa: PLC0415
    from p2psync.relay.home import log_action  # noqa: PLC0415

    home = _home(state)
    key = parse_device_id(device)
    if not yes:
        click.confirm(f"drop every envelope waiting for {short_id(key)} on this relay?", abort=True)
    mailbox = open_mailbox(home, 1)
    try:
        count = mailbox.purge(key, now_ms())
    finally:
        mailbox.close()
    log_action(home.path, f"purge {key.hex()} dropped={count} by uid={os.getuid()}")
    click.echo(f"purged {output.count(count, 'envelope')} waiting for {short_id(key)}")


for _command in AGENT_COMMANDS:
    relay.add_command(_command)

COMMANDS = [relay]
