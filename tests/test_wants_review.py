"""Review of the mailbox ``wants`` change (issue 13, item 7): each test shows one
finding and fails until it is fixed. Envelopes are handed from one mailer to the
other (no relay, no network), as in tests/test_widen_relay.py."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

import p2psync
from p2psync.cli.delivery import describe_delivery
from p2psync.cli.relaysync import _outcome
from p2psync.clock import now_ms
from p2psync.core.bundle import heads_of
from p2psync.core.envelope import MIN_SEALED_BYTES, EnvelopeClass
from p2psync.core.rules import Route, Terms
from p2psync.mail import outbox
from p2psync.mail.exchange import ExchangeReport, _count
from p2psync.mail.mailer import QUEUED_FOR_MS, Mailer
from p2psync.store import wants
from p2psync.views.delivery import delivery
from tests.test_mail import deliver, key, pair
from tests.test_widen_relay import asks_in, exchange, widened, write_pairs

MakeDb = Callable[[str], p2psync.Database]
DAY = 24 * 3600 * 1000
DOCS = Path(__file__).resolve().parent.parent / "docs"


def asked_and_answered(
    make_db: MakeDb,
) -> tuple[p2psync.Database, p2psync.Database, list[outbox.Outgoing]]:
    """a holds two of b's entries without their 'misc' payloads, asks b for them
    (b takes the ask), and b makes its answer: (a, b, b's answer envelopes)."""
    a, b = widened(make_db)
    ma, mb = Mailer(a), Mailer(b)
    ask = ma.outgoing(key(b), now_ms())
    assert sum(e.asks for e in ask) == 2
    deliver(mb, ask)
    answer = [e for e in mb.outgoing(key(a), now_ms()) if e.entries]
    assert sum(e.entries for e in answer) == 2
    return a, b, answer


# ------------------------------------------------------------ losing the answer


@pytest.mark.pure
def test_a_direct_session_does_not_retract_an_answer_whose_payloads_are_still_needed(
    make_db: MakeDb,
) -> None:
    """Mixed routes: a direct session (another rule) comes in step while b's answer
    waits at the relay. a held those entries already (without payloads): every
    answer is 'covered' by its heads, so the answer is superseded and retracted,
    and the payloads it carried never come (a asks again only a day later)."""
    a, b, answer = asked_and_answered(make_db)
    mb = Mailer(b)
    now = now_ms()
    for e in answer:
        mb.deposited(key(a), e.seq, where="relay", until_ms=now + DAY, now_ms=now)
    retracted = mb.superseded(key(a), heads_of(a.store.heads()), now)
    assert not {e.seq for e in answer} & set(retracted), (
        f"the answer {[e.seq for e in answer]} is retracted ({retracted}) while "
        f"a still lacks its payloads: {a.store.incomplete()}"
    )


@pytest.mark.pure
def test_an_answer_that_never_reached_the_relay_goes_again(make_db: MakeDb) -> None:
    """b made its answer, then crashed (or the relay refused it, or it expired at
    the relay): the ledger says 'expired (sent again)', but the asks were deleted
    when the answer was queued and the entries are below a's heads, so nothing
    goes again; and a does not ask again for a day."""
    a, b, answer = asked_and_answered(make_db)
    ma, mb = Mailer(a), Mailer(b)
    later = now_ms() + QUEUED_FOR_MS + 1000
    assert mb.expire(later) >= len(answer)  # (receipts never deposited too)
    again = mb.outgoing(key(a), later, max_envelopes=None)
    asked_again = ma.outgoing(key(b), later, max_envelopes=None)
    assert sum(e.entries for e in again) == 2, (
        f"the expired answer does not go again ({sum(e.entries for e in again)} entries "
        f"in {len(again)} envelopes), a asks again for {sum(e.asks for e in asked_again)}; "
        f"a still lacks {a.store.incomplete()}"
    )


# ------------------------------------------------------------ unbounded calls


@pytest.mark.pure
def test_one_call_answers_no_more_than_a_batch(make_db: MakeDb) -> None:
    """Mailer.outgoing makes at most max_envelopes (plus one) data envelopes, and
    exchange.deliver asks for one first, so that a relay that refuses costs one
    envelope. Answers to a peer's asks ignore it: one call seals up to 4 MiB of
    them, whatever max_envelopes (and a refusal loses every answer)."""
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["stock"], route=Route.RELAY))
    b.write(
        [
            p2psync.Change(p2psync.OpKind.PUT, "stock", f"s{i}", i),
            p2psync.Change(p2psync.OpKind.PUT, "misc", f"m{i}", "x" * 1500),
        ]
        for i in range(60)
    )
    exchange(a, b)
    pair(b, a, Terms.make(["misc"], route=Route.RELAY))
    deliver(Mailer(b), Mailer(a).outgoing(key(b), now_ms(), max_envelopes=None))
    out = Mailer(b).outgoing(key(a), now_ms(), max_sealed=4096, max_envelopes=1)
    data = [e for e in out if e.cls is EnvelopeClass.DATA]
    assert len(data) <= 2, f"{len(data)} data envelopes in one call with max_envelopes=1"


