"""Paired or pairing peers that misbehave after an honest handshake: crafted
rule objects and handshake payloads, claims about our own log, stalled readers,
floods of rule messages and Caught, invite codes whose terms do not match.
The misbehaving side is a test double speaking the protocol; the victim runs
the real session over a real store."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from click.testing import CliRunner

import p2psync
from p2psync import pairing
from p2psync.cli.main import cli
from p2psync.clock import now_ms
from p2psync.core import canonical, messages
from p2psync.core import handshake as hs
from p2psync.core import holdings as holdings_mod
from p2psync.core import rules as core_rules
from p2psync.core.flow import Flow
from p2psync.core.messages import Head
from p2psync.core.rules import Direction, RuleState, Terms
from p2psync.core.session import SessionConfig, SyncSession
from p2psync.errors import ConnectionLost, DecodeError, FrameError, HandshakeError
from p2psync.net.link import PairLink
from p2psync.net.stats import SessionStats
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.sync import run_session
from p2psync.net.transport import SecureStream, secure
from p2psync.store import rules as store_rules
from tests.test_pairing import key, session, state_of
from tests.test_sync import Hostile, connect, fill, store_calls_inline

pytestmark = pytest.mark.trio_memory

MakeDb = Callable[[str], p2psync.Database]


async def victim_session(
    victim: p2psync.Database,
    attacker: p2psync.Database,
    behave: Callable[[Hostile], object],
    *,
    config: SessionConfig | None = None,
    lockstep: bool = False,
) -> SessionStats:
    """The victim serves with its rules in force; the attacker does ``behave``."""
    if lockstep:  # no buffering: a side that stops reading stalls the other's sends
        left, right = trio.testing.lockstep_stream_pair()
        out: dict[str, SecureStream] = {}

        async def side(
            name: str, stream: trio.abc.Stream, db: p2psync.Database, init: bool
        ) -> None:
            out[name] = await secure(stream, db.identity, initiator=init, name=db.home.name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, "a", left, attacker, True)
            nursery.start_soon(side, "b", right, victim, False)
        sa, sb = out["a"], out["b"]
    else:
        sa, sb = await connect(attacker, victim)
    result: list[SessionStats] = []
    done = trio.Event()

    async def serve() -> None:
        link = PairLink(
            victim,
            key(attacker),
            handshake_hash=sb.handshake_hash,
            peer_name=attacker.home.name,
        )
        result.append(
            await run_session(
                sb, TrioStore(victim.store), ChangeFeed(), live=True, config=config, link=link
            )
        )
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await behave(Hostile(attacker, sa))  # type: ignore[misc]
        with trio.fail_after(300):
            await done.wait()
        nursery.cancel_scope.cancel()
    return result[0]


def held_digest(db: p2psync.Database, peer: p2psync.Database) -> bytes:
    return messages.rules_digest(db.store.rule_objects(key(peer)))


# ---------------------------------------------------------------- decoding


@pytest.mark.pure
def test_a_rule_body_with_mixed_keys_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        core_rules._keys({0: 1, "1": 2, 2: 3}, 3)  # sorting these would raise TypeError


@pytest.mark.pure
def test_a_handshake_payload_with_mixed_keys_is_refused() -> None:
    payload = canonical.encode({0: 1, "1": b"k" * 32, 2: b"s" * 64, 3: "x"})
    handshake = hs.Handshake.__new__(hs.Handshake)
    handshake._state = SimpleNamespace(remote_static=b"\0" * 32)  # type: ignore[assignment]
    with pytest.raises(HandshakeError, match="keys 0-3"):
        handshake._check_payload(payload)


# ---------------------------------------------------------------- claims and floods


@pytest.mark.parametrize("two_way", [False, True])
async def test_only_a_peer_that_may_send_to_us_can_stop_our_writes(
    make_db: MakeDb, two_way: bool
) -> None:
    """A peer claiming to hold more of our own log than we do stops local writes
    (they would fork our log) only if it may send us that log to prove it."""
    victim, attacker = make_db("victim"), make_db("attacker")
    direction = Direction.BOTH if two_way else Direction.SEND  # in the victim's view
    pairing.propose(victim, key(attacker), Terms.make(["*"], direction))
    pairing.propose(attacker, key(victim), Terms())
    await session(victim, attacker)
    assert RuleState.ACCEPTED in state_of(victim, attacker)
    assert RuleState.PROPOSED not in state_of(victim, attacker)
    victim.put("c", "k", 1)
    fake = {key(victim): Head(1000, os.urandom(32), False)}

    async def behave(h: Hostile) -> None:
        await h.send(messages.RulesHeld(held_digest(attacker, victim)))
        await h.send(messages.Have(fake))
        await trio.sleep(0.5)
        await h.send(messages.Bye("done"))

    await victim_session(victim, attacker, behave)
    if two_way:
        with pytest.raises(p2psync.IntegrityError, match="restored from a backup"):
            victim.put("c", "k", 2)
    else:
        victim.put("c", "k", 2)  # a receive-only peer's word stops nothing
        assert victim.get("c", "k") == 2


async def test_a_flood_of_rule_messages_closes_the_connection(make_db: MakeDb) -> None:
    victim, attacker = make_db("victim"), make_db("attacker")
    for i in range(3):
        pairing.propose(attacker, key(victim), Terms.make([f"c{i}"]))
    objects = attacker.store.rule_objects(key(victim))

    async def behave(h: Hostile) -> None:
        with contextlib.suppress(ConnectionLost):  # the victim hangs up mid-flood
            for _ in range(500):
                await h.send(messages.Rules(objects))

    stats = await victim_session(victim, attacker, behave)
    assert stats.error
    assert "too many rule messages" in stats.reason or "do not settle" in stats.reason


async def test_rules_held_that_never_settle_close_the_connection(make_db: MakeDb) -> None:
    victim, attacker = make_db("victim"), make_db("attacker")
    pairing.propose(victim, key(attacker), Terms())

    async def behave(h: Hostile) -> None:
        with contextlib.suppress(ConnectionLost):
            for _ in range(10):
                await h.send(messages.RulesHeld(os.urandom(16)))
                await trio.sleep(0.05)

    stats = await victim_session(victim, attacker, behave)
    assert stats.error and "do not settle" in stats.reason


async def test_more_open_proposals_than_allowed_are_refused(make_db: MakeDb) -> None:
    victim, attacker = make_db("victim"), make_db("attacker")
    objects = [
        core_rules.propose(
            attacker.identity, key(victim), Terms.make([f"c{i}"]), os.urandom(16), i + 1
        )
        for i in range(40)
    ]

    async def behave(h: Hostile) -> None:
        await h.send(messages.Rules(objects))
        await trio.sleep(1)

    stats = await victim_session(victim, attacker, behave)
    assert stats.error and "proposals" in stats.reason
    assert len(victim.store.rules(key(attacker))) <= 16


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> trio.testing.MockClock:
    """Virtual time, jumping ahead whenever every task has waited 20 real ms (store
    calls run inline: :func:`tests.test_sync.store_calls_inline`)."""
    store_calls_inline(monkeypatch)
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_a_peer_that_stops_reading_is_cut_off(
    make_db: MakeDb, clock: trio.testing.MockClock
) -> None:
    """The attacker keeps sending pings (so the victim never sees it idle) but
    never reads: the victim's sends time out instead of waiting forever."""
    victim, attacker = make_db("victim"), make_db("attacker")
    pairing.propose(victim, key(attacker), Terms())
    pairing.propose(attacker, key(victim), Terms())
    await session(victim, attacker)
    fill(victim, 2000)

    async def behave(h: Hostile) -> None:
        await h.send(messages.RulesHeld(held_digest(attacker, victim)))
        await h.send(messages.Have({}))
        with trio.move_on_after(120), contextlib.suppress(ConnectionLost):
            while True:
                await h.send(messages.Ping(1))
                await trio.sleep(5)

    config = SessionConfig(keepalive=10, idle_timeout=20)
    started = trio.current_time()
    stats = await victim_session(victim, attacker, behave, config=config, lockstep=True)
    assert stats.error and "stopped reading" in stats.reason
    assert trio.current_time() - started < 60  # virtual seconds


