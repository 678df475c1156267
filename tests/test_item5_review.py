"""Review of issue 13 item 5 (a68ee1d: strangers' budgets, request expiry,
``pair reject --all-pending``). Each test fails on a68ee1d and says what should
happen instead; none fixes anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

import p2psync
from p2psync import pairing
from p2psync.clock import now_ms
from p2psync.core import rules as core_rules
from p2psync.core.rules import RuleState, Terms
from p2psync.store import rules as store_rules
from tests.test_hostile import assert_no_full_scans
from tests.test_pairing import key

pytestmark = pytest.mark.pure

MakeDb = Callable[[str], p2psync.Database]
DAY = 86_400_000

SMALL = Terms()
#: the largest terms a proposal may carry: ~8.5 KiB signed
BIG = Terms.make([f"{i:02d}" + "x" * 126 for i in range(core_rules.MAX_PATTERNS)])


def ask(stranger: p2psync.Database, a: p2psync.Database, at: int, terms: Terms = SMALL) -> bytes:
    """``stranger`` sends ``a`` a pairing request received at ``at``; returns it."""
    signed = core_rules.propose(stranger.identity, key(a), terms, os.urandom(16), at)
    a.store.add_rule_objects(key(a), [signed], at, peer_only=key(stranger))
    a.store.add_peer(key(stranger), stranger.name, [], at)
    return signed


def test_reject_all_pending_frees_the_strangers_byte_budget(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue: real requests must not stay locked out by a flood the user has
    answered. Strangers' byte budget (STRANGERS_BYTES) counts every pair with no
    acceptance, *rejected ones included*, and the rejection itself restarts the
    7-day clock (expire_requests: max(received) includes our reject). So an
    attacker with 64 keys x 64 KiB fills the 4 MiB; `pair reject --all-pending`
    frees the 64 slots but not the bytes, and every real request is refused
    ("fill their budget ... reject them (--all-pending)") for 7 more days -- the
    hint tells the user to do what they just did. Should: once the user rejected
    them, strangers' requests no longer keep a new request out (reject_strangers
    forgets the rejected strangers' pairs, or rejected pairs leave the budget)."""
    a = make_db("a")
    t0 = now_ms()
    flood = [make_db(f"s{i}") for i in range(3)]
    for s in flood:
        ask(s, a, t0, BIG)
    held = sum(map(len, a.store.rule_objects(None)))
    monkeypatch.setattr(store_rules, "STRANGERS_BYTES", held)  # the flood filled it
    newcomer = make_db("newcomer")
    with pytest.raises(p2psync.P2PSyncError, match="fill their budget"):
        ask(newcomer, a, t0 + 1)
    rejected, _ = pairing.reject_strangers(a, "flood")
    assert len(rejected) == 3
    # the user cleared the flood in one step, as the refusal told them to
    ask(newcomer, a, now_ms())
    assert [r.proposer for r in a.store.rules() if r.state is RuleState.PROPOSED] == [key(newcomer)]


@pytest.mark.parametrize("cap", ["slots", "bytes"])
def test_a_flooded_joiner_still_takes_the_inviters_proposal(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch, cap: str
) -> None:
    """docs/protocol.md Limits: "An invite join is never refused by these caps".
    True only on the inviter's side. On the joiner's side the inviter is a stranger
    (no acceptance in the pair yet) and its proposal is a PROPOSE signed by the peer,
    so rules.add_objects holds it to MAX_STRANGERS and STRANGERS_BYTES: a joiner
    whose caps strangers filled cannot store the proposal its code asked for, and
    the join fails (live: link.receive -> pairing.receive; through a relay:
    mail/inbox._introduction -> pairing.receive). Should: a proposal from an
    inviter whose code we presented (``joining``: JoinTicket or relay_joins row,
    terms hash matching) is stored whatever strangers hold."""
    c, inviter = make_db("c"), make_db("inviter")
    t0 = now_ms()
    if cap == "slots":
        monkeypatch.setattr(store_rules, "MAX_STRANGERS", 2)
    for i in range(2):
        ask(make_db(f"s{i}"), c, t0)
    if cap == "bytes":
        monkeypatch.setattr(
            store_rules, "STRANGERS_BYTES", sum(map(len, c.store.rule_objects(None)))
        )
    code = pairing.parse_invite(pairing.create_invite(inviter, Terms.make(["vouchers"]), 600, []))
    ticket = pairing.JoinTicket.of(code)
    handshake = os.urandom(32)
    proposal = pairing.answer_join(inviter, key(c), code.invite, ticket.proof(handshake), handshake)
    answers = pairing.receive(c, key(inviter), [proposal], [ticket])
    assert answers, "the joiner accepts the inviter's proposal"
    assert key(inviter) in c.store.peers_in_force()


