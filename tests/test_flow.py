"""The flow policy (core/flow.py), pure: what a peer lacks, what of each entry
goes, and which received entries may be applied."""

from __future__ import annotations

import cbor2
import pytest

from p2psync.core.entry import decode_wire
from p2psync.core.flow import EVERYTHING, Flow
from p2psync.core.messages import Head
from p2psync.core.rules import Direction, Mode, Permissions, Route, Rule, RuleState, Terms
from p2psync.errors import HostileEntry, RuleViolationError, WithheldError
from tests.helpers import Author

ME, PEER = b"m" * 32, b"p" * 32

pytestmark = pytest.mark.pure


def rule(terms: Terms, state: RuleState = RuleState.ACCEPTED) -> Rule:
    return Rule(b"r" * 32, ME, PEER, terms, state, terms, None, ())


def only(*collections: str, send: bool = True, receive: bool = True) -> Flow:
    terms = (Terms(tuple(collections), Direction.SEND),)
    return Flow(Permissions(send=terms if send else (), receive=terms if receive else ()))


def test_the_peer_lacks_what_it_has_not_and_nothing_of_an_author_it_froze() -> None:
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    local = {a: Head(5, b"x"), b: Head(3, b"y"), c: Head(2, b"z")}
    peer = {a: Head(2, b"q"), b: Head(7, b"w", frozen=True)}
    assert Flow().lacks(local, peer) == {a: 2, c: 0}
    assert only("x", send=False).lacks(local, peer) == {}  # nothing may go


def test_payloads_the_peer_may_not_receive_are_withheld_and_the_rest_goes_whole() -> None:
    author = Author()
    entry = author.write(author.op("public", "a", 1), author.op("payroll", "b", 2))
    sent = only("public").outgoing([entry.wire()])[0]
    assert cbor2.loads(sent)[0] == entry.signed  # the signed part goes whole
    received = decode_wire(sent)
    assert received.id == entry.id and received.ops[1] is None
    assert received.ops[0] is not None and received.ops[0].value == 1
    assert only("public", "payroll").outgoing([entry.wire()]) == [entry.wire()]
    assert Flow().outgoing([entry.wire()]) == [entry.wire()]


def test_a_payload_no_rule_lets_the_peer_send_is_its_fault() -> None:
    author = Author()
    entry = author.write(author.op("public", "a", 1), author.op("payroll", "b", 2))
    refusal = only("public").judge(entry)
    assert isinstance(refusal, RuleViolationError) and isinstance(refusal, HostileEntry)
    assert "'payroll'" in str(refusal)
    assert only("public", "payroll").judge(entry) is None
    assert Flow().judge(entry) is None


def test_a_missing_payload_that_may_come_here_makes_the_entry_wait() -> None:
    author = Author()
    entry = author.write(author.op("public", "a", 1), author.op("payroll", "b", 2))
    filtered = decode_wire(only("public").outgoing([entry.wire()])[0])
    assert only("public").judge(filtered) is None  # payroll may not come here anyway
    for flow in (Flow(), only("public", "payroll")):
        refusal = flow.judge(filtered)
        assert isinstance(refusal, WithheldError) and not isinstance(refusal, HostileEntry)
        assert "without its 'payroll' part" in str(refusal)
    # payroll may come only by an on-demand rule: the entry waits for that sync
    later = Flow(only("public").now, (Permissions(receive=(Terms(("public", "payroll")),)),))
    refusal = later.judge(filtered)
    assert isinstance(refusal, WithheldError) and "only on demand" in str(refusal)
    # ...and a payload of such a collection, sent live, is not the peer's fault
    assert later.judge(entry) is None


def test_rules_count_by_mode_and_route() -> None:
    online = rule(Terms(("a",), Direction.BOTH, Mode.ONLINE, Route.DIRECT))
    on_demand = rule(Terms(("b",), Direction.BOTH, Mode.ON_DEMAND, Route.AUTO))
    relay_only = rule(Terms(("r",), Direction.BOTH, Mode.ONLINE, Route.RELAY))
    proposed = rule(Terms(("c",)), RuleState.PROPOSED)
    live = Flow.between(ME, PEER, [online, on_demand, proposed], live=True)
    # a live connection kept for an online rule carries the on-demand one too
    assert live.may_receive("a") and live.may_receive("b") and not live.may_receive("c")
    only_on_demand = Flow.between(ME, PEER, [on_demand], live=True)
    assert not only_on_demand.flows and only_on_demand.later
    assert only_on_demand.in_force  # a live session with it waits for nothing
    assert Flow.between(ME, PEER, [on_demand], live=False).flows
    assert not Flow.between(ME, PEER, [proposed], live=True).in_force
    # the relay carries only rules whose route lets it
    relayed = Flow.between(ME, PEER, [online, on_demand, relay_only], live=False, via_relay=True)
    assert relayed.may_receive("b") and relayed.may_receive("r") and not relayed.may_receive("a")
    # ...and a direct connection never carries a rule whose route is `relay`
    direct = Flow.between(ME, PEER, [online, on_demand, relay_only], live=True)
    assert direct.may_receive("a") and direct.may_receive("b") and not direct.may_receive("r")
    # paired only through the relay: nothing flows directly, and a direct session
    # ends at once saying so (in force, nothing to wait for)
    relay_paired = Flow.between(ME, PEER, [relay_only], live=False)
    assert relay_paired.in_force and not relay_paired.flows
    nothing = Flow.between(ME, PEER, [], live=False)
    assert nothing.now == Permissions() and not nothing.in_force
    assert Flow().now == EVERYTHING


def test_an_entry_waits_only_for_a_copy_that_brings_more() -> None:
    """A copy lacking a payload another path carries waits for that path only if
    that path would bring everything this copy has too; otherwise (a relay-only and
    a direct-only collection in one entry) no path brings more, and waiting on both
    would hold it forever."""
    author = Author()
    entry = author.write(author.op("direct", "a", 1), author.op("relay", "b", 2))
    direct_only = rule(Terms(("direct",), Direction.BOTH, Mode.ONLINE, Route.DIRECT))
    relay_only = rule(Terms(("relay",), Direction.BOTH, Mode.ONLINE, Route.RELAY))
    both = rule(Terms(("direct", "relay"), Direction.BOTH, Mode.ONLINE, Route.RELAY))
    for via_relay in (False, True):
        flow = Flow.between(ME, PEER, [direct_only, relay_only], live=True, via_relay=via_relay)
        copy = decode_wire(flow.outgoing([entry.wire()])[0])
        assert None in copy.ops and flow.judge(copy) is None  # applied as it comes
    # the relay carries both: the direct copy (relay part withheld) waits for it...
    direct = Flow.between(ME, PEER, [direct_only, both], live=True)
    copy = decode_wire(direct.outgoing([entry.wire()])[0])
    refusal = direct.judge(copy)
    assert isinstance(refusal, WithheldError) and "'relay'" in str(refusal)
    # ...and the relay's copy is whole
    relayed = Flow.between(ME, PEER, [direct_only, both], live=False, via_relay=True)
    assert relayed.judge(decode_wire(relayed.outgoing([entry.wire()])[0])) is None
