"""Sync rules: signed agreements between two agents on what flows between them.

A **proposal** names collections (glob patterns), a direction *from the
proposer's view* (``send``, ``receive``, ``both``), a mode (``online``: live
while connected; ``on-demand``: only on ``p2psync sync``) and a route
(``direct``, ``relay``, ``auto``). The proposer signs it. The other side
**accepts** it — countersigning terms that may be narrower (fewer patterns,
one direction) — or **rejects** it with a reason. Either side may later
**revoke** it. Only accepted, unrevoked rules move data.

Every rule object is ``[body, signature]`` in canonical CBOR, signed with the
prefix ``b"p2psync/v1/rule\\x00"``; its ID is BLAKE2b-256 of that encoding.
Bodies (canonical CBOR maps)::

    proposal:   {0: 1, 1: "propose", 2: proposer, 3: acceptor, 4: terms, 5: nonce(16), 6: ms}
    acceptance: {0: 1, 1: "accept",  2: signer, 3: proposal ID, 4: terms, 5: ms}
    rejection:  {0: 1, 1: "reject",  2: signer, 3: proposal ID, 4: reason, 5: ms}
    revocation: {0: 1, 1: "revoke",  2: signer, 3: proposal ID, 4: ms}
    terms = [[pattern, ...], direction, mode, route]

Pure: signing keys and nonces come from the caller; nothing here reads a clock.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from p2psync.core import canonical
from p2psync.core.identity import KEY_BYTES, Identity, short_id, verify
from p2psync.core.messages import MAX_REASON_CHARS
from p2psync.errors import DecodeError, RuleError, UsageError

RULE_PREFIX = b"p2psync/v1/rule\x00"
MAX_PATTERNS = 64
MAX_PATTERN_CHARS = 128
MAX_RULE_BYTES = 16 * 1024


class Direction(Enum):
    SEND = "send"
    RECEIVE = "receive"
    BOTH = "both"


class Mode(Enum):
    ONLINE = "online"
    ON_DEMAND = "on-demand"


class Route(Enum):
    DIRECT = "direct"
    RELAY = "relay"
    AUTO = "auto"


@dataclass(frozen=True, slots=True)
class Terms:
    """What a rule allows, from the proposer's point of view."""

    collections: tuple[str, ...] = ("*",)
    direction: Direction = Direction.BOTH
    mode: Mode = Mode.ONLINE
    route: Route = Route.AUTO

    def encode(self) -> list[Any]:
        return [list(self.collections), self.direction.value, self.mode.value, self.route.value]

    @classmethod
    def decode(cls, value: object) -> Terms:
        if type(value) is not list or len(value) != 4:
            raise DecodeError("rule terms are [collections, direction, mode, route]")
        patterns, direction, mode, route = value
        try:
            return cls.make(patterns, Direction(direction), Mode(mode), Route(route))
        except (ValueError, UsageError) as exc:
            raise DecodeError(f"bad rule terms: {exc}") from exc

    @classmethod
    def make(
        cls,
        patterns: object,
        direction: Direction = Direction.BOTH,
        mode: Mode = Mode.ONLINE,
        route: Route = Route.AUTO,
    ) -> Terms:
        if (
            type(patterns) not in (list, tuple) or not 0 < len(patterns) <= MAX_PATTERNS  # type: ignore[arg-type]
        ):
            raise UsageError(f"a rule names 1-{MAX_PATTERNS} collection patterns")
        checked = []
        for pattern in patterns:  # type: ignore[attr-defined]
            if type(pattern) is not str or not pattern.isprintable():
                raise UsageError(
                    f"invalid collection pattern {repr(pattern)[:80]}: a pattern is "
                    "printable text"
                )
            if not 0 < len(pattern) <= MAX_PATTERN_CHARS:
                raise UsageError(
                    f"invalid collection pattern {repr(pattern)[:80]}: a pattern has "
                    f"1-{MAX_PATTERN_CHARS} characters"
                )
            checked.append(pattern)
        return cls(tuple(sorted(set(checked))), direction, mode, route)

    def flipped(self) -> Terms:
        """The same terms from the other side's point of view."""
        other = {Direction.SEND: Direction.RECEIVE, Direction.RECEIVE: Direction.SEND}
        return Terms(
            self.collections, other.get(self.direction, self.direction), self.mode, self.route
        )

    def covers(self, collection: str) -> bool:
        return any(fnmatch.fnmatchcase(collection, p) for p in self.collections)

    def narrower_than(self, other: Terms) -> bool:
        """True when these terms allow nothing ``other`` does not (same proposer view).

        On-demand is narrower than online; a specific route narrows ``auto``.
        """
        if self.mode is not other.mode and self.mode is not Mode.ON_DEMAND:
            return False
        if other.route is not Route.AUTO and self.route is not other.route:
            return False
        if other.direction is not Direction.BOTH and self.direction is not other.direction:
            return False
        return all(
            pattern in other.collections or "*" in other.collections for pattern in self.collections
        )

    def common(self, other: Terms) -> Terms | None:
        """What two proposals (each from its own proposer's view) have in common,
        from *this* proposer's view; None when nothing."""
        theirs = other.flipped()
        if "*" in self.collections:
            patterns = set(theirs.collections)
        elif "*" in theirs.collections:
            patterns = set(self.collections)
        else:
            patterns = set(self.collections) & set(theirs.collections)
        sends = self.direction in (Direction.SEND, Direction.BOTH) and theirs.direction in (
            Direction.SEND,
            Direction.BOTH,
        )
        receives = self.direction in (Direction.RECEIVE, Direction.BOTH) and (
            theirs.direction in (Direction.RECEIVE, Direction.BOTH)
        )
        if not patterns or not (sends or receives):
            return None
        direction = (
            Direction.BOTH if sends and receives else Direction.SEND if sends else Direction.RECEIVE
        )
        mode = self.mode if self.mode is theirs.mode else Mode.ON_DEMAND  # the stricter
        if Route.AUTO not in (self.route, theirs.route) and self.route is not theirs.route:
            return None  # one wants direct only, the other relay only
        route = theirs.route if self.route is Route.AUTO else self.route
        return Terms(tuple(sorted(patterns)), direction, mode, route)

    def describe(self) -> str:
        return (
            f"{', '.join(self.collections)}; {self.direction.value}; {self.mode.value}; "
            f"route {self.route.value}"
        )


