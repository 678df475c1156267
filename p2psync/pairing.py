"""Pairing and sync rules as this agent lives them: propose, accept, reject,
revoke, invite, join — and what each peer may send and receive.

A peer is **paired** when at least one rule between us is accepted and not
revoked. When both sides propose to each other (both ran ``pair add``), each
accepts the other's proposal narrowed to what the two have in common. An
invite code pairs without a further question: the inviter proposes the terms
it chose, and the joiner, who asked by presenting the code, accepts them.

Invite codes: ``P2PS-`` then base32 of canonical CBOR
``[inviter key, invite id (8), secret (16), [[ip (4/16 bytes), port], ...], expires ms,
terms hash (8)]`` plus a 2-byte BLAKE2b check; a code that names a relay has a
seventh field ``[relay key (32), [[ip, port], ...]]``. The joiner accepts only a
proposal whose terms match the hash: the code says what it pairs for. The joiner
proves it holds the secret with
``BLAKE2b-256(key=secret, b"p2psync/v1/join\\x00" || handshake hash)``: bound to
its own handshake, so an overheard proof is worthless elsewhere. Through a relay
(the inviter offline) there is no handshake between the two; the proof is
``BLAKE2b-256(key=secret, b"p2psync/v1/relay-join\\x00" || inviter key || joiner
key || invite id)``, sent in an introduction envelope signed by the joiner and
sealed to the inviter: only the inviter reads it, and it serves no other joiner.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from p2psync.clock import now_ms
from p2psync.core import canonical
from p2psync.core import rules as core
from p2psync.core.identity import KEY_BYTES, short_id
from p2psync.core.rules import Direction, Mode, Permissions, Rule, RuleState, Terms
from p2psync.errors import DecodeError, PairingError, StateError, UsageError
from p2psync.home import OpenHome
from p2psync.net.address import format_address, parse_address
from p2psync.store import rules as rules_store
from p2psync.store.joins import JoinRefusal, RelayJoin

log = logging.getLogger(__name__)

INVITE_PREFIX = "P2PS-"
JOIN_PREFIX = b"p2psync/v1/join\x00"
RELAY_JOIN_PREFIX = b"p2psync/v1/relay-join\x00"
#: How every refusal of an invite code begins.
REFUSED_PREFIX = "invite code refused: "


# ---------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class Proposal:
    """What ``propose`` did: ``rule`` is the rule the terms now live in (in force,
    or a proposal waiting for the peer's answer); ``new`` is False when nothing was
    signed because it already existed."""

    rule: Rule
    new: bool


def propose(
    db: OpenHome,
    peer: bytes,
    terms: Terms,
    *,
    name: str | None = None,
    addresses: Sequence[str] = (),
) -> Proposal:
    """Propose ``terms`` to ``peer``, unless a rule with exactly these terms (in this
    agent's view) is already in force or proposed by us. If the peer has asked for
    something these terms share, that is agreement: its request is accepted,
    narrowed to what the two have in common, and nothing new is proposed."""
    me = db.identity.public_key
    if peer == me:
        raise UsageError("that is this agent's own device ID")
    db.store.add_peer(peer, name, list(addresses), now_ms())
    rules = db.store.rules(peer)
    for rule in rules:
        if rule.state is RuleState.ACCEPTED and rule.terms_for(me) == terms:
            return Proposal(rule, new=False)
        if rule.state is RuleState.PROPOSED and rule.proposer == me and rule.proposed == terms:
            return Proposal(rule, new=False)
    waiting = [r for r in rules if r.proposer == peer and r.state is RuleState.PROPOSED]
    for request in sorted(waiting, key=lambda r: r.id):
        common = request.proposed.common(terms)
        if common is not None:
            accept(db, request, common)
            tidy(db, peer)
            agreed = next(r for r in db.store.rules(peer) if r.id == request.id)
            return Proposal(agreed, new=True)
    signed = core.propose(db.identity, peer, terms, os.urandom(16), now_ms())
    db.store.add_rule_objects(me, [signed], now_ms())
    ours = core.rule_id(signed)
    return Proposal(next(r for r in db.store.rules(peer) if r.id == ours), new=True)


def settle(db: OpenHome, peer: bytes) -> list[bytes]:
    """Answer what can be answered without asking anyone. Returns the new signed
    objects (to send to the peer).

    Both sides asked (each ran ``pair add``, or proposed, before seeing the other's
    proposal): each open proposal of the peer's that shares something with one of
    ours is accepted, narrowed to the widest such share. "Ours" are our open
    proposals, and those whose acceptance by the peer we took in after its proposal
    (in a later message, or the same one: by our own count, which the peer cannot
    set; it could not have known they settled the matter). A request that reaches us
    later, overlapping a rule already in force, is for the user to answer. Nothing is
    revoked here, only widened, so the two sides may decide at the same moment from
    different views without losing anything; the duplicates this can leave are
    tidied by :func:`tidy`.
    """
    me = db.identity.public_key
    rules = db.store.rules(peer)
    ours = [
        r
        for r in rules
        if r.proposer == me and r.state in (RuleState.PROPOSED, RuleState.ACCEPTED)
    ]
    theirs = [r for r in rules if r.proposer == peer and r.state is RuleState.PROPOSED]
    if not theirs or not ours:
        return tidy(db, peer)
    arrived = db.store.rule_objects_order(
        [r.id for r in theirs]
        + [core.rule_id(r.objects[1]) for r in ours if r.state is RuleState.ACCEPTED]
    )
    created: list[bytes] = []
    for incoming in sorted(theirs, key=lambda r: r.id):
        asked_at = arrived.get(incoming.id, 0)
        shares = []
        for outgoing in ours:
            if outgoing.state is RuleState.ACCEPTED:
                answered_at = arrived.get(core.rule_id(outgoing.objects[1]), 0)
                if answered_at < asked_at:
                    continue  # settled before this was asked: the user answers it
                # (in one message, proposals are taken in before answers)
            # what we asked for, even where the peer accepted less (it may have been
            # choosing one share of several, as this function does)
            common = incoming.proposed.common(outgoing.proposed)
            if common is not None:
                shares.append((_width(common), outgoing.id, common))
        if shares:  # the widest share; of equals, the one with the oldest proposal
            widest = max(width for width, _, _ in shares)
            common = min((i, c) for w, i, c in shares if w == widest)[1]
            created.append(core.accept(db.identity, incoming.id, common, now_ms()))
    if created:
        db.store.add_rule_objects(me, created, now_ms())
    return created + tidy(db, peer)


def signed_ms(signed: bytes) -> int:
    """The time a rule object says it was signed (by its signer's clock)."""
    return core.decode(signed).at_ms


def _width(terms: Terms) -> tuple[int, int, int]:
    """How much ``terms`` let flow, to choose the widest share: directions, modes,
    collections (a ``*`` counting as more than any list)."""
    ways = 2 if terms.direction is Direction.BOTH else 1
    modes = 2 if terms.mode is Mode.ONLINE else 1
    reach = 1 << 20 if "*" in terms.collections else len(terms.collections)
    return ways, modes, reach


def tidy(db: OpenHome, peer: bytes) -> list[bytes]:
    """Revoke what of ours can add nothing: a proposal of ours, open or in force,
    whose terms (in this agent's view) equal those of a rule in force with a smaller
    ID. The smallest-ID rule in force with given terms is never revoked this way, by
    either side, so whatever the peer does meanwhile what flows is unchanged (both
    sides accepting each other's identical proposals at the same moment end with
    the older rule in force). Returns the revocations (to send to the peer)."""
    me = db.identity.public_key
    rules = db.store.rules(peer)
    oldest: dict[Terms, bytes] = {}
    for rule in sorted(rules, key=lambda r: r.id):
        if rule.state is RuleState.ACCEPTED:
            oldest.setdefault(rule.terms_for(me), rule.id)
    redundant = [
        rule
        for rule in rules
        if rule.proposer == me
        and rule.state in (RuleState.PROPOSED, RuleState.ACCEPTED)
        and oldest.get(rule.terms_for(me), rule.id) < rule.id
    ]
    revocations = [core.revoke(db.identity, rule.id, now_ms()) for rule in redundant]
    if revocations:
        db.store.add_rule_objects(me, revocations, now_ms())
    # the peer may not hold an open proposal of ours yet: it gets it with its end
    proposals = [rule.objects[0] for rule in redundant if rule.state is RuleState.PROPOSED]
    return proposals + revocations


def accept(db: OpenHome, rule: Rule, terms: Terms | None = None) -> bytes:
    me = db.identity.public_key
    if rule.acceptor != me or rule.state is not RuleState.PROPOSED:
        raise StateError(f"rule {rule.id.hex()[:12]} is not a proposal waiting for this agent")
    terms = terms or rule.proposed
    if not terms.narrower_than(rule.proposed):
        raise StateError("an acceptance may narrow a proposal, not widen it")
    signed = core.accept(db.identity, rule.id, terms, now_ms())
    db.store.add_rule_objects(me, [signed], now_ms())
    return signed


def reject(db: OpenHome, rule: Rule, reason: str) -> bytes:
    me = db.identity.public_key
    if rule.acceptor != me or rule.state is not RuleState.PROPOSED:
        raise StateError(f"rule {rule.id.hex()[:12]} is not a proposal waiting for this agent")
    signed = core.reject(db.identity, rule.id, reason, now_ms())
    db.store.add_rule_objects(me, [signed], now_ms())
    return signed


def reject_strangers(db: OpenHome, reason: str) -> tuple[list[Rule], int]:
    """Reject every request awaiting this agent from strangers: agents it has no
    rule in force with and never asked to pair (``pair reject --all-pending``), a
    flood of throwaway requests cleared in one step. Returns the rules rejected,
    and how many proposals from paired or asked peers were left for ``rule
    accept``/``rule reject``. Rejected, they no longer count against the
    strangers' caps (slots and bytes); their pairs go with the expiry."""
    me = db.identity.public_key
    known = db.store.not_strangers(me)  # paired once, or asked
    waiting = [
        r for r in db.store.rules() if r.state is RuleState.PROPOSED and r.acceptor == me
    ]
    rejected = [r for r in waiting if r.proposer not in known]
    objects = [core.reject(db.identity, r.id, reason, now_ms()) for r in rejected]
    if objects:
        db.store.add_rule_objects(me, objects, now_ms())  # one transaction
    return rejected, len(waiting) - len(rejected)


def revoke(db: OpenHome, rule: Rule) -> bytes:
    if rule.state is RuleState.REVOKED:
        raise StateError(f"rule {rule.id.hex()[:12]} is already revoked")
    signed = core.revoke(db.identity, rule.id, now_ms())
    db.store.add_rule_objects(db.identity.public_key, [signed], now_ms())
    return signed


def permissions(db: OpenHome, peer: bytes, *, live: bool) -> Permissions:
    return Permissions.between(db.identity.public_key, peer, db.store.rules(peer), live=live)


def receive(
    db: OpenHome,
    peer: bytes,
    objects: Iterable[bytes],
    joining: Sequence[Invited] = (),
    peer_name: str | None = None,
) -> list[bytes]:
    """Keep rule objects the peer sent; return our answers to send back.

    ``joining``: invite codes we presented to this peer, so we accept, as is, each
    proposal it makes in return with exactly a code's terms (signed before the code
    expired). A peer that proposes something becomes known (under the name it gave),
    so ``pair pending`` can name it.
    """
    me = db.identity.public_key
    expected = any(ticket.inviter == peer for ticket in joining)  # its proposal, no stranger's
    added = db.store.add_rule_objects(
        me, list(objects), now_ms(), peer_only=peer, expected=expected
    )
    known = db.store.peer(peer)
    if (added and known is None) or (known is not None and not known.name and peer_name):
        db.store.add_peer(peer, peer_name, [], now_ms())
    answers = []
    for ticket in joining:  # before settle may narrow it
        if ticket.inviter == peer:
            answers.extend(answer_invite_proposal(db, ticket))
    return answers + settle(db, peer)


def last_ended(rules: Sequence[Rule]) -> Rule | None:
    """Of the rules rejected or revoked, the one whose end was signed last."""
    ended = [r for r in rules if r.state in (RuleState.REJECTED, RuleState.REVOKED)]
    return max(ended, key=lambda r: (signed_ms(r.objects[-1]), r.id), default=None)


#: Why a direct session with a peer whose rules all have route relay carries nothing.
RELAY_ONLY = "paired, but these agents' rules go only through a relay (route relay)"


def unpaired_reason(db: OpenHome, peer: bytes, *, live: bool = True) -> str:
    """Why nothing flows with ``peer`` in this session (no rule in force for it), in
    words both sides read."""
    rules = db.store.rules(peer)
    me = db.identity.public_key
    paired_by = core.in_force(rules, me, peer)
    if paired_by and all(r.terms.route is core.Route.RELAY for r in paired_by):
        return RELAY_ONLY
    if any(r.state is RuleState.PROPOSED for r in rules):
        return "not paired: the pairing request awaits approval"
    if live and any(r.state is RuleState.ACCEPTED for r in rules):
        return (
            "no online rule between these agents: their rules sync on demand "
            "(`p2psync sync`)"
        )
    ended = last_ended(rules)
    if ended is not None and ended.state is RuleState.REJECTED:
        return f"not paired: the pairing request was rejected: {ended.reason}"
    if ended is not None:
        return "not paired: the rules between these agents were revoked"
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
    #: the relay where the inviter collects join requests: its key and addresses
    relay: tuple[bytes, tuple[str, ...]] | None = None


def create_invite(
    db: OpenHome,
    terms: Terms,
    expires_in_s: float,
    addresses: Sequence[str],
    relay: tuple[bytes, Sequence[str]] | None = None,
) -> str:
    """A one-time code another agent can ``pair join``; valid ``expires_in_s`` seconds.
    ``relay``: a relay (key, addresses) where the joiner may leave its request when
    this agent cannot be reached (the terms' route must let the relay carry them)."""
    if relay is not None and terms.route is core.Route.DIRECT:
        raise UsageError("an invite through a relay needs a rule with route relay or auto")
    secret = os.urandom(16)
    invite = hashlib.blake2b(secret, digest_size=8, person=b"p2psync-invite").digest()
    expires = now_ms() + int(expires_in_s * 1000)
    db.store.add_invite(
        invite, secret, terms, expires, now_ms(), relay[0] if relay is not None else None
    )
    hints = _packed(addresses)
    fields: list[object] = [db.identity.public_key, invite, secret, hints, expires,
                            terms_hash(terms)]
    if relay is not None:
        fields.append([relay[0], _packed(relay[1])])
    payload = canonical.encode(fields)
    check = hashlib.blake2b(payload, digest_size=2).digest()
    text = base64.b32encode(payload + check).decode("ascii").rstrip("=")
    return INVITE_PREFIX + "-".join(text[i : i + 8] for i in range(0, len(text), 8))


def _packed(addresses: Sequence[str]) -> list[list[object]]:
    hints: list[list[object]] = []
    for address in addresses:
        try:
            host, port = parse_address(address)
            hints.append([ipaddress.ip_address(host).packed, port])
        except ValueError:
            continue
    return hints


def _unpacked(hints: object) -> tuple[str, ...]:
    if type(hints) is not list:
        raise DecodeError("addresses")
    addresses = []
    for hint in hints:
        if type(hint) is not list or len(hint) != 2:
            raise DecodeError("address")
        ip, port = hint
        if type(ip) is not bytes or type(port) is not int or not 0 < port < 65536:
            raise DecodeError("address")
        addresses.append(format_address(str(ipaddress.ip_address(ip)), port))
    return tuple(addresses)


def withdraw_invite(db: OpenHome, invite: bytes) -> None:
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
        fields = canonical.decode(payload, what="invite code", max_depth=4)
        if type(fields) is not list or len(fields) not in (6, 7):
            raise DecodeError("fields")
        inviter, invite, secret, hints, expires, terms = fields[:6]
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
        ):
            raise DecodeError("fields")
        if expires < 0:
            raise DecodeError("expiry")
        addresses = _unpacked(hints)
        relay = None
        if len(fields) == 7:
            named = fields[6]
            if type(named) is not list or len(named) != 2:
                raise DecodeError("relay")
            key, relay_hints = named
            if type(key) is not bytes or len(key) != KEY_BYTES or key == inviter:
                raise DecodeError("relay")
            relay = (key, _unpacked(relay_hints))
    except (DecodeError, ValueError, TypeError):
        raise UsageError("invalid invite code: its contents are malformed") from None
    return InviteCode(inviter, invite, secret, addresses, expires, terms, relay)


def join_proof(secret: bytes, handshake_hash: bytes) -> bytes:
    return hashlib.blake2b(JOIN_PREFIX + handshake_hash, key=secret, digest_size=32).digest()


def relay_join_proof(secret: bytes, inviter: bytes, joiner: bytes, invite: bytes) -> bytes:
    """The proof of a join left at a relay: bound to both parties and the invite."""
    return hashlib.blake2b(
        RELAY_JOIN_PREFIX + inviter + joiner + invite, key=secret, digest_size=32
    ).digest()


_NOT_ISSUED = (
    "invite code refused: this agent did not issue it (mistyped, withdrawn, or made "
    "by another agent)"
)


def answer_join(
    db: OpenHome, peer: bytes, invite: bytes, proof: bytes, handshake_hash: bytes
) -> bytes:
    """Check a joiner's proof; on success propose the invite's terms to it (once).

    A rule with exactly these terms already proposed to the joiner (open or in
    force) is offered again instead of a new one: the same terms never make two
    rules. The joiner that used the code may present it again (its first session
    was cut short), even after it expired, but only to be offered that same rule
    while it is open or in force: once revoked or rejected (``pair remove``), the
    code pairs nobody again. A refusal says why in words meant for both sides (it
    is the reason of the ``Bye`` that ends the joiner's session)."""
    found = db.store.invite(invite)
    if found is None or not hmac.compare_digest(join_proof(found.secret, handshake_hash), proof):
        raise PairingError(_NOT_ISSUED)
    return _grant(db, peer, found, now_ms())


def answer_relay_join(
    db: OpenHome, peer: bytes, invite: bytes, proof: bytes, now: int
) -> bytes:
    """A join request ``peer`` left at a relay (in an introduction): the same checks
    and answer as :func:`answer_join`, with the proof bound to the two keys and the
    invite instead of a handshake. The proposal goes back through the relay, so the
    invite's route must let the relay carry it. The expiry counts when the request
    is collected (the joiner's clock is not trusted): an inviter offline for days
    gives its code a life as long (`pair invite --relay` defaults to 7 days).

    A refusal of a request with a valid proof (the code was used, expired, was
    withdrawn) is owed back to the joiner (``join_refusals``: an introduction
    carries it); a request without one gets no answer at all."""
    found = next((i for i in db.store.invites() if i.id == invite), None)
    me = db.identity.public_key
    if found is None or not hmac.compare_digest(
        relay_join_proof(found.secret, me, peer, invite), proof
    ):
        raise PairingError(_NOT_ISSUED)
    try:
        if found.withdrawn is not None:
            raise PairingError("invite code refused: it was withdrawn")
        if found.terms.route is core.Route.DIRECT:
            raise PairingError("invite code refused: its rule's route is direct (no relay)")
        return _grant(db, peer, found, now)
    except PairingError as exc:
        why = str(exc).removeprefix(REFUSED_PREFIX)
        if not db.store.owe_join_refusal(JoinRefusal(peer, invite, why, now)):
            log.warning(
                "refusal of %s's join not sent back: too many refusals are waiting",
                short_id(peer),
            )
        raise


def _grant(db: OpenHome, peer: bytes, found: rules_store.Invite, now: int) -> bytes:
    me = db.identity.public_key
    same = [
        r
        for r in db.store.rules(peer)
        if (r.state is RuleState.PROPOSED and r.proposer == me and r.proposed == found.terms)
        or (r.state is RuleState.ACCEPTED and r.terms_for(me) == found.terms)
    ]
    if found.used_by == peer:
        if same:
            return same[0].objects[0]
        raise PairingError("invite code refused: it was already used")
    if found.used_by is not None:
        raise PairingError("invite code refused: it was already used by another agent")
    if found.expires < now:
        raise PairingError("invite code refused: it has expired")
    if not db.store.use_invite(found.id, peer):
        raise PairingError("invite code refused: it was already used by another agent")
    if same:
        return same[0].objects[0]
    db.store.add_peer(peer, None, [], now_ms())
    # signed no later than the code's expiry, as the joiner checks: the expiry was
    # checked against ``now``, and the clock may have passed it since
    signed_at = min(now_ms(), found.expires)
    signed = core.propose(db.identity, peer, found.terms, os.urandom(16), signed_at)
    db.store.add_rule_objects(me, [signed], now_ms())
    return signed


class Invited(Protocol):
    """A code this agent presented (:class:`JoinTicket` in a session, a
    :class:`~p2psync.store.joins.RelayJoin` through a relay): whose proposal with which
    terms to accept as is."""

    @property
    def inviter(self) -> bytes: ...

    @property
    def terms(self) -> bytes: ...

    @property
    def expires(self) -> int: ...


@dataclass(frozen=True, slots=True)
class JoinTicket:
    """What the joiner needs during its session with the inviter: the code's invite
    ID and secret, and the hash of the terms it pairs for. Never stored: a code that
    the inviter refuses is forgotten with the session that presented it."""

    inviter: bytes
    invite: bytes
    secret: bytes
    terms: bytes
    expires: int

    @classmethod
    def of(cls, code: InviteCode) -> JoinTicket:
        return cls(code.inviter, code.invite, code.secret, code.terms, code.expires)

    def proof(self, handshake_hash: bytes) -> bytes:
        return join_proof(self.secret, handshake_hash)


def leave_join(db: OpenHome, code: InviteCode, relay: bytes) -> RelayJoin:
    """Record a join of ``code`` to be left at ``relay`` (an introduction carries it,
    :mod:`p2psync.mail.outbox`): the inviter's proposal, when it comes back, is
    accepted as is. One per code: joining the same code again replaces its row."""
    me = db.identity.public_key
    join = RelayJoin(
        code.inviter,
        code.invite,
        code.terms,
        relay_join_proof(code.secret, code.inviter, me, code.invite),
        relay,
        code.expires,
        now_ms(),
    )
    db.store.add_relay_join(join)
    return join


def joined_rule(db: OpenHome, ticket: Invited) -> Rule | None:
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
    db: OpenHome, ticket: JoinTicket, objects: Sequence[bytes], answers: Sequence[bytes]
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


def answer_invite_proposal(db: OpenHome, ticket: Invited) -> list[bytes]:
    """Accept, as is, the inviter's open proposal with the code's terms, signed
    before the code expired (the joiner asked for it by presenting the code; the
    inviter makes it when the code is presented, so a later one, with the same
    terms, was not asked for and waits in ``pair pending``). Both times are the
    inviter's clock. Returns the acceptance to send, if any."""
    for rule in db.store.rules(ticket.inviter):
        if (
            rule.proposer == ticket.inviter
            and rule.state is RuleState.PROPOSED
            and terms_hash(rule.proposed) == ticket.terms
            and signed_ms(rule.objects[0]) <= ticket.expires
        ):
            return [accept(db, rule)]
    return []
