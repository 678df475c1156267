"""The protocol's rules, pure: two session machines wired together through real
frames (sealed, then fed to the other side one byte at a time), with a store
model per side and virtual time. No event loop, no sockets, no sleeping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import pytest

from p2psync.core import canonical, messages
from p2psync.core.events import (
    BatchReceived,
    Event,
    NothingToSync,
    Refusal,
    RulesHeldReceived,
    RulesReceived,
    SessionClosed,
    StuckOnRefused,
    SyncedWithPeer,
)
from p2psync.core.flow import Flow
from p2psync.core.frames import MAX_FRAME, FrameReader, Opener, Sealer
from p2psync.core.messages import Head, Ping, Pong
from p2psync.core.rules import Permissions, Terms
from p2psync.core.session import (
    MAX_PEER_STUCK_EVENTS,
    TRANSITIONS,
    SessionConfig,
    State,
    SyncSession,
)
from p2psync.core.settling import MAX_RULE_WORK, MAX_RULES_HELD
from p2psync.errors import (
    FutureTimestampError,
    LocalProtocolError,
    RemoteProtocolError,
    SignatureError,
)

pytestmark = pytest.mark.pure


class Stored(NamedTuple):
    author: bytes
    seq: int
    id: bytes
    wire: bytes


def entry(author: bytes, seq: int) -> Stored:
    eid = bytes([seq % 256]) * 16 + author[:16]
    return Stored(author, seq, eid, b"E" + author + seq.to_bytes(4, "big"))


@dataclass
class Side:
    """One site: a machine, a store model (per author, its chain), its end of the wire."""

    machine: SyncSession
    log: dict[bytes, list[Stored]] = field(default_factory=dict)
    sealer: Sealer = field(default_factory=lambda: Sealer(b"k" * 32))
    opener: Opener = field(default_factory=lambda: Opener(b"k" * 32))
    reader: FrameReader = field(default_factory=lambda: FrameReader(MAX_FRAME))
    events: list[Event] = field(default_factory=list)
    refuse: set[bytes] = field(default_factory=set)  # authors whose entries it refuses

    def heads(self) -> dict[bytes, Head]:
        return {a: Head(len(c), c[-1].id) for a, c in self.log.items() if c}

    def write(self, author: bytes, count: int) -> None:
        chain = self.log.setdefault(author, [])
        start = len(chain) + 1
        chain.extend(entry(author, start + i) for i in range(count))

    def handle(self, events: list[Event]) -> None:
        self.events += events
        for event in events:
            if isinstance(event, BatchReceived):
                self.ingest(event)

    def ingest(self, event: BatchReceived) -> None:
        positions, refusals = [], []
        for wire in event.wires:
            author, seq = wire[1:33], int.from_bytes(wire[33:], "big")
            if author in self.refuse:
                error = FutureTimestampError("its clock is far ahead")
                refusals.append(Refusal(author, error, f"entry {seq}: {error}"))
            else:
                chain = self.log.setdefault(author, [])
                if seq == len(chain) + 1:
                    chain.append(entry(author, seq))
            positions.append((author, seq, entry(author, seq).id))
        self.handle(self.machine.ingested(event.batch, positions, self.heads(), refusals))

    def send_what_the_peer_lacks(self) -> None:
        while self.machine.can_send() and (wants := self.machine.wants()):
            batch = [e for a, after in wants.items() for e in self.log[a][after : after + 3]]
            self.machine.send_entries(batch)

    def wire_out(self, now: float) -> bytes:
        return b"".join(
            self.sealer.seal(messages.encode(m)) for m in self.machine.take_outbox(now)
        )

    def bytes_in(self, data: bytes, now: float) -> None:
        for byte in data:  # one byte at a time: framing must not care
            self.reader.feed(bytes([byte]))
            while (frame := self.reader.next_frame()) is not None:
                message = messages.decode(self.opener.open(*frame))
                self.handle(self.machine.receive(message, now))


class Wire:
    """Two sides and a virtual clock."""

    def __init__(self, a: Side, b: Side) -> None:
        self.a, self.b, self.now = a, b, 0.0
        self.cut = False  # b's bytes never reach a

    def run(self, until: float = 0.0) -> None:
        """Deliver until nothing moves, then let time pass to ``until``."""
        while True:
            for side in (self.a, self.b):
                side.send_what_the_peer_lacks()
            ab, ba = self.a.wire_out(self.now), self.b.wire_out(self.now)
            if not ab and not ba:
                deadline = min(self.a.machine.next_deadline(), self.b.machine.next_deadline())
                if deadline > until or (self.a.machine.closed and self.b.machine.closed):
                    return
                self.now = max(self.now, deadline)
                for side in (self.a, self.b):
                    side.handle(side.machine.timer(self.now))
                continue
            if ab and not self.b.machine.closed:
                self.b.bytes_in(ab, self.now)
            if ba and not self.cut and not self.a.machine.closed:
                self.a.bytes_in(ba, self.now)


def pair(flow_a: Flow | None = None, flow_b: Flow | None = None, **config: float) -> Wire:
    sides = []
    for flow in (flow_a, flow_b):
        machine = SyncSession(0.0, SessionConfig(**config))  # type: ignore[arg-type]
        if flow is not None:
            machine.set_flow(flow)
        sides.append(Side(machine))
    return Wire(*sides)


def begin(wire: Wire) -> None:
    for side in (wire.a, wire.b):
        side.handle(side.machine.begin(side.heads()))


A1, A2, B1 = b"a" * 32, b"c" * 32, b"b" * 32


def test_two_machines_sync_through_frames_fed_one_byte_at_a_time() -> None:
    wire = pair()
    wire.a.write(A1, 7)
    wire.a.write(A2, 2)
    wire.b.write(B1, 5)
    begin(wire)
    wire.run()
    assert wire.a.log == wire.b.log
    assert wire.a.machine.synced and wire.b.machine.synced
    assert any(isinstance(e, SyncedWithPeer) for e in wire.a.events)
    # a live session stays open, and keeps itself alive on virtual time
    wire.run(until=100.0)
    assert not wire.a.machine.closed and wire.now >= 90.0
    # a write later flows live
    wire.b.write(B1, 1)
    wire.b.machine.local_changed(wire.b.heads())
    wire.run()
    assert wire.a.log[B1] == wire.b.log[B1] and wire.a.machine.synced


def test_a_one_way_rule_is_in_step_once_everything_that_may_flow_has_flowed() -> None:
    wire = pair(
        Flow(Permissions(send=(Terms(),))), Flow(Permissions(receive=(Terms(),)))
    )
    wire.a.write(A1, 3)
    wire.b.write(B1, 4)  # never flows to a
    begin(wire)
    wire.run()
    assert wire.b.log[A1] == wire.a.log[A1] and B1 not in wire.a.log
    assert wire.a.machine.synced and wire.b.machine.synced


def test_a_silent_peer_is_pinged_then_dropped_on_virtual_time() -> None:
    wire = pair(keepalive=10.0, idle_timeout=30.0)
    begin(wire)
    wire.run()
    wire.cut = True  # b goes silent towards a
    wire.run(until=1000.0)
    closed = [e for e in wire.a.events if isinstance(e, SessionClosed)]
    assert closed == [SessionClosed("nothing received for 30 s", False, error=True)]
    assert 30.0 <= wire.now <= 40.0


def test_an_on_demand_session_ends_once_in_sync_and_says_so() -> None:
    wire = pair()
    wire.a.machine.on_demand = True
    wire.b.write(B1, 2)
    begin(wire)
    wire.run()
    done = [e for e in wire.a.events if isinstance(e, SessionClosed)]
    assert done == [SessionClosed("synced", False, False, done=True)]
    assert wire.a.machine.ended_in_sync and wire.b.machine.close_reason == "synced"


def test_refused_entries_leave_an_on_demand_sync_stuck_with_the_reason() -> None:
    wire = pair()
    wire.a.machine.on_demand = True
    wire.a.refuse.add(B1)
    wire.b.write(B1, 2)
    begin(wire)
    wire.run()
    stuck = [e for e in wire.a.events if isinstance(e, StuckOnRefused)]
    assert stuck and "its clock is far ahead" in stuck[0].reason
    assert wire.a.machine.close_reason == f"cannot get in step: {stuck[0].reason}"
    assert not wire.a.machine.ended_in_sync


def test_an_entry_that_proves_the_peer_hostile_ends_the_session_by_its_type() -> None:
    machine = SyncSession(0.0)
    machine.begin({})
    machine.receive(messages.Have({}), 0.0)
    (batch,) = machine.receive(messages.Entries(1, [b"x"]), 0.0)
    assert isinstance(batch, BatchReceived)
    forged = Refusal(B1, SignatureError("signature does not verify"), "entry 1: forged")
    events = machine.ingested(1, [], {}, [forged])
    assert events == [SessionClosed("invalid entry: entry 1: forged", False, error=True)]
    assert machine.take_outbox(0.0) == [messages.Bye("invalid entry: entry 1: forged")]


def test_pairing_waits_until_its_deadline_then_ends() -> None:
    machine = SyncSession(0.0, SessionConfig(pairing_timeout=5.0))
    machine.start_pairing([], 0.0)
    out = machine.take_outbox(0.0)
    assert out == [messages.RulesHeld(messages.rules_digest([]), False)]
    assert machine.receive(messages.RulesHeld(messages.rules_digest([]), False), 1.0) == [
        RulesHeldReceived(messages.rules_digest([]), False)
    ]
    assert machine.rules_held_answered(messages.rules_digest([]), []) is True
    assert machine.rules_in_force(Flow(Permissions())) == []  # live: waits
    assert machine.next_deadline() == 5.0
    assert machine.timer(4.9) == []
    assert machine.timer(5.0) == [NothingToSync()]
    # on demand, nothing in force ends it at once
    quick = SyncSession(0.0, on_demand=True)
    quick.start_pairing([], 0.0)
    quick.receive(messages.Rules([]), 0.0)
    quick.rules_stored([])
    assert quick.rules_in_force(Flow(Permissions())) == [NothingToSync()]


def test_rule_objects_must_settle_in_a_few_rounds() -> None:
    machine = SyncSession(0.0)
    machine.start_pairing([], 0.0)
    for n in range(MAX_RULES_HELD):
        digest = bytes([n]) * 16
        assert machine.receive(messages.RulesHeld(digest, False), 0.0)
        machine.rules_held_answered(digest, [])
    events = machine.receive(messages.RulesHeld(b"z" * 16, False), 0.0)
    assert events == [
        SessionClosed("the rule objects of this pair do not settle", False, error=True)
    ]


def test_a_flood_of_rule_messages_is_cut_off() -> None:
    machine = SyncSession(0.0)
    machine.start_pairing([], 0.0)
    for _ in range(MAX_RULE_WORK):
        assert machine.receive(messages.Rules([]), 0.0) == [RulesReceived([])]
    events = machine.receive(messages.Rules([]), 0.0)
    assert events == [SessionClosed("too many rule messages at once", False, error=True)]


def test_entries_need_a_rule_that_lets_the_peer_send_them() -> None:
    machine = SyncSession(0.0)
    machine.set_flow(Flow(Permissions(send=(Terms(),))))
    machine.begin({})
    machine.receive(messages.Have({}), 0.0)
    events = machine.receive(messages.Entries(1, [b"x"]), 0.0)
    assert events == [
        SessionClosed("entries sent, but no rule lets you send any", False, error=True)
    ]


@pytest.mark.parametrize("state", list(State))
def test_every_state_answers_every_message_by_its_table(state: State) -> None:
    samples = [
        messages.Have({}),
        messages.Entries(1, []),
        messages.Ack(1),
        messages.Caught(b"c" * 16),
        Ping(1),
        Pong(1),
        messages.Bye("bye"),
        messages.Rules([]),
        messages.RulesHeld(b"d" * 16, False),
        messages.Join(b"i" * 8, b"p" * 32),
    ]
    for message in samples:
        machine = SyncSession(0.0)
        machine.start_pairing([], 0.0)
        if state in (State.HAVE_SENT, State.OPEN):
            machine.begin({})
        if state in (State.HAVE_RECEIVED, State.OPEN):
            machine.receive(messages.Have({}), 0.0)
        if state is State.CLOSED:
            machine.close("done")
        assert machine.state is state
        events = machine.receive(message, 0.0)
        allowed = type(message) in TRANSITIONS[state]
        errors = [e for e in events if isinstance(e, SessionClosed) and e.error]
        if state is State.CLOSED:
            assert events == []
        elif type(message) is messages.Have and state in (State.HAVE_RECEIVED, State.OPEN):
            assert errors and errors[0].reason == "a second Have"
        elif not allowed:
            assert errors and "before both sides said Have" in errors[0].reason
        elif type(message) is messages.Ack:
            assert errors  # no batch was sent: the table lets it in, the check refuses it


def test_our_own_misuse_is_a_local_error_not_the_peers() -> None:
    machine = SyncSession(0.0)
    with pytest.raises(LocalProtocolError):
        machine.ingested(3, [])
    machine.start_pairing([], 0.0)
    with pytest.raises(LocalProtocolError):
        machine.start_pairing([], 0.0)
    with pytest.raises(LocalProtocolError):
        machine.send_batch([b"x"], [])  # nothing may be sent before both said Have


def test_between_two_live_sides_the_sender_hears_why_at_once_without_a_close() -> None:
    """Issue 13 item 6: a refused the entry (not b's fault) and is stuck; b, which
    believes it delivered, hears why in a Stuck message, and the session stays up."""
    wire = pair()
    wire.a.refuse.add(B1)
    wire.b.write(B1, 2)
    begin(wire)
    wire.run()
    told = [e for e in wire.b.events if isinstance(e, StuckOnRefused)]
    assert told and "its clock is far ahead" in told[0].reason, wire.b.events
    assert told[0].reason.startswith("the peer refused what we sent: ")
    assert wire.b.machine.stuck_reason == told[0].reason
    assert not wire.a.machine.closed and not wire.b.machine.closed
    # said once per stuck state, however long the session stays up
    wire.run(until=200.0)
    assert len([e for e in wire.b.events if isinstance(e, StuckOnRefused)]) == 1


def test_a_peer_repeating_stuck_is_heard_once() -> None:
    machine = SyncSession(0.0)
    machine.begin({})
    machine.receive(messages.Have({}), 0.0)
    first = machine.receive(messages.Stuck("no"), 0.0)
    again = machine.receive(messages.Stuck("no"), 0.0)
    assert first == [StuckOnRefused("the peer refused what we sent: no")] and again == []
    assert machine.receive(messages.Stuck("other"), 0.0) == [
        StuckOnRefused("the peer refused what we sent: other")
    ]


def test_stuck_travels_and_decodes_strictly() -> None:
    assert messages.decode(messages.encode(messages.Stuck("why"))) == messages.Stuck("why")
    for bad in ([11], [11, 5], [11, "x" * 501], [11, "x", 1]):
        with pytest.raises(RemoteProtocolError):
            messages.decode(canonical.encode(bad))


def test_a_peer_alternating_stuck_reasons_is_logged_a_bounded_number_of_times() -> None:
    machine = SyncSession(0.0)
    machine.begin({})
    machine.receive(messages.Have({}), 0.0)
    told = []
    for n in range(1000):
        told += machine.receive(messages.Stuck(f"reason {n % 2}"), 0.0)
    assert len(told) == MAX_PEER_STUCK_EVENTS
    assert machine.stuck_reason == "the peer refused what we sent: reason 1"
