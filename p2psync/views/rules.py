"""Rules and pairing requests as rows (``rule list``, ``pair pending``, the HTTP API)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2psync import pairing
from p2psync.clock import now_ms
from p2psync.core.identity import device_id
from p2psync.core.rules import Direction, Mode, Route, Rule, RuleState, Terms
from p2psync.errors import StateError
from p2psync.home import OpenHome


def rule_row(me: bytes, rule: Rule, names: dict[bytes, str | None]) -> dict[str, Any]:
    peer = rule.acceptor if rule.proposer == me else rule.proposer
    return {
        "id": rule.id.hex(),
        "peer": device_id(peer),
        "peer_name": names.get(peer),
        "proposed_by": "you" if rule.proposer == me else "them",
        "awaiting": (
            None
            if rule.state is not RuleState.PROPOSED
            else "you"
            if rule.acceptor == me
            else "them"
        ),
        "state": rule.state.value,
        "reason": rule.reason,
        "terms": rule.terms_for(me).describe(),
        "collections": list(rule.terms.collections),
        "direction": rule.terms_for(me).direction.value,
        "mode": rule.terms.mode.value,
        "route": rule.terms.route.value,
    }


def pending(
    db: OpenHome, *, expire: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Pairing requests and rule proposals waiting for an answer (``kind`` "rule"),
    invite codes joined through a relay waiting for the inviter (``kind`` "join"),
    and how many agents not paired with us (nor asked by us) have requests waiting.
    With ``expire``, expired requests are forgotten first (a write); inside a
    running agent, which sweeps them hourly, a look needs no write."""
    me = db.identity.public_key
    if expire:
        db.store.expire_requests(me, now_ms())
    waiting = [r for r in db.store.rules() if r.state is RuleState.PROPOSED]
    names = {p.key: p.name for p in db.store.peers()}
    joins = db.store.relay_joins()
    known = db.store.not_strangers(me)
    rows = [{"kind": "rule", **rule_row(me, r, names)} for r in waiting]
    strangers = len({r.proposer for r in waiting if r.acceptor == me and r.proposer not in known})
    now = now_ms()
    joined: list[dict[str, Any]] = [
        {
            "kind": "join",
            "awaiting": "them",
            "peer": device_id(j.inviter),
            "peer_name": names.get(j.inviter),
            "invite": j.invite.hex(),
            "relay": device_id(j.relay),
            "since": j.created,
            "expires": j.expires,
            "expired": j.expires < now,
            "refused": j.refused,
        }
        for j in joins
    ]
    return rows, joined, strangers


@dataclass(frozen=True, slots=True)
class RuleOptions:
    """``--collection/--direction/--mode/--route`` as given (empty or None: not
    given), in this agent's view whether it proposes or accepts."""

    collections: tuple[str, ...] = ()
    direction: str | None = None
    mode: str | None = None
    route: str | None = None

    def terms(self, base: Terms | None = None) -> Terms:
        """The terms the options make; what they do not give comes from ``base``
        (default: everything, both, online, auto)."""
        base = base or Terms()
        return Terms.make(
            list(self.collections) or list(base.collections),
            Direction(self.direction) if self.direction else base.direction,
            Mode(self.mode) if self.mode else base.mode,
            Route(self.route) if self.route else base.route,
        )


def accept_in_view(db: OpenHome, rule: Rule, options: RuleOptions) -> Terms:
    """Accept ``rule`` with options given in the acceptor's view; returns the terms
    in that view."""
    mine = options.terms(base=rule.proposed.flipped())
    pairing.accept(db, rule, mine.flipped())  # rules are signed in the proposer's view
    return mine


def waiting_for_us(db: OpenHome, rule: Rule, listing: str) -> Rule:
    """``rule`` if it is a proposal awaiting this site's answer; else a StateError
    that says what it is (``listing``: where the user sees the rules)."""
    me = db.identity.public_key
    if rule.acceptor != me or rule.state is not RuleState.PROPOSED:
        whose = "this agent's own" if rule.proposer == me else "a"
        raise StateError(
            f"rule {rule.id.hex()[:12]} is {whose} {rule.state.value} proposal, not one "
            f"waiting for this agent's answer; see {listing}"
        )
    return rule