def test_a_peer_we_asked_is_not_held_to_the_strangers_budget(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a68ee1d (and a6b95f6) say peers we asked are never strangers, and
    expire_requests spares them; but rules.add_objects applies _stranger_budget to
    every non-ACCEPT object in a pair with no acceptance, our own proposal
    notwithstanding. With the strangers' budget full, the peer we asked cannot
    deliver its own proposal or its rejection; and when both sides asked (both ran
    `pair add`), its Rules message [its proposal, its acceptance of ours] is refused
    as one batch, so the acceptance is lost and the two never pair. Should: a pair
    holding a proposal of ours is not held to the strangers' budgets."""
    a, x = make_db("a"), make_db("x")
    t0 = now_ms()
    for i in range(2):
        ask(make_db(f"s{i}"), a, t0)
    monkeypatch.setattr(store_rules, "STRANGERS_BYTES", sum(map(len, a.store.rule_objects(None))))
    pairing.propose(a, key(x), Terms())  # we ask x
    pairing.propose(x, key(a), Terms())  # x asks us too, before it sees our request
    pairing.receive(x, key(a), a.store.rule_objects(key(x)))  # x settles: accepts ours
    assert any(r.state is RuleState.ACCEPTED for r in x.store.rules(key(a)))
    pairing.receive(a, key(x), x.store.rule_objects(key(a)))
    assert key(x) in a.store.peers_in_force()


def test_a_stranger_cannot_keep_its_request_alive_by_asking_again(make_db: MakeDb) -> None:
    """Issue: "unanswered requests expire (default 7 days)". expire_requests forgets
    a pair only when its *newest* object is 7 days old, and any object the stranger
    sends counts: a stranger that withdraws and re-sends its request every 6 days
    is never forgotten (up to its 32 objects: ~6 months), so 64 keys doing so keep
    the 64 slots full without racing anyone for freed ones. README says "requests
    unanswered for 7 days are forgotten by themselves". Should: a pair that never
    had an answer of ours is forgotten at the latest some fixed time after the
    stranger's first request (here: within 4 x REQUEST_TTL_MS), whatever it sends."""
    a, s = make_db("a"), make_db("s")
    t0 = now_ms()
    signed = ask(s, a, t0)
    at = t0
    for _ in range(5):  # every 6 days: withdraw and ask again
        at += 6 * DAY
        revoke = core_rules.revoke(s.identity, core_rules.rule_id(signed), at)
        signed = core_rules.propose(s.identity, key(a), Terms(), os.urandom(16), at)
        a.store.add_rule_objects(key(a), [revoke, signed], at, peer_only=key(s))
    # (after test_item6_review: a request made once its pair's week is up starts a
    # new pair) no object older than a week is ever kept, whatever it sends...
    oldest = min(core_rules.decode(o).at_ms for o in a.store.rule_objects(key(s)))
    assert oldest > at - store_rules.REQUEST_TTL_MS
    # ...and its last pair goes a week after it began
    assert a.store.expire_requests(key(a), at + store_rules.REQUEST_TTL_MS) == [key(s)]


def test_a_request_refused_for_full_caps_never_scans_every_rule_object(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/test_hostile.py test_rule_bookkeeping_never_scans_every_rule_object is
    the standard: what a peer's request runs under the write lock uses indexes.
    When the slots (or the byte budget) are full, every request from a new key runs
    expire_requests inside add_objects: ``GROUP BY peer HAVING ... max(received)``
    is 'SCAN rule_objects USING INDEX rule_objects_by_signer', a lookup of every
    row of the table (paired peers' included; ``received`` lies after the ``signed``
    blob, so every blob's pages are read), once per refused request, which a flood
    of throwaway keys repeats at will. Should: the in-line sweep reads an index
    (e.g. per peer, the newest ``received`` kept in an indexed column or table, or
    an index on (peer, kind, signer, received)), or the in-line sweep is dropped in
    favour of the agent's periodic one."""
    monkeypatch.setattr(store_rules, "MAX_STRANGERS", 1)
    a = make_db("a")
    ask(make_db("s0"), a, now_ms())
    late = make_db("late")
    proposal = core_rules.propose(late.identity, key(a), Terms(), os.urandom(16), now_ms())
    statements: list[str] = []
    conn = a.store._db.conn
    conn.set_trace_callback(statements.append)
    try:
        with pytest.raises(p2psync.P2PSyncError, match="await an answer"):
            a.store.add_rule_objects(key(a), [proposal], now_ms(), peer_only=key(late))
    finally:
        conn.set_trace_callback(None)
    assert_no_full_scans(a, statements)


def test_reject_all_pending_leaves_the_requests_of_peers_we_asked(make_db: MakeDb) -> None:
    """pairing.reject_strangers rejects every waiting proposal whose proposer has no
    rule in force, including a peer the user asked (`pair add x`) that answered
    with a request of its own for other terms (nothing in common, so settle left
    it to the user). a6b95f6 says peers we asked are never strangers, and
    expire_requests spares them; `--all-pending` ("a flood") should too, and say
    how many such requests it left, as it does for paired peers' proposals."""
    a, x = make_db("a"), make_db("x")
    pairing.propose(a, key(x), Terms.make(["vouchers"]))  # we ask x
    pairing.propose(x, key(a), Terms.make(["stock"]))  # x asks for something else
    pairing.receive(a, key(x), x.store.rule_objects(key(a)))
    ask(make_db("stranger"), a, now_ms())
    rejected, kept = pairing.reject_strangers(a, "flood")
    assert [r.proposer for r in rejected] != [] and key(x) not in {r.proposer for r in rejected}
    assert kept == 1
