"""The sync session machine alone: no I/O, time passed in, two machines wired together."""

from __future__ import annotations

import os

import pytest

from p2psync.core import messages
from p2psync.core.events import (
    BatchReceived,
    JoinRequested,
    PeerHeadsReceived,
    Refusal,
    RulesReceived,
    SessionClosed,
    StuckOnRefused,
    SyncedWithPeer,
)
from p2psync.core.flow import Flow
from p2psync.core.messages import Ack, Bye, Caught, Entries, Have, Head, Ping, Pong, heads_digest
from p2psync.core.rules import Permissions, Terms
from p2psync.core.session import SessionConfig, SyncSession
from p2psync.errors import FutureTimestampError, LocalProtocolError, ProtocolError

pytestmark = pytest.mark.pure

AUTHOR = os.urandom(32)


def head(seq: int) -> Head:
    return Head(seq, seq.to_bytes(32, "big"))


def started(
    local: dict[bytes, Head], now: float = 0.0, config: SessionConfig | None = None
) -> SyncSession:
    """A machine past pairing: it has said Have."""
    machine = SyncSession(now, config)
    machine.begin(local)
    return machine


def through_wire(machine: SyncSession, now: float = 0.0) -> list[messages.Message]:
    """The outbox, encoded and decoded again (as it would travel)."""
    return [messages.decode(messages.encode(m)) for m in machine.take_outbox(now)]


def deliver(source: SyncSession, target: SyncSession, now: float = 0.0) -> list[object]:
    events: list[object] = []
    for message in through_wire(source, now):
        events.extend(target.receive(message, now))
    return events


def test_nothing_flows_before_both_sides_said_have() -> None:
    a = SyncSession(0.0)
    assert a.take_outbox(0.0) == []  # pairing first: Have only once a rule is in force
    a.begin({AUTHOR: head(3)})
    assert a.take_outbox(0.0) == [Have({AUTHOR: head(3)})]
    b = started({})
    events = b.receive(Ack(1), 0.0)
    assert isinstance(events[0], SessionClosed) and events[0].error
    assert isinstance(b.take_outbox(0.0)[0], Bye)


def test_a_full_exchange_ends_synced_on_both_sides() -> None:
    a = started({AUTHOR: head(5)})
    b = started({})
    assert isinstance(deliver(a, b)[0], PeerHeadsReceived)
    deliver(b, a)
    assert a.wants() == {AUTHOR: 0} and b.wants() == {}
    # b has nothing a lacks: it says Caught at once
    a.send_batch([b"e1", b"e2", b"e3"], [(AUTHOR, s, head(s).head) for s in (1, 2, 3)])
    a.send_batch([b"e4", b"e5"], [(AUTHOR, s, head(s).head) for s in (4, 5)])
    assert a.wants() == {}  # everything is on its way
    batches = [e for e in deliver(a, b) if isinstance(e, BatchReceived)]
    assert [x.batch for x in batches] == [1, 2]
    for batch in batches:
        b.ingested(batch.batch, [])
    b.local_changed({AUTHOR: head(5)})
    events = deliver(b, a) + deliver(a, b)
    assert any(isinstance(e, SyncedWithPeer) for e in events)
    assert a.synced and b.synced


def test_window_limits_unacknowledged_batches() -> None:
    a = started({AUTHOR: head(100)}, config=SessionConfig(window=2))
    b = started({}, config=SessionConfig(window=2))
    deliver(a, b)
    deliver(b, a)
    a.send_batch([b"x"], [(AUTHOR, 1, head(1).head)])
    a.send_batch([b"y"], [(AUTHOR, 2, head(2).head)])
    assert not a.can_send()
    with pytest.raises(LocalProtocolError):  # our own misuse: not the peer's fault
        a.send_batch([b"z"], [])
    # a peer that ignores the window is cut off
    c = started({}, config=SessionConfig(window=2))
    c.receive(Have({}), 0.0)
    for n in (1, 2):
        c.receive(Entries(n, [b"w"]), 0.0)
    events = c.receive(Entries(3, [b"w"]), 0.0)
    assert isinstance(events[0], SessionClosed) and "window" in events[0].reason


