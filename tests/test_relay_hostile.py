"""The agent's side of the relay (RelayClient, mail/exchange.py, the Mailer) against
a hostile or faulty relay (``tests/relayfake.py``) on loopback: it never loses data,
never takes forged things for real, never crashes, and ends with a clear error."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
import trio

import p2psync
from p2psync.clock import now_ms
from p2psync.core import canonical
from p2psync.core import relaywire as wire
from p2psync.core.envelope import EnvelopeClass, read_header, seal_envelope
from p2psync.core.identity import Identity
from p2psync.core.receipt import sign_receipt
from p2psync.core.rules import Route, Terms
from p2psync.errors import ConnectionLost, RelayUnavailable, RemoteProtocolError
from p2psync.mail import exchange as exchange_mod
from p2psync.mail.exchange import exchange
from p2psync.mail.mailer import QUEUED_FOR_MS, Mailer
from p2psync.net import relayclient
from p2psync.net.relayclient import _unwrapped, open_relay
from tests.helpers import flip_bit
from tests.relayfake import FakeRelay, Session, open_fake_relay
from tests.test_mail import MakeDb, key, pair, states, write

pytestmark = pytest.mark.process

DAY = 24 * 3600 * 1000
Homes = tuple[p2psync.Database, p2psync.Database]
#: What a relay that breaks its protocol may make the exchange raise.
CLEAR = (RemoteProtocolError, ConnectionLost, RelayUnavailable)


@pytest.fixture
def homes(make_db: MakeDb) -> Homes:
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["*"], route=Route.RELAY))
    return a, b


def records(db: p2psync.Database) -> int:
    return len(list(db.scan("c")))


def on(kind: type[wire.Message], act):  # type: ignore[no-untyped-def]
    """A script doing ``act(session, request)`` for requests of ``kind`` only."""

    async def script(session: Session, request: wire.Request) -> bool:
        if not isinstance(request, kind):
            return False
        await act(session, request)
        return True

    return script


def data_deposits(relay: FakeRelay, sender: p2psync.Database) -> int:
    return sum(
        1
        for who, m in relay.log
        if who == key(sender)
        and isinstance(m, wire.Deposit)
        and read_header(m.envelope).cls is EnvelopeClass.DATA
    )


async def deposit_to_b(relay: FakeRelay, a: p2psync.Database, b: p2psync.Database) -> int:
    """B hands its policy over, A deposits: the number of A's envelopes at the relay."""
    await exchange(b, relay.target)
    report = await exchange(a, relay.target)
    return report.of(key(b)).deposited


# 1 ------------------------------------------------------------------ baseline


async def test_an_honest_relay_carries_data_and_the_receipt_back(homes: Homes) -> None:
    a, b = homes
    write(a, 20)
    async with open_fake_relay() as relay:
        assert await deposit_to_b(relay, a, b) == 1
        assert states(Mailer(a), key(b)) == {"at-relay": 1}
        got = await exchange(b, relay.target)
        assert (got.of(key(a)).received, got.of(key(a)).entries_in) == (1, 20)
        assert b.get("c", "k19") == {"i": 19, "v": "x" * 60}
        assert relay.held(key(b)) == [] and len(relay.held(key(a))) == 1  # B's receipt
        back = await exchange(a, relay.target)
        assert back.of(key(b)).acknowledged == 1
        assert states(Mailer(a), key(b)) == {"acknowledged": 1}
        assert relay.held(key(a)) == []


# 2 ------------------------------------------------------------------ dropped deposits


async def test_stored_but_dropped_is_never_acknowledged_and_goes_again_after_expiry(
    homes: Homes,
) -> None:
    a, b = homes
    write(a, 20)
    async with open_fake_relay() as relay:

        async def drop(session: Session, request: wire.Deposit) -> None:
            await session.send(wire.Stored(request.rid, now_ms() + 400))

        await exchange(b, relay.target)
        relay.script = on(wire.Deposit, drop)
        assert (await exchange(a, relay.target)).of(key(b)).deposited == 1
        relay.script = None
        assert (await exchange(b, relay.target)).of(key(a)).received == 0
        await exchange(a, relay.target)
        assert states(Mailer(a), key(b)) == {"at-relay": 1}  # "stored" is not delivered
        assert data_deposits(relay, a) == 1  # nothing twice before it expires
        await trio.sleep(0.5)
        again = await exchange(a, relay.target)  # expired by A's clock: its entries go again
        assert again.expired == 1 and again.of(key(b)).entries_out == 20
        assert (await exchange(b, relay.target)).of(key(a)).entries_in == 20
        await exchange(a, relay.target)
        assert states(Mailer(a), key(b)) == {"expired": 1, "acknowledged": 1}
        assert records(b) == 20


