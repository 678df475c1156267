"""What goes to one peer through the mailbox: owed receipts, then bundles.

**What the peer lacks** is what a live session would send it — by the relay's flow
policy (``Flow.between(..., via_relay=True)``): our heads, minus its known heads
(the furthest of its last signed receipt or bundle and of a direct session), minus
what envelopes still on their way (``IN_FLIGHT`` in the ledger) or acknowledged
lately carry (an acknowledged envelope's entries may be held there, waiting for an
envelope still on its way). Per author
the known seq is carried forward over in-flight runs that touch it; runs further on
are left out of what is read. So asking twice sends nothing twice, and an expired
envelope's entries (no longer in flight) go again.

Entries are read in causal (clock) order and packed, in that order, into as few
bundles as fit ``max_sealed`` (a single entry too big for it gets an envelope of the
data class's largest size), after the entries the peer asked for again (its
bundles' ``wants``, ``store/wants.py``). Bundles of our own asks follow: entries we
hold without a payload the peer may now send us (``_asks``), each in a bundle of
its own. Rule objects about the pair ride in the first bundle
when the peer may lack them (its last bundle named another digest, and no envelope
in flight or acknowledged since carries ours). Seqs are reserved (committed) before
sealing, rows recorded "queued" before anything is returned.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from p2psync.core.bundle import (
    ENTRY_ID_BYTES,
    MAX_BUNDLE_ENTRIES,
    Bundle,
    Introduction,
    base_size,
    encode_bundle,
    encode_introduction,
    head_bytes,
    heads_of,
    packed_size,
)
from p2psync.core.envelope import (
    ENVELOPE_OVERHEAD,
    MAX_SEALED_BY_CLASS,
    MIN_SEALED_BYTES,
    EnvelopeClass,
    seal_envelope,
)
from p2psync.core.flow import Flow
from p2psync.core.messages import MAX_WANT_IDS, Head, rules_digest
from p2psync.core.receipt import MAX_APPLIED, MAX_REFUSED, sign_receipt
from p2psync.core.rules import Route, Rule, RuleState, proposed_via_relay
from p2psync.errors import UsageError
from p2psync.home import OpenHome
from p2psync.store.ingest import HELD_FOR_MS
from p2psync.store.ledger import IN_FLIGHT, Carries, LedgerRow, State
from p2psync.store.logs import Outgoing as Stored
from p2psync.store.wants import ASK_AGAIN_MS

#: Entries (and bytes) read from the store at a time while packing.
READ_ENTRIES = 8192
READ_BYTES = 4 << 20
#: Entries a peer asked for again that one call answers at most, and envelopes of
#: our own asks it makes at most (each :data:`MAX_WANT_IDS` IDs); the rest, at the
#: next call.
ANSWERS_PER_CALL = 4096
ASKS_PER_CALL = 8
_ZERO = bytes(32)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A sealed envelope to hand to the relay (or a file), recorded as queued."""

    peer: bytes
    seq: int
    cls: EnvelopeClass
    wire: bytes
    entries: int
    #: entries whose payloads this envelope asks the peer to send again
    asks: int = 0


@dataclass
class _Draft:
    cls: EnvelopeClass
    payload: bytes
    entries: int = 0
    carries: Carries = ()
    rules: bytes | None = None
    receipts: tuple[int, ...] = ()
    #: entry IDs this bundle asks the peer for (its ``wants``), and the peer's
    #: asks it answers
    asks: tuple[bytes, ...] = ()
    answers: tuple[bytes, ...] = ()