@pytest.mark.pure
def test_one_call_makes_at_most_asks_per_call_envelopes_of_asks(make_db: MakeDb) -> None:
    """ASKS_PER_CALL bounds the envelopes of asks one call makes (its comment):
    the query is limited to ASKS_PER_CALL * MAX_WANT_IDS IDs, but with a small
    envelope an ask holds far fewer IDs, so one call makes a hundred of them."""
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["stock"], route=Route.RELAY))
    write_pairs(b, 400)
    exchange(a, b)
    pair(b, a, Terms.make(["misc"], route=Route.RELAY))
    out = Mailer(a).outgoing(key(b), now_ms(), max_sealed=MIN_SEALED_BYTES, max_envelopes=1)
    asking = [e for e in out if e.asks]
    assert len(asking) <= outbox.ASKS_PER_CALL, (
        f"{len(asking)} envelopes of asks in one call (ASKS_PER_CALL = {outbox.ASKS_PER_CALL})"
    )


# ------------------------------------------------------------ asks starved


@pytest.mark.pure
def test_entries_the_peer_does_not_hold_do_not_starve_those_it_does(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_asks reads the first ASKS_PER_CALL * MAX_WANT_IDS missing ops, then drops
    those the peer does not hold (another author, a frozen one): when those fill the
    read, nothing is asked, at this call and every later one. Here a holds 1,030
    entries of c (collection 'aaa', sorting first) that b never saw, and two of b's;
    ASKS_PER_CALL is 1 so that 1,024 stand for the real 8,192."""
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    pair(a, b, Terms.make(["stock"], route=Route.RELAY))
    for i in range(2):
        with b.transaction() as tx:
            tx.put("stock", f"s{i}", i)
            tx.put("misc", f"m{i}", f"misc {i}")
    exchange(a, b)
    pair(a, c, Terms.make(["stock"], route=Route.RELAY))
    write_pairs(c, 1030, "aaa", ("c", "a"))
    exchange(a, c)
    assert a.store.incomplete() == {"misc": 2, "aaa": 1030}
    pair(b, a, Terms.make(["misc", "aaa"], route=Route.RELAY))
    monkeypatch.setattr(outbox, "ASKS_PER_CALL", 1)
    out = Mailer(a).outgoing(key(b), now_ms(), max_envelopes=None)
    assert sum(len(w) for w in asks_in(out, b)) == 2, "b's two entries are never asked for"


# ------------------------------------------------------------ asks kept forever


@pytest.mark.pure
def test_asks_past_their_time_are_forgotten(make_db: MakeDb) -> None:
    """store/wants.py: 'Asks nobody answered within WANTED_FOR_MS go', and
    mail_asked rows are only needed for ASK_AGAIN_MS. Ledger.purge_asks does
    that, but nothing calls it (not Mailer.expire, which the agent and every
    exchange run): both tables only grow (an ask kept while b's rule lets it
    send, then unanswerable once that rule narrows, stays for good)."""
    a, b = widened(make_db)
    ma, mb = Mailer(a), Mailer(b)
    deliver(mb, ma.outgoing(key(b), now_ms()))
    assert len(b.store.ledger.wanted(key(a), 10)) == 2
    later = now_ms() + wants.WANTED_FOR_MS + DAY
    ma.expire(later)
    mb.expire(later)
    with sqlite3.connect(a.home.store_path) as conn:
        (asked,) = conn.execute("SELECT count(*) FROM mail_asked").fetchone()
    assert (len(b.store.ledger.wanted(key(a), 10)), asked) == (0, 0), (
        f"a week on: {len(b.store.ledger.wanted(key(a), 10))} asks kept at b, "
        f"{asked} rows of mail_asked at a"
    )


# ------------------------------------------------------------ what a clerk reads


@pytest.mark.pure
def test_the_sync_line_of_the_side_asked_does_not_say_0_entries_received(
    make_db: MakeDb,
) -> None:
    """b's `p2psync sync` fetches a's ask: its line says '0 entries received' and
    nothing of the ask (Incoming.wanted is counted nowhere)."""
    a, b = widened(make_db)
    report = ExchangeReport(relay=bytes(32))
    for out in Mailer(a).outgoing(key(b), now_ms()):
        _count(report, Mailer(b).incoming(out.wire, now_ms()))
    line = _outcome(b, report, key(a)).line
    assert "0 entries received" not in line, line


@pytest.mark.pure
def test_peers_does_not_show_an_ask_as_0_entries_at_relay(make_db: MakeDb) -> None:
    """`p2psync peers` (describe_delivery) counts an envelope of asks as a data
    envelope of entries: 'by relay/file: 0 entries at relay ...'."""
    a, b = widened(make_db)
    now = now_ms()
    for e in Mailer(a).outgoing(key(b), now):
        Mailer(a).deposited(key(b), e.seq, where="relay", until_ms=now + DAY, now_ms=now)
    figures = delivery(a, key(b), now)
    assert figures is not None
    lines = describe_delivery(figures)
    assert not any("0 entries at relay" in line for line in lines), lines


@pytest.mark.pure
def test_docs_relay_describes_bundles_that_ask() -> None:
    """store/wants.py points at docs/relay.md, 'Payloads wanted', which does not
    exist; 'Bundles' still says exactly the keys 0-4, version 1, and 'Mixed
    routes' says that through a relay missing payloads are not asked for yet."""
    text = " ".join((DOCS / "relay.md").read_text().split())
    stale = "Through a relay, missing payloads are not asked for yet"
    assert "Payloads wanted" in text and stale not in text, (
        f"'Payloads wanted' section: {'Payloads wanted' in text}; stale sentence "
        f"still there: {stale in text}; 'exactly the keys 0-4': {'exactly the keys 0-4' in text}"
    )
