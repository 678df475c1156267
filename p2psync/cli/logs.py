"""Change-log commands: log, verify."""

from __future__ import annotations

import datetime
import re
import shlex
import sys
from typing import Any

import click

from p2psync.api import LogEntry, VerifyReport
from p2psync.cli import output
from p2psync.cli.context import State, pass_state
from p2psync.cli.lookup import resolve_author
from p2psync.cli.terms import parse_duration
from p2psync.clock import now_ms
from p2psync.core.identity import device_id, short_id
from p2psync.errors import CorruptionError, IntegrityError
from p2psync.home import loose_permissions


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


def _since_ms(text: str) -> int:
    """Wall time in ms from an ISO date/time (UTC unless it says otherwise, as the
    log shows times) or a duration back from now (``2h``: in the last two hours)."""
    if re.fullmatch(r"\s*\d+(\.\d+)?[smhd]\s*", text):  # a bare number is no duration here
        return now_ms() - int(parse_duration(text) * 1000)
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a date/time like 2026-05-01 or 2026-05-01T09:30 "
            "nor a duration like 90s, 10m, 2h or 1d",
            param_hint="--since",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


@click.command()
@click.option(
    "--author",
    metavar="PEER",
    help="Only this author's entries, in seq order: a device ID, its first characters, "
    "a peer's name, or this site's own ID or name.",
)
@click.option(
    "--since",
    metavar="WHEN",
    help="Only entries from then on: a date/time (UTC unless it gives an offset, e.g. "
    "2026-05-01 or 2026-05-01T09:30+02:00) or a duration back from now (e.g. 2h).",
)
@click.option(
    "--collection",
    "-c",
    "collections",
    multiple=True,
    metavar="GLOB",
    help="Only entries with an op in a matching collection (repeatable).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    metavar="N",
    help="Only the newest N entries (of those the other options select), shown oldest first.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def log(
    state: State,
    author: str | None,
    since: str | None,
    collections: tuple[str, ...],
    limit: int | None,
    as_json: bool,
) -> None:
    """Show the change log: every entry with author, seq, id, clock and ops."""
    since_ms = _since_ms(since) if since is not None else None
    with state.open() as db:
        key = resolve_author(db, author) if author is not None else None
        entries = db.log(key, since_ms=since_ms, collections=collections, newest=limit)
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
        shorts: dict[bytes, str] = {}  # short_id costs more than the rest of a line
        for entry in entries:
            if entry.author not in shorts:
                shorts[entry.author] = short_id(entry.author)
            lines = [
                f"{shorts[entry.author]} #{entry.seq} {entry.id.hex()[:16]} "
                f"{output.describe_hlc(entry.hlc)} sig {entry.signature.hex()[:16]}"
            ]
            for op in entry.ops:
                if op.kind is None:
                    lines.append(
                        f"    ({output.safe(op.collection)}: withheld, "
                        f"digest {op.digest.hex()[:16]})"
                    )
                elif op.kind.name == "DELETE":
                    lines.append(f"    del {output.safe(f'{op.collection}/{op.key}')}")
                else:
                    record = output.safe(f"{op.collection}/{op.key}")
                    lines.append(f"    put {record} = {output.dumps(op.value)}")
            click.echo("\n".join(lines))
    for author_key, seq, _, _ in forks:
        click.echo(
            f"FORK: author {short_id(author_key)} signed two entries at seq {seq}; frozen",
            err=True,
        )


@click.command()
@click.option(
    "--repair",
    is_flag=True,
    help="Mend damaged entries from this site's own records where they still hold "
    "them; mark the rest to be fetched again: the next sync with a peer that holds "
    "them mends them.",
)
@pass_state
def verify(state: State, repair: bool) -> None:
    """Check every stored chain, hash and signature."""
    show = sys.stderr.isatty()

    def progress(count: int) -> None:
        if show:
            checked = output.plural(count, "entry", "entries")
            click.echo(f"\r{checked} checked...", err=True, nl=False)

    mended = 0
    with state.open() as db:
        report = db.verify(progress)
        while repair and report.mendable:
            # first from this site's own rows, where they still hold what was damaged
            fixed = db.store.mend_from_records(report.mendable, now_ms())
            if not fixed:
                break
            mended += len(fixed)
            report = db.verify(progress)  # (verify stops at an author's first damage)
        if repair and report.mendable:
            db.store.mark_damaged(report.mendable, now_ms())
        own = any(author == db.identity.public_key for author, _, _ in report.mendable)
    if mended:
        click.echo(
            f"{output.plural(mended, 'damaged entry', 'damaged entries')} mended from "
            "this site's own records",
            err=True,
        )
    if show and report.entries >= 10_000:
        click.echo("", err=True)
    if report.problems:
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        own_log = (
            ". It is in this site's own log: only a peer that received that entry can "
            "send it back, and until then nothing written here after it reaches any peer"
            if own
            else ""
        )
        raise CorruptionError(report.problems[0] + more + _recovery(report, repair) + own_log)
    if report.forks:
        more = f" (and {len(report.forks) - 1} more)" if len(report.forks) > 1 else ""
        raise IntegrityError(report.forks[0] + more)
    held = ""
    if report.held:
        waits = "waits" if report.held == 1 else "wait"
        held = f"; {output.plural(report.held, 'entry', 'entries')} {waits} for predecessors"
    entries = output.plural(report.entries, "entry", "entries")
    click.echo(f"{entries} from {output.plural(report.authors, 'author')} verified{held}")
    for path, mode in loose_permissions(state.home):
        folder = path.is_dir()
        what = "the home folder" if path == state.home else "the folder" if folder else "the file"
        fix = "700" if folder else "600"
        click.echo(
            f"warning: {what} {output.safe(str(path))} is mode {mode:04o}: other users may "
            f"read or change it; run `chmod {fix} {output.safe(shlex.quote(str(path)))}`",
            err=True,
        )


def _recovery(report: VerifyReport, repaired: bool) -> str:
    """How to get a damaged store whole again, after what verify found."""
    if report.file:
        return (
            ". The file itself cannot be mended here: with the agent stopped, restore "
            "store.sqlite from a backup, or start a new home (`p2psync init --home NEW`) "
            "and pair it with a peer that holds the data"
        )
    count = len(report.mendable)
    if not count:
        return (
            ". This damage cannot be mended from a peer (the chain does not confirm the "
            "entry's ID): restore the store from a backup, or start a new home and sync"
        )
    entries = output.plural(count, "damaged entry", "damaged entries")
    if repaired:
        return (
            f". {entries} marked: this site no longer sends them and the next sync with a "
            "peer that holds them (p2psync sync, or the agent) fetches them again and "
            "mends them; run verify again afterwards"
        )
    return (
        f". {entries} can be fetched again from a peer that holds them: run "
        "`p2psync verify --repair`, then sync"
    )


COMMANDS = (log, verify)
