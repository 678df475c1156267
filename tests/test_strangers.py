"""Issue 13 item 5: strangers (agents with no rule in force that ask to pair) can
neither fill the disk nor keep real requests out for long.

Before: each throwaway key could store ~1 MiB of rule objects, 64 of them 64 MiB,
kept for ever, and the 65th was refused until the user rejected the 64 one by
one. Now: a pair with no acceptance holds at most 32 objects / 64 KiB from the
peer, all such pairs together 4 MiB; unanswered requests are forgotten after 7
days (their objects deleted); `pair reject --all-pending` clears them in one
step; an invite join is never refused by any of this.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import trio

import p2psync
from p2psync import pairing
from p2psync.agent.agent import Agent, AgentConfig
from p2psync.clock import now_ms
from p2psync.core import rules as core_rules
from p2psync.core.rules import RuleState, Terms
from p2psync.net.oneshot import join_once
from p2psync.store import rules as store_rules
from tests.test_pairing import key, pair_cli

pytestmark = pytest.mark.pure

MakeDb = Callable[[str], p2psync.Database]
DAY = 86_400_000


def ask(stranger: p2psync.Database, a: p2psync.Database, at: int) -> None:
    """``stranger`` sends ``a`` a pairing request received at ``at``."""
    signed = core_rules.propose(stranger.identity, key(a), Terms(), os.urandom(16), at)
    a.store.add_rule_objects(key(a), [signed], at, peer_only=key(stranger))
    a.store.add_peer(key(stranger), stranger.name, [], at)


def test_unanswered_requests_expire_and_free_their_slots(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_rules, "MAX_STRANGERS", 3)
    a = make_db("a")
    t0 = now_ms()
    old = [make_db(f"s{i}") for i in range(3)]
    for s in old:
        ask(s, a, t0)
    late = make_db("late")
    with pytest.raises(p2psync.P2PSyncError, match="await an answer"):
        ask(late, a, t0 + DAY)
    before = a.store.rules_version()
    # a week later the old requests are forgotten (the agent sweeps hourly), and
    # their room is free
    later = t0 + store_rules.REQUEST_TTL_MS + 1
    assert sorted(a.store.expire_requests(key(a), later)) == sorted(key(s) for s in old)
    ask(late, a, later)
    assert [r.proposer for r in a.store.rules() if r.state is RuleState.PROPOSED] == [key(late)]
    for s in old:
        assert a.store.rule_objects(key(s)) == [] and a.store.peer(key(s)) is None
    assert a.store.rules_version() > before


def test_the_sweep_keeps_what_was_answered_or_asked_by_us(make_db: MakeDb) -> None:
    a, stranger, paired, asked = make_db("a"), make_db("s"), make_db("p"), make_db("q")
    t0 = now_ms()
    ask(stranger, a, t0)
    pairing.propose(a, key(asked), Terms())  # our own request, unanswered: kept
    pairing.propose(paired, key(a), Terms())
    pairing.receive(a, key(paired), paired.store.rule_objects(key(a)))
    [proposal] = a.store.rules(key(paired))
    pairing.accept(a, proposal)
    gone = a.store.expire_requests(key(a), now_ms() + store_rules.REQUEST_TTL_MS + 1)
    assert gone == [key(stranger)]
    assert a.store.rules(key(asked)) and a.store.rules(key(paired))
    assert a.store.expire_requests(key(a), now_ms() + store_rules.REQUEST_TTL_MS + 1) == []


def test_the_rules_version_never_comes_back_after_a_deletion(make_db: MakeDb) -> None:
    """The agent re-reads its peers when the version changes: had a deletion of the
    newest rows let the next object reuse their rowid, a reader that last looked
    before the deletion would see the same number after the next request."""
    a = make_db("a")
    t0 = now_ms()
    ask(make_db("s1"), a, t0)
    seen = a.store.rules_version()
    a.store.expire_requests(key(a), t0 + store_rules.REQUEST_TTL_MS + 1)
    after_delete = a.store.rules_version()
    ask(make_db("s2"), a, t0 + store_rules.REQUEST_TTL_MS + 2)
    assert seen < after_delete < a.store.rules_version()


def churn(a: p2psync.Database, peer: p2psync.Database) -> None:
    """``peer`` proposes and revokes at once: two objects, no open proposal."""
    signed = core_rules.propose(peer.identity, key(a), Terms(), os.urandom(16), now_ms())
    revoke = core_rules.revoke(peer.identity, core_rules.rule_id(signed), now_ms())
    a.store.add_rule_objects(key(a), [signed, revoke], now_ms(), peer_only=key(peer))


def test_a_stranger_holds_at_most_its_budget_and_a_paired_peer_more(make_db: MakeDb) -> None:
    a, stranger = make_db("a"), make_db("s")
    with pytest.raises(p2psync.P2PSyncError, match="not paired with"):
        for _ in range(store_rules.MAX_OBJECTS_PER_STRANGER):
            churn(a, stranger)
    held = a.store.rule_objects(key(stranger))
    assert len(held) <= store_rules.MAX_OBJECTS_PER_STRANGER
    assert sum(map(len, held)) <= store_rules.MAX_BYTES_PER_STRANGER
    # paired, the same peer may hold more (its rule changes)
    first = a.store.rules(key(stranger))[0]
    pairing.propose(a, key(stranger), Terms())
    mine = next(r for r in a.store.rules(key(stranger)) if r.proposer == key(a))
    stranger.store.add_rule_objects(
        key(stranger), a.store.rule_objects(key(stranger)), now_ms(), peer_only=key(a)
    )
    pairing.receive(a, key(stranger), [pairing.accept(stranger, mine)])
    assert first.id != mine.id
    for _ in range(20):
        churn(a, stranger)
    assert len(a.store.rule_objects(key(stranger))) > store_rules.MAX_OBJECTS_PER_STRANGER


def test_strangers_together_hold_at_most_their_budget(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_rules, "STRANGERS_BYTES", 2000)
    a = make_db("a")
    refused = 0
    for i in range(12):
        try:
            ask(make_db(f"s{i}"), a, now_ms())
        except p2psync.P2PSyncError as exc:
            assert "fill their budget" in str(exc) and "--all-pending" in str(exc)
            refused += 1
    total = sum(len(o) for o in a.store.rule_objects(None))
    assert refused and total <= 2000


def test_pair_reject_all_pending_clears_strangers_and_keeps_paired_peers_proposals(
    make_db: MakeDb,
) -> None:
    a, friend = make_db("a"), make_db("friend")
    pairing.propose(friend, key(a), Terms.make(["vouchers"]))
    pairing.receive(a, key(friend), friend.store.rule_objects(key(a)))
    [proposal] = a.store.rules(key(friend))
    pairing.accept(a, proposal)
    pairing.propose(friend, key(a), Terms.make(["stock"]))  # a rule change: kept
    pairing.receive(a, key(friend), friend.store.rule_objects(key(a)))
    strangers = [make_db(f"s{i}") for i in range(5)]
    for s in strangers:
        ask(s, a, now_ms())
    result = pair_cli(a, "reject", "--all-pending", "--reason", "flood")
    assert result.exit_code == 0, result.output
    assert "5 pairing requests rejected: flood" in result.output
    assert "1 proposal from paired peers, or peers you asked, left" in result.output
    for s in strangers:
        [rule] = a.store.rules(key(s))
        assert rule.state is RuleState.REJECTED and rule.reason == "flood"
    assert RuleState.PROPOSED in {r.state for r in a.store.rules(key(friend))}
    both = pair_cli(a, "reject", "friend", "--all-pending", "--reason", "x")
    neither = pair_cli(a, "reject", "--reason", "x")
    assert both.exit_code == neither.exit_code == 2
    assert "either PEER or --all-pending" in neither.output


@pytest.mark.process
async def test_an_invite_join_gets_in_with_every_stranger_budget_full(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 requests waiting and the byte budget spent: a live invite join still pairs
    (the joiner's acceptance of our proposal is never a stranger's request)."""
    monkeypatch.setattr(store_rules, "MAX_STRANGERS", 4)
    a, c = make_db("a"), make_db("c")
    t0 = now_ms()
    for i in range(4):
        ask(make_db(f"s{i}"), a, t0)
    monkeypatch.setattr(store_rules, "STRANGERS_BYTES", sum(map(len, a.store.rule_objects(None))))
    with pytest.raises(p2psync.P2PSyncError):
        ask(make_db("late"), a, t0)
    a.put("vouchers", "V-1", 1)
    code = pairing.parse_invite(pairing.create_invite(a, Terms.make(["vouchers"]), 600, []))
    async with trio.open_nursery() as nursery:
        agent = Agent(a, [("127.0.0.1", 0)], AgentConfig(discovery=False))
        await nursery.start(agent.run)
        outcome = await join_once(c, pairing.JoinTicket.of(code), agent.addresses, timeout=10)
        nursery.cancel_scope.cancel()
    assert outcome.rule is not None, outcome
    assert c.get("vouchers", "V-1") is not None
