"""Second review of the relay-join fixes (5d55f67, 6271164, helper-25): each
finding as the test that failed on the code as reviewed; the docstrings say what
was wrong."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from p2psync import pairing
from p2psync.agent import relaying
from p2psync.cli import relaysync
from p2psync.clock import now_ms
from p2psync.core.envelope import EnvelopeClass
from p2psync.core.rules import Route, RuleState, Terms
from p2psync.mail import exchange as exchange_mod
from p2psync.mail.exchange import ExchangeReport
from p2psync.mail.mailer import Mailer
from p2psync.net.storeio import ChangeFeed
from p2psync.store import relays as relays_mod
from tests.test_relay_join import RELAY, MakeDb, hand_over, in_force, invite, key


@pytest.mark.pure
def test_a_second_code_of_an_inviter_already_paired_is_accepted_as_the_code_said(
    make_db: MakeDb,
) -> None:
    """Several joins per inviter (schema 13) is meant for exactly this: the branch
    is paired with the head office for 'orders' and joins a second code ('stock')
    through the relay. A rule now flows between them, so the inviter's outbox sends
    its 'stock' proposal inside a data envelope (_bundles), not an introduction; the
    joiner's inbox ``_data`` calls ``pairing.receive`` with no joins
    (p2psync/mail/inbox.py _data), so the proposal is never accepted as the code
    said: it waits in `pair pending` as an unasked request, and the join stays
    "waiting for the inviter" until the code expires."""
    inviter, joiner = make_db("head"), make_db("branch")
    orders = pairing.parse_invite(invite(inviter, Terms.make(["orders"], route=Route.AUTO)))
    pairing.leave_join(joiner, orders, RELAY)
    hand_over(joiner, inviter)
    hand_over(inviter, joiner)
    joiner.put("orders", "o1", 1)
    hand_over(joiner, inviter)  # the acceptance rides with the first data
    assert in_force(inviter, joiner) and in_force(joiner, inviter)
    hand_over(inviter, joiner)
    hand_over(joiner, inviter)
    # now the second code
    stock = pairing.parse_invite(invite(inviter, Terms.make(["stock"], route=Route.AUTO)))
    pairing.leave_join(joiner, stock, RELAY)
    got = hand_over(joiner, inviter)
    assert any(g.cls is EnvelopeClass.INTRODUCTION and g.reason is None for g in got), got  # type: ignore[attr-defined]
    hand_over(inviter, joiner)  # the 'stock' proposal
    states = {tuple(r.proposed.collections): r.state for r in joiner.store.rules(key(inviter))}
    assert states.get(("stock",)) is RuleState.ACCEPTED, (
        f"the proposal the code asked for waits as an unasked request: {states}"
    )
    assert joiner.store.relay_joins() == []


@pytest.mark.pure
def test_a_join_collected_in_the_codes_last_moment_is_answered_with_an_acceptable_proposal(
    make_db: MakeDb,
) -> None:
    """answer_relay_join checks the expiry against ``now`` (the collection time the
    inbox was given) but ``_grant`` signs the proposal with a fresh ``now_ms()``
    (p2psync/pairing.py _grant: core.propose(..., now_ms())). A join collected just
    before the expiry (or in a long collect: ``now`` is taken per envelope before
    the thread runs) gets a proposal signed after it; the joiner's new check
    (answer_invite_proposal: signed_ms <= expires) then refuses to accept it as the
    code said, while the inviter has marked the code used: the pairing stalls and
    the joiner's join shows "not answered". The proposal should be signed at the
    time the expiry was checked against (``now``), or the check use the same clock
    reading."""
    inviter, joiner = make_db("head"), make_db("branch")
    code = pairing.parse_invite(invite(inviter, seconds=0.3))
    pairing.leave_join(joiner, code, RELAY)
    (request,) = Mailer(joiner).outgoing(key(inviter), now_ms())
    time.sleep(0.4)
    got = Mailer(inviter).incoming(request.wire, code.expires)  # collected at the last ms
    assert got.reason is None, got
    hand_over(inviter, joiner)
    (rule,) = joiner.store.rules(key(inviter))
    assert rule.state is RuleState.ACCEPTED, (
        "the proposal the inviter made for a code it accepted is not accepted as the code said"
    )


# ------------------------------------------------------------ the running agent


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time, jumping ahead whenever every task has waited 200 real ms."""
    return trio.testing.MockClock(autojump_threshold=0.2)