class Kind(Enum):
    PROPOSE = "propose"
    ACCEPT = "accept"
    REJECT = "reject"
    REVOKE = "revoke"


@dataclass(frozen=True, slots=True)
class RuleObject:
    """A verified, decoded rule object."""

    id: bytes
    kind: Kind
    signer: bytes
    signed: bytes
    at_ms: int
    # proposals
    acceptor: bytes | None = None
    terms: Terms | None = None
    # acceptances, rejections, revocations
    proposal: bytes | None = None
    reason: str | None = None


def _sign(identity: Identity, body: dict[int, Any]) -> bytes:
    encoded = canonical.encode(body)
    return canonical.encode([encoded, identity.sign(RULE_PREFIX + encoded)])


def propose(identity: Identity, acceptor: bytes, terms: Terms, nonce: bytes, at_ms: int) -> bytes:
    return _sign(
        identity,
        {
            0: 1,
            1: "propose",
            2: identity.public_key,
            3: acceptor,
            4: terms.encode(),
            5: nonce,
            6: at_ms,
        },
    )


def accept(identity: Identity, proposal: bytes, terms: Terms, at_ms: int) -> bytes:
    return _sign(
        identity,
        {0: 1, 1: "accept", 2: identity.public_key, 3: proposal, 4: terms.encode(), 5: at_ms},
    )


def reject(identity: Identity, proposal: bytes, reason: str, at_ms: int) -> bytes:
    return _sign(
        identity,
        {
            0: 1,
            1: "reject",
            2: identity.public_key,
            3: proposal,
            4: reason[:MAX_REASON_CHARS],
            5: at_ms,
        },
    )


def revoke(identity: Identity, proposal: bytes, at_ms: int) -> bytes:
    return _sign(identity, {0: 1, 1: "revoke", 2: identity.public_key, 3: proposal, 4: at_ms})


def rule_id(signed: bytes) -> bytes:
    return hashlib.blake2b(signed, digest_size=32).digest()


