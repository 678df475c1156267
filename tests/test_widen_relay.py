"""Payloads withheld under a narrower rule come through the relay too when the rule
widens (issue 13, item 7, on the mailbox path): the receiving side asks for the
entries again in a bundle's ``wants`` and the other side answers in its next
bundle, so that both end holding exactly what a fresh pairing with the wider rule
gives. Envelopes are handed from one mailer to the other (no relay, no network)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import p2psync
from p2psync.clock import now_ms
from p2psync.core.bundle import Bundle, decode_bundle, encode_bundle, heads_of
from p2psync.core.canonical import encode
from p2psync.core.entry import decode_wire
from p2psync.core.envelope import EnvelopeClass, open_envelope, seal_envelope
from p2psync.core.messages import MAX_WANT_IDS, Head
from p2psync.core.receipt import sign_receipt
from p2psync.core.rules import Direction, Route, Terms
from p2psync.errors import BundleError, UsageError
from p2psync.mail.mailer import Mailer, Outgoing
from p2psync.store import wants
from tests.agents import cli
from tests.relaynode import RelayNode, pair_by_rule
from tests.test_mail import deliver, key, pair
from tests.test_relay_node import site, use_relay
from tests.test_widen import holdings, write_history

MakeDb = Callable[[str], p2psync.Database]


def write_pairs(
    db: p2psync.Database, count: int, other: str = "misc", prefixes: tuple[str, str] = ("s", "m")
) -> None:
    """``count`` entries, each a put in 'stock' and one in ``other`` (value: its index)."""
    db.write(
        [
            p2psync.Change(p2psync.OpKind.PUT, "stock", f"{prefixes[0]}{i}", i),
            p2psync.Change(p2psync.OpKind.PUT, other, f"{prefixes[1]}{i}", i),
        ]
        for i in range(count)
    )


def exchange(a: p2psync.Database, b: p2psync.Database, *, rounds: int = 10) -> int:
    """Hand envelopes both ways until neither has anything for the other; how
    many rounds that took."""
    ma, mb = Mailer(a), Mailer(b)
    for done in range(1, rounds + 1):
        ab = ma.outgoing(key(b), p2psync.clock.now_ms(), max_envelopes=None)
        deliver(mb, ab)
        ba = mb.outgoing(key(a), p2psync.clock.now_ms(), max_envelopes=None)
        deliver(ma, ba)
        if not ab and not ba:
            return done
    raise AssertionError(f"still exchanging after {rounds} rounds")


@pytest.mark.pure
def test_widening_a_relay_rule_brings_what_it_withheld_as_a_fresh_pairing_would(
    make_db: MakeDb,
) -> None:
    a, b, fresh = make_db("a"), make_db("b"), make_db("fresh")
    pair(a, b, Terms.make(["stock"], route=Route.RELAY))
    write_history(a, b)
    exchange(a, b)
    assert b.get("stock", "s1") == 1 and b.get("misc", "m1") == "b1"  # a's m1 withheld
    assert b.store.incomplete() == {"misc": 2} and a.store.incomplete() == {"misc": 2}
    a.put("misc", "m2", "a2 again")
    b.delete("misc", "m3")

    pair(b, a, Terms.make(["misc"], route=Route.RELAY))  # rules add up: stock and misc
    exchange(a, b)
    assert a.store.incomplete() == {} and b.store.incomplete() == {}

    pair(fresh, a, Terms.make(["stock", "misc"], route=Route.RELAY))
    exchange(fresh, a)
    assert holdings(a) == holdings(b), "a and b differ after widening"
    assert holdings(fresh) == holdings(a), "a fresh pairing holds something else"
    assert a.get("misc", "m2") == "a2 again" and not a.in_conflict("misc", "m2")
    assert a.in_conflict("misc", "m1") and b.in_conflict("misc", "m1")
    assert not b.exists("misc", "m3")
    assert a.verify().ok and b.verify().ok


# ------------------------------------------------------------ the bundle format


def ids(*labels: str) -> tuple[bytes, ...]:
    return tuple(sorted(label.encode().ljust(32, b"-") for label in labels))


@pytest.mark.pure
def test_a_bundle_that_asks_is_version_2_and_carries_nothing_else() -> None:
    heads = heads_of({})
    plain = encode_bundle(Bundle(heads, bytes(16)))
    asks = encode_bundle(Bundle(heads, bytes(16), wants=ids("x", "y")))
    assert decode_bundle(plain).wants == () and plain[1:3] == bytes([0, 1])  # {0: 1, ...}
    assert decode_bundle(asks).wants == ids("x", "y")
    with pytest.raises(UsageError):  # asks ride alone: an old peer refuses them alone
        encode_bundle(Bundle(heads, bytes(16), entries=(b"x",), wants=ids("x")))
    base = {0: 2, 1: [], 2: bytes(16), 3: [], 4: []}
    bad: list[tuple[dict[int, object], str]] = [
        ({**base, 0: 1, 5: list(ids("x"))}, "keys 0-4"),  # version 1 never asks
        (base, "keys 0-5"),  # version 2 always does
        ({**base, 5: []}, "1-1024"),
        ({**base, 5: [b"x" * 31]}, "ascending"),
        ({**base, 5: list(reversed(ids("x", "y")))}, "ascending"),
        ({**base, 5: list(ids("x")) * 2}, "ascending"),
        ({**base, 5: [bytes([i // 256, i % 256]) * 16 for i in range(MAX_WANT_IDS + 1)]}, "1024"),
        ({**base, 4: [b"entry"], 5: list(ids("x"))}, "no entries"),
        ({**base, 0: 3, 5: list(ids("x"))}, "unknown bundle version"),
    ]
    for body, said in bad:
        with pytest.raises(BundleError, match=said):
            decode_bundle(encode(body))


# ------------------------------------------------------------ asking


def widened(make_db: MakeDb) -> tuple[p2psync.Database, p2psync.Database]:
    """a and b shared 'stock' by the relay, then 'misc' too: a holds two of b's
    entries without their 'misc' payloads, and may ask b for them."""
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["stock"], route=Route.RELAY))
    for i in range(2):
        with b.transaction() as tx:
            tx.put("stock", f"s{i}", i)
            tx.put("misc", f"m{i}", f"misc {i}")
    exchange(a, b)
    assert a.store.incomplete() == {"misc": 2}
    pair(b, a, Terms.make(["misc"], route=Route.RELAY))
    return a, b


def asks_in(out: list[Outgoing], db: p2psync.Database) -> list[tuple[bytes, ...]]:
    return [
        decode_bundle(open_envelope(db.identity, e.wire).payload).wants
        for e in out
        if e.asks
    ]


@pytest.mark.pure
def test_an_ask_is_not_repeated_within_a_day_and_one_refused_loses_nothing(
    make_db: MakeDb,
) -> None:
    """b refuses the bundle that asks (as a p2psync too old to read ``wants`` does:
    'malformed bundle'): a's other envelopes are unaffected, a does not ask again at
    every exchange, but does a day later."""
    a, b = widened(make_db)
    a.put("stock", "from a", 1)
    ma, mb = Mailer(a), Mailer(b)
    out = ma.outgoing(key(b), now_ms())
    [asked] = asks_in(out, b)
    assert len(asked) == 2 and sum(e.asks for e in out) == 2
    data = [e for e in out if not e.asks]
    deliver(mb, data)
    assert b.get("stock", "from a") == 1
    ask = next(e for e in out if e.asks)
    refusal = sign_receipt(
        b.identity, key(a), [e.seq for e in data], {ask.seq: "malformed bundle: keys 0-4"},
        heads_of(b.store.heads()), now_ms(),
    )
    wire = seal_envelope(b.identity, key(a), 999, EnvelopeClass.RECEIPT, 0, refusal, os.urandom(32))
    assert ma.incoming(wire, now_ms()).rejected == 1
    assert ma.outgoing(key(b), now_ms()) == []  # not asked again at once
    later = now_ms() + wants.ASK_AGAIN_MS + 1000
    ma.expire(later)
    assert asks_in(ma.outgoing(key(b), later), b) == [asked]
    assert a.store.incomplete() == {"misc": 2}  # and nothing was lost meanwhile
    assert ma.summary(key(b))["refused"] == 1


@pytest.mark.pure
def test_many_missing_payloads_are_asked_for_in_bundles_of_at_most_1024(
    make_db: MakeDb,
) -> None:
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["stock"], route=Route.RELAY))
    write_pairs(b, 2500)
    exchange(a, b)
    pair(b, a, Terms.make(["misc"], route=Route.RELAY))
    out = Mailer(a).outgoing(key(b), now_ms(), max_envelopes=None)
    assert [len(w) for w in asks_in(out, b)] == [1024, 1024, 452]
    deliver(Mailer(b), out)
    exchange(a, b)
    assert a.store.incomplete() == {} and a.get("misc", "m2499") == 2499


@pytest.mark.pure
def test_a_peer_that_asks_gets_no_payload_its_rules_withhold(make_db: MakeDb) -> None:
    """Hostile b (a 'stock' rule only) asks for a's entries with 'payroll' ops, and
    for entries a does not hold: a answers with copies whose 'payroll' payloads stay
    withheld, and keeps no ask for what it does not hold."""
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["stock"], route=Route.RELAY))
    with a.transaction() as tx:
        tx.put("stock", "s", 1)
        tx.put("payroll", "salary", "SECRET-SALARY")
    exchange(a, b)
    asked = [s.id for s in a.store.entries_after({key(a): 0}, 10, 1 << 20)]
    wants_ids = tuple(sorted([*asked, *ids("not held")]))
    payload = encode_bundle(Bundle(heads_of(b.store.heads()), bytes(16), wants=wants_ids))
    wire = seal_envelope(b.identity, key(a), 500, EnvelopeClass.DATA, 0, payload, os.urandom(32))
    assert Mailer(a).incoming(wire, now_ms()).wanted == 2
    assert a.store.ledger.wanted(key(b), 10) == asked  # what a holds, only
    out = Mailer(a).outgoing(key(b), now_ms())
    answers = [
        decode_wire(w)
        for e in out
        if e.cls is EnvelopeClass.DATA
        for w in decode_bundle(open_envelope(b.identity, e.wire).payload).entries
    ]
    assert [e.id for e in answers] == asked
    for e in out:
        assert b"SECRET-SALARY" not in open_envelope(b.identity, e.wire).payload
    assert a.store.ledger.wanted(key(b), 10) == []  # answered once
    assert Mailer(a).outgoing(key(b), now_ms()) == []


@pytest.mark.pure
def test_asks_are_kept_only_while_a_rule_lets_us_send_and_within_a_cap(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["*"], Direction.RECEIVE, route=Route.RELAY))  # a only receives
    a.put("stock", "s", 1)
    held = [s.id for s in a.store.entries_after({key(a): 0}, 10, 1 << 20)]
    payload = encode_bundle(Bundle(heads_of(b.store.heads()), bytes(16), wants=tuple(held)))
    wire = seal_envelope(b.identity, key(a), 1, EnvelopeClass.DATA, 0, payload, os.urandom(32))
    assert Mailer(a).incoming(wire, now_ms()).wanted == 0
    assert a.store.ledger.wanted(key(b), 10) == []

    c = make_db("c")
    pair(a, c, Terms.make(["*"], route=Route.RELAY))
    for i in range(5):
        a.put("stock", f"s{i}", i)
    every = sorted(s.id for s in a.store.entries_after({key(a): 0}, 10, 1 << 20))
    monkeypatch.setattr(wants, "MAX_WANTED", 3)
    payload = encode_bundle(Bundle(heads_of(c.store.heads()), bytes(16), wants=tuple(every)))
    wire = seal_envelope(c.identity, key(a), 1, EnvelopeClass.DATA, 0, payload, os.urandom(32))
    assert Mailer(a).incoming(wire, now_ms()).wanted == 6  # asked for; 3 kept
    assert len(a.store.ledger.wanted(key(c), 10)) == 3


# ------------------------------------------------------------ through a relay node


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayNode]:
    node = RelayNode(tmp_path / "relay").init()
    yield node
    node.stop()


@pytest.mark.process
def test_through_a_relay_node_a_widened_rule_brings_what_it_withheld(
    tmp_path: Path, relay: RelayNode
) -> None:
    """`p2psync sync` on each side, a relay node between: b asks, a answers at its
    next sync, b's next sync merges the payload."""
    a, b = site(tmp_path, "a"), site(tmp_path, "b")
    ida, idb = pair_by_rule(a, b, Terms.make(["stock"], route=Route.RELAY))
    for device in (ida, idb):
        cli(relay.home, "relay", "allow", device)
    relay.start()
    use_relay(a, relay)
    use_relay(b, relay)
    with p2psync.open(a) as db, db.transaction() as tx:
        tx.put("stock", "s1", 1)
        tx.put("misc", "m1", "only once the rule widens")
    cli(b, "sync", "--timeout", "30")  # b's mailbox policy is at the relay
    cli(a, "sync", "--timeout", "30")
    assert "1 entry received" in cli(b, "sync", "--timeout", "30")
    with p2psync.open(b) as db:
        assert db.get("stock", "s1") == 1 and db.get("misc", "m1") is None
    pair_by_rule(a, b, Terms.make(["misc"], route=Route.RELAY))
    said = cli(b, "sync", "--timeout", "30")
    assert "asked it for the payloads of 1 entry held here without them" in said, said
    cli(a, "sync", "--timeout", "30")
    said = cli(b, "sync", "--timeout", "30")
    assert "payloads of 1 entry arrived" in said, said
    with p2psync.open(b) as db:
        assert db.get("misc", "m1") == "only once the rule widens"
        assert db.store.incomplete() == {} and db.verify().ok


@pytest.mark.pure
def test_a_direct_session_does_not_retract_an_answer(make_db: MakeDb) -> None:
    """b's answer (entries a holds, without the payloads) waits at the relay when a
    direct session shows a holds those entries: the session's heads say nothing of
    payloads, so the answer is not superseded nor retracted (a mixed pair's direct
    session cannot bring a relay-only payload)."""
    a, b = widened(make_db)
    ma, mb = Mailer(a), Mailer(b)
    deliver(mb, ma.outgoing(key(b), now_ms()))
    [answer] = [e for e in mb.outgoing(key(a), now_ms()) if e.entries]
    assert mb.deposited(key(a), answer.seq, where="r", until_ms=now_ms() + 10**8, now_ms=now_ms())
    holds = {x.author: Head(x.seq, x.head, x.frozen) for x in a.authors() if x.seq}
    assert mb.superseded(key(a), holds, now_ms()) == []
    assert mb.summary(key(a))["at-relay"] == 1
    deliver(ma, [answer])
    assert a.store.incomplete() == {}
