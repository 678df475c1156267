"""Record commands: put, get, del, ls, conflicts, resolve."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import IO, Any

import click

from p2psync.api import Change, Database
from p2psync.cli import output
from p2psync.cli.context import State, pass_state
from p2psync.core.entry import OpKind, check_collection, check_key
from p2psync.core.identity import device_id, short_id
from p2psync.errors import InvalidRecord, NotFoundError, P2PSyncError, StateError
from p2psync.store.records import VersionInfo

JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")


def _value_arg(text: str) -> Any:
    if text == "-":
        text = sys.stdin.read()
    return output.parse_value(text)


@click.command()
@click.argument("collection", required=False)
@click.argument("key", required=False)
@click.argument("value", required=False, metavar="JSON")
@click.option(
    "--from",
    "source",
    type=click.File("r", encoding="utf-8"),
    help='JSON lines {"collection","key","value"} or {"collection","key","delete":true}; '
    "- reads stdin. One entry per line, all in one store transaction: a bad line "
    "aborts the whole load.",
)
@click.option("--atomic", is_flag=True, help="With --from: the whole file is one entry.")
@pass_state
def put(
    state: State,
    collection: str | None,
    key: str | None,
    value: str | None,
    source: IO[str] | None,
    atomic: bool,
) -> None:
    """Write one record (JSON value; - reads stdin), or many with --from."""
    if source is not None:
        if collection or key or value:
            raise click.UsageError("give either COLLECTION KEY JSON or --from FILE, not both")
        with state.open() as db:
            count = _put_lines(db, source, atomic)
        whole = " as one entry" if atomic and count else ""
        click.echo(f"{output.plural(count, 'change')} written{whole}")
        return
    if atomic:
        raise click.UsageError("--atomic only applies to --from")
    if collection is None or key is None or value is None:
        raise click.UsageError("put needs COLLECTION KEY JSON (or --from FILE)")
    parsed = _value_arg(value)
    with state.open() as db:
        entry_id = db.put(collection, key, parsed)
    click.echo(f"written {collection}/{key} (entry {entry_id.hex()[:16]})")


def _read_lines(source: IO[str]) -> Iterator[Change]:
    for number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise InvalidRecord("each line must be a JSON object")
            collection, key = item["collection"], item["key"]
            check_collection(collection)  # here, so an error names its line
            check_key(key)
            if item.get("delete") is True:
                if "value" in item:
                    raise InvalidRecord("a delete line has no value")
                yield Change(OpKind.DELETE, collection, key)
            else:
                yield Change(OpKind.PUT, collection, key, output.from_json(item["value"]))
        except json.JSONDecodeError as exc:
            raise InvalidRecord(f"line {number}: not valid JSON ({exc.msg})") from exc
        except KeyError as exc:
            raise InvalidRecord(f"line {number}: missing {exc.args[0]!r}") from exc
        except RecursionError:
            raise InvalidRecord(f"line {number}: nests too deeply") from None
        except ValueError as exc:
            raise InvalidRecord(f"line {number}: {exc}") from None
        except P2PSyncError as exc:
            raise InvalidRecord(f"line {number}: {exc}") from exc


def _put_lines(db: Database, source: IO[str], atomic: bool) -> int:
    changes = _read_lines(source)
    if atomic:
        batch = list(changes)
        seen = {(c.collection, c.key) for c in batch}
        if len(seen) != len(batch):
            raise InvalidRecord("--atomic: the file changes one record more than once")
        return len(batch) if db.write([batch]) else 0
    counted = 0
    show = sys.stderr.isatty()

    def one_each() -> Iterator[list[Change]]:
        nonlocal counted
        for change in changes:
            counted += 1
            if show and counted % 10_000 == 0:
                click.echo(f"\r{counted} lines read...", err=True, nl=False)
            yield [change]

    db.write(one_each())
    if show and counted >= 10_000:
        click.echo("", err=True)
    return counted


@click.command()
@click.argument("collection")
@click.argument("key")
@pass_state
def get(state: State, collection: str, key: str) -> None:
    """Print a record's value as JSON (exit 1 when not found)."""
    with state.open() as db:
        value = db.get(collection, key)
        found = value is not None or db.exists(collection, key)
    if not found:
        raise NotFoundError(f"{collection}/{key} not found")
    click.echo(output.dumps(value))