@pytest.mark.pure
def test_a_flood_of_caught_costs_no_digest_work(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = SyncSession(0.0), SyncSession(0.0)
    heads = {os.urandom(32): Head(i + 1, os.urandom(32), False) for i in range(2000)}
    for machine in (a, b):
        machine.set_flow(Flow())
        machine.begin(heads)
    a.receive(messages.Have(heads), 0.0)
    calls = 0
    real = holdings_mod.heads_digest

    def counting(h: dict[bytes, Head]) -> bytes:
        nonlocal calls
        calls += 1
        return real(h)

    monkeypatch.setattr(holdings_mod, "heads_digest", counting)
    for _ in range(1000):
        a.receive(messages.Caught(os.urandom(16)), 0.0)
    assert calls <= 2  # the peer's heads digested once (and ours at most once)
    assert not a.synced


# ---------------------------------------------------------------- closing


async def read_until_closed(h: Hostile) -> list[messages.Message]:
    """Every message the victim sends until it closes the connection."""
    received: list[messages.Message] = []
    with contextlib.suppress(ConnectionLost, FrameError):
        while True:
            received.append(messages.decode(await h.stream.receive()))
    return received


class Raw(bytes):
    """Bytes written to the stream as they are, not sealed."""


CLOSING_CASES: dict[str, tuple[bool, list[messages.Message | bytes | None], str]] = {
    # case: (paired first, what the attacker sends, the victim's reason); bytes are
    # sealed as they are (not a message), Raw bytes not even sealed, None a pause
    "non-canonical first message": (False, [b"\x82\x05\x18\x01"], "not canonical"),
    "undecodable first message": (False, [b"\xff"], "undecodable"),
    "Ack before Have": (False, [messages.Ack(1)], "before both sides said Have"),
    "Ack of a batch never sent": (True, [messages.Have({}), None, messages.Ack(7)], "batch 7"),
    "second Have": (True, [messages.Have({}), messages.Have({})], "second Have"),
    "frame that fails authentication": (
        False,
        [Raw(struct.pack(">I", 100) + bytes(100))],
        "authentication",
    ),
    "frame longer than allowed": (False, [Raw(struct.pack(">I", (2 << 20) + 17))], "limit"),
}


@pytest.mark.parametrize("case", list(CLOSING_CASES))
async def test_a_protocol_error_is_answered_with_bye(make_db: MakeDb, case: str) -> None:
    """After the handshake every error the victim detects is told to the peer in a
    Bye, even when it is detected while the victim's writer is still busy sending
    an earlier message (here: its RulesHeld, which the attacker does not read until
    it has misbehaved; lockstep streams do not buffer)."""
    victim, attacker = make_db("victim"), make_db("attacker")
    paired, sends, reason = CLOSING_CASES[case]
    if paired:
        pairing.propose(victim, key(attacker), Terms())
        pairing.propose(attacker, key(victim), Terms())
        await session(victim, attacker)
    received: list[messages.Message] = []

    async def behave(h: Hostile) -> None:
        if paired:
            await h.send(messages.RulesHeld(held_digest(attacker, victim)))
        for item in sends:
            if item is None:
                await trio.sleep(0.5)  # the victim's rules settle: it is past Have
            elif isinstance(item, Raw):
                await h.raw(item)
            elif isinstance(item, bytes):
                await h.stream.send(item)  # sealed, but not a canonical message
            else:
                await h.send(item)
        await trio.sleep(0.5)  # the victim has seen it; its writer still waits on us
        received.extend(await read_until_closed(h))

    stats = await victim_session(victim, attacker, behave, lockstep=True)
    assert stats.error and reason in stats.reason
    assert received and isinstance(received[-1], messages.Bye), received
    assert received[-1].reason == stats.reason


# ---------------------------------------------------------------- invites and answers


async def test_an_invite_whose_terms_do_not_match_the_proposal_pairs_nothing(
    make_db: MakeDb,
) -> None:
    a, b = make_db("a"), make_db("b")
    a.put("payroll", "alice", 1)
    code = pairing.parse_invite(pairing.create_invite(a, Terms.make(["*"]), 600, []))
    # the code b was given says "vouchers only"; the inviter proposes everything
    said = pairing.InviteCode(
        code.inviter, code.invite, code.secret, (), code.expires,
        pairing.terms_hash(Terms.make(["vouchers"])),
    )
    stats_b, _ = await session(b, a, join=said)
    assert not stats_b.synced
    assert RuleState.ACCEPTED not in state_of(b, a)
    assert b.get("payroll", "alice") is None


@pytest.mark.pure
def test_the_same_joiner_may_retry_an_invite(make_db: MakeDb) -> None:
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    code = pairing.parse_invite(pairing.create_invite(a, Terms(), 600, []))
    handshake = os.urandom(32)
    proof = pairing.join_proof(code.secret, handshake)
    first = pairing.answer_join(a, key(b), code.invite, proof, handshake)
    again = pairing.answer_join(a, key(b), code.invite, proof, handshake)
    assert first == again  # the cut-short first session is simply answered again
    with pytest.raises(p2psync.P2PSyncError, match="already used"):
        pairing.answer_join(a, key(c), code.invite, proof, handshake)


async def test_pair_accept_refuses_to_guess_between_two_requests(
    make_db: MakeDb, tmp_path: Path
) -> None:
    a, b = make_db("a"), make_db("b")
    pairing.propose(b, key(a), Terms.make(["vouchers"]))
    pairing.propose(b, key(a), Terms.make(["stock"]))
    await session(b, a)
    result = CliRunner().invoke(cli, ["--home", str(a.path), "pair", "accept", "b"])
    assert result.exit_code != 0 and "2 requests waiting" in result.output
    assert "Traceback" not in result.output
    assert RuleState.ACCEPTED not in state_of(a, b)


# ---------------------------------------------------------------- rule object quotas


@pytest.mark.pure
def test_a_peer_that_fills_its_quota_can_still_be_removed(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_rules, "MAX_OBJECTS_PER_PEER", 40)
    a, p = make_db("a"), make_db("p")
    pairing.propose(a, key(p), Terms.make(["vouchers"]))
    p.store.add_rule_objects(key(p), a.store.rule_objects(key(p)), now_ms(), peer_only=key(a))
    [proposal] = p.store.rules(key(a))
    pairing.receive(a, key(p), [pairing.accept(p, proposal)])
    with pytest.raises(p2psync.P2PSyncError, match="the most it keeps"):
        for _ in range(store_rules.MAX_OBJECTS_PER_PEER):  # propose + revoke, again and again
            signed = core_rules.propose(p.identity, key(a), Terms(), os.urandom(16), now_ms())
            revoke = core_rules.revoke(p.identity, core_rules.decode(signed).id, now_ms())
            pairing.receive(a, key(p), [signed, revoke])
    [live] = [r for r in a.store.rules(key(p)) if r.state is RuleState.ACCEPTED]
    pairing.revoke(a, live)  # our own revocation is never refused
    assert RuleState.ACCEPTED not in state_of(a, p)


@pytest.mark.pure
def test_requests_from_too_many_strangers_are_refused_until_answered(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_rules, "MAX_STRANGERS", 3)
    a = make_db("a")
    strangers = [make_db(f"s{i}") for i in range(4)]
    for s in strangers[:3]:
        pairing.propose(s, key(a), Terms())
        pairing.receive(a, key(s), s.store.rule_objects(key(a)))
    late = strangers[3]
    pairing.propose(late, key(a), Terms())
    with pytest.raises(p2psync.P2PSyncError, match="await an answer"):
        pairing.receive(a, key(late), late.store.rule_objects(key(a)))
    [waiting] = a.store.rules(key(strangers[0]))
    pairing.reject(a, waiting, "no")  # answered: room for one more
    pairing.receive(a, key(late), late.store.rules(key(a))[0].objects)
    assert len(a.store.rules(key(late))) == 1


@pytest.mark.pure
def test_rule_bookkeeping_never_scans_every_rule_object(make_db: MakeDb) -> None:
    """Strangers can fill the table with requests (64 x 1,024 objects): what runs
    for each new request, under the write lock, and the agent's reload of peers
    must use indexes, not read every object (measured before: ~4 s per request)."""
    a, b = make_db("a"), make_db("b")
    pairing.propose(b, key(a), Terms())
    proposal = b.store.rule_objects(key(a))
    statements: list[str] = []
    path = a.home.store_path
    a.close()
    db = p2psync.open(path.parent)
    try:
        db.store._db.conn.set_trace_callback(statements.append)
        db.store.add_rule_objects(key(db), proposal, now_ms())
        with db.store._reader.reading() as conn:
            conn.set_trace_callback(statements.append)
            store_rules.version(conn)
            store_rules.in_force(store_rules.answered_objects(conn))
            store_rules.proposed_to(conn, key(db))
            conn.set_trace_callback(None)
        db.store._db.conn.set_trace_callback(None)
        assert_no_full_scans(db, statements)
    finally:
        db.close()


def assert_no_full_scans(db: p2psync.Database, statements: list[str]) -> None:
    """No SELECT on rule_objects among ``statements`` reads every row of the table:
    a scan reads every row unless an index covers it."""
    with db.store._reader.reading() as conn:
        for sql in statements:
            if "rule_objects" not in sql or not sql.lstrip().upper().startswith("SELECT"):
                continue
            plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
            full = [
                step
                for step in plan
                if step.startswith("SCAN ")
                and not step.startswith("SCAN (")
                and "COVERING INDEX" not in step
            ]
            assert not full, (sql, plan)


@pytest.mark.pure
def test_a_proposer_cannot_answer_its_own_request(make_db: MakeDb) -> None:
    """Only the acceptor's answers are stored: a stranger accepting its own requests
    would otherwise dodge the open-request cap and make every reload fold its pile."""
    a, stranger = make_db("a"), make_db("stranger")
    proposal = core_rules.propose(stranger.identity, key(a), Terms(), os.urandom(16), now_ms())
    own_answer = core_rules.accept(
        stranger.identity, core_rules.rule_id(proposal), Terms(), now_ms()
    )
    with pytest.raises(core_rules.RuleError, match="acceptor"):
        a.store.add_rule_objects(key(a), [proposal, own_answer], now_ms())
    assert a.store.rule_objects(key(stranger)) == []  # the batch is one transaction
    assert a.store.peers_in_force() == set()
