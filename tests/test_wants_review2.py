"""Second review of the mailbox ``wants`` (after 4e66177, the fixes of
tests/test_wants_review.py): each test shows one finding and fails until it is
fixed. Envelopes are handed from one mailer to the other, or deposited through
``exchange.deliver`` with a relay client that stores everything (no network)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from click.testing import CliRunner

import p2psync
from p2psync.cli.main import cli
from p2psync.cli.relaysync import _outcome
from p2psync.clock import now_ms
from p2psync.core import relaywire as wire
from p2psync.core.envelope import MIN_SEALED_BYTES
from p2psync.core.rules import Route, Terms
from p2psync.mail import outbox
from p2psync.mail.exchange import ExchangeReport, _count, deliver
from p2psync.mail.mailer import Mailer
from p2psync.store import missing, wants
from tests.test_mail import deliver as hand
from tests.test_mail import key, pair
from tests.test_widen_relay import exchange, widened, write_pairs

MakeDb = Callable[[str], p2psync.Database]
DAY = 24 * 3600 * 1000


@dataclass
class _Client:
    """A relay session that stores whatever is deposited (exchange.deliver's view)."""

    max_sealed: int = 1 << 20
    relay: bytes = b"R" * 32
    stored: list[bytes] = field(default_factory=list)

    @property
    def welcome(self) -> wire.Welcome:
        return wire.Welcome(now_ms(), self.max_sealed, DAY, 7 * DAY)

    async def deposit_all(self, envelopes: list[bytes]) -> list[wire.Stored]:
        self.stored += envelopes
        return [wire.Stored(i, now_ms() + DAY) for i, _ in enumerate(envelopes)]


def many_missing(make_db: MakeDb, count: int) -> tuple[p2psync.Database, p2psync.Database]:
    """a holds ``count`` of b's entries without their 'misc' payloads, and may now
    ask b for them (the rule widened)."""
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["stock"], route=Route.RELAY))
    write_pairs(b, count)
    exchange(a, b)
    pair(b, a, Terms.make(["misc"], route=Route.RELAY))
    return a, b


# ------------------------------------------------------------ 1. asks per exchange


@pytest.mark.trio_memory
async def test_one_exchange_makes_at_most_asks_per_call_envelopes_of_asks(
    make_db: MakeDb,
) -> None:
    """ASKS_PER_CALL bounds one call of Mailer.outgoing, but exchange.deliver calls
    it until it returns nothing, and each call asks for the next entries not asked
    yet (mail_asked): one `p2psync sync` asks for every missing payload at once.
    With a million missing, ~1,000 envelopes of 1,024 IDs (~35 MB) into the
    peer's mailbox (a relay's default holds 10,000), fifteen times what the peer
    keeps (MAX_WANTED, 65,536): the rest is dropped there and marked asked here,
    not asked again for a day. Here a small envelope (MIN_SEALED_BYTES) stands for
    that: 400 missing, a few IDs per ask."""
    a, _b = many_missing(make_db, 400)
    client = _Client(max_sealed=MIN_SEALED_BYTES)
    report = ExchangeReport(relay=client.relay)
    await deliver(client, Mailer(a), key(_b), report)  # type: ignore[arg-type]
    row = report.of(key(_b))
    assert row.asking <= outbox.ASKS_PER_CALL, (
        f"one exchange deposited {row.asking} envelopes of asks ({row.asked} IDs), "
        f"ASKS_PER_CALL = {outbox.ASKS_PER_CALL}"
    )


# ------------------------------------------------------------ 2. asked again: sent again


@pytest.mark.pure
def test_an_ask_repeated_while_its_answer_is_on_its_way_is_not_answered_twice(
    make_db: MakeDb,
) -> None:
    """wants.want resets ``answer`` to NULL when a peer asks again, even while the
    envelope answering it is at the relay (not refused, not expired): the next
    bundles carry the same entries again, and the first answer's receipt then
    deletes nothing (the rows name the second). a asks again a day on when b's
    answer has not reached it yet (b answered after a's exchange that day); a
    hostile peer asking the same IDs at every exchange gets every entry (up to
    MAX_WANTED) again at every exchange."""
    a, b = widened(make_db)
    ma, mb = Mailer(a), Mailer(b)
    now = now_ms()
    hand(mb, ma.outgoing(key(b), now))
    first = [e for e in mb.outgoing(key(a), now) if e.entries]
    assert sum(e.entries for e in first) == 2
    for e in first:
        assert mb.deposited(key(a), e.seq, where="relay", until_ms=now + 6 * DAY, now_ms=now)
    later = now + wants.ASK_AGAIN_MS + 1000
    ma.expire(later)
    again = ma.outgoing(key(b), later)
    assert sum(e.asks for e in again) == 2  # a asks again (its answer not collected yet)
    hand(mb, again, later)
    second = mb.outgoing(key(a), later)
    assert sum(e.entries for e in second) == 0, (
        f"b sends the 2 entries again ({sum(e.entries for e in second)} entries in "
        f"{len(second)} envelopes) while its answer {[e.seq for e in first]} is still "
        f"at the relay: {mb.summary(key(a))}"
    )


