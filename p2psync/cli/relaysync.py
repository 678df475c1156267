"""`p2psync sync` through the relay: for the peers a direct sync could not reach
(or whose rules go only through the relay), one exchange with the first relay
that admits us (``mail/exchange.py``): deposit what they lack, fetch what waits
for us, apply it, send receipts. It says what happened, peer by peer::

    Branch 1 (ABCD123): 3,200 entries at relay EFGH456 until 9 Dec 14:02; 1,150 entries received

A relay's word is "stored", not "delivered": the peer acknowledges with a signed
receipt on a later exchange (``p2psync peers`` shows the ledger)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import trio

from p2psync.api import Database
from p2psync.cli import output
from p2psync.core.identity import short_id
from p2psync.errors import P2PSyncError, RelayUnavailable
from p2psync.mail.exchange import ExchangeReport, exchange, visit_side_relays
from p2psync.mail.mailer import Mailer
from p2psync.store import relays as relays_mod


@dataclass(frozen=True, slots=True)
class RelayOutcome:
    peer: bytes
    line: str
    ok: bool
    #: a line about the relay itself or a pairing request, not a peer we sync with
    note: bool = False


def through_relay(
    db: Database, keys: Sequence[bytes], *, timeout: float, first: bytes | None = None
) -> tuple[list[RelayOutcome], str | None]:
    """Exchange with the first relay that admits us (``first`` tried before the
    others) for ``keys`` (only those the relay carries anything for), collecting
    what waits for us even when none is, then with each other relay an open invite
    code names (``visit_side_relays``); the outcome per peer (and a line per
    pairing request that arrived), or why no relay served."""
    relays = sorted(relays_mod.load(db.store), key=lambda r: r.key != first)
    if not relays:
        return [], None
    errors: list[str] = []
    started = time.monotonic()
    for relay in relays:
        carried = Mailer(db).targets(relay.key)
        wanted = [k for k in keys if k in carried]
        try:
            report = trio.run(_exchange, db, relay, wanted, timeout)
        except RelayUnavailable as exc:
            errors.append(str(exc))
            continue
        except trio.TooSlowError:
            errors.append(f"relay {short_id(relay.key)} did not finish within {timeout:g} s")
            continue
        except P2PSyncError as exc:
            errors.append(f"relay {short_id(relay.key)}: {exc}")
            continue
        outcomes = _outcomes(db, report, wanted)
        left = max(0.0, timeout - (time.monotonic() - started))
        visits = partial(visit_side_relays, within=left)
        for side in trio.run(visits, db, Mailer(db), report.relay, relays):
            outcomes += _outcomes(db, side, [k for k in side.peers if k not in wanted])
        if not outcomes:
            line = f"relay {short_id(report.relay)}: nothing waiting for this agent"
            outcomes = [RelayOutcome(report.relay, line, True, note=True)]
        return outcomes, None
    return [], "; ".join(errors)


def _outcomes(db: Database, report: ExchangeReport, wanted: Sequence[bytes]) -> list[RelayOutcome]:
    """A line per peer asked, then one per pairing request that arrived and per
    other peer whose envelope said something (a refused join)."""
    outcomes = [_outcome(db, report, key) for key in wanted]
    for key, row in report.peers.items():
        if key in wanted:
            continue
        if row.requests:
            outcomes.append(_request(db, report, key))
        elif row.deposited:
            outcomes.append(_outcome(db, report, key, note=True))
        elif row.problems:
            said = "; ".join(output.safe(p) for p in dict.fromkeys(row.problems))
            outcomes.append(RelayOutcome(key, f"{_who(db, key)}: {said}", True, note=True))
    return outcomes


def _who(db: Database, key: bytes) -> str:
    peer = db.store.peer(key)
    return f"{output.safe(peer.name)} ({short_id(key)})" if peer and peer.name else short_id(key)


def _request(db: Database, report: ExchangeReport, key: bytes) -> RelayOutcome:
    who = _who(db, key)
    return RelayOutcome(
        key,
        f"{who}: pairing request received through relay {short_id(report.relay)}; "
        "see `p2psync pair pending`",
        True,
        note=True,
    )


async def _exchange(
    db: Database, relay: relays_mod.Relay, keys: list[bytes], timeout: float
) -> ExchangeReport:
    with trio.fail_after(timeout):
        return await exchange(db, relay, keys)


def _outcome(
    db: Database, report: ExchangeReport, key: bytes, *, note: bool = False
) -> RelayOutcome:
    who = _who(db, key)
    row = report.of(key)
    parts = []
    relay = short_id(report.relay)
    if row.introduced:
        parts.append(
            f"pairing request left at relay {relay} until {output.short_time(row.until_ms)}"
        )
    if row.entries_out:
        parts.append(
            f"{output.count(row.entries_out, 'entry', 'entries')} at relay {relay} "
            f"until {output.short_time(row.until_ms)}"
        )
    elif row.deposited > row.introduced + row.asking:
        receipts = row.deposited - row.introduced - row.asking
        parts.append(f"{output.plural(receipts, 'receipt')} left at relay {relay}")
    if row.asked:
        parts.append(
            f"asked it for the payloads of {output.count(row.asked, 'entry', 'entries')} "
            "held here without them"
        )
    if row.entries_in or (row.received and not (row.filled or row.wanted)):
        parts.append(f"{output.count(row.entries_in, 'entry', 'entries')} received")
    if row.filled:
        parts.append(f"payloads of {output.count(row.filled, 'entry', 'entries')} arrived")
    if row.wanted:
        parts.append(
            f"it asked for the payloads of {output.count(row.wanted, 'entry', 'entries')} "
            "again (they go to it with what it lacks)"
        )
    if row.acknowledged:
        parts.append(f"{output.plural(row.acknowledged, 'envelope')} of ours acknowledged")
    if not parts and not row.refused:
        parts.append(f"nothing to exchange through relay {relay}")
    for reason in dict.fromkeys(row.refused + row.problems):
        parts.append(f"NOT delivered: {output.safe(reason)}")
    return RelayOutcome(key, f"{who}: {'; '.join(parts)}", not row.refused, note=note)
