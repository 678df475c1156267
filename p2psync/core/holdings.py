"""What each side of a session holds, as far as this side knows, and whether
the pair is in step: part of the session machine (``core/session.py``).

It tracks our heads, the peer's (its ``Have``, plus every entry sent to it or
received from it, so nothing the peer has is sent again), what the peer knows
we hold, and the ``Caught`` digests both ways. The pair is **in sync** when both
sides have said ``Caught`` for what the other knows they hold, nothing is in
flight, we lack nothing the peer may send us, and the peer lacks nothing we hold
for it; **stuck** when all that will flow has flowed yet we lack some of it (we
refused or hold entries, for a reason that is not the peer's fault, kept in
:attr:`Holdings.refusals`), or the peer lacks entries we hold but cannot send
(marked damaged here: :attr:`Holdings.held_back`).

Everything derived is cached, so a peer's message that changes nothing — a
Ping, a repeated Caught — costs O(1), however many authors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from p2psync.core.events import Position
from p2psync.core.flow import Flow
from p2psync.core.identity import short_id
from p2psync.core.messages import MAX_AUTHORS, Head, Heads, heads_digest


class Holdings:
    """Heads on both sides of one session, and the in-step verdict."""

    def __init__(self) -> None:
        self.flow = Flow()
        self.local: dict[bytes, Head] = {}
        self.peer: dict[bytes, Head] = {}
        #: authors whose entries from the peer we refused (not the peer's fault), and why
        self.refusals: dict[bytes, str] = {}
        self._told: dict[bytes, Head] = {}  # what the peer knows we hold
        self._caught_sent: bytes | None = None
        self._peer_caught: bytes | None = None
        self._synced: bytes | None = None  # the heads of both sides when last in sync
        self._stuck: bytes | None = None  # ...and when last found stuck
        self._local_digest: bytes | None = None
        self._peer_digest: bytes | None = None
        self._told_digest: bytes | None = None
        self._wanted: dict[bytes, int] | None = None
        self._lacks: list[bytes] | None = None
        #: entries we hold but cannot send (marked damaged, not mended yet): per
        #: author, ``(first damaged seq, seq held)``; our heads stop before them
        self.held_back: dict[bytes, tuple[int, int]] = {}

    # ------------------------------------------------------------ changes

    def opened(self, local: Heads, peer: Heads) -> None:
        """Both sides said Have: ours (``local``) and the peer's."""
        self.local, self._told, self.peer = dict(local), dict(local), dict(peer)
        self._local_digest = self._told_digest = self._peer_digest = None
        self._stale()

    def set_flow(self, flow: Flow) -> None:
        self.flow = flow
        self._stale()

    def set_held_back(self, held_back: Mapping[bytes, tuple[int, int]]) -> None:
        """What we hold but cannot send changed (our heads may not have: they stop
        before a damaged entry, however many entries we hold after it)."""
        self.held_back = dict(held_back)

    def set_local(self, local: Heads) -> None:
        """Our store's heads changed."""
        self.local = dict(local)
        self._local_digest = self._told_digest = None
        self._stale()

    def peer_has(self, positions: Iterable[Position]) -> None:
        """The peer holds these now (sent to it, or it sent them). Past
        ``MAX_AUTHORS`` authors (what a Have may name, and a store may hold), new
        authors are not tracked: a peer must not grow a session without bound with
        entries of throwaway authors that we refuse."""
        for author, seq, entry_id in positions:
            known = self.peer.get(author)
            if known is None and len(self.peer) >= MAX_AUTHORS:
                continue
            if known is None or seq > known.seq:
                self.peer[author] = Head(seq, entry_id, known.frozen if known else False)
                self._peer_digest = None
                self._stale()

    def received(self, positions: Iterable[Position]) -> None:
        """The peer sent these and we committed them: it holds them, and believes
        we hold them too."""
        positions = list(positions)
        self.peer_has(positions)
        for author, seq, entry_id in positions:
            told = self._told.get(author)
            if told is None and author not in self.peer:
                continue  # not tracked (see peer_has)
            if told is None or seq > told.seq:
                self._told[author] = Head(seq, entry_id)
                self._told_digest = None

    def peer_caught(self, digest: bytes | None) -> bool:
        """The peer said Caught (or, with None, sent more entries after all); False
        if that changes nothing."""
        if digest is not None and digest == self._peer_caught:
            return False
        self._peer_caught = digest
        return True

    def say_caught_again(self) -> None:
        """Entries went to the peer with our heads unchanged (it asked for them
        again): it takes them for more to come, so our next Caught is due even for
        the heads we said it for."""
        self._caught_sent = None

    def _stale(self) -> None:
        self._wanted = self._lacks = None

    # ------------------------------------------------------------ what follows

    def wants(self) -> dict[bytes, int]:
        """Per author, the seq after which the peer lacks entries we hold and may
        send it."""
        if self._wanted is None:
            self._wanted = self.flow.lacks(self.local, self.peer)
        return self._wanted

    def caught_due(self) -> bytes | None:
        """The digest to say Caught with, if the peer lacks nothing we may send it
        and we have not said it for these heads yet (all must be acknowledged)."""
        if self.wants():
            return None
        digest = self._caught_digest()
        if digest == self._caught_sent:
            return None
        self._caught_sent = digest
        return digest

    def _caught_digest(self) -> bytes:
        """The heads our Caught names. A side that may send to the peer names its
        heads. A side that may not (a one-way rule) names the heads *the peer knows
        it holds* — its Have plus what the peer sent it — where it holds them: its
        own writes and what other peers sent it never reach this peer, so counting
        them would keep the peer waiting for ever, while an entry of the peer's
        that it refused still shows (it names its lower head there)."""
        if self.flow.sending:
            return self._local_heads_digest()
        if self._told_digest is None:
            shown = {}
            for author, told in self._told.items():
                held = self.local.get(author)
                if held is not None:
                    shown[author] = told if held.seq >= told.seq else held
            self._told_digest = heads_digest(shown)
        return self._told_digest

    def quiet(self) -> bool:
        """With nothing in flight: nothing more will flow until a side's heads
        change. We said Caught for our current heads (nothing left to send); the
        peer said Caught for exactly what we know it holds."""
        return not (
            self._peer_caught is None
            or self._caught_sent != self._caught_digest()
            or self._peer_caught != self._peer_heads_digest()
            or self.wants()
        )

    def lacking(self) -> list[bytes]:
        """Authors of which the peer holds entries we do not, if it may send to us
        (forked authors aside: nothing more flows for them either way)."""
        if not self.flow.receiving:
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

    def unsendable(self) -> list[tuple[bytes, int, int]]:
        """``(author, damaged seq, seq held)`` for each author of which we hold
        entries the peer lacks and may have, but cannot send (from an entry marked
        damaged here on: :attr:`held_back`)."""
        if not self.held_back:
            return []
        found = []
        for author, (damaged, held) in self.held_back.items():
            ours = self.local.get(author)
            if ours is not None and ours.seq >= damaged:
                continue  # mended since
            if self.flow.lacks({author: Head(held, b"")}, self.peer):
                found.append((author, damaged, held))
        return found

    def verdict(self) -> tuple[bool, str] | None:
        """Once quiet, for heads not judged before: ``(True, "")`` in sync, or
        ``(False, why)`` stuck; None when nothing new is to be said."""
        state = self._local_heads_digest() + self._peer_heads_digest()
        lacking = self.lacking()
        unsendable = [] if lacking else self.unsendable()
        if unsendable:
            # which authors are held back, and from which damaged entry: more
            # entries written behind the same damaged one are not a new state (the
            # reason, read again later, counts them)
            state += heads_digest({a: Head(damaged, b"") for a, damaged, _ in unsendable})
        if lacking or unsendable:
            # the peer sent all it had for us, so what we lack we refused (or hold,
            # waiting for an entry we refused); or it lacks what we hold but cannot
            # send: stuck until a side's heads change
            if state == self._stuck:
                return None
            self._stuck = state
            return False, self.why(lacking) if lacking else self.why_unsendable(unsendable)
        if state == self._synced:
            return None
        self._synced = state
        return True, ""

    def why(self, lacking: list[bytes]) -> str:
        known = [self.refusals[a] for a in lacking if a in self.refusals]
        if known:
            return known[0]
        return (
            f"entries of {len(lacking)} author{'s' if len(lacking) != 1 else ''} that the "
            "peer holds were not applied here (see the log)"
        )

    def why_unsendable(self, unsendable: list[tuple[bytes, int, int]]) -> str:
        author, damaged, held = unsendable[0]
        who = short_id(author)
        theirs = self.peer.get(author)
        first = max(damaged, (theirs.seq if theirs is not None else 0) + 1)
        more = len(unsendable) - 1
        others = f" (and entries of {more} more author{'s' if more != 1 else ''})" if more else ""
        # (said to the peer too: worded for both sides)
        lacked = f"entry {first}" if first == held else f"entries {first}-{held}"
        return (
            f"the receiving site lacks {lacked} of {who}{others}, which the sending site "
            f"holds but cannot send: its copy of entry {damaged} of {who} is damaged, "
            f"and nothing of {who} after it is sent until a sound copy of it reaches the "
            "sending site from a peer that may send it there (see `p2psync verify` there)"
        )

    @property
    def ever_synced(self) -> bool:
        return self._synced is not None

    def local_digest(self) -> bytes:
        return self._local_heads_digest()

    def _local_heads_digest(self) -> bytes:
        if self._local_digest is None:
            self._local_digest = heads_digest(self.local)
        return self._local_digest

    def _peer_heads_digest(self) -> bytes:
        if self._peer_digest is None:
            self._peer_digest = heads_digest(self.peer)
        return self._peer_digest