def test_acks_the_peer_has_not_read_count_in_the_window() -> None:
    """Issue 13: a peer that sends batches and reads nothing cannot make Acks pile
    up in the outbox: a batch counts against the window until its Ack has left."""
    c = started({}, config=SessionConfig(window=2))
    c.receive(Have({}), 0.0)
    c.take_outbox(0.0)
    for n in (1, 2):
        c.receive(Entries(n, [b"w"]), 0.0)
        c.ingested(n, [])  # ingested: its Ack waits in the outbox (nothing taken)
    events = c.receive(Entries(3, [b"w"]), 0.0)
    assert isinstance(events[0], SessionClosed) and "window" in events[0].reason
    # taken (sent) in time, the same batches leave room
    d = started({}, config=SessionConfig(window=2))
    d.receive(Have({}), 0.0)
    for n in (1, 2, 3, 4):
        d.receive(Entries(n, [b"w"]), 0.0)
        d.ingested(n, [])
        assert any(isinstance(m, Ack) for m in d.take_outbox(0.0))
    assert not d.closed


def test_rules_waiting_to_be_sent_join_rather_than_pile_up() -> None:
    c = SyncSession(0.0)
    c.start_pairing([], 0.0)
    c.take_outbox(0.0)
    for n in range(50):  # our rule objects changed 50 times while the peer read nothing
        c.local_rules_changed([b"obj-%d" % k for k in range(n % 5 + 1)])
        c.receive(Ping(n), 0.0)
    out = c.take_outbox(0.0)
    rules = [m for m in out if isinstance(m, messages.Rules)]
    assert len(rules) == 1 and len(out) == 2, out
    assert set(rules[0].objects) == {b"obj-%d" % k for k in range(5)}


def test_one_pong_waits_however_many_pings_came() -> None:
    c = started({}, config=SessionConfig(window=2))
    c.receive(Have({}), 0.0)
    c.take_outbox(0.0)
    for nonce in range(1000):
        c.receive(Ping(nonce), 0.0)
    assert [m for m in c.take_outbox(0.0) if isinstance(m, Pong)] == [Pong(999)]


@pytest.mark.parametrize(
    "message",
    [Entries(2, [b"x"]), Ack(1), Ack(7)],
)
def test_out_of_order_batches_and_stray_acks_close(message: messages.Message) -> None:
    machine = started({})
    machine.receive(Have({}), 0.0)
    events = machine.receive(message, 0.0)
    assert isinstance(events[0], SessionClosed) and events[0].error


def test_keepalive_and_idle_timeout_without_sleeping() -> None:
    config = SessionConfig(keepalive=10, idle_timeout=30)
    machine = started({}, config=config)
    machine.receive(Have({}), 0.0)
    machine.take_outbox(0.0)
    assert machine.next_deadline() == 10
    machine.timer(10.0)
    assert Ping(1) in machine.take_outbox(10.0)
    machine.receive(Pong(1), 12.0)
    assert machine.next_deadline() == 20
    events = machine.timer(42.0)
    assert isinstance(events[0], SessionClosed) and "30" in events[0].reason
    assert machine.closed


def test_pings_are_answered() -> None:
    machine = started({})
    machine.take_outbox(0.0)
    machine.receive(Have({}), 1.0)
    machine.receive(Ping(7), 2.0)
    assert Pong(7) in machine.take_outbox(2.0)


def test_frozen_authors_are_not_offered() -> None:
    machine = started({AUTHOR: head(9)})
    machine.receive(Have({AUTHOR: Head(2, head(2).head, frozen=True)}), 0.0)
    assert machine.wants() == {}


