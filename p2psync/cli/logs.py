"""Change-log commands: log, verify."""

from __future__ import annotations

import sys
from typing import Any

import click

from p2psync.api import LogEntry
from p2psync.cli import output
from p2psync.cli.context import State, pass_state
from p2psync.core.identity import device_id, parse_device_id, short_id
from p2psync.errors import CorruptionError, IntegrityError


def _entry_json(entry: LogEntry) -> dict[str, Any]:
    return {
        "author": device_id(entry.author),
        "seq": entry.seq,
        "id": entry.id.hex(),
        "prev": entry.prev.hex() if entry.prev else None,
        "hlc": entry.hlc,
        "time": output.describe_hlc(entry.hlc),
        "signature": entry.signature.hex(),
        "ops": [
            {
                "collection": op.collection,
                "digest": op.digest.hex(),
                **(
                    {"hidden": True}
                    if op.kind is None
                    else {
                        "key": op.key,
                        "op": op.kind.name.lower(),
                        **({"value": op.value} if op.kind.name == "PUT" else {}),
                        "bases": [base.hex() for base in op.bases],
                    }
                ),
            }
            for op in entry.ops
        ],
    }


@click.command()
@click.option("--author", metavar="DEVICE_ID", help="Only this author's entries, in seq order.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def log(state: State, author: str | None, as_json: bool) -> None:
    """Show the change log: every entry with author, seq, id, clock and ops."""
    key = parse_device_id(author) if author else None
    with state.open() as db:
        entries = db.log(key)
        forks = db.store.forks()
        if as_json:
            output.emit_json(
                {
                    "entries": [_entry_json(e) for e in entries],
                    "forks": [
                        {"author": device_id(a), "seq": s, "ours": o.hex(), "theirs": t.hex()}
                        for a, s, o, t in forks
                    ],
                }
            )
            return
        for entry in entries:
            click.echo(
                f"{short_id(entry.author)} #{entry.seq} {entry.id.hex()[:16]} "
                f"{output.describe_hlc(entry.hlc)} sig {entry.signature.hex()[:16]}"
            )
            for op in entry.ops:
                if op.kind is None:
                    click.echo(
                        f"    ({output.safe(op.collection)}: withheld, "
                        f"digest {op.digest.hex()[:16]})"
                    )
                elif op.kind.name == "DELETE":
                    click.echo(f"    del {output.safe(f'{op.collection}/{op.key}')}")
                else:
                    record = output.safe(f"{op.collection}/{op.key}")
                    click.echo(f"    put {record} = {output.dumps(op.value)}")
    for author_key, seq, _, _ in forks:
        click.echo(
            f"FORK: author {short_id(author_key)} signed two entries at seq {seq}; frozen",
            err=True,
        )


@click.command()
@pass_state
def verify(state: State) -> None:
    """Check every stored chain, hash and signature."""
    show = sys.stderr.isatty()

    def progress(count: int) -> None:
        if show:
            click.echo(f"\r{count} entries checked...", err=True, nl=False)

    with state.open() as db:
        report = db.verify(progress)
    if show and report.entries >= 10_000:
        click.echo("", err=True)
    for found, error in ((report.problems, CorruptionError), (report.forks, IntegrityError)):
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise error(found[0] + more)
    held = f"; {report.held} entries wait for predecessors" if report.held else ""
    authors = f"{report.authors} author" + ("" if report.authors == 1 else "s")
    click.echo(f"{report.entries} entries from {authors} verified{held}")


COMMANDS = (log, verify)