@click.command(name="del")
@click.argument("collection")
@click.argument("key")
@pass_state
def delete(state: State, collection: str, key: str) -> None:
    """Delete a record (exit 1 when not found)."""
    with state.open() as db:
        if not db.delete(collection, key):
            raise NotFoundError(f"{collection}/{key} not found")
    click.echo(f"deleted {collection}/{key}")


@click.command(name="ls")
@click.argument("collection", required=False)
@click.option("--prefix", default="", help="Only keys starting with this.")
@JSON_OPTION
@pass_state
def list_records(state: State, collection: str | None, prefix: str, as_json: bool) -> None:
    """List collections, or the records of one collection."""
    with state.open() as db:
        if collection is None:
            if prefix:
                raise click.UsageError("--prefix needs a COLLECTION")
            names = db.collections()
            if as_json:
                output.emit_json([{"collection": n, "records": c} for n, c in names])
            else:
                for name, count in names:
                    click.echo(f"{output.safe(name)}\t{count}")
            return
        rows = db.scan(collection, prefix)
        if as_json:
            output.emit_json([{"key": k, "value": v} for k, v in rows])
        else:
            for key, value in rows:
                click.echo(f"{output.safe(key)}\t{output.dumps(value)}")


def _version_json(version: VersionInfo) -> dict[str, Any]:
    return {
        "value": version.value,
        "deleted": version.deleted,
        "author": device_id(version.author),
        "hlc": version.hlc,
        "time": output.describe_hlc(version.hlc),
        "entry": version.entry.hex(),
    }


def _version_text(version: VersionInfo) -> str:
    shown = "(deleted)" if version.deleted else output.dumps(version.value)
    return f"{shown} by {short_id(version.author)} at {output.describe_hlc(version.hlc)}"


@click.command()
@JSON_OPTION
@pass_state
def conflicts(state: State, as_json: bool) -> None:
    """List records written concurrently, with the applied winner and the kept losers."""
    with state.open() as db:
        found = db.conflicts()
    if as_json:
        output.emit_json(
            [
                {
                    "collection": c.collection,
                    "key": c.key,
                    "winner": _version_json(c.winner),
                    "losers": [_version_json(v) for v in c.losers],
                }
                for c in found
            ]
        )
        return
    if not found:
        click.echo("no conflicts")
    for conflict in found:
        click.echo(output.safe(f"{conflict.collection}/{conflict.key}"))
        click.echo(f"  applied: {_version_text(conflict.winner)}")
        for loser in conflict.losers:
            click.echo(f"  kept:    {_version_text(loser)}")


@click.command()
@click.argument("collection")
@click.argument("key")
@click.argument("value", metavar="JSON")
@click.option("--force", is_flag=True, help="Write it even if the record is not in conflict.")
@pass_state
def resolve(state: State, collection: str, key: str, value: str, force: bool) -> None:
    """Write a value that supersedes every conflicting version of a record
    (refused for a record not in conflict, unless --force)."""
    parsed = _value_arg(value)
    with state.open() as db:
        if not force and not db.in_conflict(collection, key):
            raise StateError(
                f"{output.safe(f'{collection}/{key}')} is not in conflict (see `p2psync "
                "conflicts`); to change it run `p2psync put COLLECTION KEY JSON`, or give --force"
            )
        entry_id = db.resolve(collection, key, parsed)
    click.echo(f"resolved {collection}/{key} (entry {entry_id.hex()[:16]})")


COMMANDS = (put, get, delete, list_records, conflicts, resolve)