def make(
    db: OpenHome,
    peer: bytes,
    now_ms: int,
    *,
    max_sealed: int,
    expiry_ms: int,
    random: Callable[[int], bytes] = os.urandom,
    receipts_only: bool = False,
    max_envelopes: int | None = None,
) -> list[Outgoing]:
    """What is due to ``peer`` now, sealed, numbered and recorded as queued: every
    owed receipt, and bundles of what it lacks, at most about ``max_envelopes`` of
    them (None: all; asking again goes on where this left off), so memory holds a
    few envelopes whatever the backlog."""
    if max_sealed < MIN_SEALED_BYTES:
        raise UsageError(f"an envelope may be no smaller than {MIN_SEALED_BYTES} bytes")
    me = db.identity.public_key
    rules = db.store.rules(peer)
    flow = Flow.between(me, peer, rules, live=False, via_relay=True)
    drafts = []
    gone: list[bytes] = []
    if not receipts_only:
        drafts = _introductions(db, peer, rules, now_ms, pairing=not flow.flows)
    if flow.flows:
        local = heads_of(db.store.heads())
        drafts += _receipts(db, peer, local, now_ms)
        if not receipts_only:
            # entries the peer asked for again go first (payloads withheld as the
            # flow says), within the batch; those no longer held are done with
            wanted = db.store.ledger.wanted(peer, ANSWERS_PER_CALL) if flow.sending else []
            budget = READ_BYTES
            if max_envelopes is not None:
                budget = min(budget, max(1, max_envelopes) * _room(max_sealed))
            found, taken = db.store.entries_with_ids(wanted, budget) if wanted else ([], 0)
            held = {item.id for item in found}
            gone = [entry for entry in wanted[:taken] if entry not in held]
            bundles = _bundles(db, peer, flow, local, max_sealed, now_ms, max_envelopes, found)
            drafts += bundles
            if max_envelopes is None or len(bundles) < max_envelopes:
                # our asks once the backlog is out: a call asks at most a few
                drafts += _asks(db, peer, flow, now_ms, _room(max_sealed))
    ledger = db.store.ledger
    if not drafts:
        if gone:
            ledger.add([], {}, gone={peer: gone})
        return []
    first = ledger.reserve(peer, len(drafts))
    out, rows = [], []
    for seq, draft in enumerate(drafts, first):
        wire = seal_envelope(
            db.identity, peer, seq, draft.cls, expiry_ms, draft.payload, random(32)
        )
        out.append(Outgoing(peer, seq, draft.cls, wire, draft.entries, len(draft.asks)))
        rows.append(
            LedgerRow(
                peer,
                seq,
                draft.cls.value,
                State.QUEUED,
                None,
                draft.entries,
                len(wire),
                expiry_ms or None,
                now_ms,
                None,
                None,
                draft.carries,
                draft.rules,
                len(draft.asks),
            )
        )
    receipts = {(peer, seq): d.receipts for seq, d in enumerate(drafts, first) if d.receipts}
    asked = [entry for d in drafts for entry in d.asks]
    answers = {(peer, seq): d.answers for seq, d in enumerate(drafts, first) if d.answers}
    ledger.add(
        rows,
        receipts,
        asked={peer: asked} if asked else None,
        answers=answers,
        gone={peer: gone} if gone else None,
        now_ms=now_ms,
    )
    return out


def _introductions(
    db: OpenHome, peer: bytes, rules: list[Rule], now_ms: int, *, pairing: bool
) -> list[_Draft]:
    """Introductions due to ``peer``, each once (unless one with the same content is
    on its way or was acknowledged): while no rule flows (``pairing``), our pending
    pairing request (or our rejection of its request through the relay) with our
    first open join of its codes; each further open join of its codes; each refusal
    of its join of our codes."""
    me = db.identity.public_key
    objects: tuple[bytes, ...] = ()
    if pairing:
        answered = [
            r
            for r in rules
            if r.state is RuleState.REJECTED
            and r.proposer == peer
            and r.proposed.route in (Route.RELAY, Route.AUTO)
        ]
        proposals = proposed_via_relay(rules, me, peer) + answered
        objects = tuple(o for rule in proposals for o in rule.objects)
    # an expired join would be refused; a refused one is over
    joins = [
        (j.invite, j.proof)
        for j in db.store.relay_joins(peer)
        if j.refused is None and j.expires >= now_ms
    ]
    contents: list[tuple[bytes, Introduction]] = []
    if objects or joins:
        join = joins.pop(0) if joins else None
        intro = Introduction(db.name, objects, join)
        contents.append((rules_digest([*objects, *(join or ())]), intro))
    for join in joins:
        contents.append((rules_digest(list(join)), Introduction(db.name, (), join)))
    for refusal in db.store.join_refusals(peer):
        refused = (refusal.invite, refusal.reason)
        digest = rules_digest([b"refused", refusal.invite, refusal.reason.encode()])
        contents.append((digest, Introduction(db.name, (), refused=refused)))
    if not contents:
        return []
    sent = {
        r.rules
        for r in db.store.ledger.rows(peer, [*IN_FLIGHT, State.ACKNOWLEDGED])
        if r.cls == EnvelopeClass.INTRODUCTION.value
    }
    return [
        _Draft(EnvelopeClass.INTRODUCTION, encode_introduction(intro), rules=digest)
        for digest, intro in contents
        if digest not in sent
    ]


def _receipts(db: OpenHome, peer: bytes, local: Mapping[bytes, Head], now_ms: int) -> list[_Draft]:
    due = db.store.ledger.due(peer)
    drafts = []
    while due:
        applied: list[int] = []
        refused: dict[int, str] = {}
        taken = 0
        for seq, reason in due:
            if reason is None and len(applied) < MAX_APPLIED:
                applied.append(seq)
            elif reason is not None and len(refused) < MAX_REFUSED:
                refused[seq] = reason
            else:
                break
            taken += 1
        due = due[taken:]
        payload = sign_receipt(db.identity, peer, applied, refused, local, now_ms)
        drafts.append(_Draft(EnvelopeClass.RECEIPT, payload, receipts=(*applied, *sorted(refused))))
    return drafts


