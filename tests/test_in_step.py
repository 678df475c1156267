"""Sessions that cannot get in step (entries refused for reasons that are not the
sender's fault) end an on-demand sync with the reason as soon as all else has
flowed, whichever side syncs on demand, instead of at its timeout."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

import p2psync
from p2psync import pairing
from p2psync.core.rules import Direction, Terms
from p2psync.store import writer as writer_mod
from tests.test_pairing import filtered_upstream, key, session

pytestmark = pytest.mark.trio_memory

MakeDb = Callable[[str], p2psync.Database]


def past_the_author_limit(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> tuple[p2psync.Database, p2psync.Database]:
    """b may hold 3 authors' logs and holds 2 (its own and d's); a, paired to send
    to b, holds its own log and c's: b can take only one of them."""
    a, b, c, d = make_db("a"), make_db("b"), make_db("c"), make_db("d")
    c.put("vouchers", "V-9", 9)
    a.ingest(list(c.export()))
    a.put("vouchers", "V-1", 1)
    d.put("vouchers", "V-4", 4)
    b.ingest(list(d.export()))
    b.put("vouchers", "V-2", 2)
    monkeypatch.setattr(writer_mod, "MAX_AUTHORS", 3)
    pairing.propose(a, key(b), Terms.make(["*"], Direction.SEND))  # a sends, b receives
    pairing.propose(b, key(a), Terms())
    return a, b


async def test_refused_entry_that_another_author_builds_on(make_db: MakeDb) -> None:
    """As in test_pairing's filtered-upstream test, but b then updates c's voucher:
    b's entry has c's refused one as a base, so a holds it; a still learns why."""
    a, b = await filtered_upstream(make_db)
    b.put("vouchers", "V-9", 10)  # b builds on c's entry
    with trio.fail_after(10):
        stats_a, _ = await session(a, b)  # a: on demand; b: live agent
    assert not stats_a.synced and "payroll" in stats_a.reason
    assert a.get("vouchers", "V-9") is None and b.get("vouchers", "V-9") == 10


async def test_on_demand_side_that_pushes_to_a_refusing_agent(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The on-demand side (a) sends and the live agent (b) refuses (its author
    limit): b tells a why in its Bye."""
    a, b = past_the_author_limit(make_db, monkeypatch)
    with trio.fail_after(10):
        stats_a, stats_b = await session(a, b)  # a dials on demand, b serves live
    assert not stats_a.synced and "authors" in stats_a.reason
    assert not stats_b.error and len(b.authors()) == 3


async def test_an_on_demand_sync_past_the_author_limit_stops_with_the_reason(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b syncs on demand and refuses (its author limit): it keeps what it may hold
    and its sync ends as soon as all else has flowed, saying why."""
    a, b = past_the_author_limit(make_db, monkeypatch)
    with trio.fail_after(5):
        stats_b, stats_a = await session(b, a)
    assert not stats_b.synced and "authors" in stats_b.reason
    assert not stats_a.error  # not a's fault
    assert [b.get("vouchers", k) for k in ("V-1", "V-9")].count(None) == 1
    assert len(b.authors()) == 3
    assert b.verify().ok
