"""Pairing, joining and connection limits against a hostile or faulty peer (from an
independent review of the newcomer fixes; each test failed before its fix): a removed
joiner cannot pair again with its used code, crossing proposals keep what both asked
for, a paired peer cannot hold many sessions, and what `peers` says stays true."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import time
from collections.abc import Callable

import pytest
import trio

import p2psync
from p2psync import pairing
from p2psync.agent import agent as agent_mod
from p2psync.agent.agent import Agent, AgentConfig
from p2psync.agent.control import _sync
from p2psync.cli.peers import describe_link
from p2psync.clock import now_ms
from p2psync.core import messages
from p2psync.core import rules as core
from p2psync.core.messages import Caught, Have, Head, Ping, heads_digest
from p2psync.core.rules import Direction, Mode, Permissions, Route, RuleState, Terms
from p2psync.core.session import SyncSession
from p2psync.errors import ConnectionLost
from p2psync.net import sync as sync_mod
from p2psync.net.link import PairLink, RulesPump
from p2psync.net.oneshot import join_once, sync_once
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.transport import SecureStream, secure
from p2psync.store.peers import PeerState
from p2psync.views.peers import peer_rows
from tests.test_pairing import key, pair_cli, session, state_of

pytestmark = pytest.mark.process

MakeDb = Callable[[str], p2psync.Database]


# ------------------------------------------------------------ F1: used code re-pairs


@pytest.mark.trio_memory
async def test_a_removed_joiner_cannot_pair_again_with_its_used_code(make_db: MakeDb) -> None:
    """`pair remove` must stick: the joiner that used a code must not get a new rule
    by presenting the same code again (even after it expired)."""
    a, b = make_db("a"), make_db("b")
    a.put("vouchers", "V-1", 1)
    invite = pairing.parse_invite(
        pairing.create_invite(a, Terms.make(["vouchers"]), 600, ["127.0.0.1:1"])
    )
    stats_b, _ = await session(b, a, join=invite)
    assert stats_b.synced and b.get("vouchers", "V-1") == 1
    result = pair_cli(a, "remove", b.device_id)  # the inviter stops syncing with b
    assert result.exit_code == 0, result.output
    assert a.store.peer(key(b)).state is PeerState.REMOVED  # type: ignore[union-attr]
    await session(b, a)  # b learns of the revocation
    with sqlite3.connect(a.home.store_path) as conn:  # and the code expires
        conn.execute("UPDATE invites SET expires = 1")
    a.put("vouchers", "V-2", 2)  # written after b was removed
    await session(b, a, join=invite)  # b presents its old code again
    problems = []
    if RuleState.ACCEPTED in state_of(a, b):
        problems.append("removed joiner re-paired (a rule in force again at the inviter)")
    if b.get("vouchers", "V-2") is not None:
        problems.append("removed joiner received data written after its removal")
    if a.store.peer(key(b)).state is not PeerState.REMOVED:  # type: ignore[union-attr]
        problems.append("the removed peer is 'known' again (the inviter dials it)")
    assert not problems, problems


# ------------------------------------------------------------ F2: crossing settle


def _proposal(db: p2psync.Database, peer: bytes, terms: Terms) -> tuple[bytes, bytes]:
    signed = core.propose(db.identity, peer, terms, os.urandom(16), now_ms())
    return signed, core.rule_id(signed)


@pytest.mark.trio_memory
async def test_mutual_proposals_settled_at_the_same_time_keep_what_both_asked(
    make_db: MakeDb,
) -> None:
    """a asks b for everything; b asks a for 'alpha' and for 'beta' (two pair adds /
    rule proposes, made while the two were apart). Both want alpha and beta to flow.
    When the proposal IDs fall b1 < a < b2, each side settles a different pair of
    proposals in the same session and the result keeps only one of them."""
    a, b = make_db("a"), make_db("b")
    a_signed, a_id = _proposal(a, key(b), Terms())
    while True:  # grind b's nonces for the order  low(b) < a < high(b)
        low, low_id = _proposal(b, key(a), Terms.make(["alpha"]))
        if low_id < a_id:
            break
    while True:
        high, high_id = _proposal(b, key(a), Terms.make(["beta"]))
        if high_id > a_id:
            break
    a.store.add_peer(key(b), "b", [], now_ms())
    b.store.add_peer(key(a), "a", [], now_ms())
    a.store.add_rule_objects(key(a), [a_signed], now_ms())
    b.store.add_rule_objects(key(b), [low, high], now_ms())
    a.put("alpha", "k", 1)
    a.put("beta", "k", 2)
    for _ in range(3):
        await session(a, b)
    in_force = [r for r in a.store.rules(key(b)) if r.state is RuleState.ACCEPTED]
    covered = {c for r in in_force for c in r.terms.collections}
    pending = [r for r in a.store.rules(key(b)) if r.state is RuleState.PROPOSED]
    assert {"alpha", "beta"} <= covered or pending, (
        "both agents proposed 'beta' and neither proposal survives: "
        f"{[(r.state.value, r.proposed.collections) for r in a.store.rules(key(b))]}"
    )
    assert b.get("beta", "k") == 2


# ------------------------------------------------------------ agent-level helpers



def mutual(a: p2psync.Database, b: p2psync.Database) -> None:
    pairing.propose(a, key(b), Terms())
    b.store.add_rule_objects(key(b), a.store.rule_objects(key(b)), now_ms())
    pairing.propose(b, key(a), Terms())
    a.store.add_rule_objects(key(a), b.store.rule_objects(key(a)), now_ms())
    pairing.settle(a, key(b))
    b.store.add_rule_objects(key(b), a.store.rule_objects(key(b)), now_ms())
    for x, y in ((a, b), (b, a)):
        assert any(r.state is RuleState.ACCEPTED for r in x.store.rules(key(y)))


async def start(nursery: trio.Nursery, db: p2psync.Database) -> Agent:
    agent = Agent(db, [("127.0.0.1", 0)], AgentConfig(discovery=False))
    await nursery.start(agent.run)
    return agent


# ------------------------------------------------------------ F: a clean on-demand sync
#    leaves a "problem" on the agent's side


async def test_a_clean_on_demand_sync_leaves_no_problem_at_the_agent(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    mutual(a, b)
    b.put("c", "k", 1)
    async with trio.open_nursery() as nursery:
        agent_a = await start(nursery, a)
        b.store.add_peer(key(a), "a", [agent_a.addresses[0]], now_ms())
        [outcome] = await sync_once(b, [key(a)], None, timeout=10)
        assert outcome.synced, outcome
        with trio.fail_after(5):
            while agent_a.registry.all():
                await trio.sleep(0.02)
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    assert a.get("c", "k") == 1
    stored = a.store.peer(key(b))
    assert stored is not None
    [row] = peer_rows(a, None)
    assert stored.last_error is None and row["problem"] is None, (
        f"after a successful on-demand sync the agent keeps last_error={stored.last_error!r}; "
        f"`peers` prints 'problem: {row['problem']}'"
    )


# ------------------------------------------------------------ F: a paired peer may hold
#    any number of sessions at once


async def _on_demand_session(host: str, port: int, me: p2psync.Database) -> SecureStream:
    """What a hostile paired peer does: says 'on demand', says Have {}, then only pings."""
    stream = await trio.open_tcp_stream(host, port)
    secured = await secure(stream, me.identity, initiator=True, name="b")
    digest = messages.rules_digest(me.store.rule_objects(None))
    await secured.send(messages.encode(messages.RulesHeld(digest, True)))
    await secured.send(messages.encode(messages.Have({})))
    return secured


async def test_a_paired_peer_cannot_hold_unbounded_parallel_sessions(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    mutual(a, b)
    for i in range(50):
        a.put("c", f"k{i}", "x" * 1000)
    async with trio.open_nursery() as nursery:
        agent_a = await start(nursery, a)
        host, port = agent_a.addresses[0].rsplit(":", 1)
        streams = []
        for _ in range(40):
            with contextlib.suppress(ConnectionLost):  # the agent may refuse it at once
                streams.append(await _on_demand_session(host, int(port), b))
        await trio.sleep(1.0)
        mine = [c for c in agent_a.registry.all() if c.peer == key(b)]
        sent = sum(c.stats.sent for c in mine if c.stats)
        for s in streams:
            await s.aclose()
        nursery.cancel_scope.cancel()
    assert len(mine) <= 1 + agent_mod.MAX_SIDE, (
        f"one paired peer holds {len(mine)} sessions at once with the agent "
        f"(the agent read and sent {sent} entries for them)"
    )


# ------------------------------------------------------------ F: pair join when the joiner
#    has its own request open to the inviter



async def test_join_with_an_open_request_of_ours_reports_what_happened(make_db: MakeDb) -> None:
    """b asked a to pair (pair add, delivered, not answered). a answers with an invite
    code instead, b joins with it. Whatever the proposal IDs, `pair join` must not
    report a failure while the two are in fact paired and synced."""
    for attempt in range(12):
        a, b = make_db(f"a{attempt}"), make_db(f"b{attempt}")
        a.put("vouchers", "V-1", 1)
        request = pairing.propose(b, key(a), Terms.make(["vouchers", "other"])).rule
        a.store.add_rule_objects(key(a), b.store.rule_objects(key(a)), now_ms())
        made = pairing.create_invite(a, Terms.make(["vouchers", "extra"]), 600, [])
        code = pairing.parse_invite(made)
        async with trio.open_nursery() as nursery:
            agent_a = await start(nursery, a)
            started = trio.current_time()
            outcome = await join_once(
                b, pairing.JoinTicket.of(code), agent_a.addresses, timeout=6
            )
            took = trio.current_time() - started
            nursery.cancel_scope.cancel()
        proposals = [r for r in a.store.rules(key(b)) if r.proposer == key(a)]
        invite_first = proposals and proposals[0].id < request.id
        paired = any(r.state is RuleState.ACCEPTED for r in b.store.rules(key(a)))
        if invite_first:
            assert not (outcome.rule is None and paired), (
                f"pair join reported failure ({outcome.error!r}, after {took:.1f} s) although "
                f"b is paired with a and holds V-1={b.get('vouchers', 'V-1')}; "
                f"b's own request: "
                f"{[r.state.value for r in b.store.rules(key(a)) if r.id == request.id]}"
            )
            return
    raise AssertionError("the invite's proposal never came first")


# ------------------------------------------------------------ F: a pending connection
#    hides the live one in `peers`


async def test_peers_shows_the_live_connection_not_a_pending_one(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    mutual(a, b)
    a.put("c", "k", 1)
    async with trio.open_nursery() as nursery:
        agent_a = await start(nursery, a)
        b.store.add_peer(key(a), "a", [agent_a.addresses[0]], now_ms())
        await start(nursery, b)
        with trio.fail_after(10):
            while not ((c := agent_a.registry.get(key(b))) and c.machine and c.machine.synced):
                await trio.sleep(0.02)
        [before] = peer_rows(a, agent_a.status())
        # b (or anything holding b's key) opens a second connection and says nothing yet
        host, port = agent_a.addresses[0].rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        extra = await secure(stream, b.identity, initiator=True, name="b")
        await trio.sleep(0.3)
        [during] = peer_rows(a, agent_a.status())
        await extra.aclose()
        nursery.cancel_scope.cancel()
    assert before["in_sync"] is True
    assert during["in_sync"] is True, (
        f"while a pending connection is open, `peers` says: {describe_link(during)} "
        f"(the live connection is in sync)"
    )


# ------------------------------------------------------------ F: pair join says "paired"
#    when the inviter never got the acceptance



async def test_pair_join_says_paired_only_when_the_inviter_holds_the_acceptance(
    make_db: MakeDb, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    a, b = make_db("a"), make_db("b")
    code = pairing.parse_invite(pairing.create_invite(a, Terms(), 600, []))
    original = RulesPump._join_requested

    async def answer_then_hang_up(self, event):  # type: ignore[no-untyped-def]
        await original(self, event)
        await trio.sleep(0.1)  # the proposal goes out; the acceptance is never read
        self.handle(self.machine.close("going away"))

    monkeypatch.setattr(RulesPump, "_join_requested", answer_then_hang_up)
    received = RulesPump._rules_received

    async def lost_on_the_way(self, event):  # type: ignore[no-untyped-def]
        if self.link.db is not a:  # the joiner's side works as usual
            await received(self, event)
        # the inviter's side: the joiner's acceptance is lost on the network

    monkeypatch.setattr(RulesPump, "_rules_received", lost_on_the_way)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def serve_once() -> None:
            stream = await listeners[0].accept()
            listeners[0].socket.close()  # the inviter is gone after this
            secured = await secure(stream, a.identity, initiator=False, name="a")
            link = PairLink(a, key(b), handshake_hash=secured.handshake_hash)
            await sync_mod.run_session(
                secured, TrioStore(a.store), ChangeFeed(), live=True, link=link
            )

        nursery.start_soon(serve_once)
        outcome = await join_once(
            b, pairing.JoinTicket.of(code), [f"127.0.0.1:{port}"], timeout=5
        )
    at_inviter = {r.state for r in a.store.rules(key(b))}
    assert not (outcome.confirmed and RuleState.ACCEPTED not in at_inviter), (
        f"`pair join` reports 'paired with a' (rule {outcome.rule.id.hex()[:12]}, sync error "
        f"{outcome.sync.error if outcome.sync else None!r}) but the inviter holds {at_inviter}"
    )


# ------------------------------------------------------------ F: settle's narrowing on routes


@pytest.mark.pure
def test_mutual_settle_never_gives_a_rule_outside_either_proposal() -> None:
    """Terms.common must be no wider than *both* proposals (each in its own view)."""
    ours = Terms(("*",), Direction.BOTH, Mode.ONLINE, Route.DIRECT)  # we: direct only
    theirs = Terms(("*",), Direction.BOTH, Mode.ONLINE, Route.RELAY)  # peer: relay only
    common = theirs.common(ours)  # what settle() signs when the peer's ID is smaller
    assert common is None or common.flipped().narrower_than(ours), (
        f"settle accepts {common} for us, but we proposed only {ours}"
    )


# ------------------------------------------------------------ F: pair add names the wrong rule


@pytest.mark.pure
def test_pair_add_reports_the_rule_it_just_agreed_to(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    # an older rule in force: b asked for alpha, a accepted
    pairing.propose(b, key(a), Terms.make(["alpha"]))
    a.store.add_rule_objects(key(a), b.store.rule_objects(key(a)), now_ms())
    [older] = a.store.rules(key(b))
    pairing.accept(a, older)
    # b now asks for beta too, with a proposal whose ID sorts first
    while True:
        signed, beta_id = _proposal(b, key(a), Terms.make(["beta"]))
        if beta_id < older.id and beta_id[0] < 8:
            break
    a.store.add_rule_objects(key(a), [signed], now_ms())
    result = pairing.propose(a, key(b), Terms.make(["beta"]))  # a: `pair add b -c beta`
    assert result.rule.id == beta_id, (
        f"pair add says it agreed to rule {result.rule.id.hex()[:12]} "
        f"({result.rule.terms.collections}); the rule it accepted is {beta_id.hex()[:12]} (beta)"
    )


# ------------------------------------------------------------ F: every message costs O(authors)


@pytest.mark.pure
def test_a_ping_costs_the_reader_constant_time_once_in_sync() -> None:
    """net/sync.py reader: after every message, `machine.synced` (O(authors): _quiet's
    wants() and _lacking()). A paired peer that floods tiny Pings makes the agent's one
    event loop do O(authors) work per frame."""
    heads = {os.urandom(32): Head(5, os.urandom(32)) for _ in range(20_000)}
    machine = SyncSession(0.0)
    machine.begin(heads)
    machine.receive(Have(dict(heads)), 0.0)
    machine.receive(Caught(heads_digest(heads)), 0.0)
    assert machine.synced
    started = time.perf_counter()
    for nonce in range(100):
        machine.receive(Ping(nonce), 0.0)
        machine.synced  # noqa: B018 - what the reader does after each message
    per_message = (time.perf_counter() - started) / 100
    assert per_message < 0.001, f"{per_message * 1000:.1f} ms per Ping at 20k authors"


# ------------------------------------------------------------ F: sync through the agent waits
#    for removed peers


async def test_sync_through_the_agent_ignores_removed_peers(make_db: MakeDb) -> None:
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    mutual(a, b)
    mutual(a, c)
    async with trio.open_nursery() as nursery:
        agent_b = await start(nursery, b)
        agent_c = await start(nursery, c)
        a.store.add_peer(key(b), "b", [agent_b.addresses[0]], now_ms())
        a.store.add_peer(key(c), "c", [agent_c.addresses[0]], now_ms())
        result = pair_cli(a, "remove", c.device_id)  # a stops syncing with c
        assert result.exit_code == 0, result.output
        agent_a = await start(nursery, a)
        started = trio.current_time()
        answer = await _sync(agent_a, None, 3)  # `p2psync sync` while the agent runs
        took = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert answer["ok"] and [p["name"] for p in answer["peers"]] == ["b"], (
        f"after {took:.1f} s: {answer}"
    )


# ------------------------------------------------------------ mutual proposals, any order


def _terms(rng: random.Random) -> Terms:
    patterns = rng.choice([["*"], ["a"], ["b"], ["a", "b"], ["c"], ["a", "c"]])
    return Terms.make(
        patterns,
        rng.choice(list(Direction)),
        rng.choice(list(Mode)),
        rng.choice([Route.AUTO, Route.AUTO, Route.DIRECT, Route.RELAY]),
    )


def _allowed(db: p2psync.Database, peer: bytes) -> set[tuple[str, str]]:
    """(collection, send|receive) this side may move with ``peer``, by any rule."""
    allowed = Permissions.between(key(db), peer, db.store.rules(peer), live=False)
    out = set()
    for collection in ("a", "b", "c", "z"):
        if allowed.may_send(collection):
            out.add((collection, "send"))
        if allowed.may_receive(collection):
            out.add((collection, "receive"))
    return out


def _wanted(mine: list[Terms], theirs: list[Terms]) -> set[tuple[str, str]]:
    """What both asked for: the common part of every pair of proposals, in ``mine``'s
    view (the allowance a fresh pair of rules with those terms would give)."""
    out = set()
    for ours in mine:
        for other in theirs:
            common = ours.common(other)
            if common is None:
                continue
            for collection in ("a", "b", "c", "z"):
                if not common.covers(collection):
                    continue
                if common.direction in (Direction.SEND, Direction.BOTH):
                    out.add((collection, "send"))
                if common.direction in (Direction.RECEIVE, Direction.BOTH):
                    out.add((collection, "receive"))
    return out


@pytest.mark.pure
@pytest.mark.parametrize("seed", range(40))
def test_mutual_proposals_in_any_order_settle_within_what_both_asked(
    make_db: MakeDb, seed: int
) -> None:
    """Each side proposes 1-3 terms while apart, sees some of the other's proposals
    (settling on what it sees), then all is exchanged until nothing changes: both
    sides hold the same rules; nothing flows that both did not ask for; a proposal
    left open shares nothing with the other side's that does not flow already; no
    two rules in force have the same terms; one proposal each gives exactly the
    common part."""
    rng = random.Random(seed)
    a, b = make_db(f"a{seed}"), make_db(f"b{seed}")
    mine = [_terms(rng) for _ in range(rng.randint(1, 3) if seed % 3 else 1)]
    theirs = [_terms(rng) for _ in range(rng.randint(1, 3) if seed % 3 else 1)]
    for terms in mine:
        pairing.propose(a, key(b), terms)
    for terms in theirs:
        pairing.propose(b, key(a), terms)
    # each sees a random part of the other's objects first, and settles on it
    for db, other in ((a, b), (b, a)):
        seen = [  # some of its proposals (answers only come with what they answer)
            o
            for o in other.store.rule_objects(key(db))
            if core.decode(o).kind is core.Kind.PROPOSE and rng.random() < 0.5
        ]
        pairing.receive(db, key(other), seen)
    for _ in range(6):  # then everything, both ways, until quiet
        pairing.receive(a, key(b), b.store.rule_objects(key(a)))
        pairing.receive(b, key(a), a.store.rule_objects(key(b)))
    rules = a.store.rules(key(b))
    fold_a = {(r.id, r.state, r.terms) for r in rules}
    assert fold_a == {(r.id, r.state, r.terms) for r in b.store.rules(key(a))}
    allowed, wanted = _allowed(a, key(b)), _wanted(mine, theirs)
    assert allowed <= wanted, (mine, theirs, fold_a)
    if len(mine) == len(theirs) == 1:
        assert allowed == wanted, (mine, theirs, fold_a)
    for rule in rules:  # what an open proposal shares with the other side's flows already
        if rule.state is RuleState.PROPOSED:
            if rule.proposer == key(a):
                shared = _wanted([rule.proposed], theirs)
            else:
                shared = {
                    (c, {"send": "receive", "receive": "send"}[way])
                    for c, way in _wanted([rule.proposed], mine)
                }
            assert shared <= allowed, (rule, mine, theirs, fold_a)
    in_force = [r.terms_for(key(a)) for r in rules if r.state is RuleState.ACCEPTED]
    assert len(in_force) == len(set(in_force)), fold_a  # no two with the same terms
