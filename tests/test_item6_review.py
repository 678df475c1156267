"""Review of issue 13 item 6 (3eedebf, c509787: the Stuck message) and of the
strangers review (ec8c674). Each test fails at ec8c674 and says what should
happen instead; none fixes anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

import p2psync
from p2psync import pairing
from p2psync.clock import now_ms
from p2psync.core import messages
from p2psync.core import rules as core_rules
from p2psync.core.events import BatchReceived, Refusal, StuckOnRefused, SyncedWithPeer
from p2psync.core.flow import Flow
from p2psync.core.identity import Identity
from p2psync.core.messages import Head
from p2psync.core.rules import Permissions, RuleState, Terms
from p2psync.core.session import SyncSession
from p2psync.errors import FutureTimestampError
from p2psync.store import rules as store_rules
from tests.test_pairing import key

pytestmark = pytest.mark.pure

MakeDb = Callable[[str], p2psync.Database]
HOUR = 3_600_000
AUTHOR = os.urandom(32)
#: the largest terms a proposal may carry: ~8.5 KiB signed
BIG = Terms.make([f"{i:02d}" + "x" * 126 for i in range(core_rules.MAX_PATTERNS)])


# ---------------------------------------------------------------- item 6: Stuck


def head(seq: int) -> Head:
    return Head(seq, seq.to_bytes(32, "big"))


def started(local: dict[bytes, Head]) -> SyncSession:
    machine = SyncSession(0.0)
    machine.begin(local)
    return machine


def deliver(source: SyncSession, target: SyncSession) -> list[object]:
    events: list[object] = []
    for message in source.take_outbox(0.0):
        events.extend(target.receive(messages.decode(messages.encode(message)), 0.0))
    return events


def refuse(a: SyncSession, b: SyncSession, seq: int) -> list[object]:
    """a sends its entry ``seq``; b refuses it (not a's fault); the two exchange
    Ack, Caught and Stuck. The events a saw."""
    a.send_batch([b"e%d" % seq], [(AUTHOR, seq, head(seq).head)])
    batch = next(e for e in deliver(a, b) if isinstance(e, BatchReceived))
    refused = Refusal(AUTHOR, FutureTimestampError("ahead"), f"entry {seq}: its clock is far ahead")
    b.ingested(batch.batch, [(AUTHOR, seq, head(seq).head)], None, [refused])
    seen = deliver(b, a)
    deliver(a, b)
    return seen + deliver(b, a)


def test_a_peer_stuck_is_superseded_by_its_next_caught() -> None:
    """Item 6 asks that both sides say 'cannot get in step' while it holds. a keeps
    b's Stuck (session._peer_stuck) until a itself reaches an in-sync verdict, and
    stuck_reason returns it even while a is not quiet. So when b gets the refused
    entry another way and says Caught for its new heads, but a is still streaming
    (here: one more entry, unacknowledged), a goes on saying 'the peer refused what
    we sent' for as long as it keeps writing: `peers` shows a problem b no longer
    has, and `p2psync sync b` through a's agent (control._wait_live: stuck_reason
    is not None) answers 'NOT in sync' at once instead of waiting for the entry in
    flight. (The same hole lets a hostile peer leave a Stuck that never clears
    while a says in sync: Caught(bogus) -> Stuck -> Caught(right digest) finds
    holdings.verdict() cached for these heads, so _synced_event never clears it.)
    Should: a Caught from the peer for new heads supersedes its earlier Stuck (an
    honest peer still stuck sends Stuck again after it: its verdict state changed),
    or stuck_reason ignores _peer_stuck once the peer's Caught covers what we
    know it holds."""
    a, b = started({AUTHOR: head(3)}), started({AUTHOR: head(2)})
    deliver(a, b)
    deliver(b, a)
    assert a.wants() == {AUTHOR: 2}
    a.send_batch([b"e3"], [(AUTHOR, 3, head(3).head)])
    batch = next(e for e in deliver(a, b) if isinstance(e, BatchReceived))
    b.ingested(batch.batch, [(AUTHOR, 3, head(3).head)], {AUTHOR: head(3)})
    for _ in range(3):
        deliver(b, a)
        deliver(a, b)
    assert a.synced and b.synced
    a.local_changed({AUTHOR: head(4)})
    refuse(a, b, 4)
    assert a.stuck_reason is not None and "the peer refused what we sent" in a.stuck_reason
    # b gets entry 4 from elsewhere: it is in step with all a ever sent it
    b.local_changed({AUTHOR: head(4)})
    assert any(isinstance(e, SyncedWithPeer) for e in b.poll_synced())
    assert b.stuck_reason is None
    # a writes on: entry 5 leaves before b's Caught for 4 arrives
    a.local_changed({AUTHOR: head(5)})
    a.send_batch([b"e5"], [(AUTHOR, 5, head(5).head)])
    deliver(b, a)  # b's Caught for heads that include entry 4
    assert a.stuck_reason is None, a.stuck_reason


def test_a_peer_stuck_after_many_honest_episodes_is_still_told() -> None:
    """c509787 caps the StuckOnRefused events a peer's Stuck yields at 16 *per
    session* (_peer_stuck_told is never reset). A live session lasts days: after
    16 honest episodes (b refuses an entry from a, later gets it another way, the
    two are in sync again), the 17th is no longer logged, the agent's on_stuck
    callback (agent.py: PeerNote 'cannot get in step', kept for `peers` after the
    agent stops) never runs, and SessionStats.stuck stays None, so after_session
    records the close reason instead. Should: the count starts again when the two
    are in sync (where _peer_stuck is cleared); only reasons changing without an
    in-sync in between count against the cap."""
    a, b = started({AUTHOR: head(1)}), started({AUTHOR: head(1)})
    for _ in range(3):
        deliver(a, b)
        deliver(b, a)
    assert a.synced and b.synced
    told = []
    for seq in range(2, 20):
        a.local_changed({AUTHOR: head(seq)})
        told.append(sum(isinstance(e, StuckOnRefused) for e in refuse(a, b, seq)))
        b.local_changed({AUTHOR: head(seq)})  # the entry came another way
        b.poll_synced()
        for _ in range(2):
            deliver(b, a)
            deliver(a, b)
        assert a.synced and b.synced and a.stuck_reason is None
    assert told == [1] * len(told), told


def test_stuck_from_a_peer_we_never_send_to_is_not_taken_as_a_refusal() -> None:
    """Stuck means "I refused what you sent me" (docs/protocol.md), so it only
    makes sense to a side whose flow sends to the peer. _on_stuck takes it in any
    OPEN session: under a one-way rule where we only receive, a peer (buggy or
    hostile) makes our `peers`/`status` say 'the peer refused what we sent' and
    `p2psync sync` through our agent answer 'NOT in sync' at once, about entries
    we never send it. Entries under a rule that lets the peer send none are a
    protocol error ("entries sent, but no rule lets you send any"); Should: a
    Stuck when our flow sends nothing is one too (or is ignored)."""
    receiver = SyncSession(0.0)
    receiver.set_flow(Flow(Permissions(receive=(Terms(),))))
    sender = SyncSession(0.0)
    sender.set_flow(Flow(Permissions(send=(Terms(),))))
    receiver.begin({})
    sender.begin({})
    deliver(sender, receiver)
    deliver(receiver, sender)
    assert not receiver.flow.sending
    receiver.receive(messages.Stuck("entry 9: its clock is far ahead"), 0.0)
    assert "the peer refused what we sent" not in (receiver.stuck_reason or "")


# ---------------------------------------------------------------- strangers


def test_a_stranger_that_withdraws_its_request_escapes_the_strangers_budget(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ec8c674 counts, in the 64 slots and in the 4 MiB, only strangers with a
    request *awaiting an answer* (_Strangers._waiting: a PROPOSE signed by the
    peer with no non-propose object naming it). A REVOKE signed by the proposer
    is such an object and add_objects stores it (only accept/reject must come
    from the acceptor). So a throwaway key sends [proposal, its revocation] in
    one Rules message: both are stored (up to 32 objects / 64 KiB per key) and
    the key counts against neither cap. With N keys the strangers' pile grows
    N x 64 KiB for 7 days (plus a peers row each), with no user action at all:
    the disk-filling item 5 closed is open again (a68ee1d counted every pair
    with no acceptance). It also makes the _waiting query (a SEARCH over every
    PROPOSE row, revoked ones included, under the write lock) grow with the
    pile, per request. Should: what strangers hold that *we* never answered
    (requests open or withdrawn by the stranger; only the user's rejection
    frees them) counts against STRANGERS_BYTES (and a slot), so the budget is
    reached here."""
    a = make_db("a")
    t0 = now_ms()
    one = len(core_rules.propose(Identity(os.urandom(32)), key(a), BIG, os.urandom(16), t0))
    monkeypatch.setattr(store_rules, "MAX_STRANGERS", 2)
    monkeypatch.setattr(store_rules, "STRANGERS_BYTES", 4 * one)
    for i in range(30):
        stranger = Identity(os.urandom(32))
        proposal = core_rules.propose(stranger, key(a), BIG, os.urandom(16), t0 + i)
        withdrawn = core_rules.revoke(stranger, core_rules.rule_id(proposal), t0 + i)
        try:
            pairing.receive(a, stranger.public_key, [proposal, withdrawn])
        except p2psync.P2PSyncError:
            break
    with a.store._reader.reading() as conn:
        (held,) = conn.execute(
            "SELECT coalesce(sum(size), 0) FROM rule_objects WHERE signer = peer"
        ).fetchone()
    assert held <= store_rules.STRANGERS_BYTES + store_rules.MAX_BYTES_PER_STRANGER, (
        f"{held} bytes from strangers stored against a budget of {store_rules.STRANGERS_BYTES}"
    )