def decode(signed: bytes) -> RuleObject:
    """Strictly decode and verify one signed rule object; raise RuleError."""
    if type(signed) is not bytes or len(signed) > MAX_RULE_BYTES:
        raise RuleError("rule object missing or too large")
    try:
        pair = canonical.decode(signed, what="rule object", max_depth=1)
        if type(pair) is not list or len(pair) != 2 or not all(type(x) is bytes for x in pair):
            raise DecodeError("a rule object is [body, signature]")
        body_bytes, signature = pair
        body = canonical.decode(body_bytes, what="rule body", max_depth=3)
        version = body.get(0) if type(body) is dict else None
        if type(version) is not int or version != 1 or type(body.get(1)) is not str:
            raise DecodeError("unknown rule object version or kind")
        kind = Kind(body[1])
        signer = body.get(2)
        if type(signer) is not bytes or len(signer) != KEY_BYTES:
            raise DecodeError("rule object signer is not a 32-byte key")
        if not verify(signer, RULE_PREFIX + body_bytes, signature):
            raise DecodeError(f"rule object signature by {short_id(signer)} does not verify")
        return _fields(rule_id(signed), kind, signer, signed, body)
    except (DecodeError, ValueError, KeyError) as exc:
        raise RuleError(f"invalid rule object: {exc}") from exc


def _fields(
    identifier: bytes, kind: Kind, signer: bytes, signed: bytes, body: dict[int, Any]
) -> RuleObject:
    if kind is Kind.PROPOSE:
        _keys(body, 7)
        acceptor, terms, nonce, at_ms = body[3], Terms.decode(body[4]), body[5], body[6]
        if type(acceptor) is not bytes or len(acceptor) != KEY_BYTES or acceptor == signer:
            raise DecodeError("a proposal names another agent as acceptor")
        if type(nonce) is not bytes or len(nonce) != 16:
            raise DecodeError("proposal nonce must be 16 bytes")
        return RuleObject(identifier, kind, signer, signed, _ms(at_ms), acceptor, terms)
    proposal = body[3]
    if type(proposal) is not bytes or len(proposal) != 32:
        raise DecodeError("rule object names no proposal")
    if kind is Kind.ACCEPT:
        _keys(body, 6)
        return RuleObject(
            identifier,
            kind,
            signer,
            signed,
            _ms(body[5]),
            terms=Terms.decode(body[4]),
            proposal=proposal,
        )
    if kind is Kind.REJECT:
        _keys(body, 6)
        reason = body[4]
        if type(reason) is not str or len(reason) > MAX_REASON_CHARS:
            raise DecodeError("rejection reason must be short text")
        return RuleObject(
            identifier, kind, signer, signed, _ms(body[5]), proposal=proposal, reason=reason
        )
    _keys(body, 5)
    return RuleObject(identifier, kind, signer, signed, _ms(body[4]), proposal=proposal)


def _keys(body: dict[Any, Any], count: int) -> None:
    if not all(type(k) is int for k in body) or set(body) != set(range(count)):
        raise DecodeError(f"rule body must have the keys 0-{count - 1}")


def _ms(value: object) -> int:
    if type(value) is not int or not 0 <= value < 1 << 63:
        raise DecodeError("rule time must be a non-negative integer")
    return value


# ---------------------------------------------------------------- the state of a pair


class RuleState(Enum):
    PROPOSED = "proposed"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class Rule:
    """A proposal and what became of it."""

    id: bytes
    proposer: bytes
    acceptor: bytes
    proposed: Terms
    state: RuleState
    terms: Terms  # the accepted (possibly narrowed) terms, else the proposed ones
    reason: str | None
    objects: tuple[bytes, ...]  # every signed object that made this state

    def party(self, key: bytes) -> bool:
        return key in (self.proposer, self.acceptor)

    def terms_for(self, me: bytes) -> Terms:
        """The terms from ``me``'s point of view."""
        return self.terms if me == self.proposer else self.terms.flipped()


