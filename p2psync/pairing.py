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
from p2psync.errors import DecodeError, P2PSyncError, UsageError
from p2psync.home import now_ms

INVITE_PREFIX = "P2PS-"
JOIN_PREFIX = b"p2psync/v1/join\x00"


class PairingError(P2PSyncError):
    """A pairing step was refused (bad or used invite, unknown rule, ...)."""


# ---------------------------------------------------------------- rules


def propose(
    db: Database,
    peer: bytes,
    terms: Terms,
    *,
    name: str | None = None,
    addresses: Sequence[str] = (),
) -> list[Rule]:
    """Propose ``terms`` to ``peer``; if it already proposed to us, accept its proposal
    narrowed to what both want (mutual ``pair add``). Returns the rules touched."""
    if peer == db.identity.public_key:
        raise UsageError("that is this agent's own device ID")
    db.store.add_peer(peer, name, list(addresses), now_ms())
    signed = core.propose(db.identity, peer, terms, os.urandom(16), now_ms())
    db.store.add_rule_objects(db.identity.public_key, [signed], now_ms())
    settle(db, peer)
    return [r for r in db.store.rules(peer) if r.state is not RuleState.REVOKED]


def settle(db: Database, peer: bytes) -> list[bytes]:
    """Answer what can be answered without asking anyone: when we have our own
    open proposal to ``peer``, accept each of its open proposals narrowed to the
    common terms. Returns the new signed objects (to send to the peer)."""
    me = db.identity.public_key
    rules = db.store.rules(peer)
    ours = [r for r in rules if r.proposer == me and r.state is RuleState.PROPOSED]
    theirs = [r for r in rules if r.proposer == peer and r.state is RuleState.PROPOSED]
    created = []
    for incoming in theirs:
        for outgoing in ours:
            common = incoming.proposed.common(outgoing.proposed)
            if common is not None:  # the peer does the same with ours when it sees it
                created.append(core.accept(db.identity, incoming.id, common, now_ms()))
                break
    if created:
        db.store.add_rule_objects(me, created, now_ms())
    return created


def accept(db: Database, rule: Rule, terms: Terms | None = None) -> bytes:
    me = db.identity.public_key
    if rule.acceptor != me or rule.state is not RuleState.PROPOSED:
        raise UsageError(f"rule {rule.id.hex()[:12]} is not a proposal waiting for this agent")
    terms = terms or rule.proposed
    if not terms.narrower_than(rule.proposed):
        raise UsageError("an acceptance may narrow a proposal, not widen it")
    signed = core.accept(db.identity, rule.id, terms, now_ms())
    db.store.add_rule_objects(me, [signed], now_ms())
    return signed


def reject(db: Database, rule: Rule, reason: str) -> bytes:
    me = db.identity.public_key
    if rule.acceptor != me or rule.state is not RuleState.PROPOSED:
        raise UsageError(f"rule {rule.id.hex()[:12]} is not a proposal waiting for this agent")
    signed = core.reject(db.identity, rule.id, reason, now_ms())
    db.store.add_rule_objects(me, [signed], now_ms())
    return signed


def revoke(db: Database, rule: Rule) -> bytes:
    if rule.state is RuleState.REVOKED:
        raise UsageError(f"rule {rule.id.hex()[:12]} is already revoked")
    signed = core.revoke(db.identity, rule.id, now_ms())
    db.store.add_rule_objects(db.identity.public_key, [signed], now_ms())
    return signed


def permissions(db: Database, peer: bytes, *, live: bool) -> Permissions:
    return Permissions.between(db.identity.public_key, peer, db.store.rules(peer), live=live)


def receive(
    db: Database,
    peer: bytes,
    objects: Iterable[bytes],
    joining: bytes | None,
    peer_name: str | None = None,
) -> list[bytes]:
    """Keep rule objects the peer sent; return our answers to send back.

    ``joining``: we presented an invite code to this peer (these are the code's
    terms hash), so we accept, as is, the proposal it makes in return with exactly
    those terms. A peer that proposes something becomes known (under the name it
    gave), so ``pair pending`` can name it.
    """
    me = db.identity.public_key
    added = db.store.add_rule_objects(me, list(objects), now_ms(), peer_only=peer)
    known = db.store.peer(peer)
    if (added and known is None) or (known is not None and not known.name and peer_name):
        db.store.add_peer(peer, peer_name, [], now_ms())
    answers = settle(db, peer)
    if joining is not None:
        for rule in db.store.rules(peer):
            if (
                rule.proposer == peer
                and rule.state is RuleState.PROPOSED
                and terms_hash(rule.proposed) == joining
            ):
                answers.append(accept(db, rule))
    return answers


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
        addresses = []
        for ip, port in hints:
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
    """Check a joiner's proof; on success propose the invite's terms to it (once)."""
    found = db.store.invite(invite)
    if found is None or not hmac.compare_digest(join_proof(found.secret, handshake_hash), proof):
        raise PairingError(f"{short_id(peer)} presented an invalid invite code")
    if found.expires < now_ms():
        raise PairingError(f"{short_id(peer)} presented an expired invite code")
    if found.used_by == peer:  # the same joiner again (its first session was cut short)
        for rule in db.store.rules(peer):
            if rule.proposer == db.identity.public_key and rule.proposed == found.terms:
                return rule.objects[0]
    if not db.store.use_invite(invite, peer):
        raise PairingError(f"{short_id(peer)} presented an invite code that was already used")
    db.store.add_peer(peer, None, [], now_ms())
    signed = core.propose(db.identity, peer, found.terms, os.urandom(16), now_ms())
    db.store.add_rule_objects(db.identity.public_key, [signed], now_ms())
    return signed


def pending_join(db: Database, peer: bytes) -> tuple[bytes, bytes, bytes] | None:
    """``(invite id, secret, terms hash)`` when we are joining ``peer`` with a code."""
    value = db.store.get_meta(f"join:{peer.hex()}")
    if not isinstance(value, bytes) or len(value) != 32:
        return None
    return value[:8], value[8:24], value[24:]


def remember_join(db: Database, code: InviteCode) -> None:
    db.store.set_meta(f"join:{code.inviter.hex()}", code.invite + code.secret + code.terms)


def forget_join(db: Database, peer: bytes) -> None:
    db.store.delete_meta(f"join:{peer.hex()}")