def test_a_request_made_after_the_ttl_is_not_swept_with_the_old_pair(make_db: MakeDb) -> None:
    """expire_requests forgets a stranger's pair once min(received) is past the
    TTL, and add_objects no longer sweeps inline (only hourly in the agent, or
    at the start of `sync`/`pair pending`). A stranger whose first request is
    7 days old and that asks again before the next sweep adds the new request to
    the old pair; the next sweep deletes it with the old one, less than an hour
    after it came (and without an agent, `pair pending` sweeps it away just
    before it would have listed it). docs/protocol.md: "A stranger that asks
    again later is a new request." Should: a request arriving after its pair's
    TTL starts a new pair (add_objects drops that one peer's expired objects
    first, by index), so it lives its own 7 days."""
    a, s = make_db("a"), make_db("s")
    t0 = now_ms()
    first = core_rules.propose(s.identity, key(a), Terms(), os.urandom(16), t0)
    a.store.add_rule_objects(key(a), [first], t0, peer_only=key(s))
    later = t0 + store_rules.REQUEST_TTL_MS + HOUR // 2  # the sweep has not run yet
    withdrawn = core_rules.revoke(s.identity, core_rules.rule_id(first), later)
    again = core_rules.propose(s.identity, key(a), Terms(), os.urandom(16), later)
    a.store.add_rule_objects(key(a), [withdrawn, again], later, peer_only=key(s))
    a.store.expire_requests(key(a), later + HOUR // 2)  # the hourly sweep
    waiting = [r.id for r in a.store.rules(key(s)) if r.state is RuleState.PROPOSED]
    assert waiting == [core_rules.rule_id(again)], "the new request is kept for its own week"


def test_entries_held_back_as_damaged_are_stuck_here_without_a_stuck_message() -> None:
    """A side holding entries it cannot send (marked damaged: ``held_back``) that
    the peer lacks is not in sync, and says why; but it sends no ``Stuck`` (that
    means "I refused what you sent"): under a one-way rule the peer, which never
    sends to us, would close the session on it as a protocol error."""
    sender = SyncSession(0.0)
    sender.set_flow(Flow(Permissions(send=(Terms(),))))
    receiver = SyncSession(0.0)
    receiver.set_flow(Flow(Permissions(receive=(Terms(),))))
    sender.begin({AUTHOR: head(1)}, (), {AUTHOR: (2, 5)})
    receiver.begin({AUTHOR: head(1)})  # it holds entry 1: it lacks 2-5
    sent: list[str] = []
    for _ in range(4):
        for message in sender.take_outbox(0.0):
            sent.append(type(message).__name__)
            receiver.receive(messages.decode(messages.encode(message)), 0.0)
        deliver(receiver, sender)
    assert "Caught" in sent and "Stuck" not in sent, sent
    assert not sender.synced and not sender.closed and not receiver.closed
    assert sender.stuck_reason is not None and "entry 2 of" in sender.stuck_reason
