"""`p2psync watch`: the change feed on the command line, a line per record change
as it is applied (``docs/change-feed.md``)::

    #41 vouchers/V-1001 = {"amount": 1200} by ABCD123
    #42 drafts/V-1001 deleted by ABCD123
    #43 ledgers/ACME = {"balance": 10} by EFGH456 (in conflict: `p2psync conflicts`)

With ``--json``, one JSON object per line. A program keeps the last ``change``
it handled and starts again with ``--since`` that number."""

from __future__ import annotations

import click

from p2psync.api import RecordChange
from p2psync.cli import output
from p2psync.cli.context import State, pass_state
from p2psync.core.identity import short_id
from p2psync.views.records import change_json


def change_text(change: RecordChange) -> str:
    where = f"{output.safe(change.collection)}/{output.safe(change.key)}"
    what = "deleted" if change.deleted else f"= {output.dumps(change.value)}"
    line = f"#{change.change} {where} {what} by {short_id(change.author)}"
    if change.conflict:
        line += " (in conflict: `p2psync conflicts`)"
    return line


@click.command()
@click.option(
    "--since",
    type=click.IntRange(min=0, max=(1 << 63) - 1),
    default=None,
    help="Start after this change number (default: only changes from now on).",
)
@click.option(
    "-c",
    "--collection",
    "collections",
    multiple=True,
    help="Only this collection (repeat for several).",
)
@click.option("--no-follow", is_flag=True, help="Print the changes so far and stop.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_state
def watch(
    state: State, since: int | None, collections: tuple[str, ...], no_follow: bool, as_json: bool
) -> None:
    """Print each record change as it is applied, local or received, until interrupted."""
    wanted = list(collections) or None
    with state.open() as db:
        start = db.last_change() if since is None else since
        changes = db.changes(start, wanted) if no_follow else db.watch(start, wanted)
        try:
            for change in changes:
                if as_json:
                    click.echo(output.dumps(change_json(change)))
                else:
                    click.echo(change_text(change))
        except KeyboardInterrupt:
            return


COMMANDS = (watch,)
