"""Second review of the mend commit 03c525b (``verify --repair`` mends from this
site's own rows; ``_confirmed`` walks through entries damaged in their payloads;
a site holding entries it cannot send is not "in sync"): a hostile peer, a local
file change, and what a newcomer is told. Each test fails on 03c525b and says
what should happen instead; none fixes anything."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import pytest
import trio
from click.testing import CliRunner

import p2psync
from p2psync.cli.main import cli
from p2psync.clock import now_ms
from p2psync.core import messages
from p2psync.core.flow import Flow
from p2psync.core.rules import Permissions, Terms
from p2psync.core.session import SyncSession
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.sync import run_session
from tests.test_item6_review import AUTHOR, deliver, head
from tests.test_mend import damage, damage_entry, verify_cli
from tests.test_pairing import key
from tests.test_sync import connect, sync_pair
from tests.test_widen import forked

MakeDb = Callable[[str], p2psync.Database]

#: a one-way rule: this side sends, the peer only receives
SEND_ONLY = Flow(Permissions(send=(Terms(),)))
RECEIVE_ONLY = Flow(Permissions(receive=(Terms(),)))


def entry_ids(db: p2psync.Database, author: bytes) -> list[bytes]:
    """The stored IDs of ``author``'s entries, in seq order."""
    with sqlite3.connect(db.home.store_path) as conn:
        rows = conn.execute(
            "SELECT e.id FROM entries e JOIN authors a ON a.idx = e.author "
            "WHERE a.key = ? ORDER BY e.seq",
            (author,),
        ).fetchall()
    return [r[0] for r in rows]


def frozen(db: p2psync.Database, author: bytes) -> bool:
    return any(state.frozen for state in db.authors() if state.author == author)


# ------------------------------------------------------------ _confirmed


@pytest.mark.trio_memory
async def test_an_entry_whose_successor_does_not_decode_is_not_confirmed_by_the_chain(
    make_db: MakeDb,
) -> None:
    """``_confirmed`` calls ``stored_prev`` (which raises ``DecodeError`` on a
    signed part that does not decode) inside the ``try`` meant for payload damage,
    so a successor whose *signed part* is unreadable counts as "damaged only in its
    payloads" and the walk goes on past it: nothing then checks that anything names
    the damaged entry's stored ID. With b's stored ID of a's entry 2 wrong (a bit
    flipped in the ``id`` column) and entry 3's signed part unreadable, `verify
    --repair` marks entry 2 *under the wrong ID* as mendable; the next sync sends
    the sound entry 2, whose ID differs from the stored one: b records a fork and
    freezes a, refusing everything a writes from then on (and frozen, even the
    damage cannot be mended). The chain confirms nothing through an entry whose
    signed part does not decode: entry 2 must not be reported mendable (verify
    names the damage; the operator restores a backup), and a must never be frozen
    by its own sound entries."""
    a, b = make_db("a"), make_db("b")
    for i in range(4):
        a.put("stock", f"s{i}", "x" * 40)
    b.store.ingest(list(a.export(key(a))), now_ms())
    ids = entry_ids(b, key(a))
    damage_entry(b, ids[1], "id", 5)  # entry 2's stored ID is wrong
    damage_entry(b, ids[2], "signed", 0)  # entry 3's signed part: 0x82 -> 0x83
    report = b.verify()
    wrongly = [seq for author, seq, _ in report.mendable if author == key(a)]
    verify_cli(b, "--repair")
    with trio.fail_after(10):
        await sync_pair(b, a)
    assert not frozen(b, key(a)), (
        f"verify reported a's entries {wrongly} as mendable under an ID no entry names; "
        "the sync that followed froze a as a forker"
    )


# ------------------------------------------------------------ a frozen author


@pytest.mark.pure
def test_repair_mends_a_frozen_authors_entry_from_this_sites_records(
    make_db: MakeDb,
) -> None:
    """b holds x's entry 1 (its version is the record ``misc/m``) and then saw x
    fork: x is frozen. A bit flips in entry 1's payload. `verify --repair` rebuilds
    a sound copy from the record, but ingests it like a peer's, and ``ingest``
    refuses everything of a frozen author (``FrozenAuthorError``) before
    ``Writer.fill`` sees it: nothing is mended and entry 1 is marked damaged. No
    copy can ever mend it then (every copy of a frozen author is refused), so the
    site is stuck for good with each peer that lacks x's entry, with a reason that
    says "until a sound copy mends it". A copy that changes no record and only
    mends stored bytes the author signed should mend a frozen author's entry too."""
    b = make_db("b")
    a1, b1, _ = forked()
    b.store.ingest([a1.wire()], now_ms())
    b.store.ingest([b1.wire()], now_ms())  # the fork: x is frozen
    assert frozen(b, a1.author)
    with sqlite3.connect(b.home.store_path) as conn:
        (blob,) = conn.execute("SELECT payloads FROM entries").fetchone()
    damage_entry(b, a1.id, "payloads", (len(blob) - 4) * 8)
    assert b.verify().mendable, "the chain confirms entry 1 (the author's head)"
    _, text = verify_cli(b, "--repair")
    assert "1 damaged entry mended from this site's own records" in text, text
    assert not b.verify().problems


# ------------------------------------------------------------ a damaged row