async def test_a_stored_until_beyond_the_relays_own_ttl_does_not_hold_entries_back_forever(
    homes: Homes,
) -> None:
    a, b = homes
    write(a, 5)
    async with open_fake_relay() as relay:

        async def forever(session: Session, request: wire.Deposit) -> None:
            await session.send(wire.Stored(request.rid, (1 << 63) - 1))

        await exchange(b, relay.target)
        relay.script = on(wire.Deposit, forever)
        await exchange(a, relay.target)
    [row] = Mailer(a).ledger(key(b))
    assert row.until_ms is not None and row.until_ms <= now_ms() + 7 * DAY
    assert Mailer(a).expire(now_ms() + 8 * DAY) == 1  # A's own clock lets them go again


# 3 ------------------------------------------------------------------ reorder, duplicate, replay


async def test_reordered_duplicated_and_replayed_envelopes_are_applied_once(
    homes: Homes,
) -> None:
    a, b = homes
    write(a, 300)
    async with open_fake_relay() as relay:
        relay.max_sealed = 16 * 1024
        count = await deposit_to_b(relay, a, b)
        assert count >= 4

        def serve_again(extra: list[bytes]):  # type: ignore[no-untyped-def]
            async def serve(session: Session, request: wire.Fetch) -> None:
                honest = relay.answer(session.key, request)
                assert isinstance(honest, wire.Envelopes)
                blobs = [h.envelope for h in reversed(honest.held)]
                blobs += blobs[:2] + extra  # reordered, duplicated, replayed
                rows = tuple(
                    wire.Held(request.after + 1 + i, now_ms() + DAY, blob)
                    for i, blob in enumerate(blobs)
                )
                await session.send(wire.Envelopes(request.rid, rows, False))

            return serve

        relay.script = on(wire.Fetch, serve_again([]))
        got = (await exchange(b, relay.target)).of(key(a))
        assert (got.received, got.entries_in, got.problems) == (count, 300, [])
        assert records(b) == 300 and relay.held(key(b)) == []
        replayed = [h.envelope for h in relay.deleted if h.sender == key(a)]
        assert len(replayed) == count
        relay.script = on(wire.Fetch, serve_again(replayed))  # after B deleted them
        got = (await exchange(b, relay.target)).of(key(a))
        assert (got.received, got.entries_in, got.problems) == (0, 0, [])
        assert records(b) == 300
        relay.script = None
        await exchange(a, relay.target)
        assert states(Mailer(a), key(b)) == {"acknowledged": count}
        assert Mailer(b).gaps(key(a), now_ms()).missing == ()


# 4 ------------------------------------------------------------------ bit flips


