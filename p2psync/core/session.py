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
    recv:   Want([id, ...])                    entries it holds without payloads the
                                               rules now let come: send them again
    sender: Entries(n, [...]) ... Resent(k)    those it holds, then "that was all"
    both:   Caught(digest)                     "I have sent you everything I hold"
    either: Ping/Pong                          keepalive while idle
    either: Bye(reason)                        closing, with the reason

States (:class:`State`) and which message each accepts are one table,
:data:`TRANSITIONS`; a message a state does not list is the peer's protocol error.

The machine owns the protocol's rules: how rule objects settle (at most
:data:`MAX_RULES_HELD` rounds), how long a pair with no rule in force may wait
(``pairing_timeout``), the window, the keepalive and idle timeout, what the peer
lacks and may see (a :class:`~p2psync.core.flow.Flow`), which refused entries
prove the peer hostile (a type: :class:`~p2psync.errors.HostileEntry`), and when
the pair is in sync. It tracks what the peer holds (its ``Have``, plus every
entry sent to it or received from it) so nothing the peer has is sent again.
A peer that breaks the protocol gets ``Bye(reason)`` and the session closes;
nothing it sent before is lost. Our own code calling it out of turn raises
:class:`~p2psync.errors.LocalProtocolError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from p2psync.core.events import (
    BatchReceived,
    Event,
    JoinRequested,
    MissingPayload,
    NothingToSync,
    PeerHeadsReceived,
    Position,
    Refusal,
    RulesHeldReceived,
    RulesInForce,
    RulesReceived,
    SessionClosed,
    Stored,
    StuckOnRefused,
    SyncedWithPeer,
)
from p2psync.core.flow import Flow
from p2psync.core.holdings import Holdings
from p2psync.core.messages import (
    MAX_WANT_IDS,
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
    Resent,
    Rules,
    RulesHeld,
    Stuck,
    Want,
)
from p2psync.core.settling import RuleExchange
from p2psync.errors import HostileEntry, LocalProtocolError, RemoteProtocolError


class State(Enum):
    PAIRING = "pairing"  # rule objects being exchanged; neither side said Have
    HAVE_SENT = "have sent"  # we said Have (a rule is in force); the peer has not
    HAVE_RECEIVED = "have received"  # the peer said Have; we have not (yet)
    OPEN = "open"  # both said Have: entries may flow
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    window: int = 4  # batches sent and not yet acknowledged
    keepalive: float = 15.0  # send a Ping after this long without sending
    idle_timeout: float = 45.0  # close after this long without receiving
    pairing_timeout: float = 5.0  # a pair with no rule in force waits this long


class SyncSession:
    """The protocol state of one connection.

    ``on_demand``: this side syncs on demand (the session ends once in sync);
    otherwise it stays connected and entries flow live.
    """

    def __init__(
        self, now: float, config: SessionConfig | None = None, *, on_demand: bool = False
    ) -> None:
        self.config = config or SessionConfig()
        self.state = State.PAIRING
        self.on_demand = on_demand
        self.peer_on_demand = False  # its RulesHeld said it syncs on demand
        self.holdings = Holdings()
        self._outbox: list[Message] = []
        self._have: dict[bytes, Head] | None = None  # ours, once said
        self._peer_have: dict[bytes, Head] | None = None
        self._rules: RuleExchange | None = None  # when rule objects are exchanged
        self._pairing_deadline: float | None = None
        # entries
        self._next_batch_out = 1
        self._unacked: list[int] = []
        #: per unacknowledged batch, the IDs of the entries it carries (ordinary
        #: flow and Want answers)
        self._sent_ids: dict[int, list[bytes]] = {}
        #: the peer ended the session (its Bye): with entries of ours unacknowledged,
        #: it may have found one invalid (see :meth:`unacked_ids`)
        self.closed_by_peer = False
        self._next_batch_in = 1
        self._receiving: set[int] = set()  # batches handed to the shell, not yet ingested
        self._last_received = now
        self._last_sent = now
        self._ping_nonce = 0
        self.close_reason: str | None = None
        #: the session was in sync when it closed (``synced`` says False once closed)
        self.ended_in_sync = False
        #: why the peer cannot get in step with what we sent (its Stuck), until in sync
        self._peer_stuck: str | None = None
        self._peer_stuck_told = 0  # its Stuck reasons taken note of (and logged)
        # payloads held missing: ours to ask for, asked and not yet answered (and
        # whether the peer's Resent came), and what the peer asked of us and we
        # have not sent yet (and how many went)
        self._missing: Sequence[MissingPayload] = ()
        self._to_ask: list[bytes] = []
        self._asked: set[bytes] = set()
        self._resent = False
        self._asked_of_us: list[bytes] = []
        self._resent_count = 0
        self._shrunk = False  # our heads went down (entries marked damaged)

    # ------------------------------------------------------------ output

    def take_outbox(self, now: float) -> list[Message]:
        """Messages to send now, in order."""
        out, self._outbox = self._outbox, []
        if out:
            self._last_sent = now
        return out

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def begun(self) -> bool:
        """We said Have."""
        return self.state in (State.HAVE_SENT, State.OPEN)

    # ------------------------------------------------------------ rule objects

    def start_pairing(
        self, objects: Sequence[bytes], now: float, join: tuple[bytes, bytes] | None = None
    ) -> None:
        """Say which rule objects about the pair we hold (and present an invite
        code); Have follows once both sides hold the same ones and one is in force."""
        if self.state is not State.PAIRING or self._rules is not None:
            raise LocalProtocolError("start_pairing called twice or after Have")
        self._rules = RuleExchange(objects, on_demand=self.on_demand, join=join)
        self._outbox += self._rules.opening()
        self._pairing_deadline = now + self.config.pairing_timeout

    def _exchange(self) -> RuleExchange:
        if self._rules is None:
            raise LocalProtocolError("no pairing on this connection")
        return self._rules

    def rules_held_answered(self, digest: bytes, ours: Sequence[bytes]) -> bool:
        """Our rule objects, read after the peer's RulesHeld named ``digest``: sent
        if they differ. True if the peer holds exactly what we hold."""
        same, out = self._exchange().held_answered(digest, ours)
        self._queue(out)
        return same

    def rules_stored(self, answers: Sequence[bytes], *, join_answered: bool = False) -> None:
        """The peer's rule objects are stored; ``answers`` (ours) go back."""
        self._queue(self._exchange().stored(answers, join_answered=join_answered))

    def join_answered(self, proposal: bytes) -> None:
        """The invite code checked out: our proposal to the joiner."""
        self._queue(self._exchange().join_answered(proposal))

    def local_rules_changed(self, ours: Sequence[bytes]) -> bool:
        """Rule objects about the pair changed here: tell the peer if they differ
        from what we last sent it. True if they did."""
        out = self._exchange().changed(ours) if not self.closed else []
        self._queue(out)
        return bool(out)

    def _queue(self, messages: list[Message]) -> None:
        if self.closed:
            return
        for message in messages:
            # a Rules joins the Rules waiting last (only Pongs after it: nothing is
            # reordered): the peer stores the union of what they carry either way,
            # and a peer that never reads cannot pile them up
            last = len(self._outbox) - 1
            while last >= 0 and isinstance(self._outbox[last], Pong):
                last -= 1
            waiting = self._outbox[last] if last >= 0 else None
            if isinstance(message, Rules) and isinstance(waiting, Rules):
                union = list(dict.fromkeys([*waiting.objects, *message.objects]))
                self._outbox[last] = Rules(union)
            else:
                self._outbox.append(message)

    @property
    def settled(self) -> bool:
        """Both sides hold the same rule objects (or there are none to exchange)."""
        return self._rules is None or self._rules.settled

    @property
    def joining(self) -> bool:
        """We presented an invite code and the inviter has not answered it yet."""
        return self._rules is not None and self._rules.joining

    def rules_in_force(self, flow: Flow) -> list[Event]:
        """The rules between us, as they stand once settled: what may flow.

        Before Have: a rule in force for this session asks the shell to begin
        (:class:`RulesInForce`); none ends the session (:class:`NothingToSync`)
        unless there is something to wait for: the inviter's answer to our code,
        or — live, with no rule in force at all — the user answering a request
        (the pairing deadline ends the wait). After Have: a changed flow ends it,
        so that both sides start afresh under the new rules."""
        if not self.settled or self.closed:
            return []
        if not self.begun:
            self.set_flow(flow)
            if flow.flows:
                return [RulesInForce()]
            if not self.joining and (self.on_demand or flow.in_force):
                return [NothingToSync()]
            return []
        if flow.now != self.flow.now:
            return self.close("the rules between us changed")
        return []

    @property
    def live(self) -> bool:
        """Both sides stay connected (neither syncs on demand): only a pair with an
        online rule syncs here; otherwise on-demand rules count too."""
        return not self.on_demand and not self.peer_on_demand

    # ------------------------------------------------------------ opening

    def begin(
        self,
        local: Heads,
        missing: Sequence[MissingPayload] = (),
        held_back: Mapping[bytes, tuple[int, int]] | None = None,
    ) -> list[Event]:
        """A rule is in force (or the connection has no rules): state our heads and
        start syncing. ``missing``: ops we hold without their payload; once the
        peer's heads are known, we ask it for the entries it holds of those whose
        collection it may send us (:class:`Want`). ``held_back``: per author,
        ``(first damaged seq, seq held)`` of entries we hold but cannot send (marked
        damaged); a peer that lacks them is not "in sync" with us."""
        if self.state is State.PAIRING:
            self.state = State.HAVE_SENT
        elif self.state is State.HAVE_RECEIVED:
            self.state = State.OPEN
        elif self.state is State.CLOSED:
            return []
        else:
            raise LocalProtocolError("begin called after we said Have")
        self._pairing_deadline = None
        self._missing = missing
        self.holdings.set_held_back(held_back or {})
        self._have = dict(local)
        self._outbox.append(Have(dict(local)))
        return self._opened()

    def _opened(self) -> list[Event]:
        if self.state is not State.OPEN:
            return []
        assert self._have is not None and self._peer_have is not None
        self.holdings.opened(self._have, self._peer_have)
        self._plan_asks(self._peer_have)
        self._check_caught()
        return [PeerHeadsReceived(dict(self._peer_have))]

    # ------------------------------------------------------------ what to send

    def set_flow(self, flow: Flow) -> None:
        """What the rules let flow between us, before we say Have (afterwards a
        change of rules ends the session: :meth:`rules_in_force`)."""
        if self.begun:
            raise LocalProtocolError("the flow of a session changed after we said Have")
        self.holdings.set_flow(flow)

    @property
    def flow(self) -> Flow:
        return self.holdings.flow

    @property
    def local(self) -> dict[bytes, Head]:
        """Our heads, as last told."""
        return self.holdings.local

    @property
    def peer(self) -> dict[bytes, Head]:
        """What the peer holds, as far as we know."""
        return self.holdings.peer

    @property
    def refusals(self) -> dict[bytes, str]:
        return self.holdings.refusals

    def wants(self) -> dict[bytes, int]:
        """Per author, the seq after which the peer lacks entries we hold (and may get)."""
        return dict(self._wants())

    def _wants(self) -> dict[bytes, int]:
        return self.holdings.wants() if self.state is State.OPEN else {}

    def can_send(self) -> bool:
        return (
            self.state is State.OPEN
            and self.flow.sending
            and len(self._unacked) < self.config.window
        )

    def send_entries(self, stored: Sequence[Stored]) -> int:
        """Queue what of ``stored`` (read for what the peer lacked) the peer still
        lacks, its payloads withheld as the flow says; how many went."""
        if not self.can_send():
            raise LocalProtocolError("entries to send while the window is full or closed")
        wanted = self._wants()
        batch = [s for s in stored if s.author in wanted and s.seq > wanted[s.author]]
        if batch:
            last = {s.author: (s.seq, s.id) for s in batch}  # seqs rise per author
            self.send_batch(
                self.flow.outgoing([s.wire for s in batch]),
                [(author, seq, eid) for author, (seq, eid) in last.items()],
                [s.id for s in batch],
            )
        return len(batch)

    def unacked_ids(self) -> list[bytes]:
        """The IDs of the entries we sent that the peer has not acknowledged (when
        the peer ends the session so, the shell checks them: a peer that found one
        invalid closed it)."""
        return [i for batch in self._unacked for i in self._sent_ids.get(batch, ())]

    def fork_suspects(self, peer_heads: Heads) -> list[tuple[bytes, int, bytes]]:
        """Where the peer names an entry at a seq we hold too, (author, seq, its
        entry ID): if ours differs, :meth:`send_fork_proof` sends it ours."""
        suspects = []
        for author, theirs in peer_heads.items():
            ours = self.local.get(author)
            if ours is None or theirs.seq > ours.seq or theirs.seq == 0 or theirs.frozen:
                continue
            suspects.append((author, theirs.seq, theirs.head))
        return suspects

    def send_fork_proof(self, wire: bytes) -> bool:
        """Send our entry at a seq where the peer holds another (its proof of the
        fork too), if the window and the rules allow."""
        if not self.can_send():
            return False
        self.send_batch(self.flow.outgoing([wire]), [])
        return True

    def send_batch(
        self, wires: list[bytes], positions: Iterable[Position], ids: Sequence[bytes] = ()
    ) -> None:
        """Queue an Entries message of ready wire forms; ``positions`` say which
        entries it carries (the last of each author), ``ids`` all of them (kept
        until acknowledged: :meth:`unacked_ids`)."""
        if not self.can_send():
            raise LocalProtocolError("entries to send while the window is full or closed")
        batch = self._next_batch_out
        self._next_batch_out += 1
        self._unacked.append(batch)
        if ids:
            self._sent_ids[batch] = list(ids)
        self._outbox.append(Entries(batch, wires))
        self.holdings.peer_has(positions)

    # ------------------------------------------------------------ payloads wanted

    def _plan_asks(self, peer: Heads) -> None:
        """Ask the peer for the entries it holds (by its Have) of those we hold
        without a payload the rules of this session let it send us, a Want of at
        most :data:`MAX_WANT_IDS` at a time (none of an author either side froze
        after a fork: its chains may differ). Our Caught waits until all are
        answered: a peer that syncs on demand must not end the session before."""
        if not self.flow.receiving:
            return
        ours = self._have or {}
        wanted: set[bytes] = set()
        for m in self._missing:
            head, own = peer.get(m.author), ours.get(m.author)
            frozen = (head is not None and head.frozen) or (own is not None and own.frozen)
            held = head is not None and head.seq >= m.seq
            if held and not frozen and self.flow.may_receive(m.collection):
                wanted.add(m.entry)
        self._missing = ()
        self._to_ask = sorted(wanted)
        self._ask()

    def _ask(self) -> None:
        if self._asked or not self._to_ask:
            return
        chunk, self._to_ask = self._to_ask[:MAX_WANT_IDS], self._to_ask[MAX_WANT_IDS:]
        self._asked = set(chunk)
        self._outbox.append(Want(chunk))

    def _answered(self) -> None:
        """The peer's Resent came: once every batch before it is stored, what it
        did not send it does not hold; ask for the next ones."""
        if self._resent and not self._receiving:
            self._resent = False
            self._asked = set()
            self._ask()

    def to_resend(self) -> list[bytes]:
        """Entries the peer asked for again (its Want) that we have not sent yet."""
        return list(self._asked_of_us) if self.state is State.OPEN else []

    def resend(self, ids: Sequence[bytes], wires: list[bytes]) -> None:
        """Send again the ``wires`` read for the first ``ids`` of :meth:`to_resend`
        (those not held here have none), their payloads withheld as the flow says;
        after the last, say ``Resent``."""
        if list(ids) != self._asked_of_us[: len(ids)]:
            raise LocalProtocolError("asked-for entries sent out of order")
        del self._asked_of_us[: len(ids)]
        if wires:
            self.send_batch(self.flow.outgoing(wires), [], ids)  # (some perhaps not held)
            # the peer takes the batch for more to come: our Caught is due again,
            # even for the heads we said it for
            self.holdings.say_caught_again()
            self._resent_count += len(wires)
        if not self._asked_of_us:
            self._outbox.append(Resent(self._resent_count))

    def _on_want(self, message: Want) -> list[Event]:
        if not self.flow.sending:
            raise RemoteProtocolError("Want sent, but no rule lets us send you anything")
        if self._asked_of_us:
            raise RemoteProtocolError("a Want before the last one was answered")
        self._asked_of_us = list(message.ids)
        self._resent_count = 0
        return []

    def _on_resent(self, message: Resent) -> list[Event]:
        if not self._asked or self._resent:
            raise RemoteProtocolError("Resent, but we asked for nothing")
        self._resent = True
        self._answered()
        return self.poll_synced()

    # ------------------------------------------------------------ store events

    def local_changed(
        self, local: Heads, held_back: Mapping[bytes, tuple[int, int]] | None = None
    ) -> None:
        """Our store's heads changed (a local write, or another session's ingest),
        and with them, if given, what we hold but cannot send (see :meth:`begin`):
        :meth:`poll_synced` says what follows."""
        before = self.holdings.local
        if self.state is State.OPEN and any(
            author not in local or local[author].seq < head.seq
            for author, head in before.items()
        ):
            # entries marked damaged here (`verify --repair`): the peer believes we
            # hold them; a new session, from our new Have, has them sent again
            self._shrunk = True
        if held_back is not None:
            self.holdings.set_held_back(held_back)
        self.holdings.set_local(local)
        self._check_caught()

    def ingested(
        self,
        batch: int,
        positions: Iterable[Position],
        local: Heads | None = None,
        refusals: Sequence[Refusal] = (),
    ) -> list[Event]:
        """Batch ``batch`` from the peer is committed: ``positions`` the peer holds,
        our heads after it (if read), and the entries not applied. One that proves
        the peer hostile closes the session; the others are noted (not the peer's
        fault)."""
        if batch not in self._receiving:
            raise LocalProtocolError(f"batch {batch} was not being received")
        if self.closed:
            return []
        self._receiving.discard(batch)
        self.holdings.received(positions)
        self._outbox.append(Ack(batch))
        self._answered()
        if local is not None:
            self.local_changed(local)
        for refusal in refusals:
            if isinstance(refusal.error, HostileEntry):
                return self.fail(f"invalid entry: {refusal.description}")
        for refusal in refusals:
            if refusal.author is not None and refusal.author in self.holdings.peer:
                self.refusals[refusal.author] = refusal.description
        return self.poll_synced()

    def receive(self, message: Message, now: float) -> list[Event]:
        """Feed one message from the peer."""
        if self.state is State.CLOSED:
            return []
        self._last_received = now
        handler = TRANSITIONS[self.state].get(type(message))
        try:
            if handler is None:
                raise RemoteProtocolError(_unexpected(self.state, message))
            return handler(self, message)
        except RemoteProtocolError as exc:
            return self.fail(str(exc))

    def _on_bye(self, message: Bye) -> list[Event]:
        self.ended_in_sync = self.synced
        self.closed_by_peer = True
        self.state = State.CLOSED
        self.close_reason = message.reason
        return [SessionClosed(message.reason, by_peer=True, error=False)]

    def _on_ping(self, message: Ping) -> list[Event]:
        # at most one Pong waits (the latest): a peer that pings and never reads
        # must not grow the outbox by one a Ping
        self._latest_only(Pong(message.nonce))
        return []

    def _latest_only(self, message: Pong | Stuck) -> None:
        """Queue ``message`` in place of any of its kind still waiting: only the
        latest counts, and a peer that never reads cannot pile them up."""
        self._outbox = [m for m in self._outbox if type(m) is not type(message)]
        self._outbox.append(message)

    def _on_pong(self, message: Pong) -> list[Event]:
        return []

    def _on_stuck(self, message: Stuck) -> list[Event]:
        # said once per stuck state by an honest peer; a repeat changes nothing, so
        # a peer that repeats it cannot flood the log
        if not self.flow.sending:
            raise RemoteProtocolError("Stuck sent, but no rule lets us send you anything")
        if message.reason == self._peer_stuck or self.synced:
            return []
        self._peer_stuck = message.reason
        self._peer_stuck_told += 1
        if self._peer_stuck_told > MAX_PEER_STUCK_EVENTS:
            return []  # kept for stuck_reason, but no more log lines from this peer
        return [StuckOnRefused(_PEER_STUCK + message.reason)]

    def _on_rules(self, message: Rules) -> list[Event]:
        self._peer_rules().peer_message()
        return [RulesReceived(message.objects)]

    def _on_rules_held(self, message: RulesHeld) -> list[Event]:
        self._peer_rules().peer_message(held=True)
        if message.on_demand:
            self.peer_on_demand = True  # on-demand rules count in this session too
        return [RulesHeldReceived(message.digest, message.on_demand)]

    def _on_join(self, message: Join) -> list[Event]:
        self._peer_rules().peer_message()
        return [JoinRequested(message.invite, message.proof)]

    def _peer_rules(self) -> RuleExchange:
        if self._rules is None:
            raise RemoteProtocolError("no pairing on this connection")
        return self._rules

    def _on_have(self, message: Have) -> list[Event]:
        self._peer_have = dict(message.heads)
        self.state = State.OPEN if self.state is State.HAVE_SENT else State.HAVE_RECEIVED
        return self._opened()

    def _on_second_have(self, message: Have) -> list[Event]:
        raise RemoteProtocolError("a second Have")

    def _on_entries(self, message: Entries) -> list[Event]:
        if not self.flow.receiving:
            raise RemoteProtocolError("entries sent, but no rule lets you send any")
        if message.batch != self._next_batch_in:
            raise RemoteProtocolError(
                f"batch {message.batch} out of order (expected {self._next_batch_in})"
            )
        # a batch counts until its Ack has left: a peer that sends and never reads
        # cannot make Acks pile up beyond the window either
        waiting_acks = sum(1 for m in self._outbox if isinstance(m, Ack))
        if len(self._receiving) + waiting_acks >= self.config.window:
            raise RemoteProtocolError("peer exceeded the window of unacknowledged batches")
        self._next_batch_in += 1
        self._receiving.add(message.batch)
        self.holdings.peer_caught(None)  # the peer had more to say after all
        return [BatchReceived(message.batch, message.wires)]

    def _on_ack(self, message: Ack) -> list[Event]:
        if not self._unacked or message.batch != self._unacked[0]:
            raise RemoteProtocolError(f"acknowledgement of batch {message.batch} not expected")
        self._sent_ids.pop(self._unacked.pop(0), None)
        self._check_caught()
        return self._synced_event()

    def _on_caught(self, message: Caught) -> list[Event]:
        if not self.holdings.peer_caught(message.digest):
            return []  # nothing new: whatever changed since was checked when it did
        # its heads moved on: a Stuck it sent is no longer its word (a peer still
        # stuck says so again once quiet for the new heads)
        self._peer_stuck = None
        return self._synced_event()

    # ------------------------------------------------------------ caught up / synced

    def _check_caught(self) -> None:
        """Send Caught when the peer lacks nothing we hold and all is acknowledged."""
        if self.state is State.OPEN and not self._unacked and not self._asked:
            digest = self.holdings.caught_due()
            if digest is not None:
                self._outbox.append(Caught(digest))

    def _quiet(self) -> bool:
        """Nothing more will flow in this session until a side's heads change."""
        return (
            self.state is State.OPEN
            and not self._unacked
            and not self._receiving
            and not self._asked
            and not self._asked_of_us
            and self.holdings.quiet()
        )

    def _synced_event(self) -> list[Event]:
        verdict = self.holdings.verdict() if self._quiet() else None
        if verdict is None:
            return []
        in_sync, why = verdict
        if in_sync:
            self._peer_stuck = None
            self._peer_stuck_told = 0  # a new episode may be told again
            return [SyncedWithPeer(self.holdings.local_digest()), *self.end_if_done()]
        events: list[Event] = [StuckOnRefused(why)]
        if self.on_demand or self.peer_on_demand:
            # an on-demand sync (ours or the peer's) says why now rather than at its
            # timeout; the peer learns the reason from our Bye
            events += self.close(f"cannot get in step: {why}")
        elif self.holdings.lacking():
            # live: the peer, which believes it delivered, hears why, and both stay
            # connected (the entries may yet arrive another way). One Stuck waits
            # at most, the latest: verdicts are said once per state anyway. (Stuck
            # means "I refused what you sent": not said for what we hold but cannot
            # send, which the peer, in sync with all we can send, takes no note of;
            # a peer that may not send to us would take it for a protocol error.)
            self._latest_only(Stuck(why))
        return events

    def end_if_done(self) -> list[Event]:
        """An on-demand session ends once in sync, and once an invite code it
        presented has been answered (a refusal ends it from the inviter's side)."""
        if self.on_demand and not self.joining and self.synced:
            return self._close("synced", error=False, done=True)
        return []

    @property
    def stuck_reason(self) -> str | None:
        """Why we cannot get in step in this session, once nothing more will flow:
        what we lack and refused, else what the peer said it refused of ours."""
        lacking = self.holdings.lacking() if self._quiet() else []
        if lacking:
            return self.holdings.why(lacking)
        unsendable = self.holdings.unsendable() if self._quiet() else []
        if unsendable:
            return self.holdings.why_unsendable(unsendable)
        return None if self._peer_stuck is None else _PEER_STUCK + self._peer_stuck

    def poll_synced(self) -> list[Event]:
        """Re-check the synced condition (after the store changed)."""
        if self._shrunk:
            return self.close("this store's log shrank (entries marked damaged): starting afresh")
        self._check_caught()
        return self._synced_event()

    @property
    def synced(self) -> bool:
        """In sync: both sides sent all the other may have, and it has arrived."""
        return (
            self.holdings.ever_synced
            and self._quiet()
            and not self.holdings.lacking()
            and not self.holdings.unsendable()
        )

    @property
    def idle(self) -> bool:
        """Open, with nothing of ours unacknowledged: a change of our heads alone
        may call for a new Caught (:meth:`local_changed`, then :meth:`poll_synced`)."""
        return self.state is State.OPEN and not self._unacked

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    # ------------------------------------------------------------ time and closing

    def next_deadline(self) -> float:
        deadline = min(
            self._last_sent + self.config.keepalive,
            self._last_received + self.config.idle_timeout,
        )
        if self._pairing_deadline is not None:
            deadline = min(deadline, self._pairing_deadline)
        return deadline

    def timer(self, now: float) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        if now >= self._last_received + self.config.idle_timeout:
            return self.fail(f"nothing received for {self.config.idle_timeout:g} s")
        events: list[Event] = []
        if self._pairing_deadline is not None and now >= self._pairing_deadline:
            # a pair with no rule in force has nothing to do once rules are exchanged
            self._pairing_deadline = None
            if not self.begun:
                events.append(NothingToSync())
        if now >= self._last_sent + self.config.keepalive:
            if not any(isinstance(m, Ping) for m in self._outbox):
                self._ping_nonce += 1
                self._outbox.append(Ping(self._ping_nonce))
            self._last_sent = now  # queued counts as sent: no busy loop while the writer waits
        return events

    def fail(self, reason: str) -> list[Event]:
        """Close because the peer broke the protocol (or went silent)."""
        return self._close(reason, error=True)

    def close(self, reason: str) -> list[Event]:
        """Close on our side, telling the peer why."""
        return self._close(reason, error=False)

    def _close(self, reason: str, error: bool, done: bool = False) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        self.ended_in_sync = self.synced and not error
        self.state = State.CLOSED
        self.close_reason = reason
        if error:  # the peer broke the protocol: nothing more for it but the reason
            self._outbox = [Bye(reason)]
        else:  # on purpose: what was queued (a last Caught, an Ack, rules) goes first,
            # but no entries: they were chosen under the rules that may just have ended
            self._outbox = [m for m in self._outbox if not isinstance(m, Entries)]
            self._outbox.append(Bye(reason))
        return [SessionClosed(reason, by_peer=False, error=error, done=done)]


#: A peer's Stuck reasons logged per session: an honest peer changes its reason
#: only when its holdings change; one alternating reasons must not flood the log.
MAX_PEER_STUCK_EVENTS = 16
#: How a peer's Stuck is told here (``status``, ``peers``, ``sync``, the log).
_PEER_STUCK = "the peer refused what we sent: "


def _unexpected(state: State, message: Message) -> str:
    name = type(message).__name__
    if state is not State.OPEN and isinstance(message, Entries | Ack | Caught):
        return f"{name} before both sides said Have"
    return f"unexpected {name}"


Handler = Callable[[SyncSession, Message], list[Event]]

_ALWAYS: dict[type[Message], Handler] = {
    Bye: SyncSession._on_bye,  # type: ignore[dict-item]
    Ping: SyncSession._on_ping,  # type: ignore[dict-item]
    Pong: SyncSession._on_pong,  # type: ignore[dict-item]
    Rules: SyncSession._on_rules,  # type: ignore[dict-item]
    RulesHeld: SyncSession._on_rules_held,  # type: ignore[dict-item]
    Join: SyncSession._on_join,  # type: ignore[dict-item]
}

#: Per state, the messages it accepts from the peer and what each does; anything
#: else is the peer's protocol error (a closed session ignores everything).
TRANSITIONS: dict[State, dict[type[Message], Handler]] = {
    State.PAIRING: {**_ALWAYS, Have: SyncSession._on_have},  # type: ignore[dict-item]
    State.HAVE_SENT: {**_ALWAYS, Have: SyncSession._on_have},  # type: ignore[dict-item]
    State.HAVE_RECEIVED: {**_ALWAYS, Have: SyncSession._on_second_have},  # type: ignore[dict-item]
    State.OPEN: {
        **_ALWAYS,
        Have: SyncSession._on_second_have,  # type: ignore[dict-item]
        Entries: SyncSession._on_entries,  # type: ignore[dict-item]
        Ack: SyncSession._on_ack,  # type: ignore[dict-item]
        Caught: SyncSession._on_caught,  # type: ignore[dict-item]
        Stuck: SyncSession._on_stuck,  # type: ignore[dict-item]
        Want: SyncSession._on_want,  # type: ignore[dict-item]
        Resent: SyncSession._on_resent,  # type: ignore[dict-item]
    },
    State.CLOSED: {},
}