def test_entries_received_are_not_sent_back() -> None:
    a = started({})
    a.receive(Have({}), 0.0)
    a.receive(Entries(1, [b"e"]), 0.0)
    a.ingested(1, [(AUTHOR, 1, head(1).head)])
    a.local_changed({AUTHOR: head(1)})
    assert a.wants() == {}


def test_rules_and_joins_are_events_in_any_phase() -> None:
    machine = SyncSession(0.0)
    machine.start_pairing([], 0.0)
    assert machine.receive(messages.Rules([b"r"]), 0.0) == [RulesReceived([b"r"])]
    assert machine.receive(messages.Join(b"i" * 8, b"p" * 32), 0.0) == [
        JoinRequested(b"i" * 8, b"p" * 32)
    ]
    machine.receive(Have({}), 0.0)  # the peer said Have; we have not begun
    assert machine.wants() == {} and machine.state.value == "have received"
    events = machine.receive(Entries(1, [b"x"]), 0.0)
    assert isinstance(events[0], SessionClosed) and "before both sides" in events[0].reason


def test_rule_messages_on_a_connection_without_pairing_are_refused() -> None:
    machine = started({})
    events = machine.receive(messages.Rules([b"r"]), 0.0)
    assert events == [SessionClosed("no pairing on this connection", False, error=True)]


def test_bye_closes_quietly() -> None:
    machine = started({})
    events = machine.receive(Bye("agent stopping"), 0.0)
    assert events == [SessionClosed("agent stopping", by_peer=True, error=False)]


def test_caught_digest_must_match() -> None:
    machine = started({AUTHOR: head(1)})
    machine.receive(Have({AUTHOR: head(1)}), 0.0)
    out = machine.take_outbox(0.0)
    assert Caught(heads_digest({AUTHOR: head(1)})) in out
    assert machine.receive(Caught(b"\x00" * 16), 0.0) == []  # different holdings
    assert not machine.synced
    assert machine.receive(Caught(heads_digest({AUTHOR: head(1)})), 0.0)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80",
        b"\x82\x09\x00",  # unknown type
        b"\x82\x03\x20",  # negative batch
        b"\x83\x03\x01\x01",  # extra field
        b"\x82\x01\x81\x84" + b"\x58\x20" + b"a" * 32 + b"\x01\x58\x20" + b"b" * 32 + b"\x01",
        b"\x82\x07\x19\x00\x01",  # reason not text
        b"\x82\x03\x18\x01",  # non-canonical int
        b"\x82\x03\x01\x00",  # trailing byte
        b"\x82\x05\xc2\x41\x01",  # tagged nonce
    ],
)
def test_malformed_messages_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        messages.decode(data)


def test_message_round_trip() -> None:
    samples: list[messages.Message] = [
        Have({AUTHOR: head(4), os.urandom(32): Head(1, os.urandom(32), True)}),
        Entries(3, [b"a", b"b" * 300]),
        Ack(3),
        Caught(os.urandom(16)),
        Ping(9),
        Pong(9),
        Bye("bye"),
    ]
    for message in samples:
        assert messages.decode(messages.encode(message)) == message


def test_entries_refused_leave_the_session_stuck_with_the_reason() -> None:
    """b refuses a's entries 4 and 5 (not a's fault): once all has flowed, b is
    stuck and says why, never in sync; a later write that b applies clears it."""
    a = started({AUTHOR: head(5)})
    b = started({AUTHOR: head(3)})
    deliver(a, b)
    deliver(b, a)
    a.send_batch([b"e4", b"e5"], [(AUTHOR, s, head(s).head) for s in (4, 5)])
    batch = next(e for e in deliver(a, b) if isinstance(e, BatchReceived))
    refused = Refusal(AUTHOR, FutureTimestampError("far ahead"), "entry 4: its clock is far ahead")
    b.ingested(batch.batch, [(AUTHOR, 5, head(5).head)], None, [refused])  # a holds up to 5
    assert b.stuck_reason is None  # a has not said Caught for that yet
    events = deliver(b, a) + deliver(a, b) + deliver(b, a)
    assert b.stuck_reason == "entry 4: its clock is far ahead"
    stuck = [e for e in events if isinstance(e, StuckOnRefused)]
    assert stuck == [  # b's own, then a's on b's Stuck message: both know at once
        StuckOnRefused("entry 4: its clock is far ahead"),
        StuckOnRefused("the peer refused what we sent: entry 4: its clock is far ahead"),
    ]
    assert a.stuck_reason == stuck[1].reason and not a.closed and not b.closed
    assert not b.synced and not any(isinstance(e, SyncedWithPeer) for e in events)
    assert b.poll_synced() == []  # reported once per state
    b.local_changed({AUTHOR: head(5)})  # the entries arrived by another path
    assert b.stuck_reason is None
    assert any(isinstance(e, SyncedWithPeer) for e in b.poll_synced()) and b.synced
    deliver(b, a)  # b's Caught for what it holds now
    assert a.stuck_reason is None and a.synced


