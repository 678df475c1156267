"""Rules in use, from a second hostile review (each test failed before its fix): an
on-demand rule beside an online one loses nothing; a revocation made while connected
reaches the peer; a request the user rejected is not accepted again when backdated;
a failed session is not recorded as in sync; `sync` through the agent survives a
removed peer and runs one on-demand sync per peer at a time; what settle answers
the peer can always store."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
import trio
import trio.testing
from click.testing import CliRunner

import p2psync
from p2psync import pairing
from p2psync.agent.agent import Agent, AgentConfig
from p2psync.agent.control import _sync, handle_control
from p2psync.cli.main import cli
from p2psync.clock import now_ms
from p2psync.core import rules as core
from p2psync.core.messages import Caught, Have, Head, heads_digest
from p2psync.core.rules import Direction, Mode, RuleState, Terms
from p2psync.core.session import SyncSession
from tests.test_pairing import key

pytestmark = pytest.mark.process

MakeDb = Callable[[str], p2psync.Database]


async def start(nursery: trio.Nursery, db: p2psync.Database) -> Agent:
    agent = Agent(db, [("127.0.0.1", 0)], AgentConfig(discovery=False))
    await nursery.start(agent.run)
    return agent


def agree(a: p2psync.Database, b: p2psync.Database, terms: Terms) -> core.Rule:
    """a proposes ``terms``, b accepts them as they are; both hold every object."""
    proposal = pairing.propose(a, key(b), terms).rule
    b.store.add_rule_objects(key(b), a.store.rule_objects(key(b)), now_ms())
    pairing.accept(b, next(r for r in b.store.rules(key(a)) if r.id == proposal.id))
    a.store.add_rule_objects(key(a), b.store.rule_objects(key(a)), now_ms())
    return next(r for r in a.store.rules(key(b)) if r.id == proposal.id)


async def wait_live_in_sync(agent: Agent, peer: bytes, seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while not ((c := agent.registry.get(peer)) and c.machine and c.machine.synced):
            await trio.sleep(0.02)


# ------------------------------------------------------------ R1: mixed modes lose data


async def test_on_demand_collection_of_a_pair_that_also_has_an_online_rule_arrives(
    make_db: MakeDb,
) -> None:
    """a and b have an online rule for 'notes' and an on-demand rule for 'photos' (what
    settle() itself makes when two proposals differ in mode). While the agents run, the
    live session carries every entry of b, with the 'photos' payload withheld (live
    rules only), and a applies it *without* that op. `p2psync sync` (through a's agent,
    the fixed path) then finds a already holding the entry: the photo never arrives."""
    a, b = make_db("a"), make_db("b")
    agree(a, b, Terms.make(["notes"]))
    agree(a, b, Terms.make(["photos"], mode=Mode.ON_DEMAND))
    async with trio.open_nursery() as nursery:
        agent_b = await start(nursery, b)
        a.store.add_peer(key(b), "b", [agent_b.addresses[0]], now_ms())
        agent_a = await start(nursery, a)
        await wait_live_in_sync(agent_a, key(b))
        b.put("photos", "p1", "holiday.jpg")
        b.put("notes", "n1", "see the photo")
        with trio.fail_after(10):
            while a.get("notes", "n1") is None:
                await trio.sleep(0.05)
        answer = await _sync(agent_a, None, 5)  # `p2psync sync` while the agents run
        nursery.cancel_scope.cancel()
    assert a.get("photos", "p1") == "holiday.jpg", (
        f"`p2psync sync` answered {answer} but a lacks photos/p1 for good "
        f"(a counts incomplete ops: {a.store.incomplete()})"
    )


# ------------------------------------------------------------ R2: a revocation never sent


def rule_cli(db: p2psync.Database, *args: str) -> None:
    result = CliRunner().invoke(cli, ["rule", *args, "--home", str(db.path)])
    assert result.exit_code == 0, result.output


async def test_a_revocation_made_while_connected_reaches_the_peer(make_db: MakeDb) -> None:
    """a (a laptop: b has no address for it) dials b; one online rule. a's user revokes
    it with `p2psync rule revoke` while the live connection is up. a's agent reloads
    the rules and, a no longer having an online rule or an open request with b,
    cancels its dialer for b — and with it the live connection, before the session's
    rules watcher has sent the revocation. b never hears of it (b cannot dial a, and a
    never dials b again), so b keeps the rule in force for ever."""
    a, b = make_db("a"), make_db("b")
    rule = agree(a, b, Terms())
    async with trio.open_nursery() as nursery:
        agent_b = await start(nursery, b)
        a.store.add_peer(key(b), "b", [agent_b.addresses[0]], now_ms())
        agent_a = await start(nursery, a)
        await wait_live_in_sync(agent_a, key(b))
        await trio.to_thread.run_sync(rule_cli, a, "revoke", rule.id.hex())
        await trio.sleep(4)
        at_b = {r.state for r in b.store.rules(key(a))}
        connected = agent_a.registry.get(key(b)) is not None
        nursery.cancel_scope.cancel()
    assert RuleState.REVOKED in at_b, (
        f"a revoked the rule; 4 s later b still holds {at_b} (a connected to b: {connected})"
    )


# ------------------------------------------------------------ R3: a backdated request
#    overrides the user's rejection


@pytest.mark.pure
def test_a_request_the_user_rejected_is_not_accepted_when_made_again_backdated(
    make_db: MakeDb,
) -> None:
    """b proposed 'everything' to a, a accepted only 'notes' (b sends). Later a asks for
    'photos' too; b's user rejects it. a (hostile, or with a clock set back) asks again,
    signing the new proposal with a time before its old acceptance: settle() takes it
    for a request crossing b's and accepts it with no user involved. `ms` is the
    signer's word, so the rule "a proposal the peer makes later ... is left for the
    user" (protocol.md §6) cannot hold."""
    a, b = make_db("a"), make_db("b")
    ask = pairing.propose(b, key(a), Terms()).rule  # b: `pair add a` (everything)
    a.store.add_rule_objects(key(a), b.store.rule_objects(key(a)), now_ms())
    [theirs] = a.store.rules(key(b))
    pairing.accept(a, theirs, Terms.make(["notes"], Direction.SEND))  # b sends notes only
    b.store.add_rule_objects(key(b), a.store.rule_objects(key(b)), now_ms())
    accepted_at = pairing.signed_ms(a.store.rule_objects(key(b))[-1])
    # a asks for photos (a sends); b's user says no
    later = core.propose(a.identity, key(b), Terms.make(["photos"], Direction.SEND),
                         os.urandom(16), accepted_at + 60_000)
    pairing.receive(b, key(a), [later])
    request = next(r for r in b.store.rules(key(a)) if r.id == core.rule_id(later))
    assert request.state is RuleState.PROPOSED  # left for the user, as documented
    pairing.reject(b, request, "no photos from you")
    # a asks again, backdated
    again = core.propose(a.identity, key(b), Terms.make(["photos"], Direction.SEND),
                         os.urandom(16), accepted_at - 1)
    answers = pairing.receive(b, key(a), [again])
    state = next(r for r in b.store.rules(key(a)) if r.id == core.rule_id(again)).state
    assert state is RuleState.PROPOSED, (
        f"b's user rejected 'a sends photos'; the same request, backdated, was accepted "
        f"by b's agent without asking ({len(answers)} answer(s) signed; b's old request "
        f"{ask.id.hex()[:8]} is what it 'crossed')"
    )