def known_heads(db: OpenHome, peer: bytes) -> dict[bytes, Head]:
    """What ``peer`` holds, as far as we know: per author the furthest of its signed
    word through the mailbox and of the last direct session, if that ended in step
    (a session counts what it sent as held; one that could not get in step may have
    sent entries the peer holds back, waiting for a payload only we can bring)."""
    known = dict(db.store.ledger.pair(peer).heads or {})
    row = db.store.peer(peer)
    if row is None or row.last_error is not None:
        return known
    for author, seq in db.store.peer_heads(peer).items():
        held = known.get(author)
        if held is None or seq > held.seq:
            known[author] = Head(seq, _ZERO, held.frozen if held else False)
    return known


Runs = dict[bytes, list[tuple[int, int]]]


def _on_their_way(db: OpenHome, peer: bytes, now_ms: int) -> tuple[list[LedgerRow], Runs]:
    """Data envelopes in flight, and the runs they carry plus those of envelopes
    acknowledged lately (the peer committed them, applied or held waiting for a
    predecessor; held ones it drops after HELD_FOR_MS, after which only its heads count)."""
    ledger = db.store.ledger
    rows = [r for r in ledger.rows(peer, IN_FLIGHT) if r.cls == EnvelopeClass.DATA.value]
    acked = [
        r
        for r in ledger.rows(peer, [State.ACKNOWLEDGED])
        if r.entries and (r.done_ms or 0) > now_ms - HELD_FOR_MS
    ]
    runs: Runs = defaultdict(list)
    for row in rows + acked:
        for author, first, last in row.carries:
            runs[author].append((first, last))
    return rows, runs


def _bundles(
    db: OpenHome,
    peer: bytes,
    flow: Flow,
    local: Mapping[bytes, Head],
    max_sealed: int,
    now_ms: int,
    max_envelopes: int | None = None,
    answers: list[Stored] | None = None,
) -> list[_Draft]:
    """Bundles of what ``peer`` lacks, after the entries it asked for again
    (``answers``: those held go, payloads withheld as the flow says)."""
    rows, runs = _on_their_way(db, peer, now_ms)
    after = flow.lacks(local, known_heads(db, peer))
    skip: dict[bytes, list[tuple[int, int]]] = {}
    for author in list(after):
        at = after[author]
        later = []
        for first, last in sorted(runs.get(author, ())):
            if first <= at + 1:
                at = max(at, last)
            else:
                later.append((first, last))
        if at >= local[author].seq:
            del after[author]
        else:
            after[author], skip[author] = at, later
    objects = db.store.rule_objects(peer)
    digest = rules_digest(objects)
    base = Bundle(dict(local), digest, tuple(objects) if _rules_due(db, peer, digest, rows) else ())
    packer = _Packer(base, max_sealed)
    if answers:  # bundles of their own, carrying no runs (see _Packer.runs)
        packer.runs = False
        for item in answers:
            if max_envelopes is not None and len(packer.drafts) >= max_envelopes:
                break  # the rest at the next call
            packer.add([item], flow.outgoing([item.wire]))
        packer.close()
        packer.runs = True
    while after and (max_envelopes is None or len(packer.drafts) < max_envelopes):
        batch = db.store.entries_after(after, READ_ENTRIES, READ_BYTES)
        if not batch:
            break
        for item in batch:
            after[item.author] = item.seq
        wanted = [s for s in batch if not _skipped(skip.get(s.author), s.seq)]
        if wanted:
            packer.add(wanted, flow.outgoing([s.wire for s in wanted]))
        for author in [a for a, seq in after.items() if seq >= local[a].seq]:
            del after[author]
    return packer.finish()


def _room(max_sealed: int) -> int:
    """Bytes of bundle an envelope of at most ``max_sealed`` holds."""
    return min(max_sealed, MAX_SEALED_BY_CLASS[EnvelopeClass.DATA]) - ENVELOPE_OVERHEAD


