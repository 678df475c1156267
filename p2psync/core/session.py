"""The sync session: a sans-IO state machine for one secured connection.

Both sides run the same machine (the protocol is symmetric once the handshake
is done). Bytes never pass through here: the shell decodes frames into
:mod:`~p2psync.core.messages` and feeds them in, sends what :meth:`take_outbox`
returns, and tells the machine what the store did. Time is an argument.

Flow::

    both:   RulesHeld(digest)                  which rule objects about the pair it holds
    both:   Rules([...])                       all of them, when the digests differ
    joiner: Join(invite, proof)                when pairing by invite code
    both:   Have(heads)                        once the pair has a rule in force
    sender: Entries(n, [...]) ...              what the peer lacks, causal order,
                                               at most ``window`` batches unacknowledged
    recv:   Ack(n)                             after batch n is committed
    both:   Caught(digest)                     "I have sent you everything I hold"
    either: Ping/Pong                          keepalive while idle
    either: Bye(reason)                        closing, with the reason

The machine tracks what the peer holds (its ``Have``, plus every entry sent to
it or received from it) so nothing the peer has is sent again, and it declares
the pair *synced* when both sides have sent ``Caught`` with equal digests.
A peer that breaks the protocol gets ``Bye(reason)`` and the session closes;
nothing it sent before is lost.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from p2psync.core.messages import (
    Ack,
    Bye,
    Caught,
    Entries,
    Have,
    Head,
    Heads,
    Join,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Rules,
    RulesHeld,
    heads_digest,
)


class Phase(Enum):
    PAIRING = "pairing"  # rules being exchanged; no Have sent or not yet received
    OPEN = "open"  # both Haves exchanged: entries may flow
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    window: int = 4  # batches sent and not yet acknowledged
    keepalive: float = 15.0  # send a Ping after this long without sending
    idle_timeout: float = 45.0  # close after this long without receiving


# Events: what happened, for the shell to act on (past tense).


@dataclass(frozen=True, slots=True)
class PeerHeadsReceived:
    heads: dict[bytes, Head]


@dataclass(frozen=True, slots=True)
class RulesReceived:
    objects: list[bytes]


@dataclass(frozen=True, slots=True)
class RulesHeldReceived:
    digest: bytes
    on_demand: bool


@dataclass(frozen=True, slots=True)
class JoinRequested:
    invite: bytes
    proof: bytes


@dataclass(frozen=True, slots=True)
class BatchReceived:
    batch: int
    wires: list[bytes]


@dataclass(frozen=True, slots=True)
class SyncedWithPeer:
    digest: bytes


@dataclass(frozen=True, slots=True)
class StuckOnRefused:
    """All has flowed that will flow in this session, yet the peer holds entries we
    do not: we refused or are holding some (see ``note_refused``)."""

    reason: str


@dataclass(frozen=True, slots=True)
class SessionClosed:
    reason: str
    by_peer: bool
    error: bool


Event = (
    PeerHeadsReceived
    | BatchReceived
    | SyncedWithPeer
    | StuckOnRefused
    | SessionClosed
    | RulesReceived
    | JoinRequested
    | RulesHeldReceived
)

Position = tuple[bytes, int, bytes]  # author, seq, entry ID


class SyncSession:
    """The protocol state of one connection."""

    def __init__(self, now: float, config: SessionConfig | None = None) -> None:
        self.config = config or SessionConfig()
        self.phase = Phase.PAIRING
        self.local: dict[bytes, Head] = {}
        self.peer: dict[bytes, Head] = {}
        self._outbox: list[Message] = []
        self._begun = False
        self._peer_have: dict[bytes, Head] | None = None
        self.sending = True
        self.receiving = True
        self._next_batch_out = 1
        self._unacked: list[int] = []
        self._next_batch_in = 1
        self._receiving: set[int] = set()  # batches handed to the shell, not yet ingested
        self._caught_sent: bytes | None = None
        self._peer_caught: bytes | None = None
        self._synced: bytes | None = None
        #: authors whose entries from the peer we refused (not the peer's fault), and why
        self.refusals: dict[bytes, str] = {}
        self._stuck: bytes | None = None
        # heads digests cost O(authors); cached so a flood of Caught costs O(1) each
        self._local_digest: bytes | None = None
        self._peer_digest: bytes | None = None
        #: what the peer knows we hold: our Have, plus what it sent us
        self._told: dict[bytes, Head] = {}
        self._told_digest: bytes | None = None
        self._changed()
        self._last_received = now
        self._last_sent = now
        self._ping_nonce = 0
        self.close_reason: str | None = None
        #: the session was in sync when it closed (``synced`` says False once closed)
        self.ended_in_sync = False

    # ------------------------------------------------------------ output

    def take_outbox(self, now: float) -> list[Message]:
        """Messages to send now, in order."""
        out, self._outbox = self._outbox, []
        if out:
            self._last_sent = now
        return out

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    # ------------------------------------------------------------ pairing

    def send_rules(self, objects: list[bytes]) -> None:
        if self.phase is not Phase.CLOSED:
            self._outbox.append(Rules(objects))

    def send_rules_held(self, digest: bytes, *, on_demand: bool = False) -> None:
        if self.phase is not Phase.CLOSED:
            self._outbox.append(RulesHeld(digest, on_demand))

    def send_join(self, invite: bytes, proof: bytes) -> None:
        if self.phase is not Phase.CLOSED:
            self._outbox.append(Join(invite, proof))

    def begin(self, local: Heads) -> list[Event]:
        """The pair has a rule in force: state our heads and start syncing."""
        if self._begun or self.phase is Phase.CLOSED:
            return []
        self._begun = True
        self.local = dict(local)
        self._local_digest = None
        self._told = dict(local)
        self._changed()
        self._outbox.append(Have(dict(local)))
        return self._open()

    @property
    def begun(self) -> bool:
        return self._begun

    def _open(self) -> list[Event]:
        if not self._begun or self._peer_have is None or self.phase is not Phase.PAIRING:
            return []
        self.phase = Phase.OPEN
        self.peer = dict(self._peer_have)
        self._peer_digest = None
        self._changed()
        self._check_caught()
        return [PeerHeadsReceived(dict(self._peer_have))]

    # ------------------------------------------------------------ what to send

    def set_flow(self, *, sending: bool, receiving: bool) -> None:
        """Whether the rules let us send to the peer, and receive from it."""
        self.sending, self.receiving = sending, receiving
        self._changed()

    def _changed(self) -> None:
        """Our heads, the peer's, or the flow changed: what was derived from them is
        stale. (Everything derived is cached, so a peer's message that changes
        nothing — a Ping, a repeated Caught — costs O(1), however many authors.)"""
        self._wanted: dict[bytes, int] | None = None
        self._lacks: list[bytes] | None = None

    def wants(self) -> dict[bytes, int]:
        """Per author, the seq after which the peer lacks entries we hold (and may get)."""
        return dict(self._wants())

    def _wants(self) -> dict[bytes, int]:
        if self.phase is not Phase.OPEN or not self.sending:
            return {}
        if self._wanted is None:
            wanted = {}
            for author, head in self.local.items():
                theirs = self.peer.get(author)
                if theirs is not None and theirs.frozen:
                    continue  # the peer refuses this author: sending would only be refused
                have = theirs.seq if theirs is not None else 0
                if head.seq > have:
                    wanted[author] = have
            self._wanted = wanted
        return self._wanted

    def peer_positions(self) -> dict[bytes, int]:
        """What the peer holds, per author (its frozen authors as holding everything)."""
        return {
            author: (1 << 63) if head.frozen else head.seq for author, head in self.peer.items()
        }

    def can_send(self) -> bool:
        return self.phase is Phase.OPEN and len(self._unacked) < self.config.window

    def send_batch(self, wires: list[bytes], positions: Iterable[Position]) -> None:
        """Queue an Entries message; ``positions`` say which entries it carries."""
        if not self.can_send():
            raise RuntimeError("send_batch called while the window is full or closed")
        batch = self._next_batch_out
        self._next_batch_out += 1
        self._unacked.append(batch)
        self._outbox.append(Entries(batch, wires))
        self._peer_has(positions)

    # ------------------------------------------------------------ store events

    def local_changed(self, local: Heads) -> None:
        """Our store's heads changed (a local write or an ingest)."""
        self.local = dict(local)
        self._local_digest = self._told_digest = None
        self._changed()
        self._check_caught()

    def ingested(self, batch: int, positions: Iterable[Position]) -> None:
        """Batch ``batch`` from the peer is committed; ``positions`` it holds now."""
        if batch not in self._receiving:
            raise RuntimeError(f"batch {batch} was not being received")
        self._receiving.discard(batch)
        positions = list(positions)
        self._peer_has(positions)
        for author, seq, entry_id in positions:  # the peer now believes we hold these
            told = self._told.get(author)
            if told is None or seq > told.seq:
                self._told[author] = Head(seq, entry_id)
                self._told_digest = None
        if self.phase is not Phase.CLOSED:
            self._outbox.append(Ack(batch))

    def _peer_has(self, positions: Iterable[Position]) -> None:
        for author, seq, entry_id in positions:
            known = self.peer.get(author)
            if known is None or seq > known.seq:
                self.peer[author] = Head(seq, entry_id, known.frozen if known else False)
                self._peer_digest = None
                self._wanted = self._lacks = None

    def _local_heads_digest(self) -> bytes:
        if self._local_digest is None:
            self._local_digest = heads_digest(self.local)
        return self._local_digest

    def _peer_heads_digest(self) -> bytes:
        if self._peer_digest is None:
            self._peer_digest = heads_digest(self.peer)
        return self._peer_digest

    # ------------------------------------------------------------ receiving

    def receive(self, message: Message, now: float) -> list[Event]:
        """Feed one message from the peer."""
        if self.phase is Phase.CLOSED:
            return []
        self._last_received = now
        try:
            return self._dispatch(message)
        except ProtocolError as exc:
            return self.fail(str(exc))

    def _dispatch(self, message: Message) -> list[Event]:
        if isinstance(message, Bye):
            self.ended_in_sync = self.synced
            self.phase = Phase.CLOSED
            self.close_reason = message.reason
            return [SessionClosed(message.reason, by_peer=True, error=False)]
        if isinstance(message, Rules):
            return [RulesReceived(message.objects)]
        if isinstance(message, RulesHeld):
            return [RulesHeldReceived(message.digest, message.on_demand)]
        if isinstance(message, Join):
            return [JoinRequested(message.invite, message.proof)]
        if isinstance(message, Ping):
            self._outbox.append(Pong(message.nonce))
            return []
        if isinstance(message, Pong):
            return []
        if isinstance(message, Have):
            if self._peer_have is not None:
                raise ProtocolError("a second Have")
            self._peer_have = dict(message.heads)
            return self._open()
        if self.phase is not Phase.OPEN:
            raise ProtocolError(f"{type(message).__name__} before both sides said Have")
        if isinstance(message, Entries):
            if message.batch != self._next_batch_in:
                raise ProtocolError(
                    f"batch {message.batch} out of order (expected {self._next_batch_in})"
                )
            if len(self._receiving) >= self.config.window:
                raise ProtocolError("peer exceeded the window of unacknowledged batches")
            self._next_batch_in += 1
            self._receiving.add(message.batch)
            self._peer_caught = None  # the peer had more to say after all
            return [BatchReceived(message.batch, message.wires)]
        if isinstance(message, Ack):
            if not self._unacked or message.batch != self._unacked[0]:
                raise ProtocolError(f"acknowledgement of batch {message.batch} not expected")
            self._unacked.pop(0)
            self._check_caught()
            return self._synced_event()
        if isinstance(message, Caught):
            if message.digest == self._peer_caught:
                return []  # nothing new: whatever changed since was checked when it did
            self._peer_caught = message.digest
            return self._synced_event()
        raise ProtocolError(f"unexpected {type(message).__name__}")

    # ------------------------------------------------------------ caught up / synced

    def _check_caught(self) -> None:
        """Send Caught when the peer lacks nothing we hold and all is acknowledged."""
        if self.phase is not Phase.OPEN or self._unacked or self._wants():
            return
        digest = self._caught_digest()
        if digest != self._caught_sent:
            self._caught_sent = digest
            self._outbox.append(Caught(digest))

    def _caught_digest(self) -> bytes:
        """The heads our Caught names. A side that may send to the peer names its
        heads. A side that may not (a one-way rule) names the heads *the peer knows
        it holds* — its Have plus what the peer sent it — where it holds them: its
        own writes and what other peers sent it never reach this peer, so counting
        them would keep the peer waiting for ever, while an entry of the peer's
        that it refused still shows (it names its lower head there)."""
        if self.sending:
            return self._local_heads_digest()
        if self._told_digest is None:
            shown = {}
            for author, told in self._told.items():
                held = self.local.get(author)
                if held is not None:
                    shown[author] = told if held.seq >= told.seq else held
            self._told_digest = heads_digest(shown)
        return self._told_digest

    def _quiet(self) -> bool:
        """Nothing more will flow in this session until a side's heads change.

        We said Caught for our current heads (nothing left to send); the peer said
        Caught for heads that are exactly what we know it holds; nothing in flight.
        """
        return not (
            self.phase is not Phase.OPEN
            or self._peer_caught is None
            or self._unacked
            or self._receiving
            or self._caught_sent != self._caught_digest()
            or self._peer_caught != self._peer_heads_digest()
            or self._wants()
        )

    def _lacking(self) -> list[bytes]:
        """Authors of which the peer holds entries we do not, if it may send to us
        (forked authors aside: nothing more flows for them either way)."""
        if not self.receiving:
            return []
        if self._lacks is None:
            lacking = []
            for author, head in self.peer.items():
                ours = self.local.get(author)
                if head.frozen or (ours is not None and ours.frozen):
                    continue
                if ours is None or ours.seq < head.seq:
                    lacking.append(author)
            self._lacks = lacking
        return self._lacks

    def _in_sync(self) -> bool:
        """Both sides have sent all the other may have, and it has all arrived."""
        return self._quiet() and not self._lacking()

    def _synced_event(self) -> list[Event]:
        if not self._quiet():
            return []
        state = self._local_heads_digest() + self._peer_heads_digest()
        lacking = self._lacking()
        if lacking:
            # the peer sent all it had for us, so what we lack we refused (or hold,
            # waiting for an entry we refused): stuck until a side's heads change
            if state == self._stuck:
                return []
            self._stuck = state
            return [StuckOnRefused(self._why(lacking))]
        if state == self._synced:
            return []
        self._synced = state
        return [SyncedWithPeer(self._local_heads_digest())]

    def _why(self, lacking: list[bytes]) -> str:
        known = [self.refusals[a] for a in lacking if a in self.refusals]
        if known:
            return known[0]
        return (
            f"entries of {len(lacking)} author{'s' if len(lacking) != 1 else ''} that the "
            "peer holds were not applied "
            "here (see the log)"
        )

    @property
    def stuck_reason(self) -> str | None:
        """Why we cannot get in step in this session, once nothing more will flow."""
        if not self._quiet():
            return None
        lacking = self._lacking()
        return self._why(lacking) if lacking else None

    def note_refused(self, author: bytes, reason: str) -> None:
        """We refused one of ``author``'s entries from the peer, for a reason that is
        not the peer's fault; ``StuckOnRefused`` gives it if we end up lacking it."""
        self.refusals[author] = reason

    def poll_synced(self) -> list[Event]:
        """Re-check the synced condition (after ``ingested`` or ``local_changed``)."""
        self._check_caught()
        return self._synced_event()

    @property
    def synced(self) -> bool:
        return self._synced is not None and self._in_sync()

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    # ------------------------------------------------------------ time and closing

    def next_deadline(self) -> float:
        return min(
            self._last_sent + self.config.keepalive,
            self._last_received + self.config.idle_timeout,
        )

    def timer(self, now: float) -> list[Event]:
        if self.phase is Phase.CLOSED:
            return []
        if now >= self._last_received + self.config.idle_timeout:
            return self.fail(f"nothing received for {self.config.idle_timeout:g} s")
        if now >= self._last_sent + self.config.keepalive:
            if not any(isinstance(m, Ping) for m in self._outbox):
                self._ping_nonce += 1
                self._outbox.append(Ping(self._ping_nonce))
            self._last_sent = now  # queued counts as sent: no busy loop while the writer waits
        return []

    def fail(self, reason: str) -> list[Event]:
        """Close because the peer broke the protocol (or went silent)."""
        return self._close(reason, error=True)

    def close(self, reason: str) -> list[Event]:
        """Close on our side, telling the peer why."""
        return self._close(reason, error=False)

    def _close(self, reason: str, error: bool) -> list[Event]:
        if self.phase is Phase.CLOSED:
            return []
        self.ended_in_sync = self.synced and not error
        self.phase = Phase.CLOSED
        self.close_reason = reason
        if error:  # the peer broke the protocol: nothing more for it but the reason
            self._outbox = [Bye(reason)]
        else:  # on purpose: what was queued (a last Caught, an Ack, rules) goes first,
            # but no entries: they were chosen under the rules that may just have ended
            self._outbox = [m for m in self._outbox if not isinstance(m, Entries)]
            self._outbox.append(Bye(reason))
        return [SessionClosed(reason, by_peer=False, error=error)]
