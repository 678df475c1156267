"""The agent's mailbox side at store level: two homes paired with a relay rule
exchange envelopes by hand (no relay, no network): bundles, receipts, the ledger,
loss, reordering, duplicates, forgeries, narrowed rules, conflicts."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest

import p2psync
from p2psync import pairing
from p2psync.clock import now_ms
from p2psync.core import canonical
from p2psync.core.bundle import Bundle, decode_bundle, encode_bundle, heads_of
from p2psync.core.entry import decode_wire
from p2psync.core.envelope import EnvelopeClass, open_envelope, seal_envelope
from p2psync.core.policy import decode_policy
from p2psync.core.receipt import sign_receipt
from p2psync.core.rules import Direction, Route, RuleState, Terms
from p2psync.errors import (
    EnvelopeMismatchError,
    EnvelopeSealError,
    EnvelopeSignatureError,
    UsageError,
)
from p2psync.mail.mailer import QUEUED_FOR_MS, Mailer, Outgoing
from p2psync.store.ledger import State

pytestmark = pytest.mark.pure

MakeDb = Callable[[str], p2psync.Database]
NOW = now_ms()  # entries are stamped by the real clock: reset for each test below


@pytest.fixture(autouse=True)
def _now() -> None:
    """NOW as each test starts: a value taken at import went stale when the tests
    ran more than 10 minutes after collection (a slow or loaded machine), and
    entries written then were refused as from the future."""
    global NOW  # noqa: PLW0603 (the module-level value the tests read)
    NOW = now_ms()
DAY = 24 * 3600 * 1000


def key(db: p2psync.Database) -> bytes:
    return db.identity.public_key


def pair(a: p2psync.Database, b: p2psync.Database, terms: Terms) -> None:
    """A proposes ``terms`` to B, B accepts: both hold the rule in force."""
    pairing.propose(a, key(b), terms, name=b.name)
    pairing.receive(b, key(a), a.store.rule_objects(key(b)), (), a.name)
    proposal = next(r for r in b.store.rules(key(a)) if r.state is RuleState.PROPOSED)
    pairing.accept(b, proposal)
    pairing.receive(a, key(b), b.store.rule_objects(key(a)))
    assert any(r.state is RuleState.ACCEPTED for r in a.store.rules(key(b)))


def write(db: p2psync.Database, count: int, collection: str = "c", start: int = 0) -> None:
    db.write(
        [p2psync.Change(p2psync.OpKind.PUT, collection, f"k{i}", {"i": i, "v": "x" * 60})]
        for i in range(start, start + count)
    )


def deliver(mailer: Mailer, envelopes: list[Outgoing], now: int | None = None) -> list[object]:
    when = now_ms() if now is None else now  # (not NOW: other modules call it too)
    return [mailer.incoming(e.wire, when) for e in envelopes]


def states(mailer: Mailer, peer: bytes) -> dict[str, int]:
    return {k: v for k, v in mailer.summary(peer).items() if v and k != "receipts"}


@pytest.fixture
def relay_pair(make_db: MakeDb) -> tuple[p2psync.Database, p2psync.Database]:
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["*"], route=Route.RELAY))
    return a, b


def test_a_thousand_records_go_by_envelopes_and_come_back_acknowledged(relay_pair) -> None:
    a, b = relay_pair
    ma, mb = Mailer(a), Mailer(b)
    write(a, 1000)
    out = ma.outgoing(key(b), NOW)
    assert 1 <= len(out) < 10 and sum(e.entries for e in out) == 1000
    assert all(e.cls is EnvelopeClass.DATA for e in out)
    assert [e.seq for e in out] == list(range(1, len(out) + 1))
    assert states(ma, key(b)) == {"queued": len(out)}
    for e in out:
        assert ma.deposited(key(b), e.seq, where="relay-x", until_ms=NOW + DAY, now_ms=NOW)
    assert states(ma, key(b)) == {"at-relay": len(out)}
    results = deliver(mb, out)
    assert sum(r.applied for r in results) == 1000
    assert b.get("c", "k999") == {"i": 999, "v": "x" * 60}
    assert ma.outgoing(key(b), NOW) == []  # all in flight: nothing twice
    receipts = mb.outgoing(key(a), NOW)
    assert [r.cls for r in receipts] == [EnvelopeClass.RECEIPT]
    got = deliver(ma, receipts)
    assert got[0].acknowledged == len(out)
    assert states(ma, key(b)) == {"acknowledged": len(out)}
    assert ma.outgoing(key(b), NOW) == []
    assert mb.outgoing(key(a), NOW) == []  # B knows A holds its own entries
    write(a, 5, start=1000)
    again = ma.outgoing(key(b), NOW)
    assert [e.entries for e in again] == [5] and again[0].seq == len(out) + 1
    assert mb.gaps(key(a), NOW).missing == ()


def test_reordered_duplicated_and_dropped_envelopes_converge(relay_pair) -> None:
    a, b = relay_pair
    ma, mb = Mailer(a), Mailer(b)
    write(a, 3000)
    out = ma.outgoing(key(b), NOW, max_sealed=64 * 1024)
    assert len(out) >= 5
    for e in out:
        ma.deposited(key(b), e.seq, where="relay-x", until_ms=NOW + DAY, now_ms=NOW)
    dropped = out[2]
    shuffled = [e for e in out if e is not dropped] + out[:2]  # and two duplicates
    random.Random(1).shuffle(shuffled)
    results = deliver(mb, shuffled)
    assert sum(r.duplicate for r in results) == 2
    assert mb.gaps(key(a), NOW).missing == (dropped.seq,)
    assert not b.exists("c", "k2999")  # held behind the dropped envelope
    deliver(ma, mb.outgoing(key(a), NOW))
    assert states(ma, key(b)) == {"acknowledged": len(out) - 1, "at-relay": 1}
    assert ma.outgoing(key(b), NOW) == []  # the lost one is still in flight
    assert ma.expire(NOW + DAY) == 1
    resent = ma.outgoing(key(b), NOW + DAY)
    assert sum(e.entries for e in resent) == dropped.entries
    deliver(mb, resent, NOW + DAY)
    assert b.get("c", "k2999") == {"i": 2999, "v": "x" * 60}
    assert len(list(b.scan("c"))) == 3000
    deliver(ma, mb.outgoing(key(a), NOW + DAY), NOW + DAY)
    assert states(ma, key(b)) == {"acknowledged": len(out), "expired": 1}
    assert ma.outgoing(key(b), NOW + DAY) == []


def test_queued_envelopes_never_deposited_go_again(relay_pair) -> None:
    a, b = relay_pair
    ma = Mailer(a)
    write(a, 10)
    first = ma.outgoing(key(b), NOW)
    assert ma.expire(NOW + QUEUED_FOR_MS - 1) == 0
    assert ma.expire(NOW + QUEUED_FOR_MS) == 1
    again = ma.outgoing(key(b), NOW + QUEUED_FOR_MS)
    assert [e.entries for e in again] == [10] and again[0].seq == first[0].seq + 1


def test_forged_misaddressed_and_foreign_receipts_are_refused(make_db: MakeDb, relay_pair) -> None:
    a, b = relay_pair
    c = make_db("c")
    ma, mb = Mailer(a), Mailer(b)
    write(a, 20)
    out = ma.outgoing(key(b), NOW)
    wire = out[0].wire
    with pytest.raises(EnvelopeSealError):  # addressed to B, opened by C
        Mailer(c).incoming(wire, NOW)
    with pytest.raises(EnvelopeMismatchError):  # deposited by someone else
        mb.incoming(wire, NOW, depositor=key(c))
    # C signs an envelope naming itself... and one claiming to be A
    forged = seal_envelope(c.identity, key(b), 1, EnvelopeClass.DATA, 0, b"x", os.urandom(32))
    header, sealed = canonical.decode(forged, what="w", max_depth=2)
    header[1] = key(a)
    with pytest.raises((EnvelopeSignatureError, EnvelopeMismatchError)):
        mb.incoming(canonical.encode([header, sealed]), NOW)
    stranger = mb.incoming(forged, NOW)  # C is no peer of B's: refused, nothing applied
    assert stranger.reason is not None and "no rule" in stranger.reason
    assert not b.exists("c", "k0")
    # a receipt for A's envelopes, signed by C, sealed as from B: refused
    fake = sign_receipt(c.identity, key(a), [out[0].seq], {}, {}, NOW)
    receipt = seal_envelope(b.identity, key(a), 99, EnvelopeClass.RECEIPT, 0, fake, os.urandom(32))
    with pytest.raises(EnvelopeMismatchError):
        ma.incoming(receipt, NOW)
    c_receipt = seal_envelope(c.identity, key(a), 1, EnvelopeClass.RECEIPT, 0, fake, os.urandom(32))
    assert ma.incoming(c_receipt, NOW).acknowledged == 0  # only rows to C could move
    assert states(ma, key(b)) == {"queued": len(out)}


def test_a_direct_rule_sends_nothing_and_lists_no_one(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["*"], route=Route.DIRECT))
    write(a, 10)
    assert Mailer(a).outgoing(key(b), NOW) == []
    assert Mailer(a).policy(NOW) is None


def test_a_narrowed_rule_leaks_no_other_collection(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["vouchers"], route=Route.AUTO))
    write(a, 30, "vouchers")
    a.write(
        [p2psync.Change(p2psync.OpKind.PUT, "payroll", f"secret-key-{i}", f"SECRET-{i}")]
        for i in range(30)
    )
    out = Mailer(a).outgoing(key(b), NOW)
    seen = set()
    for e in out:
        envelope = open_envelope(b.identity, e.wire)
        # withheld ops keep their collection name and digest (docs/entry-format.md
        # §3.4, as in a direct session); their keys and values never travel
        assert b"SECRET" not in envelope.payload and b"secret-key" not in envelope.payload
        assert b"x" * 60 in envelope.payload
        for wire in decode_bundle(envelope.payload).entries:
            entry = decode_wire(wire)
            seen |= {
                c for c, op in zip(entry.collections, entry.ops, strict=True) if op is not None
            }
    assert seen == {"vouchers"}
    deliver(Mailer(b), out)
    assert b.collections() == [("vouchers", 30)]


def test_a_one_way_rule_refuses_entries_the_other_way(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["*"], Direction.SEND, route=Route.RELAY))  # A sends, B receives
    write(b, 5)
    from_b = Mailer(b).outgoing(key(a), NOW)  # only its rule objects, if any
    assert sum(e.entries for e in from_b) == 0
    deliver(Mailer(a), from_b)
    write(a, 5)
    deliver(Mailer(b), Mailer(a).outgoing(key(b), NOW))
    assert len(list(b.scan("c"))) == 5
    # B sends its entries anyway, sealed by hand: A refuses them, applies nothing
    entries = tuple(s.wire for s in b.store.entries_after({key(b): 0}, 100, 1 << 20))
    payload = encode_bundle(Bundle(heads_of(b.store.heads()), bytes(16), (), entries))
    wire = seal_envelope(b.identity, key(a), 77, EnvelopeClass.DATA, 0, payload, os.urandom(32))
    got = Mailer(a).incoming(wire, NOW)
    assert got.applied == 0 and got.reason is not None and "no rule" in got.reason
    assert len(list(a.scan("c"))) == 5  # its own five only
    receipt = [e for e in Mailer(a).outgoing(key(b), NOW) if e.cls is EnvelopeClass.RECEIPT]
    deliver(Mailer(b), receipt)
    assert Mailer(b).summary(key(a))["refused"] == 0  # seq 77 was never in B's ledger


def test_conflicting_writes_converge_through_envelopes(relay_pair) -> None:
    a, b = relay_pair
    ma, mb = Mailer(a), Mailer(b)
    a.put("c", "same", {"by": "a"})
    b.put("c", "same", {"by": "b"})
    to_b, to_a = ma.outgoing(key(b), NOW), mb.outgoing(key(a), NOW)
    deliver(mb, to_b)
    deliver(ma, to_a)
    assert a.get("c", "same") == b.get("c", "same")
    assert a.in_conflict("c", "same") and b.in_conflict("c", "same")
    deliver(ma, mb.outgoing(key(a), NOW))
    deliver(mb, ma.outgoing(key(b), NOW))
    assert states(ma, key(b)) == {"acknowledged": 1}
    assert states(mb, key(a)) == {"acknowledged": 1}


def test_the_mailbox_policy_is_signed_again_only_when_senders_change(make_db: MakeDb) -> None:
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    pair(a, b, Terms.make(["*"], route=Route.RELAY))
    first = decode_policy(Mailer(a).policy(NOW) or b"")
    assert (first.version, first.senders) == (1, (key(b),))
    assert Mailer(a).policy(NOW + 1) == first.wire
    pair(a, c, Terms.make(["*"], route=Route.AUTO))
    second = decode_policy(Mailer(a).policy(NOW + 2) or b"")
    assert second.version == 2 and set(second.senders) == {key(b), key(c)}


def test_superseded_envelopes_are_named_for_retraction(relay_pair) -> None:
    a, b = relay_pair
    ma = Mailer(a)
    write(a, 10)
    out = ma.outgoing(key(b), NOW)
    ma.deposited(key(b), out[0].seq, where="relay-x", until_ms=NOW + DAY, now_ms=NOW)
    assert ma.superseded(key(b), {}, NOW) == []
    assert ma.superseded(key(b), a.store.heads(), NOW) == [out[0].seq]
    assert states(ma, key(b)) == {"superseded": 1}
    assert ma.outgoing(key(b), NOW) == []  # it holds them


def test_envelopes_smaller_than_the_smallest_bucket_cannot_be_asked_for(relay_pair) -> None:
    a, b = relay_pair
    with pytest.raises(UsageError):
        Mailer(a).outgoing(key(b), NOW, max_sealed=512)


def test_a_pairing_request_goes_as_an_introduction_and_the_answer_comes_back(
    make_db: MakeDb,
) -> None:
    """A proposes to B, which it never met: one introduction (class 2) carries the
    request; B lists it as pending under A's name; B accepts; B's answer comes back
    in a data envelope A's policy lets in; the rule is in force at both; data then
    flows, and the introduction is acknowledged."""
    a, b = make_db("a"), make_db("b")
    ma, mb = Mailer(a), Mailer(b)
    pairing.propose(a, key(b), Terms.make(["orders"], route=Route.RELAY), name="b")
    assert key(b) in ma.peers()  # its answer may come to our mailbox
    (intro,) = ma.outgoing(key(b), NOW)
    assert intro.cls is EnvelopeClass.INTRODUCTION
    assert ma.outgoing(key(b), NOW) == []  # once
    got = mb.incoming(intro.wire, NOW)
    assert got.reason is None and got.rules_added >= 1
    (pending,) = [r for r in b.store.rules(key(a)) if r.state is RuleState.PROPOSED]
    assert b.store.peer(key(a)).name == "a"
    assert key(a) not in mb.peers()  # nothing from A until B says yes
    pairing.accept(b, pending)
    write(b, 3, collection="orders")
    answer = mb.outgoing(key(a), NOW)
    assert [e.cls for e in answer][-1] is EnvelopeClass.DATA
    results = [ma.incoming(e.wire, NOW) for e in answer]
    assert any(r.rules_added for r in results) and sum(r.applied for r in results) == 3
    assert any(r.state is RuleState.ACCEPTED for r in a.store.rules(key(b)))
    receipts = ma.outgoing(key(b), NOW)
    for e in receipts:
        mb.incoming(e.wire, NOW)
    data = [e for e in answer if e.cls is EnvelopeClass.DATA]
    assert states(mb, key(a)).get("acknowledged") == len(data)
    assert answer[0].cls is EnvelopeClass.RECEIPT  # for the introduction
    (intro_row,) = [r for r in ma.ledger(key(b)) if r.seq == intro.seq]
    assert intro_row.state is State.ACKNOWLEDGED  # the introduction
    write(a, 2, collection="orders")
    for e in ma.outgoing(key(b), NOW):
        mb.incoming(e.wire, NOW)
    assert b.get("orders", "k1") is not None


def test_a_rejected_request_is_answered_through_the_relay(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    ma, mb = Mailer(a), Mailer(b)
    pairing.propose(a, key(b), Terms.make(["*"], route=Route.AUTO), name="b")
    (intro,) = ma.outgoing(key(b), NOW)
    mb.incoming(intro.wire, NOW)
    (pending,) = b.store.rules(key(a))
    pairing.reject(b, pending, "we do not know you")
    (answer,) = mb.outgoing(key(a), NOW)
    assert answer.cls is EnvelopeClass.INTRODUCTION
    ma.incoming(answer.wire, NOW)
    (rule,) = a.store.rules(key(b))
    assert rule.state is RuleState.REJECTED and rule.reason == "we do not know you"
    assert key(b) not in ma.peers() and ma.outgoing(key(b), NOW) == []


def test_introductions_from_strangers_that_are_not_requests_change_nothing(
    make_db: MakeDb, relay_pair
) -> None:
    _, b = relay_pair
    c = make_db("c")
    garbage = seal_envelope(
        c.identity, key(b), 1, EnvelopeClass.INTRODUCTION, 0, b"hi", os.urandom(32)
    )
    assert "malformed introduction" in (Mailer(b).incoming(garbage, NOW).reason or "")
    assert Mailer(b).incoming(garbage, NOW).duplicate
    assert b.store.peer(key(c)) is None
    # data from a stranger who only introduced itself: refused, nothing applied
    write(c, 2)
    pairing.propose(c, key(b), Terms.make(["*"], route=Route.RELAY), name="b")
    (intro,) = Mailer(c).outgoing(key(b), NOW)
    Mailer(b).incoming(intro.wire, NOW)
    data = seal_envelope(c.identity, key(b), 9, EnvelopeClass.DATA, 0, b"x", os.urandom(32))
    assert "no rule" in (Mailer(b).incoming(data, NOW).reason or "")