# ------------------------------------------------------------ R4: ended in sync after an error


@pytest.mark.pure
def test_a_session_failed_by_a_protocol_error_is_not_recorded_as_ended_in_sync() -> None:
    """_close() sets ended_in_sync = synced also for fail(): a peer that breaks the
    protocol (or goes silent for 45 s) after the pair got in step ends a session that
    agent._record_end treats as 'in step at the end': no error recorded, last_error
    cleared, `peers` shows nothing wrong."""
    heads = {os.urandom(32): Head(1, os.urandom(32))}
    machine = SyncSession(0.0)
    machine.begin(heads)
    machine.receive(Have(dict(heads)), 0.0)
    machine.receive(Caught(heads_digest(heads)), 0.0)
    assert machine.synced
    machine.receive(Have(dict(heads)), 1.0)  # a second Have: a protocol error
    assert machine.closed
    assert not machine.ended_in_sync, (
        f"closed with error {machine.close_reason!r}, yet ended_in_sync is True: the agent "
        "records no error and clears the last one"
    )


# ------------------------------------------------------------ R5: `p2psync sync X` for a
#    removed peer kills the running agent


def pair_cli(db: p2psync.Database, *args: str) -> None:
    result = CliRunner().invoke(cli, ["pair", *args, "--home", str(db.path)])
    assert result.exit_code == 0, result.output


