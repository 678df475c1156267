"""The signed mailbox policy (core/policy.py), pure: round trips, every tampering
refused with a typed error, only the owner signs its policy, versions order as the
mailbox has it, and which peers the rules admit."""

from __future__ import annotations

from typing import Any

import pytest

from p2psync.core import canonical
from p2psync.core.envelope import EnvelopeClass
from p2psync.core.identity import Identity
from p2psync.core.mailbox import NO_POLICY, Deposit, MailboxPolicy, newer
from p2psync.core.policy import (
    MAX_POLICY_BYTES,
    MAX_SENDERS,
    POLICY_PREFIX,
    SignedPolicy,
    decode_policy,
    senders_for,
    sign_policy,
)
from p2psync.core.rules import Direction, Mode, Route, Rule, RuleState, Terms
from p2psync.errors import PolicyError, RemoteProtocolError, UsageError

pytestmark = pytest.mark.pure

A, B, C = (Identity(bytes([n]) * 32) for n in (1, 2, 3))
T = 1_700_000_000_000
P, Q, R = (bytes([n]) * 32 for n in (0x50, 0x51, 0x52))


def wire_of(version: int = 1, senders: tuple[bytes, ...] = (Q, P), owner: Identity = B) -> bytes:
    return sign_policy(owner, version, senders, T)


def split(wire: bytes) -> tuple[dict[int, Any], bytes]:
    body, signature = canonical.decode(wire, what="t", max_depth=1)
    return canonical.decode(body, what="t", max_depth=2), signature


def craft(body: dict[Any, Any], signer: Identity = B) -> bytes:
    """A policy with any body, signed by ``signer`` (checks of fields, not signature)."""
    encoded = canonical.encode(body)
    return canonical.encode([encoded, signer.sign(POLICY_PREFIX + encoded)])


def body_of(**changes: Any) -> dict[int, Any]:
    body, _ = split(wire_of())
    keys = {"format": 0, "owner": 1, "version": 2, "senders": 3, "at": 4}
    return {**body, **{keys[name]: value for name, value in changes.items()}}


# ---------------------------------------------------------------- the format


def test_a_policy_round_trips() -> None:
    wire = wire_of(7, (Q, P, Q))
    policy = decode_policy(wire)
    assert policy == SignedPolicy(B.public_key, 7, (P, Q), T, wire)
    assert decode_policy(wire, owner=B.public_key) == policy
    assert policy.to_mailbox_policy() == MailboxPolicy(7, frozenset({P, Q}))
    body, _ = split(wire)
    assert body == {0: 1, 1: B.public_key, 2: 7, 3: [P, Q], 4: T}


def test_an_empty_policy_admits_no_one() -> None:
    plain = decode_policy(sign_policy(B, 2, [], T)).to_mailbox_policy()
    assert plain.senders == frozenset()
    data = Deposit(B.public_key, P, 1, EnvelopeClass.DATA, 0, 1024)
    assert not plain.allows(data)
    assert decode_policy(wire_of()).to_mailbox_policy().allows(data)


def flips(data: bytes) -> list[bytes]:
    """``data`` with each byte in turn changed (low bit flipped, then all bits)."""
    out = []
    for index in range(len(data)):
        for mask in (0x01, 0xFF):
            out.append(data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :])
    return out


def test_every_byte_changed_is_refused_with_a_typed_error() -> None:
    wire = wire_of()
    for tampered in [*flips(wire), wire[:-1], wire + b"\0", b"", b"\x82", bytes(range(256))]:
        with pytest.raises(PolicyError):  # anything else (cbor2, nacl, ...) fails the test
            decode_policy(tampered)
    assert issubclass(PolicyError, RemoteProtocolError)
    with pytest.raises(PolicyError):
        decode_policy(bytearray(wire))  # type: ignore[arg-type]