def fold(objects: Iterable[RuleObject]) -> dict[bytes, Rule]:
    """The state of every proposal, from any set of rule objects, in any order.

    Only the acceptor may accept or reject a proposal, and only its first answer
    counts (earliest time, then ID); an acceptance must be no wider than the
    proposal. Either party may revoke, and a revocation is final.
    """
    proposals = {o.id: o for o in objects if o.kind is Kind.PROPOSE}
    answers: dict[bytes, list[RuleObject]] = {}
    for obj in objects:
        if obj.kind is not Kind.PROPOSE and obj.proposal in proposals:
            answers.setdefault(obj.proposal, []).append(obj)
    rules = {}
    for pid, prop in proposals.items():
        assert prop.acceptor is not None and prop.terms is not None
        state, terms, reason = RuleState.PROPOSED, prop.terms, None
        valid = []
        for answer in sorted(answers.get(pid, []), key=lambda o: (o.at_ms, o.id)):
            if answer.kind is Kind.REVOKE and answer.signer in (prop.signer, prop.acceptor):
                valid.append(answer)
                state = RuleState.REVOKED
                break
            if state is not RuleState.PROPOSED or answer.signer != prop.acceptor:
                continue
            if answer.kind is Kind.ACCEPT:
                assert answer.terms is not None
                if answer.terms.narrower_than(prop.terms):
                    state, terms = RuleState.ACCEPTED, answer.terms
                    valid.append(answer)
            elif answer.kind is Kind.REJECT:
                state, reason = RuleState.REJECTED, answer.reason
                valid.append(answer)
        rules[pid] = Rule(
            pid,
            prop.signer,
            prop.acceptor,
            prop.terms,
            state,
            terms,
            reason,
            (prop.signed, *(a.signed for a in valid)),
        )
    return rules


def proposed_via_relay(rules: Iterable[Rule], me: bytes, peer: bytes) -> list[Rule]:
    """Our proposals to ``peer`` still awaiting its answer whose route lets the relay
    carry them (``relay`` or ``auto``): they travel as introductions, and the
    peer's answer may come back through our mailbox."""
    return [
        rule
        for rule in rules
        if rule.state is RuleState.PROPOSED
        and rule.proposer == me
        and rule.acceptor == peer
        and rule.proposed.route in (Route.RELAY, Route.AUTO)
    ]


def in_force(rules: Iterable[Rule], *parties: bytes) -> list[Rule]:
    """The rules in force among ``rules`` (accepted, not revoked); with ``parties``,
    only those between them. Two agents are **paired** while a rule between them
    is in force: this is the one definition of it."""
    return [
        rule
        for rule in rules
        if rule.state is RuleState.ACCEPTED and all(rule.party(key) for key in parties)
    ]


def on_demand_only(rules: Iterable[Rule]) -> bool:
    """Every one of ``rules`` syncs on demand (true of none): a pair whose rules in
    force are all on demand has nothing to do on a live connection."""
    return all(rule.terms.mode is Mode.ON_DEMAND for rule in rules)


@dataclass(frozen=True, slots=True)
class Permissions:
    """What may flow between me and one peer, from the rules in force."""

    send: tuple[Terms, ...] = ()
    receive: tuple[Terms, ...] = ()

    @classmethod
    def between(cls, me: bytes, peer: bytes, rules: Sequence[Rule], *, live: bool) -> Permissions:
        """What flows between ``me`` and ``peer``: on demand, by every rule in force;
        in a live session, by every rule in force too, provided one of them is
        online (that is what the live connection is for; an on-demand rule then
        flows on it as well, rather than wait for `p2psync sync` or, worse, have its
        entries arrive without their payload), else by none."""
        paired_by = in_force(rules, me, peer)
        if live and on_demand_only(paired_by):
            return cls()
        send: set[Terms] = set()
        receive: set[Terms] = set()
        for rule in paired_by:
            terms = rule.terms_for(me)
            one_way = Terms(terms.collections, Direction.SEND, terms.mode, terms.route)
            if terms.direction in (Direction.SEND, Direction.BOTH):
                send.add(one_way)
            if terms.direction in (Direction.RECEIVE, Direction.BOTH):
                receive.add(one_way)
        # the same allowance granted twice (both sides proposed) is one allowance
        return cls(tuple(sorted(send, key=repr)), tuple(sorted(receive, key=repr)))

    @property
    def paired(self) -> bool:
        """Something flows: the pair is paired (:func:`in_force`), and in a live
        session by an online rule."""
        return bool(self.send or self.receive)

    def may_send(self, collection: str) -> bool:
        return any(t.covers(collection) for t in self.send)

    def may_receive(self, collection: str) -> bool:
        return any(t.covers(collection) for t in self.receive)