async def test_sync_through_the_agent_with_a_removed_peer_named_does_not_kill_the_agent(
    make_db: MakeDb,
) -> None:
    """`p2psync sync c` where c was removed (resolve_peer accepts it): _sync puts c in
    the on-demand list, sync_once skips it (not KNOWN), and zip(..., strict=True)
    raises ValueError inside _sync's nursery. Wrapped in an ExceptionGroup it escapes
    handle_control's `except (ValueError, P2PSyncError)`, then trio.serve_listeners,
    and takes the whole agent down (seen with real processes: the CLI prints 'no
    paired peer with an address', the agent log ends with 'internal error:
    ExceptionGroup'). Any P2PSyncError inside that nursery (a store error while
    recording) does the same."""
    a, c = make_db("a"), make_db("c")
    agree(a, c, Terms())
    pair_cli(a, "remove", c.device_id)
    request = json.dumps({"op": "sync", "peer": c.device_id, "timeout": 3}).encode() + b"\n"
    escaped: BaseException | None = None
    async with trio.open_nursery() as nursery:
        agent_a = await start(nursery, a)
        ours, theirs = trio.testing.memory_stream_pair()
        await theirs.send_all(request)
        try:
            await handle_control(agent_a, ours)
        except BaseException as exc:  # what would reach the agent's nursery
            escaped = exc
        nursery.cancel_scope.cancel()
    assert escaped is None, (
        f"`p2psync sync <removed peer>` raised {escaped!r} out of handle_control: "
        "the agent stops"
    )


# ------------------------------------------------------------ R6: two syncs at once


async def test_two_syncs_at_once_through_the_agent_both_succeed_or_say_why(
    make_db: MakeDb,
) -> None:
    """Two `p2psync sync` at once (a cron job and the user) on an on-demand pair: each
    runs its own sync_once from a's agent; b's agent admits one on-demand session per
    peer (MAX_ON_DEMAND) and ends the other with 'another connection between us is
    kept' — which a's user reads as the reason its sync failed."""
    a, b = make_db("a"), make_db("b")
    agree(a, b, Terms.make(["stock"], mode=Mode.ON_DEMAND))
    for i in range(300):
        b.put("stock", f"s{i}", "x" * 2000)
    answers = []
    async with trio.open_nursery() as nursery:
        agent_b = await start(nursery, b)
        a.store.add_peer(key(b), "b", [agent_b.addresses[0]], now_ms())
        agent_a = await start(nursery, a)

        async def one() -> None:
            answers.append(await _sync(agent_a, None, 10))

        async with trio.open_nursery() as both:
            both.start_soon(one)
            both.start_soon(one)
        nursery.cancel_scope.cancel()
    errors = [p["error"] for answer in answers for p in answer["peers"] if p["error"]]
    assert not any("another connection between us is kept" in e for e in errors), answers


# ------------------------------------------------------------ R7: what both asked for is
#    dropped, with nothing left pending


# ------------------------------------------------------------ R8: answers that the peer
#    must refuse


@pytest.mark.pure
def test_the_answers_settle_returns_can_be_stored_by_the_peer(make_db: MakeDb) -> None:
    """settle()'s answers (sent alone, as a `Rules` of just those answers) include
    tidy()'s revocations of our OPEN proposals — possibly one the peer has never
    received (made by `pair add` a moment ago; the session's rules watcher sends it
    only after the agent reloads). The peer then refuses the whole message ('an answer
    to a proposal this agent does not hold') and ends the session with an error,
    dropping our acceptance with it. Here: both users `pair add` the same terms at
    once while connected; b's request arrives at a before a's own has gone out."""
    a, b = make_db("a"), make_db("b")
    mine = pairing.propose(a, key(b), Terms()).rule
    while True:  # b's request (same terms) has the smaller ID: tidy keeps it, revokes a's
        signed = core.propose(b.identity, key(a), Terms(), os.urandom(16), now_ms())
        if core.rule_id(signed) < mine.id:
            break
    b.store.add_rule_objects(key(b), [signed], now_ms())
    answers = pairing.receive(a, key(b), [signed])  # a's pairing worker
    kinds = [core.decode(x).kind.value for x in answers]
    try:
        pairing.receive(b, key(a), answers)  # b, before a's full Rules arrives
    except core.RuleError as exc:
        raise AssertionError(
            f"a answers {kinds}; b refuses the whole message ({exc}) and ends the session"
        ) from None
