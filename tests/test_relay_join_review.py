"""Review of "pair join CODE through a relay" (commit 4f0bbb4): each finding as the
test that failed on the code as reviewed; the docstrings say what was wrong."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import p2psync
from p2psync import home as home_mod
from p2psync import pairing
from p2psync.agent.relaying import RelayLink
from p2psync.clock import now_ms
from p2psync.core.envelope import EnvelopeClass
from p2psync.core.identity import device_id
from p2psync.core.identity import parse_device_id as device_key
from p2psync.core.rules import Route, RuleState, Terms
from p2psync.mail.mailer import Mailer
from p2psync.net.storeio import ChangeFeed
from p2psync.store.ledger import State
from tests.agents import cli, run
from tests.relaynode import RelayNode
from tests.test_relay_join import RELAY, MakeDb, hand_over, in_force, invite, key

DOCS = Path(__file__).resolve().parent.parent / "docs"
DAY_MS = 86_400_000


# ------------------------------------------------------------ store level


@pytest.mark.pure
def test_a_refused_relay_join_is_reported_to_the_joiner(make_db: MakeDb) -> None:
    """The inviter refuses a join collected through the relay (here: the code was
    already used by another site). It records the envelope with ``owe=False`` and
    sends nothing back, so the joiner never learns: its join stays in the store and
    `pair pending` says "waiting for head to collect it" for the code's whole life
    (7 days by default), then "not answered" for ever. The refusal should reach the
    joiner (its introduction refused with the reason, or the join dropped)."""
    inviter, first, second = make_db("head"), make_db("one"), make_db("two")
    code = pairing.parse_invite(invite(inviter))
    pairing.leave_join(first, code, RELAY)
    pairing.leave_join(second, code, RELAY)
    assert hand_over(first, inviter)[0].reason is None  # type: ignore[attr-defined]
    refused = hand_over(second, inviter)[0]
    assert "already used" in (refused.reason or "")  # type: ignore[attr-defined]
    hand_over(inviter, second)  # everything the inviter has for the second joiner
    join = second.store.relay_join(key(inviter))
    assert join is not None and "already used" in (join.refused or ""), (
        f"the second joiner still waits for an answer that never comes: {join}"
    )
    assert Mailer(second).targets() == frozenset()  # the join is not sent again
    assert hand_over(second, inviter) == []
    # the first joiner is not told anything of the kind, and a holder of no code
    # gets no answer at all (no oracle of which codes exist)
    assert inviter.store.join_refusals(key(first)) == []
    assert [r.joiner for r in inviter.store.join_refusals()] == [key(second)]


@pytest.mark.pure
def test_a_long_expired_join_does_not_auto_accept_a_later_proposal(make_db: MakeDb) -> None:
    """A join whose code expired a month ago, never answered (the inviter never
    collected it), is never cleared (store/joins.py says it is kept "until ... the
    code's expiry passes"; nothing removes it, and the inbox ignores the expiry).
    Any later proposal from that site with those terms - a plain `pair add` weeks
    later - is then accepted without asking the user. Only a proposal made for the
    code (signed before it expired) should be accepted as is."""
    inviter, joiner = make_db("head"), make_db("branch")
    terms = Terms.make(["orders"], route=Route.AUTO)
    code = pairing.parse_invite(invite(inviter, terms))
    stale = dataclasses.replace(code, expires=now_ms() - 30 * DAY_MS)
    pairing.leave_join(joiner, stale, RELAY)
    # a month later the inviter proposes the same terms on its own
    pairing.propose(inviter, key(joiner), terms, name="branch")
    hand_over(inviter, joiner)
    (rule,) = joiner.store.rules(key(inviter))
    assert rule.state is RuleState.PROPOSED, (
        "a proposal made long after the code expired was accepted with no question"
    )


@pytest.mark.pure
def test_two_codes_of_one_inviter_joined_through_the_relay_both_pair(make_db: MakeDb) -> None:
    """relay_joins has one row per inviter: joining a second code of the same inviter
    (another rule: 'stock') replaces the first, although the first join was already
    delivered and the inviter used the code and proposed. The first proposal then
    waits in `pair pending` instead of being accepted as the code said; the CLI
    says nothing about the replacement."""
    inviter, joiner = make_db("head"), make_db("branch")
    orders = pairing.parse_invite(invite(inviter, Terms.make(["orders"], route=Route.AUTO)))
    stock = pairing.parse_invite(invite(inviter, Terms.make(["stock"], route=Route.AUTO)))
    pairing.leave_join(joiner, orders, RELAY)
    assert hand_over(joiner, inviter)[0].reason is None  # type: ignore[attr-defined]
    pairing.leave_join(joiner, stock, RELAY)
    assert hand_over(joiner, inviter)[0].reason is None  # type: ignore[attr-defined]
    assert all(i.used_by == key(joiner) for i in inviter.store.invites())
    hand_over(inviter, joiner)  # both proposals
    states = sorted(
        (tuple(r.proposed.collections), r.state.value) for r in joiner.store.rules(key(inviter))
    )
    assert all(state == RuleState.ACCEPTED.value for _, state in states), states
    assert in_force(joiner, inviter)


@pytest.mark.pure
def test_docs_describe_pair_join_through_a_relay() -> None:
    """docs/relay.md still lists `pair join CODE` through a relay under "Not yet" and
    gives the introduction as {0, 1, 2} (no key 3: the join); docs/protocol.md's
    invite code has six fields (no seventh: the relay) and says the joiner never
    stores the code and that a refused code leaves nothing behind - a relay join
    stores the proof and adds the code's relay to the joiner's relays."""
    relay_md = (DOCS / "relay.md").read_text()
    protocol_md = (DOCS / "protocol.md").read_text()
    problems = []
    if "**Not yet.** `pair join CODE` through a relay" in relay_md:
        problems.append("relay.md: pair join through a relay listed as not yet done")
    if "relay-join" not in relay_md and "relay-join" not in protocol_md:
        problems.append("no doc gives the relay join proof (p2psync/v1/relay-join)")
    if "relay key" not in protocol_md:
        problems.append("protocol.md: the invite code's seventh field (the relay) is missing")
    if "The code is never stored by the joiner" in protocol_md:
        problems.append("protocol.md: says the joiner never stores the code")
    assert not problems, problems


# ------------------------------------------------------------ end to end


@pytest.fixture
def two_relays(tmp_path: Path) -> Iterator[tuple[RelayNode, RelayNode]]:
    mine = RelayNode(tmp_path / "relay-a", name="branch-relay").init()
    theirs = RelayNode(tmp_path / "relay-b", name="head-relay").init()
    try:
        yield mine, theirs
    finally:
        mine.stop()
        theirs.stop()


def _sites_with_a_relay_each(
    tmp_path: Path, mine: RelayNode, theirs: RelayNode
) -> tuple[Path, Path, str]:
    """A head office using relay B (``theirs``) and a branch using relay A (``mine``,
    first in its list); both are admitted at B. The head office's code names B."""
    head, branch = tmp_path / "head", tmp_path / "branch"
    home_mod.init(head, "head")
    home_mod.init(branch, "branch")
    ids = {home: cli(home, "id").strip() for home in (head, branch)}
    cli(mine.home, "relay", "allow", ids[branch])
    for home in (head, branch):
        cli(theirs.home, "relay", "allow", ids[home])
    mine.start()
    theirs.start()
    cli(branch, "relay", "add", mine.device_id, "--address", mine.address)
    cli(head, "relay", "add", theirs.device_id, "--address", theirs.address)
    made = cli(head, "pair", "invite", "-c", "orders", "--relay", theirs.device_id[:7])
    return head, branch, made.strip().splitlines()[-1]


@pytest.mark.process
def test_a_joiner_with_a_relay_of_its_own_collects_the_answer(
    tmp_path: Path, two_relays: tuple[RelayNode, RelayNode]
) -> None:
    """The branch already uses a relay A of its own (first in its list, admits it).
    The head office's code names relay B. `pair join` appends B to the branch's
    relays and leaves the join there (first=B), and the head office answers at B;
    but the branch's `sync` (and its running agent) exchange only with the first
    relay that admits them, A, so the answer waiting at B is never collected: the
    join never completes (RelayJoin.relay is recorded but never used to route)."""
    mine, theirs = two_relays
    head, branch, code = _sites_with_a_relay_each(tmp_path, mine, theirs)
    joined = run(branch, "pair", "join", code, "--name", "Head office")
    assert joined.returncode == 0 and "left at relay" in joined.stdout, (
        joined.stdout + joined.stderr
    )
    cli(head, "sync", "--timeout", "20")
    assert "you asked branch" in cli(head, "pair", "pending")  # its proposal, left at B
    run(branch, "sync", "--timeout", "20")
    run(branch, "sync", "--timeout", "20")
    pending = cli(branch, "pair", "pending").strip()
    assert pending == "nothing pending", pending


@pytest.mark.process
def test_the_running_agents_link_collects_the_answer_at_the_codes_relay(
    tmp_path: Path, two_relays: tuple[RelayNode, RelayNode]
) -> None:
    """The same as above for the running agent: its relay link keeps a session with
    its own relay A, and its exchange visits the code's relay B too, where the answer
    waits (a task beside the session); the head office's answer is accepted and the
    acceptance deposited at B."""
    mine, theirs = two_relays
    head, branch, code = _sites_with_a_relay_each(tmp_path, mine, theirs)
    assert run(branch, "pair", "join", code, "--name", "Head office").returncode == 0
    cli(head, "sync", "--timeout", "20")  # the proposal waits at B

    async def agent_link() -> bool:
        """The agent's relay link, until its acceptance is at relay B."""
        db = p2psync.open(branch)
        inviter = db.store.relay_joins()[0].inviter
        at_b = device_id(device_key(theirs.device_id))

        def accepted_at_b() -> bool:
            return any(
                row.place == at_b and row.cls == EnvelopeClass.DATA.value
                for row in Mailer(db).ledger(inviter)
                if row.state is State.AT_RELAY
            )

        try:
            link = RelayLink(db, ChangeFeed(), set)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.run)
                with trio.move_on_after(30):
                    while not accepted_at_b():
                        await trio.sleep(0.2)
                assert link.relay == device_key(mine.device_id)  # its session: relay A
                nursery.cancel_scope.cancel()
            return accepted_at_b()
        finally:
            db.close()

    assert trio.run(agent_link)
    assert cli(branch, "pair", "pending").strip() == "nothing pending"
    cli(head, "sync", "--timeout", "20")  # collects the acceptance at B
    assert "you asked" not in cli(head, "pair", "pending")