def test_lacking_entries_without_a_known_refusal_still_say_so() -> None:
    a = started({AUTHOR: head(2)})
    b = started({})
    deliver(a, b)
    deliver(b, a)
    a.send_batch([b"e1", b"e2"], [(AUTHOR, s, head(s).head) for s in (1, 2)])
    batch = next(e for e in deliver(a, b) if isinstance(e, BatchReceived))
    b.ingested(batch.batch, [(AUTHOR, 2, head(2).head)])  # held, not applied
    deliver(b, a)
    deliver(a, b)
    deliver(b, a)
    assert b.stuck_reason is not None and "not applied here" in b.stuck_reason


def one_way() -> tuple[SyncSession, SyncSession, bytes, bytes]:
    """A sender and a receiver of a one-way rule, past Have: each holds one entry of
    its own author (``mine`` the sender's, ``theirs`` the receiver's)."""
    mine, theirs = os.urandom(32), os.urandom(32)
    sender = SyncSession(0.0)
    sender.set_flow(Flow(Permissions(send=(Terms(),))))
    receiver = SyncSession(0.0)
    receiver.set_flow(Flow(Permissions(receive=(Terms(),))))
    sender.begin({mine: head(1)})
    receiver.begin({theirs: head(1)})
    deliver(sender, receiver)
    deliver(receiver, sender)
    return sender, receiver, mine, theirs


def test_the_sender_of_a_one_way_flow_is_in_sync_whatever_the_receiver_writes() -> None:
    """The receiver's own writes never flow to the sender (the rules say so), yet its
    Caught digest counts them: the sender must not wait for it to match."""
    sender, receiver, mine, theirs = one_way()
    assert sender.wants() == {mine: 0}
    sender.send_batch([b"entry"], [(mine, 1, head(1).head)])
    [batch] = [e for e in deliver(sender, receiver) if isinstance(e, BatchReceived)]
    receiver.ingested(batch.batch, [(mine, 1, head(1).head)])
    receiver.local_changed({mine: head(1), theirs: head(2)})  # it wrote meanwhile
    events = deliver(receiver, sender)
    events += sender.poll_synced()
    deliver(sender, receiver)
    assert any(isinstance(e, SyncedWithPeer) for e in events) and sender.synced
    receiver.poll_synced()
    assert receiver.synced


def test_the_sender_of_a_one_way_flow_still_sees_a_refusal() -> None:
    """...but when the receiver refused what was sent, its Caught shows it."""
    sender, receiver, mine, theirs = one_way()
    sender.send_batch([b"entry"], [(mine, 1, head(1).head)])
    [batch] = [e for e in deliver(sender, receiver) if isinstance(e, BatchReceived)]
    receiver.ingested(batch.batch, [(mine, 1, head(1).head)])
    receiver.local_changed({theirs: head(1)})  # refused: nothing of `mine` applied
    events = deliver(receiver, sender)
    events += sender.poll_synced()
    assert not any(isinstance(e, SyncedWithPeer) for e in events) and not sender.synced