def test_a_policy_signed_by_another_for_the_owner_is_refused() -> None:
    body, _ = split(wire_of())
    forged = craft(body, signer=C)  # C signs a policy naming B as owner
    with pytest.raises(PolicyError, match="signature"):
        decode_policy(forged)
    # C's own policy is not B's, even with a good signature
    c_policy = wire_of(owner=C)
    assert decode_policy(c_policy).owner == C.public_key
    with pytest.raises(PolicyError, match="not"):
        decode_policy(c_policy, owner=B.public_key)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format": 2}, "format"),
        ({"owner": b"\2" * 31}, "owner"),
        ({"version": 0}, "version"),
        ({"version": 1 << 63}, "version"),
        ({"version": True}, "version"),
        ({"senders": [Q, P]}, "ascending"),
        ({"senders": [P, P]}, "ascending"),
        ({"senders": [P[:31]]}, "32-byte"),
        ({"senders": [P, "q"]}, "32-byte"),
        ({"senders": {P: 1}}, "senders"),
        ({"at": -1}, "time"),
        ({"at": 1 << 63}, "time"),
    ],
)
def test_malformed_fields_are_refused(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        decode_policy(craft(body_of(**changes)))


def test_the_owner_is_never_a_sender_and_the_keys_are_exact() -> None:
    with pytest.raises(PolicyError, match="owner"):
        decode_policy(craft(body_of(senders=sorted([P, B.public_key]))))
    body = body_of()
    with pytest.raises(PolicyError, match="keys"):
        decode_policy(craft({**body, 5: b""}))
    with pytest.raises(PolicyError, match="keys"):
        decode_policy(craft({k: v for k, v in body.items() if k != 4}))
    _, signature = split(wire_of())
    with pytest.raises(PolicyError, match="signature"):
        decode_policy(canonical.encode([canonical.encode(body), signature[:63]]))


def test_signing_bad_arguments_is_a_usage_error() -> None:
    for version, senders, at in [
        (0, [P], T),
        (1 << 63, [P], T),
        (1, [B.public_key], T),
        (1, [P[:31]], T),
        (1, [P, 3], T),
        (1, [P], -1),
    ]:
        with pytest.raises(UsageError):
            sign_policy(B, version, senders, at)  # type: ignore[arg-type]


def test_the_largest_policy_fits_its_cap_and_one_more_sender_does_not() -> None:
    keys = [i.to_bytes(32, "big") for i in range(1, MAX_SENDERS + 1)]
    wire = sign_policy(B, (1 << 63) - 1, keys, (1 << 63) - 1)
    assert len(wire) <= MAX_POLICY_BYTES
    assert len(decode_policy(wire).senders) == MAX_SENDERS
    with pytest.raises(UsageError):
        sign_policy(B, 1, [*keys, (MAX_SENDERS + 1).to_bytes(32, "big")], T)
    too_many = craft(body_of(senders=[*keys, (MAX_SENDERS + 1).to_bytes(32, "big")]))
    with pytest.raises(PolicyError):
        decode_policy(too_many)


# ---------------------------------------------------------------- versions


def test_versions_order_as_the_mailbox_has_it() -> None:
    """A relay keeps the newest valid policy per owner: ``newer`` on the plain
    values agrees with the signed versions, and any signed policy replaces none."""
    policies = [decode_policy(wire_of(v)).to_mailbox_policy() for v in (1, 2, 3, 1 << 40)]
    for old in policies:
        assert newer(NO_POLICY, old)
        for new in policies:
            assert newer(old, new) == (new.version > old.version)
    same = decode_policy(sign_policy(B, 2, [R], T + 1)).to_mailbox_policy()
    assert not newer(policies[1], same)  # the same version is not newer, whatever it lists


# ---------------------------------------------------------------- from the rules

ME = B.public_key


def rule(
    peer: bytes,
    direction: Direction = Direction.BOTH,
    route: Route = Route.AUTO,
    state: RuleState = RuleState.ACCEPTED,
    *,
    proposer_is_me: bool = True,
    mode: Mode = Mode.ONLINE,
) -> Rule:
    terms = Terms(("*",), direction, mode, route)
    proposer, acceptor = (ME, peer) if proposer_is_me else (peer, ME)
    return Rule(bytes([len(peer)]) * 32, proposer, acceptor, terms, state, terms, None, ())


def test_only_rules_by_relay_or_auto_admit_a_peer() -> None:
    assert senders_for(ME, {P: [rule(P, route=Route.DIRECT)]}) == frozenset()
    assert senders_for(ME, {P: [rule(P, route=Route.RELAY)]}) == {P}
    assert senders_for(ME, {P: [rule(P, route=Route.AUTO)]}) == {P}
    on_demand = rule(P, route=Route.RELAY, mode=Mode.ON_DEMAND)
    assert senders_for(ME, {P: [on_demand]}) == {P}
    mixed = [rule(P, route=Route.DIRECT), rule(P, Direction.SEND, Route.RELAY)]
    assert senders_for(ME, {P: mixed}) == {P}  # by the relay it returns receipts


def test_a_rule_either_way_admits_the_peer_its_receipts_included() -> None:
    """A peer this agent only sends to must be able to return receipts through
    the mailbox; which way entries flow is the recipient's to enforce."""
    for direction in Direction:
        for proposer_is_me in (True, False):
            one = rule(P, direction, proposer_is_me=proposer_is_me)
            assert senders_for(ME, {P: [one]}) == {P}


@pytest.mark.parametrize("state", [RuleState.PROPOSED, RuleState.REJECTED, RuleState.REVOKED])
def test_rules_not_in_force_admit_no_one(state: RuleState) -> None:
    assert senders_for(ME, {P: [rule(P, state=state, proposer_is_me=False)]}) == frozenset()
    if state is not RuleState.PROPOSED:
        assert senders_for(ME, {P: [rule(P, state=state)]}) == frozenset()


def test_a_peer_we_asked_to_pair_may_answer_by_the_relay() -> None:
    assert senders_for(ME, {P: [rule(P, state=RuleState.PROPOSED)]}) == {P}
    direct = rule(P, route=Route.DIRECT, state=RuleState.PROPOSED)
    assert senders_for(ME, {P: [direct]}) == frozenset()


def test_several_peers_each_by_their_own_rules() -> None:
    rules = {
        P: [rule(P, route=Route.RELAY)],
        Q: [rule(Q, route=Route.DIRECT), rule(Q, state=RuleState.REVOKED)],
        R: [rule(R, Direction.RECEIVE, Route.AUTO)],
        C.public_key: [rule(P)],  # a rule between others is not C's
        ME: [rule(P)],
    }
    assert senders_for(ME, rules) == {P, R}
    wire = sign_policy(B, 1, senders_for(ME, rules), T)
    assert decode_policy(wire).senders == (P, R)