def _asks(db: OpenHome, peer: bytes, flow: Flow, now_ms: int, room: int) -> list[_Draft]:
    """Bundles asking ``peer`` for entries we hold without a payload it may send us
    and holds itself (by its last word; none of an author either side froze after
    a fork), not asked of it within :data:`ASK_AGAIN_MS`: a live session's
    ``Want`` (``store/wants.py``)."""
    if not flow.receiving:
        return []
    # at most ASKS_PER_CALL envelopes of asks on their way at once: the next ones
    # once the peer's receipts say it took these (or they expired)
    rows = db.store.ledger.rows(peer, IN_FLIGHT)
    waiting = sum(1 for r in rows if r.cls == EnvelopeClass.DATA.value and r.asks)
    if waiting >= ASKS_PER_CALL:
        return []
    local = heads_of(db.store.heads())
    held = {  # what the peer holds, of authors neither side froze
        author: head.seq
        for author, head in known_heads(db, peer).items()
        if not head.frozen and not (author in local and local[author].frozen)
    }
    if not held:
        return []
    base = Bundle(local, rules_digest(db.store.rule_objects(peer)))
    per = (room - base_size(base) - 8) // (ENTRY_ID_BYTES + head_bytes(ENTRY_ID_BYTES))
    per = max(1, min(MAX_WANT_IDS, per))
    missing = db.store.payloads_missing(
        flow.may_receive,
        peer,
        now_ms,
        limit=ASKS_PER_CALL * per,
        asked_since=now_ms - ASK_AGAIN_MS,
        authors=held,
    )
    wanted = sorted({m.entry for m in missing})[: (ASKS_PER_CALL - waiting) * per]
    drafts = []
    for start in range(0, len(wanted), per):
        chunk = tuple(wanted[start : start + per])
        bundle = Bundle(base.heads, base.rules_digest, wants=chunk)
        drafts.append(_Draft(EnvelopeClass.DATA, encode_bundle(bundle), asks=chunk))
    return drafts


def _skipped(runs: list[tuple[int, int]] | None, seq: int) -> bool:
    return bool(runs) and any(first <= seq <= last for first, last in runs or ())


def _rules_due(db: OpenHome, peer: bytes, digest: bytes, in_flight: list[LedgerRow]) -> bool:
    """The peer may lack some of our rule objects about the pair."""
    pair = db.store.ledger.pair(peer)
    if pair.rules == digest or any(r.rules == digest for r in in_flight):
        return False
    acked = [
        r.done_ms or 0
        for r in db.store.ledger.rows(peer, [State.ACKNOWLEDGED])
        if r.rules == digest
    ]
    # acknowledged, and the peer said nothing since: it holds them
    return not acked or (pair.rules_ms is not None and pair.rules_ms > max(acked))


class _Packer:
    """Entries into as few bundles as fit, in order."""

    def __init__(self, base: Bundle, max_sealed: int) -> None:
        self.base = base
        self.limit = _room(max_sealed)
        self.drafts: list[_Draft] = []
        #: whether the bundles record the runs they carry: not those answering a
        #: peer's asks (entries it holds by its heads, without payloads), which
        #: nothing it holds supersedes (Mailer.superseded) or counts as on its way
        self.runs = True
        self._start()

    def _start(self) -> None:
        self.size = base_size(self.base)
        self.wires: list[bytes] = []
        self.stored: list[Stored] = []
        self.entry_bytes = 0

    def add(self, stored: list[Stored], wires: list[bytes]) -> None:
        for item, wire in zip(stored, wires, strict=True):
            cost = len(wire) + head_bytes(len(wire))
            full = (
                len(self.wires) >= MAX_BUNDLE_ENTRIES
                or packed_size(self.size, len(self.wires) + 1, self.entry_bytes + cost) > self.limit
            )
            if self.wires and full:
                self._flush()
            self.wires.append(wire)
            self.stored.append(item)
            self.entry_bytes += cost

    def close(self) -> None:
        """End the bundle being filled, if it holds entries."""
        if self.wires:
            self._flush()

    def _flush(self) -> None:
        bundle = Bundle(
            self.base.heads, self.base.rules_digest, self.base.rule_objects, tuple(self.wires)
        )
        carries: list[tuple[bytes, int, int]] = []
        index: dict[bytes, int] = {}  # author -> its last run in carries
        for item in self.stored:
            at = index.get(item.author)
            if at is not None and carries[at][2] == item.seq - 1:
                carries[at] = (item.author, carries[at][1], item.seq)
            else:
                index[item.author] = len(carries)
                carries.append((item.author, item.seq, item.seq))
        rules = self.base.rules_digest if self.base.rule_objects else None
        self.drafts.append(
            _Draft(
                EnvelopeClass.DATA,
                encode_bundle(bundle),
                len(self.wires),
                tuple(carries) if self.runs else (),
                rules,
                answers=() if self.runs else tuple(item.id for item in self.stored),
            )
        )
        self.base = Bundle(self.base.heads, self.base.rules_digest)  # objects ride once
        self._start()

    def finish(self) -> list[_Draft]:
        if self.wires or self.base.rule_objects:
            self._flush()
        return self.drafts
