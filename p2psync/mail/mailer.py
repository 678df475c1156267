"""The agent's mailbox side as one object, over an open home: what callers use.

* :meth:`Mailer.outgoing` — envelopes due to a peer (owed receipts, then bundles of
  what it lacks), recorded "queued" (``mail/outbox.py``);
* :meth:`Mailer.deposited`, :meth:`Mailer.refused` — what the carrier did with them
  ("at relay R until T", "handed over as file F"; the relay refused);
* :meth:`Mailer.incoming` — one envelope that arrived (``mail/inbox.py``);
* :meth:`Mailer.expire` — by our own clock: envelopes past their time are
  "expired", so their entries go again; :meth:`Mailer.notice`, a relay's expiry
  notice, is advice (a forged one only causes a re-send);
* :meth:`Mailer.superseded` — a direct session showed the peer holds what envelopes
  carry: they are "superseded", and those at the relay may be retracted;
* :meth:`Mailer.ledger`, :meth:`Mailer.summary`, :meth:`Mailer.gaps` — for
  ``peers`` and ``status``;
* :meth:`Mailer.policy` — the signed mailbox policy, re-signed (next version) only
  when the senders change.

Time is always an argument; every method is a few store transactions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from p2psync import clock
from p2psync.core.envelope import Envelope, EnvelopeClass
from p2psync.core.messages import Head, rules_digest
from p2psync.core.policy import senders_for, sign_policy
from p2psync.core.rules import Permissions, Route, Rule, RuleState, in_force
from p2psync.home import OpenHome
from p2psync.mail import inbox, outbox
from p2psync.mail.inbox import Incoming
from p2psync.mail.outbox import Outgoing
from p2psync.store.ledger import IN_FLIGHT, Ledger, LedgerRow, State

__all__ = ["Gaps", "Incoming", "LedgerRow", "Mailer", "Outgoing", "State"]

#: A queued envelope never reported deposited counts as sent this long.
QUEUED_FOR_MS = 3600 * 1000
#: Envelopes out this long without a receipt: "receipts stopped".
RECEIPT_PATIENCE_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Gaps:
    """What may be missing with one peer."""

    #: its seqs below the highest received that never arrived (dropped or withheld?)
    missing: tuple[int, ...]
    received_up_to: int
    #: our data envelopes out without a receipt, and since when
    unanswered: int
    oldest_unanswered_ms: int | None
    receipts_stopped: bool


#: Data envelopes one call to :meth:`Mailer.outgoing` makes at most (plus one):
#: memory holds a few envelopes, whatever the backlog.
BATCH = 4


class Mailer:
    """The mailbox side of one open home."""

    def __init__(self, db: OpenHome, *, random: Callable[[int], bytes] = os.urandom) -> None:
        self.db = db
        self._random = random

    @property
    def _ledger(self) -> Ledger:
        return self.db.store.ledger

    # ------------------------------------------------------------ envelopes

    def outgoing(
        self,
        peer: bytes,
        now_ms: int,
        *,
        max_sealed: int = 1 << 20,
        expiry_ms: int = 0,
        receipts_only: bool = False,
        max_envelopes: int | None = BATCH,
    ) -> list[Outgoing]:
        """What is due to ``peer`` now (see ``mail/outbox.py``; only the owed
        receipts with ``receipts_only``), sealed and queued: a batch of about
        ``max_envelopes`` (None: everything); ask again for the next."""
        return outbox.make(
            self.db,
            peer,
            now_ms,
            max_sealed=max_sealed,
            expiry_ms=expiry_ms,
            random=self._random,
            receipts_only=receipts_only,
            max_envelopes=max_envelopes,
        )

    def incoming(self, wire: bytes, now_ms: int, *, depositor: bytes | None = None) -> Incoming:
        """Open and apply one envelope (see ``mail/inbox.py``); committed on return."""
        return inbox.take(self.db, wire, now_ms, depositor)

    def apply(self, envelope: Envelope, now_ms: int) -> Incoming:
        """Like :meth:`incoming`, for an envelope already opened (``open_envelope``)."""
        return inbox.apply(self.db, envelope, now_ms)

    # ------------------------------------------------------------ what the carrier did

    def deposited(
        self, peer: bytes, seq: int, *, where: str, until_ms: int, now_ms: int, file: bool = False
    ) -> bool:
        """The relay ``where`` stored it until ``until_ms`` (or, ``file``, it was
        handed over as the file ``where``, expiring at ``until_ms``)."""
        state = State.HANDED_OVER if file else State.AT_RELAY
        moved = self._ledger.move(peer, [seq], state, now_ms, place=where, until_ms=until_ms)
        return bool(moved)

    def refused(self, peer: bytes, seq: int, reason: str, now_ms: int) -> bool:
        """The relay refused it (full, not allowed, ...): final; its entries go again."""
        return bool(self._ledger.move(peer, [seq], State.REFUSED, now_ms, reason=reason))

    def expire(self, now_ms: int) -> int:
        """Envelopes on their way past their time (queued ones never deposited after
        :data:`QUEUED_FOR_MS`) become "expired"; how many. Joins and refusals long
        past are forgotten (``store/joins.py``), and asks for payloads past their time
        (``store/wants.py``)."""
        self.db.store.purge_joins(now_ms)
        self._ledger.purge_asks(now_ms)
        count = 0
        for row in self._ledger.rows(states=IN_FLIGHT):
            if row.until_ms is not None and row.until_ms <= now_ms:
                reason = "expired"
            elif row.state is State.QUEUED and row.made_ms + QUEUED_FOR_MS <= now_ms:
                reason = "never deposited"
            else:
                continue
            moved = self._ledger.move(row.peer, [row.seq], State.EXPIRED, now_ms, reason=reason)
            count += len(moved)
        return count

    def notice(self, peer: bytes, seq: int, until_ms: int, now_ms: int) -> bool:
        """A relay says it expired our envelope ``seq`` to ``peer`` at ``until_ms``."""
        rows = [r for r in self._ledger.rows(peer, [State.AT_RELAY]) if r.seq == seq]
        if not rows:
            return False
        return bool(
            self._ledger.move(peer, [seq], State.EXPIRED, now_ms, reason="the relay expired it")
        )

    def superseded(self, peer: bytes, heads: Mapping[bytes, Head], now_ms: int) -> list[int]:
        """A direct session showed ``peer`` holds ``heads``: envelopes whose entries
        all fall within them are "superseded"; the seqs of those at a relay (for the
        relay client to retract). The session settled the rule objects too."""
        objects = self.db.store.rule_objects(peer)
        self._ledger.merge_heads(peer, heads, now_ms, rules=rules_digest(objects))
        covered = [
            row
            for row in self._ledger.rows(peer, IN_FLIGHT)
            if row.cls == EnvelopeClass.DATA.value
            and row.carries  # (answers to asks carry none: the heads say nothing of payloads)
            and all(a in heads and heads[a].seq >= last for a, _, last in row.carries)
        ]
        moved = self._ledger.move(
            peer,
            [r.seq for r in covered],
            State.SUPERSEDED,
            now_ms,
            reason="a direct sync delivered it",
        )
        return [r.seq for r in moved if r.state is State.AT_RELAY]

    # ------------------------------------------------------------ showing

    def ledger(self, peer: bytes | None = None) -> list[LedgerRow]:
        return self._ledger.rows(peer)

    def summary(self, peer: bytes) -> dict[str, int]:
        """Per state, how many data envelopes to ``peer`` (every state named, zeros
        too), and under ``receipts`` how many receipt envelopes we sent it."""
        counts = {state.value: 0 for state in State}
        counts["receipts"] = 0
        for row in self._ledger.rows(peer):
            counts[row.state.value if row.cls == EnvelopeClass.DATA.value else "receipts"] += 1
        return counts

    def gaps(self, peer: bytes, now_ms: int) -> Gaps:
        pair = self._ledger.pair(peer)
        out = [
            r
            for r in self._ledger.rows(peer, [State.AT_RELAY, State.HANDED_OVER])
            if r.cls == EnvelopeClass.DATA.value
        ]
        oldest = min((r.made_ms for r in out), default=None)
        last_word = max(pair.heads_ms or 0, pair.recv_ms or 0)
        stopped = oldest is not None and now_ms - max(oldest, last_word) > RECEIPT_PATIENCE_MS
        return Gaps(tuple(pair.missing()), pair.recv_high, len(out), oldest, stopped)

    # ------------------------------------------------------------ the mailbox policy

    def peers(self) -> frozenset[bytes]:
        """The peers the relay carries anything for, one way or the other (a rule in
        force with route relay or auto): the mailbox policy's senders."""
        me = self.db.identity.public_key
        by_peer: dict[bytes, list[Rule]] = {}
        for rule in self.db.store.rules(None):
            other = rule.acceptor if rule.proposer == me else rule.proposer
            by_peer.setdefault(other, []).append(rule)
        return senders_for(me, by_peer)

    def targets(self, relay: bytes | None = None) -> frozenset[bytes]:
        """The peers an exchange (with ``relay``, if given) deposits for: the
        policy's senders, peers whose request through the relay we rejected (the
        rejection goes back as an introduction; they are not on our policy),
        inviters whose code we joined through the relay (the join goes as an
        introduction; with ``relay``, only codes naming it: the inviter collects
        there) and joiners whose join we refused (so does the refusal)."""
        me = self.db.identity.public_key
        rejected = {
            rule.proposer
            for rule in self.db.store.rules(None)
            if rule.state is RuleState.REJECTED
            and rule.acceptor == me
            and rule.proposed.route in (Route.RELAY, Route.AUTO)
        }
        now = clock.now_ms()
        joining = {
            j.inviter
            for j in self.db.store.relay_joins()
            if j.expires >= now and j.refused is None and relay in (None, j.relay)
        }
        return self.peers() | rejected | joining | self.refusing()

    def refusing(self) -> frozenset[bytes]:
        """Joiners whose join of our code we refused: the refusal is owed to them."""
        return frozenset(r.joiner for r in self.db.store.join_refusals())

    def side_relays(self, now_ms: int) -> dict[bytes, frozenset[bytes]]:
        """Relays to visit besides the one in use, while invite codes are open: per
        relay, the peers to deposit for there. Our open joins wait for their
        inviter's answer at the relay their code named (and go there); an open
        code of ours that names a relay has joins collected there (no peer yet)."""
        visits: dict[bytes, set[bytes]] = {}
        for join in self.db.store.relay_joins():
            if join.refused is None and join.expires >= now_ms:
                visits.setdefault(join.relay, set()).add(join.inviter)
        for invite in self.db.store.invites():
            if (
                invite.relay is not None
                and invite.used_by is None
                and invite.withdrawn is None
                and invite.expires >= now_ms
            ):
                visits.setdefault(invite.relay, set())
        return {relay: frozenset(peers) for relay, peers in visits.items()}

    def live_peers(self) -> frozenset[bytes]:
        """Peers a live splice through a relay may serve: a rule in force with route
        relay or auto, one of those online (the live session's test)."""
        me = self.db.identity.public_key
        by_peer: dict[bytes, list[Rule]] = {}
        for rule in self.db.store.rules(None):
            if rule.terms.route in (Route.RELAY, Route.AUTO):
                other = rule.acceptor if rule.proposer == me else rule.proposer
                by_peer.setdefault(other, []).append(rule)
        return frozenset(
            peer
            for peer, rules in by_peer.items()
            if Permissions.between(me, peer, rules, live=True).paired
        )

    def relay_only(self) -> frozenset[bytes]:
        """Peers with a rule in force whose route is ``relay``: what it carries goes
        through the relay even while a direct connection with them is live."""
        me = self.db.identity.public_key
        return frozenset(
            rule.acceptor if rule.proposer == me else rule.proposer
            for rule in in_force(self.db.store.rules(None), me)
            if rule.terms.route is Route.RELAY
        )

    def policy(self, now_ms: int) -> bytes | None:
        """The signed mailbox policy in force (a new version only when the senders
        changed); None while no peer was ever listed."""
        senders = self.peers()
        last = self._ledger.policy()
        if last is not None and set(last[1]) == senders:
            return last[2]
        if last is None and not senders:
            return None
        version = (last[0] if last is not None else 0) + 1
        wire = sign_policy(self.db.identity, version, senders, now_ms)
        self._ledger.set_policy(version, sorted(senders), wire)
        return wire
