"""`pair join CODE` through a relay (issue 10): the inviter is offline, the code
names a relay. The joiner leaves a join request (an introduction, sealed to the
inviter, its proof bound to both keys and the invite); the inviter, when it next
collects, proposes the code's terms back; the joiner accepts them as is; the
acceptance comes back in its first data envelope. Mailer level: a perfect relay
hands over every envelope."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

import p2psync
from p2psync import pairing
from p2psync.clock import now_ms
from p2psync.core import canonical
from p2psync.core.bundle import Introduction, decode_introduction, encode_introduction
from p2psync.core.envelope import EnvelopeClass, seal_envelope
from p2psync.core.rules import Route, RuleState, Terms
from p2psync.errors import BundleError, UsageError
from p2psync.mail.mailer import Mailer

pytestmark = pytest.mark.pure

MakeDb = Callable[[str], p2psync.Database]
RELAY = b"R" * 32


def key(db: p2psync.Database) -> bytes:
    return db.identity.public_key


def invite(db: p2psync.Database, terms: Terms | None = None, seconds: float = 600) -> str:
    terms = terms or Terms.make(["orders"], route=Route.AUTO)
    return pairing.create_invite(db, terms, seconds, [], relay=(RELAY, ["127.0.0.1:7000"]))


def hand_over(sender: p2psync.Database, receiver: p2psync.Database) -> list[object]:
    """Everything ``sender`` has for ``receiver`` reaches it (a perfect relay)."""
    out = Mailer(sender).outgoing(key(receiver), now_ms())
    return [Mailer(receiver).incoming(e.wire, now_ms()) for e in out]


def in_force(db: p2psync.Database, peer: p2psync.Database) -> bool:
    return any(r.state is RuleState.ACCEPTED for r in db.store.rules(key(peer)))


def test_join_through_the_relay_pairs_with_an_inviter_that_was_offline(
    make_db: MakeDb,
) -> None:
    inviter, joiner = make_db("head"), make_db("branch")
    code = pairing.parse_invite(invite(inviter))
    assert code.relay == (RELAY, ("127.0.0.1:7000",)) and code.addresses == ()
    pairing.leave_join(joiner, code, RELAY)
    assert key(inviter) in Mailer(joiner).targets()
    (request,) = Mailer(joiner).outgoing(key(inviter), now_ms())
    assert request.cls is EnvelopeClass.INTRODUCTION
    assert Mailer(joiner).outgoing(key(inviter), now_ms()) == []  # once
    (got,) = [Mailer(inviter).incoming(request.wire, now_ms())]
    assert got.reason is None, got
    (proposal,) = inviter.store.rules(key(joiner))
    assert proposal.state is RuleState.PROPOSED and inviter.store.peer(key(joiner)).name == "branch"
    hand_over(inviter, joiner)  # the proposal, as an introduction
    assert in_force(joiner, inviter)  # accepted as is: the code said what it pairs for
    assert joiner.store.relay_joins() == []
    joiner.put("orders", "o1", {"qty": 3})
    hand_over(joiner, inviter)  # the acceptance rides with the first data
    assert in_force(inviter, joiner)
    assert inviter.get("orders", "o1") == {"qty": 3}
    inviter.put("orders", "o2", "from the head office")
    hand_over(inviter, joiner)
    assert joiner.get("orders", "o2") == "from the head office"
    (used,) = inviter.store.invites()
    assert used.used_by == key(joiner)


def test_a_proof_serves_only_the_joiner_it_was_made_for(make_db: MakeDb) -> None:
    """A third site that learns a joiner's proof (it cannot: it is sealed to the
    inviter; say the joiner is careless) presents it as its own: refused, the code
    stays unused for the real joiner."""
    inviter, joiner, thief = make_db("head"), make_db("branch"), make_db("thief")
    code = pairing.parse_invite(invite(inviter))
    join = pairing.leave_join(joiner, code, RELAY)
    stolen = encode_introduction(Introduction("thief", (), (join.invite, join.proof)))
    wire = seal_envelope(
        thief.identity, key(inviter), 1, EnvelopeClass.INTRODUCTION, 0, stolen, os.urandom(32)
    )
    got = Mailer(inviter).incoming(wire, now_ms())
    assert got.reason is not None and "did not issue it" in got.reason
    assert inviter.store.rules(key(thief)) == [] and inviter.store.invites()[0].used_by is None
    assert all(r.reason is None for r in hand_over(joiner, inviter))
    assert inviter.store.invites()[0].used_by == key(joiner)


def test_a_code_joined_twice_pairs_only_the_first(make_db: MakeDb) -> None:
    inviter, first, second = make_db("head"), make_db("one"), make_db("two")
    code = pairing.parse_invite(invite(inviter))
    pairing.leave_join(first, code, RELAY)
    pairing.leave_join(second, code, RELAY)
    assert hand_over(first, inviter)[0].reason is None  # type: ignore[attr-defined]
    refused = hand_over(second, inviter)[0]
    assert "already used" in (refused.reason or "")  # type: ignore[attr-defined]
    assert inviter.store.rules(key(second)) == []
    # the first joiner's request delivered again (a relay replays it): the same rule
    hand_over(inviter, first)
    assert in_force(first, inviter) and len(inviter.store.rules(key(first))) == 1


def test_a_code_expired_when_the_inviter_collects_is_refused(make_db: MakeDb) -> None:
    inviter, joiner = make_db("head"), make_db("branch")
    code = pairing.parse_invite(invite(inviter, seconds=10))
    pairing.leave_join(joiner, code, RELAY)
    (request,) = Mailer(joiner).outgoing(key(inviter), now_ms())
    got = Mailer(inviter).incoming(request.wire, now_ms() + 11_000)
    assert "expired" in (got.reason or "")
    assert inviter.store.rules(key(joiner)) == []


def test_a_code_with_a_direct_route_cannot_name_a_relay(make_db: MakeDb) -> None:
    inviter = make_db("head")
    with pytest.raises(UsageError, match="route relay or auto"):
        invite(inviter, Terms.make(["orders"], route=Route.DIRECT))


def test_the_inviter_proposal_is_accepted_only_with_the_code_terms(make_db: MakeDb) -> None:
    """The inviter (or whoever holds its key) proposes something else than the code
    says: it waits in `pair pending` like any request, it is not accepted."""
    inviter, joiner = make_db("head"), make_db("branch")
    code = pairing.parse_invite(invite(inviter))
    pairing.leave_join(joiner, code, RELAY)
    pairing.propose(inviter, key(joiner), Terms.make(["*"], route=Route.AUTO), name="b")
    hand_over(inviter, joiner)
    (rule,) = joiner.store.rules(key(inviter))
    assert rule.state is RuleState.PROPOSED
    assert joiner.store.relay_join(key(inviter)) is not None  # still waiting for its code


def test_introduction_join_field_is_strict() -> None:
    ok = Introduction("x", (), (b"i" * 8, b"p" * 32))
    assert decode_introduction(encode_introduction(ok)) == ok
    for bad in ((b"i" * 7, b"p" * 32), (b"i" * 8, b"p" * 31)):
        with pytest.raises(BundleError):
            decode_introduction(encode_introduction(Introduction("x", (), bad)))
    with pytest.raises(BundleError, match="a join, a refusal or at least one rule object"):
        decode_introduction(encode_introduction(Introduction("x", ())))


def test_introduction_refusal_field_is_strict() -> None:
    ok = Introduction("x", (), refused=(b"i" * 8, "invite code refused: it has expired"))
    assert decode_introduction(encode_introduction(ok)) == ok
    for bad in ((b"i" * 7, "no"), (b"i" * 8, ""), (b"i" * 8, b"bytes"), ("text", "no")):
        with pytest.raises(BundleError, match="refusal"):
            decode_introduction(
                canonical.encode({0: 1, 1: "x", 2: [], 4: list(bad)})
            )
    with pytest.raises(BundleError, match="keys 0-2"):
        decode_introduction(canonical.encode({0: 1, 1: "x", 2: [], 5: 0}))
