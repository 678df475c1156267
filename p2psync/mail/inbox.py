"""Opening what arrives through the mailbox, and what it does to the store.

In order, for one wire envelope:

1. :func:`~p2psync.core.envelope.open_envelope` — forged, tampered or misaddressed
   envelopes raise their typed :class:`~p2psync.errors.EnvelopeError`; nothing is
   recorded.
2. Deduplicated by (sender, seq): a seq seen before changes nothing.
3. By class:

   * **data** — only from a peer with a rule in force with route relay/auto (else
     refused, no receipt: a stranger gets no answer); expired ones are refused. The
     bundle's rule objects are kept through the pairing path (as a session's
     ``Rules``), then its entries are ingested by the flow those rules give — the
     live session's judge: what no rule lets in is refused, missing predecessors
     are held. Then, in one transaction: the seq received, a receipt owed (applied,
     or refused with the first reason that is the sender's fault), the sender's
     heads and rules digest noted, and the entries its bundle asks for again
     (``wants``, while a rule lets us send it anything: ``store/wants.py``).
   * **receipt** — verified (:func:`~p2psync.core.receipt.receipt_of`); the rows it
     names move to acknowledged or refused (reason); the signer's heads are noted.
   * **introduction** — a pairing request (or an answer to ours) from a site
     that may not know us: its rule objects go through the pairing path, so a
     request waits in ``pair pending`` under the name it gave. A join with one of
     our invite codes (``pairing.answer_relay_join``) makes our proposal, which goes
     back as an introduction; the inviter's proposal to a site that joined its
     code is accepted as is (``store/joins.py``). From anyone the
     relay admitted (the relay caps them per sender and per mailbox). A data
     envelope from a peer we asked to pair is opened too: its rule objects may be
     the acceptance.

The caller deletes the envelope from the relay only after this returned (its
effects are committed). A crash between the ingest and the ledger's commit only
means the envelope is applied again next time (duplicates are harmless).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from p2psync import pairing
from p2psync.core.bundle import decode_bundle, decode_introduction
from p2psync.core.envelope import Envelope, EnvelopeClass, open_envelope
from p2psync.core.flow import Flow
from p2psync.core.identity import short_id
from p2psync.core.receipt import receipt_of
from p2psync.core.rules import proposed_via_relay
from p2psync.errors import BundleError, HostileEntry, PairingError, RemoteProtocolError
from p2psync.home import OpenHome
from p2psync.store.joins import RelayJoin
from p2psync.store.ledger import State

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Incoming:
    """What one envelope did."""

    cls: EnvelopeClass
    sender: bytes
    seq: int
    duplicate: bool = False
    #: data: entries applied, held (waiting for predecessors), refused, already held
    applied: int = 0
    held: int = 0
    refused: int = 0
    duplicates: int = 0
    #: data: entries held already of which payloads we lacked arrived (asked for
    #: again), and entries the sender asked us to send again (a bundle's wants)
    filled: int = 0
    wanted: int = 0
    rules_added: int = 0
    #: receipt: our envelopes it acknowledged, and refused
    acknowledged: int = 0
    rejected: int = 0
    #: why the envelope as a whole was refused (not applied), if it was
    reason: str | None = None


def take(db: OpenHome, wire: bytes, now_ms: int, depositor: bytes | None) -> Incoming:
    return apply(db, open_envelope(db.identity, wire, depositor=depositor), now_ms)


def apply(db: OpenHome, envelope: Envelope, now_ms: int) -> Incoming:
    """What an opened envelope (steps 2-3 above) does."""
    sender, seq, cls = envelope.sender, envelope.seq, envelope.cls
    ledger = db.store.ledger
    if ledger.pair(sender).received(seq):
        return Incoming(cls, sender, seq, duplicate=True)
    if cls is EnvelopeClass.RECEIPT:
        receipt = receipt_of(envelope)
        if not ledger.receive(sender, seq, now_ms, owe=False, heads=receipt.heads):
            return Incoming(cls, sender, seq, duplicate=True)
        acked = ledger.move(sender, receipt.applied, State.ACKNOWLEDGED, now_ms)
        refused = 0
        for refused_seq, reason in receipt.refused:
            refused += len(ledger.move(sender, [refused_seq], State.REFUSED, now_ms, reason=reason))
        return Incoming(cls, sender, seq, acknowledged=len(acked), rejected=refused)
    if cls is EnvelopeClass.INTRODUCTION:
        return _introduction(db, envelope.payload, sender, seq, now_ms)
    return _data(db, envelope.payload, sender, seq, envelope.expiry_ms, now_ms)


def _introduction(db: OpenHome, payload: bytes, sender: bytes, seq: int, now_ms: int) -> Incoming:
    """A pairing request (or an answer to ours) from a site that may not know us:
    its rule objects go through the pairing path as a session's ``Rules`` would (a
    request then waits in ``pair pending``). The receipt is owed (it flows once a
    rule is in force)."""
    cls = EnvelopeClass.INTRODUCTION
    try:
        intro = decode_introduction(payload)
    except BundleError as exc:
        db.store.ledger.receive(sender, seq, now_ms, owe=False)
        return Incoming(cls, sender, seq, reason=f"malformed introduction: {exc}")
    before = len(db.store.rule_objects(sender))
    # we joined its codes: its proposals with their terms are accepted as is
    joining = [j for j in db.store.relay_joins(sender) if j.refused is None]
    try:
        if intro.join is not None:  # it joins with our invite code
            pairing.answer_relay_join(db, sender, *intro.join, now_ms)
        pairing.receive(db, sender, list(intro.rule_objects), joining, intro.name)
    except PairingError as exc:
        db.store.ledger.receive(sender, seq, now_ms, owe=False)
        log.warning("join request from %s through the relay refused: %s",
                    short_id(sender), exc)
        why = str(exc).removeprefix(pairing.REFUSED_PREFIX)
        return Incoming(cls, sender, seq, reason=f"its join of our invite code was refused: {why}")
    except RemoteProtocolError as exc:
        db.store.ledger.receive(sender, seq, now_ms, owe=False)
        return Incoming(cls, sender, seq, reason=f"rule objects refused: {exc}")
    _joined(db, joining)
    refusal = None
    if intro.refused is not None:  # only the inviter of a code we joined can refuse it
        invite, reason = intro.refused
        if db.store.refuse_relay_join(sender, invite, reason):
            refusal = f"our join of its invite code was refused: {reason}"
            log.warning("%s refused our join of its invite code: %r", short_id(sender), reason)
    added = len(db.store.rule_objects(sender)) - before
    fresh = db.store.ledger.receive(sender, seq, now_ms, owe=True)
    return Incoming(cls, sender, seq, duplicate=not fresh, rules_added=added, reason=refusal)


def _joined(db: OpenHome, joining: list[RelayJoin]) -> None:
    """Forget the joins the inviter answered: a rule with their terms is in force."""
    for join in joining:
        if pairing.joined_rule(db, join) is not None:
            db.store.drop_relay_join(join.inviter, join.invite)  # paired as the code said


def _data(
    db: OpenHome, payload: bytes, sender: bytes, seq: int, expiry_ms: int, now_ms: int
) -> Incoming:
    me, ledger, cls = db.identity.public_key, db.store.ledger, EnvelopeClass.DATA

    def refuse(reason: str, *, owe: bool = True) -> Incoming:
        fresh = ledger.receive(sender, seq, now_ms, owe=owe, reason=reason)
        return Incoming(cls, sender, seq, duplicate=not fresh, reason=None if not fresh else reason)

    rules = db.store.rules(sender)
    asked = bool(proposed_via_relay(rules, me, sender))  # its answer may be in it
    if not asked and not Flow.between(me, sender, rules, live=False, via_relay=True).flows:
        return refuse(
            f"no rule with route relay or auto is in force with {short_id(sender)}", owe=False
        )
    if expiry_ms and expiry_ms <= now_ms:
        return refuse("expired")
    try:
        bundle = decode_bundle(payload)
    except BundleError as exc:
        return refuse(f"malformed bundle: {exc}")
    added = 0
    if bundle.rule_objects:
        before = len(db.store.rule_objects(sender))
        # a peer we are paired with answers a further code of its we joined here
        joining = [j for j in db.store.relay_joins(sender) if j.refused is None]
        try:
            pairing.receive(db, sender, list(bundle.rule_objects), joining)
        except (RemoteProtocolError, PairingError) as exc:
            return refuse(f"rule objects refused: {exc}")
        _joined(db, joining)
        added = len(db.store.rule_objects(sender)) - before
    flow = Flow.between(me, sender, db.store.rules(sender), live=False, via_relay=True)
    if bundle.entries and not flow.receiving:
        return refuse("entries sent, but no rule lets you send any here by the relay")
    result = db.store.ingest(list(bundle.entries), now_ms, flow=flow) if bundle.entries else None
    hostile = [r for r in result.rejected if isinstance(r.error, HostileEntry)] if result else []
    if flow.receiving:
        db.store.note_peer_heads(sender, bundle.heads)
    reason = f"invalid entry: {hostile[0].describe()}" if hostile else None
    # asks are answered only while a rule lets us send it something
    wants = bundle.wants if flow.sending else ()
    fresh = ledger.receive(
        sender,
        seq,
        now_ms,
        owe=True,
        reason=reason,
        heads=bundle.heads,
        rules=bundle.rules_digest,
        wants=wants,
    )
    if result is None:
        return Incoming(
            cls,
            sender,
            seq,
            duplicate=not fresh,
            rules_added=added,
            reason=reason,
            wanted=len(wants),
        )
    return Incoming(
        cls,
        sender,
        seq,
        duplicate=not fresh,
        applied=len(result.accepted),
        held=len(result.held),
        refused=len(result.rejected),
        duplicates=result.duplicates,
        filled=len(result.filled),
        rules_added=added,
        reason=reason,
    )
