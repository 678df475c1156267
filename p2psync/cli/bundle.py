"""Bundle commands: the relay mailbox's envelopes as files handed over by hand.

    p2psync bundle export PEER FILE            what PEER lacks, sealed to it, in FILE
    p2psync bundle import FILE [--receipt OUT] apply it; receipts to hand back in OUT
    p2psync bundle ledger [PEER] [--json]      what became of the envelopes we made

They open the store directly (a running agent shares it through SQLite).
"""

from __future__ import annotations

from pathlib import Path

import click

from p2psync.cli import output
from p2psync.cli.context import State, pass_state
from p2psync.cli.lookup import resolve_peer
from p2psync.clock import now_ms
from p2psync.core.envelope import EnvelopeClass
from p2psync.core.identity import device_id
from p2psync.mail.files import export_file, hand_over, import_file, who
from p2psync.mail.mailer import Mailer


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


@click.group(name="bundle")
def bundle() -> None:
    """Hand envelopes over as files (when neither a LAN nor a relay links two sites)."""


@bundle.command(name="export")
@click.argument("peer")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@pass_state
def export(state: State, peer: str, file: Path) -> None:
    """Write what PEER lacks (and receipts owed to it) to FILE, sealed to PEER."""
    with state.open() as db:
        key = resolve_peer(db, peer).key
        done = export_file(db, key, file, now_ms())
        name = who(db, key)
    if not done.envelopes:
        click.echo(
            f"nothing to send to {name}: no rule with route relay or auto lets "
            "anything flow, or it holds (or has on its way) all it may get"
        )
        return
    click.echo(
        f"wrote {output.plural(len(done.envelopes), 'envelope')} "
        f"({output.plural(done.entries, 'entry', 'entries')}, {_mb(done.size)}) "
        f"for {name} to {file}"
    )


@bundle.command(name="import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--receipt",
    "receipt",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the receipts to hand back (default: FILE.receipt).",
)
@pass_state
def import_(state: State, file: Path, receipt: Path | None) -> None:
    """Apply the envelopes of FILE; write the receipts to hand back."""
    now = now_ms()
    with state.open() as db:
        done = import_file(db, file, now)
        results = done.results
        fresh = [r for r in results if not r.duplicate]
        if not fresh:
            click.echo(
                f"nothing new in {file}: its {output.plural(len(results), 'envelope')} "
                "were imported before"
            )
        for sender in sorted({r.sender for r in fresh}):
            mine = [r for r in fresh if r.sender == sender]
            data = [r for r in mine if r.cls is EnvelopeClass.DATA]
            name = who(db, sender)
            if data:
                click.echo(
                    f"from {name}: {output.plural(len(data), 'envelope')}, "
                    f"{output.plural(sum(r.applied for r in data), 'entry', 'entries')} applied, "
                    f"{sum(r.held for r in data)} held, {sum(r.refused for r in data)} refused"
                )
            acked = sum(r.acknowledged for r in mine)
            rejected = sum(r.rejected for r in mine)
            if any(r.cls is EnvelopeClass.RECEIPT for r in mine):
                click.echo(
                    f"from {name}: {output.plural(acked, 'envelope')} acknowledged"
                    + (f", {rejected} refused" if rejected else "")
                )
            for refusal in {r.reason for r in mine if r.reason}:
                click.echo(f"from {name}: refused: {refusal}")
        if len(fresh) < len(results) and fresh:
            click.echo(f"{len(results) - len(fresh)} envelopes were imported before")
        wires = [e for envelopes in done.receipts.values() for e in envelopes]
        if wires:
            target = receipt or file.with_name(file.name + ".receipt")
            hand_over(db, wires, target, now)
            names = ", ".join(who(db, k) for k in done.receipts)
            click.echo(
                f"wrote {output.plural(len(wires), 'receipt')} to {target}: hand it back to "
                f"{names} (p2psync bundle import {target})"
            )


@bundle.command(name="ledger")
@click.argument("peer", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def ledger(state: State, peer: str | None, as_json: bool) -> None:
    """What became of the envelopes made for PEER (or every peer)."""
    now = now_ms()
    with state.open() as db:
        key = resolve_peer(db, peer).key if peer is not None else None
        mailer = Mailer(db)
        rows = mailer.ledger(key)
        peers = sorted({r.peer for r in rows} | ({key} if key else set()))
        summaries = {p: (who(db, p), mailer.summary(p), mailer.gaps(p, now)) for p in peers}
    if as_json:
        output.emit_json(
            {
                "peers": [
                    {
                        "device_id": device_id(p),
                        "name": name,
                        "envelopes": counts,
                        "missing_from_peer": list(gaps.missing),
                        "unanswered": gaps.unanswered,
                        "receipts_stopped": gaps.receipts_stopped,
                    }
                    for p, (name, counts, gaps) in summaries.items()
                ],
                "rows": [
                    {
                        "device_id": device_id(r.peer),
                        "seq": r.seq,
                        "class": EnvelopeClass(r.cls).name.lower(),
                        "state": r.state.value,
                        "where": r.place,
                        "entries": r.entries,
                        "bytes": r.size,
                        "until_ms": r.until_ms,
                        "made_ms": r.made_ms,
                        "done_ms": r.done_ms,
                        "reason": r.reason,
                    }
                    for r in rows
                ],
            }
        )
        return
    if not summaries:
        click.echo("no envelopes made yet")
    for name, counts, gaps in summaries.values():
        shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none"
        line = f"{name}: {shown}"
        if gaps.missing:
            line += f"; missing from it: {', '.join(map(str, gaps.missing))}"
        if gaps.receipts_stopped:
            line += "; its receipts stopped"
        click.echo(line)


COMMANDS = (bundle,)
