"""`p2psync peers`: known and discovered peers — and the one place that decides
what `peers` and `status` say about each peer (connected?, in step?, behind and
ahead, last in sync, what is wrong), so the two never disagree.

While the agent runs, a connected peer's figures come from its live session;
otherwise from what the store kept of the last contact.
"""

from __future__ import annotations

from typing import Any

import click

from p2psync.cli import output
from p2psync.cli.context import State, pass_state
from p2psync.cli.delivery import describe_delivery
from p2psync.cli.lookup import agent_status
from p2psync.views.peers import peer_rows


def _ms(value: int | None) -> str:
    return output.describe_hlc(value << 16) if value else "never"


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
