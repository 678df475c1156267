"""Pairing and sync rules as this agent lives them: propose, accept, reject,
revoke, invite, join — and what each peer may send and receive.

A peer is **paired** when at least one rule between us is accepted and not
revoked. When both sides propose to each other (both ran ``pair add``), each
accepts the other's proposal narrowed to what the two have in common. An
invite code pairs without a further question: the inviter proposes the terms
it chose, and the joiner, who asked by presenting the code, accepts them.

Invite codes: ``P2PS-`` then base32 of canonical CBOR
``[inviter key, invite id (8), secret (16), [[ip (4/16 bytes), port], ...], expires ms,
terms hash (8)]`` plus a 2-byte BLAKE2b check. The joiner accepts only a proposal
whose terms match the hash: the code says what it pairs for. The joiner proves it
holds the secret with
``BLAKE2b-256(key=secret, b"p2psync/v1/join\\x00" || handshake hash)``: bound to
its own handshake, so an overheard proof is worthless elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from p2psync.api import Database
from p2psync.core import canonical
from p2psync.core import rules as core
from p2psync.core.identity import KEY_BYTES, short_id
from p2psync.core.rules import Permissions, Rule, RuleState, Terms
from p2psync.errors import DecodeError, P2PSyncError, StateError, UsageError
from p2psync.home import now_ms

INVITE_PREFIX = "P2PS-"
JOIN_PREFIX = b"p2psync/v1/join\x00"


class PairingError(P2PSyncError):
    """A pairing step was refused (bad or used invite, unknown rule, ...)."""


# ---------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class Proposal:
    """What ``propose`` did: ``rule`` is the rule the terms now live in (in force,
    or a proposal waiting for the peer's answer); ``new`` is False when nothing was
    signed because it already existed."""

    rule: Rule
    new: bool


def propose(
    db: Database,
    peer: bytes,
    terms: Terms,
    *,
    name: str | None = None,
    addresses: Sequence[str] = (),
) -> Proposal:
    """Propose ``terms`` to ``peer``, unless a rule with exactly these terms (in this
    agent's view) is already in force or proposed by us. If the peer proposed to us
    too, the two proposals become one rule with what both want (see :func:`settle`).
    """
    me = db.identity.public_key
    if peer == me:
        raise UsageError("that is this agent's own device ID")
    db.store.add_peer(peer, name, list(addresses), now_ms())
    for rule in db.store.rules(peer):
        if rule.state is RuleState.ACCEPTED and rule.terms_for(me) == terms:
            return Proposal(rule, new=False)
        if rule.state is RuleState.PROPOSED and rule.proposer == me and rule.proposed == terms:
            return Proposal(rule, new=False)
    signed = core.propose(db.identity, peer, terms, os.urandom(16), now_ms())
    db.store.add_rule_objects(me, [signed], now_ms())
    ours = core.rule_id(signed)
    settle(db, peer)
    rules = db.store.rules(peer)
    mine = next(r for r in rules if r.id == ours)
    if mine.state is RuleState.REVOKED:  # superseded by the peer's: agreed on the common part
        agreed = [r for r in rules if r.state is RuleState.ACCEPTED and r.proposer == peer]
        if agreed:
            return Proposal(agreed[-1], new=True)
    return Proposal(mine, new=True)


def settle(db: Database, peer: bytes) -> list[bytes]:
    """Answer what can be answered without asking anyone. Returns the new signed
    objects (to send to the peer).

    When both sides hold an open proposal to each other with something in common,
    they become **one** rule: the proposal with the smaller ID is accepted by its
    acceptor, narrowed to the common terms, and that acceptor revokes its own
    (superseded) proposal. Each side decides the same way from the same two objects,
    so whichever side sees them first, the pair ends with one rule, nothing open.
    An open proposal of ours with exactly the terms of a rule in force is revoked
    too: it can add nothing.
    """
    me = db.identity.public_key
    rules = db.store.rules(peer)
    ours = [r for r in rules if r.proposer == me and r.state is RuleState.PROPOSED]
    theirs = [r for r in rules if r.proposer == peer and r.state is RuleState.PROPOSED]
    created: list[bytes] = []
    superseded: set[bytes] = set()
    for incoming in sorted(theirs, key=lambda r: r.id):
        for outgoing in sorted(ours, key=lambda r: r.id):
            if outgoing.id in superseded or incoming.id > outgoing.id:
                continue  # the peer accepts ours (the smaller ID) and revokes its own
            common = incoming.proposed.common(outgoing.proposed)
            if common is not None:
                created.append(core.accept(db.identity, incoming.id, common, now_ms()))
                created.append(core.revoke(db.identity, outgoing.id, now_ms()))
                superseded.add(outgoing.id)
                break
    in_force = {r.terms_for(me) for r in rules if r.state is RuleState.ACCEPTED}
    for outgoing in ours:
        if outgoing.id not in superseded and outgoing.proposed in in_force:
            created.append(core.revoke(db.identity, outgoing.id, now_ms()))
    if created:
        db.store.add_rule_objects(me, created, now_ms())
    return created


def accept(db: Database, rule: Rule, terms: Terms | None = None) -> bytes:
    me = db.identity.public_key
    if rule.acceptor != me or rule.state is not RuleState.PROPOSED:
        raise StateError(f"rule {rule.id.hex()[:12]} is not a proposal waiting for this agent")
    terms = terms or rule.proposed
    if not terms.narrower_than(rule.proposed):
        raise UsageError("an acceptance may narrow a proposal, not widen it")
    signed = core.accept(db.identity, rule.id, terms, now_ms())
    db.store.add_rule_objects(me, [signed], now_ms())
    return signed


def reject(db: Database, rule: Rule, reason: str) -> bytes:
    me = db.identity.public_key
    if rule.acceptor != me or rule.state is not RuleState.PROPOSED:
        raise StateError(f"rule {rule.id.hex()[:12]} is not a proposal waiting for this agent")
    signed = core.reject(db.identity, rule.id, reason, now_ms())
    db.store.add_rule_objects(me, [signed], now_ms())
    return signed


def revoke(db: Database, rule: Rule) -> bytes:
    if rule.state is RuleState.REVOKED:
        raise StateError(f"rule {rule.id.hex()[:12]} is already revoked")
    signed = core.revoke(db.identity, rule.id, now_ms())
    db.store.add_rule_objects(db.identity.public_key, [signed], now_ms())
    return signed


def permissions(db: Database, peer: bytes, *, live: bool) -> Permissions:
    return Permissions.between(db.identity.public_key, peer, db.store.rules(peer), live=live)


def receive(
    db: Database,
    peer: bytes,
    objects: Iterable[bytes],
    joining: JoinTicket | None,
    peer_name: str | None = None,
) -> list[bytes]:
    """Keep rule objects the peer sent; return our answers to send back.

    ``joining``: we presented an invite code to this peer, so we accept, as is, the
    proposal it makes in return with exactly the code's terms. A peer that proposes
    something becomes known (under the name it gave), so ``pair pending`` can name it.
    """
    me = db.identity.public_key
    added = db.store.add_rule_objects(me, list(objects), now_ms(), peer_only=peer)
    known = db.store.peer(peer)
    if (added and known is None) or (known is not None and not known.name and peer_name):
        db.store.add_peer(peer, peer_name, [], now_ms())
    answers = settle(db, peer)
    if joining is not None and joining.inviter == peer:
        answers.extend(answer_invite_proposal(db, joining))
    return answers


def unpaired_reason(db: Database, peer: bytes) -> str:
    """Why nothing flows with ``peer`` (no rule in force), in words both sides read."""
    rules = db.store.rules(peer)
    if any(r.state is RuleState.PROPOSED for r in rules):
        return "not paired: the pairing request awaits approval"
    rejected = [r for r in rules if r.state is RuleState.REJECTED]
    if rejected:
        return f"not paired: the pairing request was rejected: {rejected[-1].reason}"
    return (
        "not paired: no rule in force between these agents (ask with `p2psync pair add`, "
        "or join with an invite code)"
    )


def terms_hash(terms: Terms) -> bytes:
    return hashlib.blake2b(canonical.encode(terms.encode()), digest_size=8).digest()


# ---------------------------------------------------------------- invites


@dataclass(frozen=True, slots=True)
class InviteCode:
    inviter: bytes
    invite: bytes
    secret: bytes
    addresses: tuple[str, ...]
    expires: int
    terms: bytes  # hash of the terms the inviter will propose


def create_invite(db: Database, terms: Terms, expires_in_s: float, addresses: Sequence[str]) -> str:
    """A one-time code another agent can ``pair join``; valid ``expires_in_s`` seconds."""
    secret = os.urandom(16)
    invite = hashlib.blake2b(secret, digest_size=8, person=b"p2psync-invite").digest()
    expires = now_ms() + int(expires_in_s * 1000)
    db.store.add_invite(invite, secret, terms, expires, now_ms())
    hints = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            hints.append([ipaddress.ip_address(host.strip("[]")).packed, int(port)])
        except ValueError:
            continue
    payload = canonical.encode(
        [db.identity.public_key, invite, secret, hints, expires, terms_hash(terms)]
    )
    check = hashlib.blake2b(payload, digest_size=2).digest()
    text = base64.b32encode(payload + check).decode("ascii").rstrip("=")
    return INVITE_PREFIX + "-".join(text[i : i + 8] for i in range(0, len(text), 8))


def withdraw_invite(db: Database, invite: bytes) -> None:
    """Withdraw an invite this agent made, so its code works no more: a joiner
    presenting it is refused exactly as with a code this agent never made. A used,
    expired or already withdrawn invite is refused."""
    found = next((i for i in db.store.invites() if i.id == invite), None)
    shown = invite.hex()
    if found is None:
        raise PairingError(f"this agent made no invite {shown}; see `p2psync pair invites`")
    if found.withdrawn is not None:
        raise PairingError(f"invite {shown} was already withdrawn")
    if found.used_by is not None:
        who = short_id(found.used_by)
        raise PairingError(
            f"invite {shown} was already used by {who}; to stop syncing with it, "
            f"run `p2psync pair remove {who}`"
        )
    if found.expires < now_ms():
        raise PairingError(f"invite {shown} has expired; its code works no more")
    if not db.store.withdraw_invite(invite, now_ms()):
        raise PairingError(f"invite {shown} was used meanwhile; see `p2psync pair invites`")


def parse_invite(code: str) -> InviteCode:
    cleaned = "".join(code.split()).upper()
    if not cleaned.startswith(INVITE_PREFIX):
        raise UsageError("invalid invite code: it starts with P2PS-")
    body = cleaned[len(INVITE_PREFIX) :].replace("-", "")
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError:
        raise UsageError("invalid invite code: not the letters and digits of a code") from None
    payload, check = raw[:-2], raw[-2:]
    if len(raw) < 3 or hashlib.blake2b(payload, digest_size=2).digest() != check:
        raise UsageError("invalid invite code: it was mistyped or cut short")
    try:
        fields = canonical.decode(payload, what="invite code", max_depth=3)
        inviter, invite, secret, hints, expires, terms = fields
        if (
            type(terms) is not bytes
            or len(terms) != 8
            or type(inviter) is not bytes
            or len(inviter) != KEY_BYTES
            or type(invite) is not bytes
            or len(invite) != 8
            or type(secret) is not bytes
            or len(secret) != 16
            or type(expires) is not int
            or type(hints) is not list
        ):
            raise DecodeError("fields")
        if expires < 0:
            raise DecodeError("expiry")
        addresses = []
        for ip, port in hints:
            if type(ip) is not bytes or type(port) is not int or not 0 < port < 65536:
                raise DecodeError("address")
            host = str(ipaddress.ip_address(ip))
            addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    except (DecodeError, ValueError, TypeError):
        raise UsageError("invalid invite code: its contents are malformed") from None
    return InviteCode(inviter, invite, secret, tuple(addresses), expires, terms)


def join_proof(secret: bytes, handshake_hash: bytes) -> bytes:
    return hashlib.blake2b(JOIN_PREFIX + handshake_hash, key=secret, digest_size=32).digest()


def answer_join(
    db: Database, peer: bytes, invite: bytes, proof: bytes, handshake_hash: bytes
) -> bytes:
    """Check a joiner's proof; on success propose the invite's terms to it (once).

    A rule with exactly these terms already proposed to the joiner (open or in
    force) is offered again instead of a new one: the same terms never make two
    rules. A refusal says why in words meant for both sides (it is the reason of
    the ``Bye`` that ends the joiner's session)."""
    found = db.store.invite(invite)
    if found is None or not hmac.compare_digest(join_proof(found.secret, handshake_hash), proof):
        raise PairingError(
            "invite code refused: this agent did not issue it (mistyped, withdrawn, or made "
            "by another agent)"
        )
    if found.expires < now_ms() and found.used_by != peer:  # its joiner may still retry
        raise PairingError("invite code refused: it has expired")
    if found.used_by not in (None, peer):
        raise PairingError("invite code refused: it was already used by another agent")
    me = db.identity.public_key
    same = [
        r
        for r in db.store.rules(peer)
        if (r.state is RuleState.PROPOSED and r.proposer == me and r.proposed == found.terms)
        or (r.state is RuleState.ACCEPTED and r.terms_for(me) == found.terms)
    ]
    if not db.store.use_invite(invite, peer) and found.used_by != peer:
        raise PairingError("invite code refused: it was already used by another agent")
    if same:  # offered again: the joiner's first session was cut short, or it holds it
        return same[0].objects[0]
    db.store.add_peer(peer, None, [], now_ms())
    signed = core.propose(db.identity, peer, found.terms, os.urandom(16), now_ms())
    db.store.add_rule_objects(me, [signed], now_ms())
    return signed


@dataclass(frozen=True, slots=True)
class JoinTicket:
    """What the joiner needs during its session with the inviter: the code's invite
    ID and secret, and the hash of the terms it pairs for. Never stored: a code that
    the inviter refuses is forgotten with the session that presented it."""

    inviter: bytes
    invite: bytes
    secret: bytes
    terms: bytes

    @classmethod
    def of(cls, code: InviteCode) -> JoinTicket:
        return cls(code.inviter, code.invite, code.secret, code.terms)

    def proof(self, handshake_hash: bytes) -> bytes:
        return join_proof(self.secret, handshake_hash)


def joined_rule(db: Database, ticket: JoinTicket) -> Rule | None:
    """The rule in force with the inviter that gives exactly what the code pairs for
    (in the inviter's view), if there is one: the rule the join made, or one that
    was already in force with those terms."""
    for rule in db.store.rules(ticket.inviter):
        if (
            rule.state is RuleState.ACCEPTED
            and terms_hash(rule.terms_for(ticket.inviter)) == ticket.terms
        ):
            return rule
    return None


def join_answered(
    db: Database, ticket: JoinTicket, objects: Sequence[bytes], answers: Sequence[bytes]
) -> Rule | None:
    """The rule the inviter gave for our code, if ``objects`` (a ``Rules`` message from
    it) answer the code: we just accepted its proposal for the code's terms, or the
    message is the inviter's answer to ``Join`` naming a rule with those terms that is
    already in force (the same terms never make a second rule). The inviter's
    ``Rules`` with everything it holds about the pair does not count: only its answer
    says the code is good."""
    rule = joined_rule(db, ticket)
    if rule is None:
        return None
    accepted = {
        signed.proposal
        for signed in map(core.decode, answers)
        if signed.kind is core.Kind.ACCEPT
    }
    if rule.id in accepted or (len(objects) == 1 and core.rule_id(objects[0]) == rule.id):
        return rule
    return None


def answer_invite_proposal(db: Database, ticket: JoinTicket) -> list[bytes]:
    """Accept, as is, the inviter's open proposal with the code's terms (the joiner
    asked for it by presenting the code). Returns the acceptance to send, if any."""
    for rule in db.store.rules(ticket.inviter):
        if (
            rule.proposer == ticket.inviter
            and rule.state is RuleState.PROPOSED
            and terms_hash(rule.proposed) == ticket.terms
        ):
            return [accept(db, rule)]
    return []