@pytest.mark.trio_memory
async def test_a_side_relay_that_never_answers_does_not_hold_the_agents_relay_session(
    make_db: MakeDb, clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RelayLink._exchange (p2psync/agent/relaying.py) awaits ``visit_side_relays``
    inline, inside the session with the agent's own relay: a relay named by an open
    code that accepts and then says nothing (hostile), or is simply unreachable
    (blackholed), holds the session loop SIDE_VISIT_S = 30 s per such relay. And
    ``_next_side`` is set *before* the visit, so after a 30 s stall the next
    exchange (any arrival, any local write) visits again at once: the agent spends
    nearly all its time waiting on the side relay, arrivals at its own relay wait
    with it. The side visit should run beside the session (its own task), counted
    from its end, with a backoff for a relay that fails."""

    inviter, joiner = make_db("head"), make_db("branch")
    code = pairing.parse_invite(invite(inviter))  # names RELAY (the side relay)
    pairing.leave_join(joiner, code, RELAY)
    own = relays_mod.Relay(b"A" * 32, ("127.0.0.1:7001",))
    side = relays_mod.Relay(RELAY, ("127.0.0.1:7000",))

    async def main_exchange(client: object, mailer: object, peers: object) -> ExchangeReport:
        return ExchangeReport(own.key)

    visits = []

    async def hostile(db: object, relay: object, peers: object = None) -> ExchangeReport:
        visits.append(relay)
        await trio.sleep_forever()  # accepts, then never answers
        raise AssertionError

    monkeypatch.setattr(relaying, "exchange_on", main_exchange)
    monkeypatch.setattr(exchange_mod, "exchange", hostile)

    class Client:
        relay = own.key

    link = relaying.RelayLink(joiner, ChangeFeed(), set)
    link._relays = [own, side]
    held = 0.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link._visit_sides, own.key)  # as the session starts it
        for _ in range(4):  # four exchanges with our own relay, as arrivals wake them
            started = trio.current_time()
            await link._exchange(Client())  # type: ignore[arg-type]
            held += trio.current_time() - started
            await trio.sleep(1)
        assert visits, "the side relay was not visited at all"
        nursery.cancel_scope.cancel()
    assert held < 5, f"our own relay's session was held {held:.0f} s by the side relay"


@pytest.mark.trio_memory
def test_sync_timeout_bounds_the_visits_to_relays_codes_name(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`p2psync sync --timeout T` / `pair join --timeout T` ("Seconds to wait")
    bound only the exchange with the first relay (relaysync._exchange); the visits
    that follow (visit_side_relays, p2psync/cli/relaysync.py through_relay) each
    take up to SIDE_VISIT_S = 30 s whatever T is, so one unreachable relay named by
    an open code makes every `sync` take T + 30 s (and more per such relay). The
    visits should share the caller's deadline. (SIDE_VISIT_S is cut to 3 s here to
    keep the test short.)"""

    inviter, joiner = make_db("head"), make_db("branch")
    pairing.leave_join(joiner, pairing.parse_invite(invite(inviter)), RELAY)
    own = relays_mod.Relay(b"A" * 32, ("127.0.0.1:7001",))
    relays_mod.put(joiner.store, own)
    relays_mod.put(joiner.store, relays_mod.Relay(RELAY, ("127.0.0.1:7000",)))

    async def main_exchange(db: object, relay: object, peers: object = None) -> ExchangeReport:
        return ExchangeReport(own.key)

    async def unreachable(db: object, relay: object, peers: object = None) -> ExchangeReport:
        await trio.sleep_forever()
        raise AssertionError

    monkeypatch.setattr(relaysync, "exchange", main_exchange)
    monkeypatch.setattr(exchange_mod, "exchange", unreachable)
    monkeypatch.setattr(exchange_mod, "SIDE_VISIT_S", 3)
    started = time.monotonic()
    relaysync.through_relay(joiner, [key(inviter)], timeout=0.5, first=own.key)
    took = time.monotonic() - started
    assert took < 2, f"sync --timeout 0.5 took {took:.1f} s"