async def test_flipped_bits_are_refused_and_the_rest_is_applied(
    homes: Homes, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = homes
    write(a, 300)
    async with open_fake_relay() as relay:
        relay.max_sealed = 16 * 1024
        count = await deposit_to_b(relay, a, b)
        assert count >= 4
        box = relay.held(key(b))
        header_bad = box[1].envelope
        box[1].envelope = flip_bit(header_bad, 8 * 3)  # the version in the header: 1 -> 0
        box[2].envelope = flip_bit(box[2].envelope, 8 * len(box[2].envelope) - 200)  # sealed
        seq_bad = box[2].seq
        with caplog.at_level(logging.WARNING):
            got = await exchange(b, relay.target)
        row = got.of(key(a))
        assert got.fetched == count
        assert row.received == count - 2 and len(row.problems) == 1  # the sealed flip
        assert "malformed envelope" in caplog.text  # the header flip: logged
        assert not Mailer(b).db.store.ledger.pair(key(a)).received(seq_bad)
        # a header that cannot be read names no (sender, seq): it stays at the relay;
        # the one that opened no seal was deleted like any refused envelope
        assert [h.seq for h in relay.held(key(b))] == [box[1].seq]
        assert Mailer(b).gaps(key(a), now_ms()).missing == (box[1].seq, seq_bad)
        assert records(b) < 300  # entries after the gap wait for their predecessors
        await exchange(a, relay.target)
        assert states(Mailer(a), key(b)) == {"acknowledged": count - 2, "at-relay": 2}


# 5 ------------------------------------------------------------------ forgeries


async def test_forged_envelopes_and_receipts_change_nothing(homes: Homes, make_db: MakeDb) -> None:
    a, b = homes
    c = make_db("c")
    write(a, 10)
    async with open_fake_relay() as relay:
        assert await deposit_to_b(relay, a, b) == 1
        [real] = relay.held(key(b))
        # "from A", seq 1 (the real one's), signed by C; served before the real one
        forged = seal_envelope(c.identity, key(b), 1, EnvelopeClass.DATA, 0, b"x", os.urandom(32))
        header, sealed = canonical.decode(forged, what="w", max_depth=2)
        header[1] = key(a)
        relay.held(key(b)).clear()
        relay.store(key(a), canonical.encode([header, sealed]))
        relay.held(key(b)).append(real)
        real.position = 99
        got = (await exchange(b, relay.target)).of(key(a))
        assert got.received == 1 and got.entries_in == 10 and len(got.problems) == 1
        assert records(b) == 10
        # receipts to A: C's receipt sealed as from B, and C's own naming A's seqs
        fake = sign_receipt(c.identity, key(a), [1, 2, 3], {}, {}, now_ms())
        as_b = seal_envelope(b.identity, key(a), 90, EnvelopeClass.RECEIPT, 0, fake, os.urandom(32))
        own = seal_envelope(c.identity, key(a), 1, EnvelopeClass.RECEIPT, 0, fake, os.urandom(32))
        genuine = relay.held(key(a))[:]
        relay.held(key(a)).clear()
        relay.store(key(b), as_b)
        relay.store(key(c), own)
        mine = await exchange(a, relay.target, peers=[])
        assert mine.of(key(b)).acknowledged == 0 and len(mine.of(key(b)).problems) == 1
        assert mine.of(key(c)).acknowledged == 0
        assert states(Mailer(a), key(b)) == {"at-relay": 1}
        relay.held(key(a)).extend(genuine)  # now B's real receipt
        assert (await exchange(a, relay.target)).of(key(b)).acknowledged == 1
        relay.boxes[key(a)] = [relay.store(key(b), h.envelope) for h in genuine]  # replayed
        assert (await exchange(a, relay.target)).of(key(b)).acknowledged == 0
        assert states(Mailer(a), key(b)) == {"acknowledged": 1}


# 6 ------------------------------------------------------------------ forged expiry notices


async def test_forged_expiry_notices_cause_at_most_a_resend(homes: Homes, make_db: MakeDb) -> None:
    a, b = homes
    stranger = make_db("c")
    write(a, 10)
    async with open_fake_relay() as relay:
        assert await deposit_to_b(relay, a, b) == 1
        later = now_ms() + DAY
        relay.notices[key(a)] = [
            wire.Notice(key(b), 77, later),  # a seq never sent
            wire.Notice(key(stranger), 1, 0),  # another recipient
            wire.Notice(key(b), 1, later),  # the real one, "expired" tomorrow
        ]
        again = await exchange(a, relay.target)
        assert again.of(key(b)).deposited == 1  # the entries went again, as seq 2
        rows = {r.seq: r.state.value for r in Mailer(a).ledger()}
        assert rows == {1: "expired", 2: "at-relay"}  # nothing "delivered", nothing made up
        assert (await exchange(b, relay.target)).of(key(a)).entries_in == 10
        await exchange(a, relay.target)
        assert states(Mailer(a), key(b)) == {"acknowledged": 2}  # a late receipt counts
        assert records(b) == 10


# 7 ------------------------------------------------------------------ withholding


async def test_an_empty_answer_saying_more_ends_the_fetch(homes: Homes) -> None:
    a, b = homes
    write(a, 10)
    async with open_fake_relay() as relay:
        assert await deposit_to_b(relay, a, b) == 1

        async def nothing(session: Session, request: wire.Fetch) -> None:
            await session.send(wire.Envelopes(request.rid, (), True))

        relay.script = on(wire.Fetch, nothing)
        with trio.fail_after(5):
            got = await exchange(b, relay.target)
        assert got.fetched == 0 and records(b) == 0
        assert len(relay.held(key(b))) == 1  # still there for an honest fetch
        relay.script = None
        assert (await exchange(b, relay.target)).of(key(a)).entries_in == 10


async def test_a_relay_serving_replays_forever_cannot_hold_the_exchange(
    homes: Homes, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = homes
    write(a, 10)
    monkeypatch.setattr(exchange_mod, "MAX_COLLECT", 50, raising=False)
    async with open_fake_relay() as relay:
        assert await deposit_to_b(relay, a, b) == 1
        blob = relay.held(key(b))[0].envelope

        async def endless(session: Session, request: wire.Fetch) -> None:
            held = (wire.Held(request.after + 1, now_ms() + DAY, blob),)
            await session.send(wire.Envelopes(request.rid, held, True))

        await exchange(a, relay.target)
        write(b, 3, collection="d")
        before = data_deposits(relay, b)
        relay.script = on(wire.Fetch, endless)
        with trio.fail_after(20):
            got = await exchange(b, relay.target)
        assert got.of(key(a)).entries_in == 10 and records(b) == 10
        assert data_deposits(relay, b) == before + 1  # B still sent its own


async def test_a_relay_that_never_answers_ends_the_exchange_with_an_error(
    homes: Homes, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = homes
    write(a, 10)
    monkeypatch.setattr(relayclient, "ANSWER_TIMEOUT", 0.5, raising=False)
    async with open_fake_relay() as relay:
        assert await deposit_to_b(relay, a, b) == 1

        async def silent(session: Session, request: wire.Fetch) -> None:
            await trio.sleep_forever()

        relay.script = on(wire.Fetch, silent)
        with trio.fail_after(5), pytest.raises(CLEAR):
            await exchange(b, relay.target)
        assert records(b) == 0 and len(relay.held(key(b))) == 1
        assert states(Mailer(a), key(b)) == {"at-relay": 1}


# 8 ------------------------------------------------------------------ protocol garbage


async def _wrong_rid(session: Session, request: wire.Request) -> None:
    await session.send(wire.Done(request.rid + 5, 0))


async def _wrong_type(session: Session, request: wire.Request) -> None:
    wrong = wire.Done(request.rid, 0) if isinstance(request, wire.TakeNotices) else None
    await session.send(wrong or wire.Notices(request.rid, ()))


async def _not_canonical(session: Session, request: wire.Request) -> None:
    await session.send_bytes(b"\x83\x18\x11" + wire.encode(wire.Done(request.rid, 0))[2:])


async def _oversized(session: Session, request: wire.Request) -> None:
    await session.send_raw(struct.pack(">I", wire.MAX_MESSAGE_BYTES + 1000) + b"\0" * 64)


async def _bye(session: Session, request: wire.Request) -> None:
    await session.send(wire.Bye("going away"))


@pytest.mark.parametrize("answer", [_wrong_rid, _wrong_type, _not_canonical, _oversized, _bye])
@pytest.mark.parametrize("kind", [wire.Policy, wire.Fetch, wire.TakeNotices, wire.Deposit])
async def test_protocol_garbage_is_a_clear_error_and_nothing_is_at_the_relay(
    homes: Homes, kind: type[wire.Message], answer: Callable[[Session, wire.Request], Any]
) -> None:
    a, b = homes
    write(a, 10)
    async with open_fake_relay() as relay:
        await exchange(b, relay.target)
        relay.script = on(kind, answer)
        with trio.fail_after(5), pytest.raises(CLEAR):
            await exchange(a, relay.target)
    assert "at-relay" not in states(Mailer(a), key(b))
    assert relay.held(key(b)) == [] or kind is wire.Deposit


async def test_a_connection_dropped_mid_pipeline_records_no_deposit_without_an_answer(
    homes: Homes,
) -> None:
    a, b = homes
    write(a, 300)
    async with open_fake_relay() as relay:
        relay.max_sealed = 16 * 1024
        await exchange(b, relay.target)
        answered = 0

        async def drop(session: Session, request: wire.Deposit) -> None:
            nonlocal answered
            if answered == 2:
                await session.hang_up()
                return
            answered += 1
            await session.send(relay.answer(session.key, request))

        relay.script = on(wire.Deposit, drop)
        with trio.fail_after(5), pytest.raises(CLEAR):
            await exchange(a, relay.target)
        made = Mailer(a).ledger(key(b))
        assert len(made) >= 4 and len(relay.held(key(b))) == 2
        assert {r.state.value for r in made} <= {"queued", "at-relay"}
        stored = {h.seq for h in relay.held(key(b))}
        assert {r.seq for r in made if r.state.value == "at-relay"} <= stored
        # the unanswered ones go again once "never deposited"
        assert Mailer(a).expire(now_ms() + QUEUED_FOR_MS) >= len(made) - 2


# 9 ------------------------------------------------------------------ impostor


async def test_an_impostor_at_the_relays_address_is_refused_before_anything_is_sent(
    homes: Homes,
) -> None:
    a, _ = homes
    write(a, 10)
    pinned = Identity(os.urandom(32)).public_key
    async with open_fake_relay() as impostor:
        target = type(impostor.target)(pinned, (impostor.address,), None)
        with trio.fail_after(5), pytest.raises(RelayUnavailable):
            await exchange(a, target)
        with pytest.raises(RelayUnavailable):
            async with open_relay(a.identity, a.name, target):
                pass
        impostor.admit = False  # the right key, but it does not admit us
        with pytest.raises(RelayUnavailable, match="did not admit"):
            await exchange(a, impostor.target)
    assert impostor.log == [] and impostor.sessions == 1
    assert Mailer(a).ledger() == []


# 10 ----------------------------------------------------------------- served after expiry


async def test_an_envelope_served_after_its_expiry_is_refused_as_expired(homes: Homes) -> None:
    a, b = homes
    async with open_fake_relay() as relay:
        await exchange(b, relay.target)
        await exchange(a, relay.target)  # A's policy lets B's receipt in
        write(a, 10)
        [out] = Mailer(a).outgoing(key(b), now_ms(), expiry_ms=now_ms() + 50)
        Mailer(a).deposited(key(b), out.seq, where="r", until_ms=now_ms() + DAY, now_ms=now_ms())
        relay.store(key(a), out.wire, until_ms=now_ms() + DAY)  # kept past its expiry
        await trio.sleep(0.1)
        got = (await exchange(b, relay.target)).of(key(a))
        assert got.entries_in == 0 and got.problems == ["expired"]
        assert records(b) == 0 and relay.held(key(b)) == []
        await exchange(a, relay.target)  # B's receipt refuses it; A sends the entries again
        [row] = [r for r in Mailer(a).ledger(key(b)) if r.seq == out.seq]
        assert (row.state.value, row.reason) == ("refused", "expired")
        assert (await exchange(b, relay.target)).of(key(a)).entries_in == 10
        assert records(b) == 10


def test_a_session_broken_under_several_tasks_is_one_p2psync_error() -> None:
    """The read loop, the pinger and requests in flight all fail when the relay
    goes: their errors come out as one ConnectionLost, not an ExceptionGroup that
    would escape the agent's `except P2PSyncError` (seen under kill -9)."""
    with pytest.raises(ConnectionLost), _unwrapped():
        raise ExceptionGroup(
            "two tasks", [ConnectionLost("read"), ExceptionGroup("x", [ConnectionLost("ping")])]
        )
    with pytest.raises(ExceptionGroup), _unwrapped():  # a bug elsewhere: every traceback
        raise ExceptionGroup("bug", [ConnectionLost("read"), KeyError("oops")])
