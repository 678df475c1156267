"""Sync rules: signed objects, folding, narrowing, permissions (pure)."""

from __future__ import annotations

import os

import pytest

from p2psync.core import canonical
from p2psync.core import rules as r
from p2psync.core.identity import Identity
from p2psync.core.rules import Direction, Mode, Permissions, Route, RuleState, Terms

pytestmark = pytest.mark.pure

A, B, C = (Identity(os.urandom(32)) for _ in range(3))


def proposal(
    proposer: Identity = A, acceptor: Identity = B, terms: Terms | None = None, at: int = 1
) -> bytes:
    return r.propose(proposer, acceptor.public_key, terms or Terms(), os.urandom(16), at)


def state(*objects: bytes) -> r.Rule:
    [rule] = r.fold([r.decode(o) for o in objects]).values()
    return rule


def test_round_trip_and_ids() -> None:
    terms = Terms.make(["vouchers", "ledgers/*"], Direction.SEND, Mode.ON_DEMAND, Route.DIRECT)
    signed = proposal(terms=terms)
    decoded = r.decode(signed)
    assert decoded.kind is r.Kind.PROPOSE and decoded.terms == terms
    assert decoded.signer == A.public_key and decoded.acceptor == B.public_key
    assert decoded.id == r.rule_id(signed)


def test_lifecycle() -> None:
    p = proposal()
    pid = r.rule_id(p)
    assert state(p).state is RuleState.PROPOSED
    narrowed = Terms.make(["vouchers"], Direction.SEND)
    accepted = state(p, r.accept(B, pid, narrowed, 2))
    assert accepted.state is RuleState.ACCEPTED and accepted.terms == narrowed
    assert accepted.terms_for(B.public_key).direction is Direction.RECEIVE
    rejected = state(p, r.reject(B, pid, "not now", 2))
    assert rejected.state is RuleState.REJECTED and rejected.reason == "not now"
    revoked = state(p, r.accept(B, pid, Terms(), 2), r.revoke(A, pid, 3))
    assert revoked.state is RuleState.REVOKED


def test_only_the_acceptor_answers_and_answers_may_not_widen() -> None:
    p = proposal(terms=Terms.make(["vouchers"]))
    pid = r.rule_id(p)
    assert state(p, r.accept(A, pid, Terms.make(["vouchers"]), 2)).state is RuleState.PROPOSED
    assert state(p, r.accept(C, pid, Terms.make(["vouchers"]), 2)).state is RuleState.PROPOSED
    wider = r.accept(B, pid, Terms.make(["vouchers", "payroll"]), 2)
    assert state(p, wider).state is RuleState.PROPOSED
    assert state(p, r.revoke(C, pid, 5)).state is RuleState.PROPOSED  # not a party


def test_fold_ignores_order_and_first_answer_wins() -> None:
    p = proposal()
    pid = r.rule_id(p)
    answers = [r.reject(B, pid, "no", 5), r.accept(B, pid, Terms(), 3)]
    one = state(p, *answers)
    two = state(*reversed([p, *answers]))
    assert one == two and one.state is RuleState.ACCEPTED


def test_tampered_or_foreign_objects_are_refused() -> None:
    signed = proposal()
    body, signature = canonical.decode(signed, what="x", max_depth=1)
    with pytest.raises(r.RuleError, match="signature"):
        r.decode(canonical.encode([body, bytes(64)]))
    with pytest.raises(r.RuleError):
        r.decode(signed + b"\x00")
    with pytest.raises(r.RuleError):
        r.decode(b"\xff" * 40)
    with pytest.raises(r.RuleError, match="acceptor"):
        r.decode(r.propose(A, A.public_key, Terms(), os.urandom(16), 1))
    assert signature


def test_common_terms_of_two_proposals() -> None:
    mine = Terms.make(["*"])
    theirs = Terms.make(["vouchers", "stock"], Direction.SEND)  # they send to us
    common = mine.common(theirs)
    assert common == Terms(("stock", "vouchers"), Direction.RECEIVE, Mode.ONLINE, Route.AUTO)
    assert mine.common(Terms.make(["x"], Direction.RECEIVE)) == Terms(
        ("x",), Direction.SEND, Mode.ONLINE, Route.AUTO
    )
    both_send = Terms.make(["x"], Direction.SEND)
    assert both_send.common(Terms.make(["x"], Direction.SEND)) is None  # nobody receives
    assert Terms.make(["a"]).common(Terms.make(["b"])) is None
    on_demand = Terms.make(["*"], mode=Mode.ON_DEMAND)
    assert mine.common(on_demand).mode is Mode.ON_DEMAND  # type: ignore[union-attr]


def test_permissions_follow_accepted_rules_and_modes() -> None:
    p = proposal(terms=Terms.make(["vouchers"], Direction.SEND))
    online = state(p, r.accept(B, r.rule_id(p), Terms.make(["vouchers"], Direction.SEND), 2))
    q = proposal(terms=Terms.make(["stock"], mode=Mode.ON_DEMAND))
    on_demand = state(q, r.accept(B, r.rule_id(q), Terms.make(["stock"], mode=Mode.ON_DEMAND), 2))
    rules = [online, on_demand]
    a_live = Permissions.between(A.public_key, B.public_key, rules, live=True)
    assert a_live.may_send("vouchers") and not a_live.may_receive("vouchers")
    # the live connection made for the online rule carries the on-demand one too
    assert a_live.may_send("stock") and a_live.may_receive("stock")
    a_once = Permissions.between(A.public_key, B.public_key, rules, live=False)
    assert a_once.may_send("stock") and a_once.may_receive("stock")
    b_live = Permissions.between(B.public_key, A.public_key, rules, live=True)
    assert b_live.may_receive("vouchers") and not b_live.may_send("vouchers")
    assert not Permissions.between(A.public_key, C.public_key, rules, live=True).paired
    # with only the on-demand rule in force, nothing flows live: only on demand
    alone = Permissions.between(A.public_key, B.public_key, [on_demand], live=True)
    assert not alone.paired
    assert Permissions.between(A.public_key, B.public_key, [on_demand], live=False).paired


def test_globs() -> None:
    terms = Terms.make(["ledgers/*", "vouchers"])
    assert terms.covers("ledgers/ACME") and terms.covers("vouchers")
    assert not terms.covers("vouchers2") and not terms.covers("payroll")
    with pytest.raises(Exception, match="pattern"):
        Terms.make(["bad\npattern"])
    with pytest.raises(Exception, match="1-64"):
        Terms.make([])


def test_a_rule_body_with_true_for_its_version_is_refused() -> None:
    """CBOR ``true`` is not the integer 1 (Python would say they are equal)."""
    signer = Identity(os.urandom(32))
    body = canonical.encode({0: True, 1: "revoke", 2: signer.public_key, 3: bytes(32), 4: 1})
    signed = canonical.encode([body, signer.sign(r.RULE_PREFIX + body)])
    with pytest.raises(r.RuleError, match="version"):
        r.decode(signed)
