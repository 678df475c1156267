"""`p2psync relay add/list/remove`: the relays this agent uses (tried in order).

They sit in the same `relay` group as the relay node's own commands
(`cli/relay.py`); these act on the agent's home, those on a relay's."""

from __future__ import annotations

from typing import Any

import click

from p2psync.api import Database
from p2psync.cli import output
from p2psync.cli.context import State, pass_state
from p2psync.core.identity import device_id, parse_device_id, short_id
from p2psync.core.relaywire import parse_token
from p2psync.errors import NotFoundError, P2PSyncError, UsageError
from p2psync.net.address import parse_address
from p2psync.store import relays as relays_mod


@click.command(name="add")
@click.argument("relay_id")
@click.option(
    "--address",
    "addresses",
    metavar="HOST:PORT",
    multiple=True,
    required=True,
    help="Where the relay listens (repeat for several; tried in order).",
)
@click.option("--token", metavar="TOKEN", help="An admission token from the relay's operator.")
@click.option(
    "--no-check",
    "check",
    is_flag=True,
    flag_value=False,
    default=True,
    help="Do not connect now (by default the relay is reached once: admission checked, "
    "our mailbox opened there).",
)
@pass_state
def add(
    state: State, relay_id: str, addresses: tuple[str, ...], token: str | None, check: bool
) -> None:
    """Use the relay RELAY_ID (its device ID, pinned) for peers out of direct reach.

    Adding a relay already added replaces its addresses and token. Relays are
    tried in the order they were added. The relay is reached once at once, so a
    wrong address or token shows now; it is added either way."""
    key = parse_device_id(relay_id)
    for address in addresses:
        try:
            parse_address(address)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    if token is not None:
        try:
            parse_token(token)
        except ValueError as exc:
            raise UsageError(f"--token: {exc}") from exc
    with state.open() as db:
        if key == db.identity.public_key:
            raise UsageError("that is this agent's own device ID, not a relay's")
        relay = relays_mod.Relay(key, tuple(addresses), token)
        new = relays_mod.put(db.store, relay)
        verb = "added" if new else "updated"
        click.echo(f"{verb} relay {short_id(key)} at {', '.join(addresses)}")
        if check:
            click.echo(_check(db, relay))


def _check(db: Database, relay: relays_mod.Relay) -> str:
    """Connect once: the relay admits us (spending the token) and holds our
    mailbox policy, so peers can leave envelopes for us from now on."""
    import trio  # noqa: PLC0415 - the CLI imports trio only where it runs it

    from p2psync.mail.exchange import hand_policy  # noqa: PLC0415
    from p2psync.mail.mailer import Mailer  # noqa: PLC0415
    from p2psync.net.relayclient import open_relay  # noqa: PLC0415

    async def connect() -> None:
        with trio.fail_after(CHECK_TIMEOUT):
            async with open_relay(db.identity, db.name, relay) as client:
                if relay.token is not None:
                    await trio.to_thread.run_sync(relays_mod.admitted, db.store, relay.key)
                await hand_policy(client, Mailer(db))

    try:
        trio.run(connect)
    except trio.TooSlowError:
        problem = f"it did not answer within {CHECK_TIMEOUT:g} s"
    except P2PSyncError as exc:
        problem = str(exc)
    else:
        return f"relay {short_id(relay.key)} admitted this agent; peers can leave envelopes for it"
    return (
        f"could not connect to it now: {output.safe(problem)}. Peers can leave envelopes "
        "for this agent once it has connected (the running agent retries; so does each "
        "`p2psync sync`)"
    )


@click.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def list_relays(state: State, as_json: bool) -> None:
    """The relays this agent uses, in the order it tries them."""
    with state.open() as db:
        relays = relays_mod.load(db.store)
    rows: list[dict[str, Any]] = [
        {
            "device_id": device_id(r.key),
            "short_id": short_id(r.key),
            "addresses": list(r.addresses),
            "token": "waiting to be used" if r.token else None,
        }
        for r in relays
    ]
    if as_json:
        output.emit_json({"relays": rows})
        return
    if not rows:
        click.echo("no relays (add one with `p2psync relay add RELAY_ID --address HOST:PORT`)")
    for index, row in enumerate(rows, 1):
        token = " (admission token not used yet)" if row["token"] else ""
        click.echo(f"{index}. {row['device_id']}  {', '.join(row['addresses'])}{token}")


def relay_named(db: Database, text: str) -> bytes:
    """The key of the relay of our list that ``text`` names: its device ID or the
    first characters of it (as every output shows them)."""
    wanted = text.strip().upper().replace("-", "")
    relays = relays_mod.load(db.store)
    found = [r.key for r in relays if device_id(r.key).replace("-", "").startswith(wanted)]
    if not wanted or len(found) != 1:
        listed = ", ".join(short_id(r.key) for r in relays) or "none yet"
        raise NotFoundError(
            f"{text!r} names {'no' if not found else 'more than one'} relay of this agent's "
            f"list ({listed}; see `p2psync relay list`)"
        )
    return found[0]


@click.command(name="remove")
@click.argument("relay_id")
@pass_state
def remove(state: State, relay_id: str) -> None:
    """Stop using the relay RELAY_ID (its device ID or first characters; what it
    holds for us expires there)."""
    with state.open() as db:
        key = relay_named(db, relay_id)
        relays_mod.remove(db.store, key)
    click.echo(f"removed relay {short_id(key)}")


AGENT_COMMANDS = [add, list_relays, remove]
CHECK_TIMEOUT = 15.0
