"""Merge semantics: who wins, what is a conflict, what resolves one."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

import p2psync
from p2psync.clock import now_ms
from p2psync.core import hlc
from p2psync.core.merge import Version, merge
from tests.helpers import Author

pytestmark = pytest.mark.pure

MakeDb = Callable[[str], p2psync.Database]


def version(hlc: int, author: bytes = b"a" * 32) -> Version:
    return Version(os.urandom(32), hlc, author, b"payload", False)


def test_merge_replaces_bases_and_orders_by_rank() -> None:
    v1 = version(1)
    v2 = version(2)
    assert merge([v1], v2, {v1.entry}) == [v2]
    concurrent = version(3, b"b" * 32)
    heads = merge([v2], concurrent, set())
    assert heads == [concurrent, v2]
    same_clock = Version(os.urandom(32), 3, b"c" * 32, b"p", False)
    assert merge(heads, same_clock, set())[0] == same_clock  # author breaks the tie
    resolved = version(9)
    assert merge(heads, resolved, {concurrent.entry, v2.entry}) == [resolved]


def exchange(*dbs: p2psync.Database) -> None:
    for target in dbs:
        for source in dbs:
            if source is not target:
                result = target.ingest(list(source.export()))
                assert not result.rejected and not result.held


def test_sequential_edits_across_sites_are_not_conflicts(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    a.put("ledgers", "ACME", {"balance": 1})
    exchange(a, b)
    b.put("ledgers", "ACME", {"balance": 2})
    exchange(a, b)
    a.delete("ledgers", "ACME")
    exchange(a, b)
    b.put("ledgers", "ACME", {"balance": 3})
    exchange(a, b)
    for db in (a, b):
        assert db.get("ledgers", "ACME") == {"balance": 3}
        assert db.conflicts() == []


def test_concurrent_edits_conflict_and_resolve(make_db: MakeDb) -> None:
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    a.put("stock", "bolts", {"qty": 10})
    exchange(a, b, c)
    a.put("stock", "bolts", {"qty": 9})
    b.put("stock", "bolts", {"qty": 7})
    exchange(a, b, c)
    lists = [db.conflicts() for db in (a, b, c)]
    assert lists[0] == lists[1] == lists[2] and len(lists[0]) == 1
    conflict = lists[0][0]
    values = {conflict.winner.value["qty"], conflict.losers[0].value["qty"]}  # type: ignore[index]
    assert values == {9, 7}
    assert a.get("stock", "bolts") == conflict.winner.value
    # an ordinary write supersedes only the applied version: the conflict stays listed
    c.put("stock", "bolts", {"qty": 8})
    exchange(a, b, c)
    assert len(a.conflicts()) == 1 and a.get("stock", "bolts") == {"qty": 8}
    b.resolve("stock", "bolts", {"qty": 16})
    exchange(a, b, c)
    for db in (a, b, c):
        assert db.conflicts() == []
        assert db.get("stock", "bolts") == {"qty": 16}


def test_concurrent_creation_is_a_conflict(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    a.put("vouchers", "V-1", {"amount": 1})
    b.put("vouchers", "V-1", {"amount": 2})
    exchange(a, b)
    assert len(a.conflicts()) == 1 and a.conflicts() == b.conflicts()


def test_delete_against_edit_is_a_conflict(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    a.put("vouchers", "V-1", {"amount": 1})
    exchange(a, b)
    a.delete("vouchers", "V-1")
    b.put("vouchers", "V-1", {"amount": 5})
    exchange(a, b)
    [conflict] = a.conflicts()
    assert {conflict.winner.deleted, conflict.losers[0].deleted} == {True, False}
    assert a.get("vouchers", "V-1") == b.get("vouchers", "V-1")


def test_base_naming_an_unrelated_entry_supersedes_nothing(db: p2psync.Database) -> None:
    author = Author()
    author.clock = hlc.from_wall(now_ms())
    unrelated = author.put("c", "other", 1)
    first = author.put("c", "k", 1)
    sneaky = author.put("c", "k", 2, bases=[unrelated.id])
    result = db.ingest([unrelated.wire(), first.wire(), sneaky.wire()])
    assert len(result.accepted) == 3
    assert len(db.conflicts()) == 1  # first and sneaky are both heads