# ------------------------------------------------------------ 3. cost per author


@pytest.mark.xfail(
    strict=True,
    reason="left: one query per author the peer holds (a skip scan would not)",
)
@pytest.mark.pure
def test_asking_costs_no_query_per_author_the_peer_holds(make_db: MakeDb) -> None:
    """missing.to_ask(authors=) runs one query per collection with missing payloads
    AND per author the peer holds, whether or not we miss anything of that author:
    a peer holding the logs of 3,000 sites (a hub) costs 3,000 queries per
    collection, at every call of Mailer.outgoing that gets to _asks (at least the
    last of every exchange, while anything is missing at all). Only the authors
    with missing payloads need one (a skip scan of the index gives them). Low:
    here 3,003 statements, ~26 ms a call."""
    a, b = widened(make_db)
    held = {bytes([i // 256, i % 256]) * 16: 5 for i in range(3000)}
    held[key(b)] = 10
    statements: list[str] = []
    with sqlite3.connect(a.home.store_path) as conn:
        conn.set_trace_callback(statements.append)
        start = time.perf_counter()
        rows = missing.to_ask(
            conn, lambda c: True, 8192, key(b), now_ms(), now_ms() - DAY, authors=held
        )
        took = time.perf_counter() - start
    assert len(rows) == 2
    assert len(statements) < 100, (
        f"{len(statements)} statements ({took * 1000:.0f} ms) for 2 missing payloads of "
        f"one author, the peer holding {len(held)} authors"
    )


# ------------------------------------------------------------ 4. the sync line


@pytest.mark.trio_memory
async def test_the_side_asked_is_not_told_its_answers_go_with_the_next_exchange(
    make_db: MakeDb,
) -> None:
    """exchange_on collects first and deposits after: b's `p2psync sync` that
    fetched a's ask answers it in the same exchange. Its line says both '2 entries
    at relay ...' (the answers) and 'it asked for 2 entries again (they go with the
    next exchange)', so a clerk waits for an exchange that has nothing to do (and
    Incoming.wanted counts the IDs asked, not those kept: an ask of IDs b does not
    hold says they go too)."""
    a, b = widened(make_db)
    report = ExchangeReport(relay=b"R" * 32)
    for out in Mailer(a).outgoing(key(b), now_ms()):
        _count(report, Mailer(b).incoming(out.wire, now_ms()))
    await deliver(_Client(), Mailer(b), key(a), report)  # type: ignore[arg-type]
    assert report.of(key(a)).entries_out == 2  # answered in this exchange
    line = _outcome(b, report, key(a)).line
    assert "next exchange" not in line, line


# ------------------------------------------------------------ 5. bundle ledger


@pytest.mark.xfail(
    strict=True,
    reason="left: bundle ledger does not show asks yet (peers does)",
)
@pytest.mark.pure
def test_bundle_ledger_shows_what_an_envelope_asks_for(make_db: MakeDb) -> None:
    """relay.md: 'the ledger (`bundle ledger`) keeps how many entries each envelope
    asks for'. The table does (mail_out.asks), but `bundle ledger --json` shows an
    ask as a data envelope of 0 entries (no 'asks' key) and the text line counts it
    among the data envelopes ('1 queued'), as `peers` did before 4e66177."""
    a, b = widened(make_db)
    out = Mailer(a).outgoing(key(b), now_ms())
    assert sum(e.asks for e in out) == 2
    path = str(a.path)
    a.close()
    result = CliRunner().invoke(cli, ["--home", path, "bundle", "ledger", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    data = {r["seq"]: r.get("asks") for r in rows if r["class"] == "data"}
    [ask] = [e.seq for e in out if e.asks]
    assert data[ask] == 2, f"the ask (seq {ask}) in `bundle ledger --json`: {data}"