@pytest.mark.pure
def test_a_record_row_of_another_type_does_not_crash_repair(make_db: MakeDb) -> None:
    """A single flipped bit in an SQLite record header turns a BLOB cell into TEXT
    (serial types 2n and 2n+1). b's entry 1 has a damaged payload, and the
    ``records`` row holding its version reads back as text: ``copy_from_records``
    hashes every row it finds (``payload_digest(str)``) and `verify --repair`
    dies with a TypeError traceback: nothing is mended and nothing is marked, so
    the damaged entry goes on being served (a peer takes it for an attack). A row
    that is not bytes holds no copy: skip it, and mark the entry for a peer."""
    a, b = make_db("a"), make_db("b")
    a.put("stock", "s1", "x" * 40)
    b.store.ingest(list(a.export(key(a))), now_ms())
    (entry,) = entry_ids(b, key(a))
    with sqlite3.connect(b.home.store_path) as conn:
        (blob,) = conn.execute("SELECT payloads FROM entries").fetchone()
        conn.execute("UPDATE records SET payload = CAST('damaged' AS TEXT)")
    damage_entry(b, entry, "payloads", (len(blob) - 4) * 8)
    result = CliRunner().invoke(cli, ["verify", "--repair", "--home", str(b.path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"verify --repair crashed: {result.exception!r}"
    )
    assert "marked" in result.output, result.output


# ------------------------------------------------------------ held back


@pytest.mark.trio_memory
async def test_own_writes_during_a_session_held_back_behind_damage_are_not_in_sync(
    make_db: MakeDb,
) -> None:
    """b sends to c under a one-way rule; c already holds b's entries 1-4. b's own
    entry 2 is damaged, with no copy in b's records (superseded), and marked by
    `verify --repair`: b's heads stop at 1. A live session opens: ``held_back`` is
    read once (``opening``: entry 2 on, up to seq 4), c holds 4, so the pair is in
    sync (right). b then writes entry 5: it is held back too (its heads still stop
    at 1), c lacks it and cannot get it, yet the session compares c's heads with
    the stale ``(2, 4)`` and stays "in sync": exactly the write after a damaged own
    entry that protocol.md says "cannot pass for delivered". ``held_back`` must
    follow the store (or the session be judged against the seq held now)."""
    b, c = make_db("b"), make_db("c")
    for i in range(3):
        b.put("stock", f"s{i}", "x" * 50)
    b.put("stock", "s1", "again")  # entry 2's version is gone from b's records
    with trio.fail_after(10):
        await sync_pair(c, b)
    assert c.store.heads()[key(b)].seq == 4
    damage(b, 2, "payloads")
    assert verify_cli(b, "--repair")[0] == 1
    sb, sc = await connect(b, c)
    feed_b = ChangeFeed()
    synced: list[bool] = []
    machines: dict[str, SyncSession] = {}

    def start_b(machine: SyncSession, _: object) -> None:
        machine.set_flow(SEND_ONLY)
        machines["b"] = machine

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_session(
                sb,
                TrioStore(b.store),
                feed_b,
                live=True,
                on_start=start_b,
                on_synced=lambda _: synced.append(True),
            )
        )
        nursery.start_soon(
            lambda: run_session(
                sc,
                TrioStore(c.store),
                ChangeFeed(),
                live=True,
                on_start=lambda m, _: m.set_flow(RECEIVE_ONLY),
            )
        )
        with trio.fail_after(10):
            while not synced:
                await trio.sleep(0.02)
        b.put("stock", "later", "written while the session runs")
        feed_b.bump()
        await trio.sleep(0.5)
        machine = machines["b"]
        lacks = c.get("stock", "later") is None
        in_sync = machine.synced
        nursery.cancel_scope.cancel()
    assert not (lacks and in_sync), (
        "c lacks b's entry 5, which b cannot send (held back behind its damaged entry 2), "
        "yet b's live session says in sync"
    )


# ------------------------------------------------------------ what is said


@pytest.mark.pure
def test_the_stuck_reason_does_not_say_the_peer_lacks_an_entry_it_holds() -> None:
    """The sender holds AUTHOR's entries up to 5, entry 2 marked damaged; the
    receiver (one-way: it never sends) holds 1-3 already and lacks 4-5. The sender
    is rightly stuck, but its reason says "entry 2 ... is damaged in the sending
    site's store and the receiving site lacks it ... until a sound copy mends it":
    the receiving site holds entry 2, sound: what it lacks is entry 4 on, and the
    copy that would mend entry 2 is the receiver's own, which this rule never lets
    come back. A clerk at either site is sent looking for the wrong entry."""
    sender = SyncSession(0.0)
    sender.set_flow(SEND_ONLY)
    receiver = SyncSession(0.0)
    receiver.set_flow(RECEIVE_ONLY)
    sender.begin({AUTHOR: head(1)}, (), {AUTHOR: (2, 5)})
    receiver.begin({AUTHOR: head(3)})
    for _ in range(4):
        for message in sender.take_outbox(0.0):
            receiver.receive(messages.decode(messages.encode(message)), 0.0)
        deliver(receiver, sender)
    reason = sender.stuck_reason
    assert reason is not None and not sender.synced
    assert "receiving site lacks it" not in reason, reason
