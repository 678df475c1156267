"""Ingesting entries from elsewhere: good ones apply, each bad one gets its typed
error and changes nothing else."""

from __future__ import annotations

import hashlib
import sqlite3
from typing import Any

import cbor2
import pytest

import p2psync
from p2psync.clock import now_ms
from p2psync.core import canonical, hlc
from p2psync.core.entry import SIGN_PREFIX, Entry, entry_id
from p2psync.core.flow import Flow
from p2psync.core.rules import Permissions, Terms
from p2psync.errors import (
    ChainError,
    DecodeError,
    ForkError,
    FrozenAuthorError,
    FutureTimestampError,
    HeldLimitError,
    NestingError,
    NonCanonicalError,
    OversizeError,
    SignatureError,
    WithheldError,
)
from p2psync.store import ingest as ingest_mod
from tests.helpers import Author

pytestmark = pytest.mark.pure


def snapshot(db: p2psync.Database) -> dict[str, Any]:
    """Everything the store holds, for before/after comparisons."""
    conn = sqlite3.connect(db.home.store_path)
    try:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("authors", "entries", "records", "losers", "held", "forks")
        }
    finally:
        conn.close()


def live_author() -> Author:
    author = Author()
    author.clock = hlc.from_wall(now_ms())
    return author


def wires(entries: list[Entry]) -> list[bytes]:
    return [entry.wire() for entry in entries]


def resign(author: Author, entry: Entry, **changes: Any) -> bytes:
    """Re-encode ``entry`` with body fields changed, signed properly by ``author``."""
    fields = cbor2.loads(entry.body)
    for key, value in changes.items():
        fields[{"seq": 2, "prev": 3, "hlc": 4}[key]] = value
    body = canonical.encode(fields)
    signature = author.identity.sign(SIGN_PREFIX + body)
    return canonical.encode([canonical.encode([body, signature]), list(entry.payloads)])


def test_valid_chain_applies_with_one_signature_check(db: p2psync.Database) -> None:
    author = live_author()
    chain = author.chain(500)
    result = db.ingest(wires(chain))
    assert not result.rejected and not result.held
    assert len(result.accepted) == 500
    assert result.signatures_checked == 1
    assert db.get("c", "k499") == {"i": 499}
    again = db.ingest(wires(chain))
    assert again.duplicates == 500 and not again.accepted and not again.rejected


def test_forged_last_signature(db: p2psync.Database) -> None:
    author = live_author()
    chain = author.chain(5)
    last = chain[-1]
    forged_signed = canonical.encode([last.body, bytes(64)])
    forged = canonical.encode([forged_signed, list(last.payloads)])
    result = db.ingest([*wires(chain[:-1]), forged])
    assert len(result.accepted) == 4
    assert [type(r.error) for r in result.rejected] == [SignatureError]
    assert db.get("c", "k4") is None and db.get("c", "k3") == {"i": 3}


def test_forged_middle_entry_rejected_and_rest_held(db: p2psync.Database) -> None:
    author = live_author()
    chain = author.chain(3)
    fields = cbor2.loads(chain[1].body)
    fields[4] += 5  # change the clock without the key
    body = canonical.encode(fields)
    forged = canonical.encode(
        [canonical.encode([body, chain[1].signature]), list(chain[1].payloads)]
    )
    other = live_author()
    before_other = db.ingest(wires(other.chain(2)))
    assert len(before_other.accepted) == 2
    result = db.ingest([chain[0].wire(), forged, chain[2].wire()])
    assert [type(r.error) for r in result.rejected] == [SignatureError]
    assert result.accepted == [chain[0].id]
    assert result.held == [chain[2].id]
    released = db.ingest([chain[1].wire()])
    assert released.accepted == [chain[1].id, chain[2].id]
    assert db.verify().ok


def test_reordered_delivery_is_fine(db: p2psync.Database) -> None:
    author = live_author()
    chain = author.chain(50)
    result = db.ingest(wires(chain[::-1]))
    assert len(result.accepted) == 50 and not result.held and not result.rejected


def test_relabelled_chain_is_refused(db: p2psync.Database) -> None:
    author = live_author()
    chain = author.chain(3)
    # swap the seq numbers of entries 2 and 3 without the author's key
    swapped = []
    for entry, seq in ((chain[1], 3), (chain[2], 2)):
        fields = cbor2.loads(entry.body)
        fields[2] = seq
        body = canonical.encode(fields)
        swapped.append(
            canonical.encode([canonical.encode([body, entry.signature]), list(entry.payloads)])
        )
    before = snapshot(db)
    result = db.ingest(swapped)
    assert {type(r.error) for r in result.rejected} == {SignatureError}
    assert not result.accepted
    assert snapshot(db) == before


def test_clock_going_backwards_is_a_chain_error(db: p2psync.Database) -> None:
    author = live_author()
    first = author.put("c", "a", 1)
    second = author.put("c", "b", 2)
    backwards = resign(author, second, hlc=first.hlc - 1)
    result = db.ingest([first.wire(), backwards])
    assert [type(r.error) for r in result.rejected] == [ChainError]
    assert result.accepted == [first.id]


def test_missing_predecessor_is_held_then_applied(db: p2psync.Database) -> None:
    author = live_author()
    chain = author.chain(4)
    result = db.ingest([chain[0].wire(), chain[2].wire(), chain[3].wire()])
    assert result.accepted == [chain[0].id]
    assert sorted(result.held) == sorted([chain[2].id, chain[3].id])
    assert db.get("c", "k2") is None
    assert db.store.held_count() == 2
    result = db.ingest([chain[1].wire()])
    assert result.accepted == [chain[1].id, chain[2].id, chain[3].id]
    assert db.get("c", "k3") == {"i": 3}
    assert db.store.held_count() == 0


def test_missing_base_is_held_then_applied(db: p2psync.Database) -> None:
    a, b = live_author(), live_author()
    master = a.put("ledgers", "ACME", {"balance": 0})
    b.clock = max(b.clock, master.hlc)
    update = b.put("ledgers", "ACME", {"balance": 10}, bases=[master.id])
    result = db.ingest([update.wire()])
    assert result.held == [update.id]
    assert db.get("ledgers", "ACME") is None
    result = db.ingest([master.wire()])
    assert result.accepted == [master.id, update.id]
    assert db.get("ledgers", "ACME") == {"balance": 10}
    assert db.conflicts() == []


def test_fork_is_kept_as_proof_and_freezes_the_author(db: p2psync.Database) -> None:
    author = live_author()
    chain = author.chain(2)
    # the same key signs a different entry 2
    author.seq, author.prev = 1, chain[0].id
    other_two = author.put("c", "evil", 666)
    assert other_two.seq == 2 and other_two.id != chain[1].id
    db.ingest(wires(chain))
    bystander = live_author()
    before = snapshot(db)
    result = db.ingest([other_two.wire(), *wires(bystander.chain(2))])
    assert [type(r.error) for r in result.rejected] == [ForkError]
    assert len(result.accepted) == 2  # the bystander's entries are unaffected
    assert db.get("c", "evil") is None
    forks = db.store.forks()
    assert len(forks) == 1 and forks[0][0] == author.key and forks[0][1] == 2
    assert forks[0][2] == chain[1].wire() and forks[0][3] == other_two.wire()
    after = snapshot(db)
    assert after["records"] != before["records"]  # only the bystander's records were added
    assert len(after["entries"]) == len(before["entries"]) + 2
    # frozen: nothing more from that author
    author.seq, author.prev = 2, chain[1].id
    more = author.put("c", "later", 1)
    result = db.ingest([more.wire()])
    assert [type(r.error) for r in result.rejected] == [FrozenAuthorError]
    report = db.verify()
    assert not report.ok and "forked at seq 2" in report.forks[0] and not report.problems
    assert issubclass(ForkError, p2psync.IntegrityError)


def test_fork_via_link_mismatch(db: p2psync.Database) -> None:
    author = live_author()
    chain = author.chain(2)
    author.seq, author.prev = 1, chain[0].id
    alternative_two = author.put("c", "alt", 1)
    alternative_three = author.put("c", "alt3", 1)
    db.ingest(wires(chain))
    result = db.ingest([alternative_three.wire()])
    assert [type(r.error) for r in result.rejected] == [ForkError]
    assert alternative_two.id != chain[1].id


def test_non_canonical_entry_refused(db: p2psync.Database) -> None:
    entry = live_author().put("c", "k", 1)
    non_canonical = b"\x82\x59" + len(entry.signed).to_bytes(2, "big") + entry.signed
    before = snapshot(db)
    result = db.ingest([non_canonical + entry.payloads_blob])
    assert isinstance(result.rejected[0].error, NonCanonicalError)
    assert snapshot(db) == before


def test_oversize_entry_refused(db: p2psync.Database) -> None:
    before = snapshot(db)
    result = db.ingest([b"\x82" + b"\x00" * (2 << 20)])
    assert isinstance(result.rejected[0].error, OversizeError)
    assert snapshot(db) == before


def test_deeply_nested_value_refused(db: p2psync.Database) -> None:
    author = live_author()
    entry = author.put("c", "k", 1)
    deep = b"\x81" * 100 + b"\x00"
    payload = b"\x85\x50" + b"s" * 16 + b"\x00\x61k" + deep + b"\x80"  # [salt, 0, "k", deep, []]
    digest = hashlib.blake2b(payload, digest_size=32).digest()
    fields = cbor2.loads(entry.body)
    fields[5] = [["c", digest]]
    body = canonical.encode(fields)
    signature = author.identity.sign(SIGN_PREFIX + body)
    wire = canonical.encode([canonical.encode([body, signature]), [payload]])
    before = snapshot(db)
    result = db.ingest([wire])
    assert isinstance(result.rejected[0].error, NestingError)
    assert snapshot(db) == before


def test_future_timestamp_refused_with_reason(db: p2psync.Database) -> None:
    author = live_author()
    author.clock = hlc.from_wall(now_ms() + 3_600_000)
    entry = author.put("c", "k", 1)
    before = snapshot(db)
    result = db.ingest([entry.wire()])
    error = result.rejected[0].error
    assert isinstance(error, FutureTimestampError)
    assert "ahead" in str(error) and "clock" in str(error)
    assert snapshot(db) == before
    relaxed = db.ingest([entry.wire()], max_skew_ms=2 * 3_600_000)
    assert relaxed.accepted == [entry.id]


def test_garbage_refused(db: p2psync.Database) -> None:
    before = snapshot(db)
    result = db.ingest([b"", b"\x00", b"\x82\x40\x80", b"\xff" * 40, "text"])  # type: ignore[list-item]
    assert len(result.rejected) == 5
    assert all(isinstance(r.error, DecodeError) for r in result.rejected)
    assert snapshot(db) == before


def test_clock_moves_past_ingested_entries(db: p2psync.Database) -> None:
    author = live_author()
    author.clock = hlc.from_wall(now_ms() + 60_000)  # a minute ahead: allowed
    entry = author.put("c", "k", 1)
    db.ingest([entry.wire()])
    db.put("c", "k", 2)
    assert db.get("c", "k") == 2  # our later write wins although our wall clock is behind
    assert db.conflicts() == []


def test_withheld_payload_is_refused_and_cannot_displace_the_full_copy(
    db: p2psync.Database,
) -> None:
    author = live_author()
    entry = author.write(author.op("ledgers", "ACME", {"balance": 1200}))
    stripped = canonical.encode([entry.signed, [None]])
    before = snapshot(db)
    result = db.ingest([stripped])
    assert [type(r.error) for r in result.rejected] == [WithheldError]
    assert snapshot(db) == before
    full = db.ingest([entry.wire()])
    assert full.accepted == [entry.id]
    assert db.get("ledgers", "ACME") == {"balance": 1200}


def test_payloads_of_invisible_collections_may_be_withheld(db: p2psync.Database) -> None:
    author = live_author()
    entry = author.write(author.op("public", "a", 1), author.op("payroll", "b", {"pay": 9}))
    filtered = canonical.encode([entry.signed, [entry.payloads[0], None]])
    public_only = Flow(Permissions(receive=(Terms(("public",)),)))
    result = db.store.ingest([filtered], now_ms(), flow=public_only)
    assert result.accepted == [entry.id]
    assert db.get("public", "a") == 1 and db.get("payroll", "b") is None
    assert db.verify().ok


def test_body_with_boolean_keys_is_refused(db: p2psync.Database) -> None:
    """false/true equal 0/1 in Python; the body must use integer keys."""
    author = live_author()
    entry = author.put("c", "k", 1)
    assert entry.body[1:3] == b"\x00\x01" and entry.body[3] == 0x01
    body = b"\xa6\xf4\x01\xf5" + entry.body[4:]  # keys 0 and 1 as false and true
    signature = author.identity.sign(SIGN_PREFIX + body)
    wire = canonical.encode([canonical.encode([body, signature]), list(entry.payloads)])
    result = db.ingest([wire])
    assert [type(r.error) for r in result.rejected] == [DecodeError]


def test_held_entries_have_a_quota_per_author(
    db: p2psync.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_mod, "MAX_HELD_PER_AUTHOR", 5)
    flooder, honest = live_author(), live_author()
    flood = flooder.chain(20)
    result = db.ingest(wires(flood[1:]))  # entry 1 missing: all would wait
    assert len(result.held) == 5
    assert {type(r.error) for r in result.rejected} == {HeldLimitError}
    mine = honest.chain(3)
    result = db.ingest([mine[2].wire()])
    assert result.held == [mine[2].id]  # another author is not crowded out
    result = db.ingest(wires(mine[:2]))
    assert len(result.accepted) == 3


def test_held_entries_expire(db: p2psync.Database) -> None:
    author = live_author()
    chain = author.chain(3)
    week = 7 * 24 * 3600 * 1000
    db.store.ingest([chain[2].wire()], now_ms() - week - 1000, max_skew_ms=2 * week)
    assert db.store.held_count() == 1
    db.ingest([live_author().put("c", "other", 1).wire(), chain[1].wire()])
    assert db.store.held_count() == 1  # the week-old one is gone; entry 2 waits now


def test_vouched_entry_is_accepted_whatever_the_batching(db: p2psync.Database) -> None:
    """An entry whose own signature is bad but which its signed successor names by
    hash is accepted in one batch; it must be accepted in two batches too."""
    author = live_author()
    first = author.put("c", "a", 1)
    bad_first = canonical.encode([canonical.encode([first.body, bytes(64)]), list(first.payloads)])
    # the successor must name the badly signed form's ID
    author.seq, author.prev = 1, entry_id(canonical.encode([first.body, bytes(64)]))
    second = author.put("c", "b", 2)
    result = db.ingest([second.wire()])
    assert result.held == [second.id]
    result = db.ingest([bad_first])
    assert len(result.accepted) == 2 and not result.rejected
    assert db.get("c", "b") == 2


def test_a_far_ahead_clock_moves_ours_only_a_little(db: p2psync.Database) -> None:
    author = live_author()
    author.clock = hlc.from_wall(now_ms() + 9 * 60_000)  # allowed, but far ahead
    db.ingest([author.put("c", "k", 1).wire()])
    db.put("c", "mine", 1)
    mine = [e for e in db.log(db.identity.public_key)][-1]
    assert hlc.wall_ms(mine.hlc) <= now_ms() + hlc.MAX_ADOPT_AHEAD_MS


def test_a_forged_entry_counts_as_forged_whatever_else_is_wrong(db: p2psync.Database) -> None:
    """A missing payload or a clock far ahead is not the sender's fault, so they
    are decided only once the entry is proven authentic: a forged one must not
    pass for an honest refusal (which would keep a hostile sender connected)."""
    author = live_author()
    entry = author.write(author.op("ledgers", "ACME", {"balance": 1200}))
    forged_withheld = canonical.encode([canonical.encode([entry.body, bytes(64)]), [None]])
    ahead = live_author()
    ahead.clock = hlc.from_wall(now_ms() + 3_600_000)
    late = ahead.put("c", "k", 1)
    forged_ahead = canonical.encode(
        [canonical.encode([late.body, bytes(64)]), list(late.payloads)]
    )
    before = snapshot(db)
    result = db.ingest([forged_withheld, forged_ahead])
    assert [type(r.error) for r in result.rejected] == [SignatureError, SignatureError]
    assert snapshot(db) == before
    honest = db.ingest([canonical.encode([entry.signed, [None]]), late.wire()])
    assert {type(r.error) for r in honest.rejected} == {WithheldError, FutureTimestampError}


def test_a_forged_entry_of_a_frozen_author_counts_as_forged(db: p2psync.Database) -> None:
    author = live_author()
    chain = author.chain(2)
    author.seq, author.prev = 1, chain[0].id
    other_two = author.put("c", "evil", 666)
    db.ingest(wires(chain))
    db.ingest([other_two.wire()])  # a fork: the author is frozen
    author.seq, author.prev = 2, chain[1].id
    later = author.put("c", "later", 1)
    forged = canonical.encode([canonical.encode([later.body, bytes(64)]), list(later.payloads)])
    assert [type(r.error) for r in db.ingest([forged]).rejected] == [SignatureError]
    assert [type(r.error) for r in db.ingest([later.wire()]).rejected] == [FrozenAuthorError]


def test_of_a_full_and_a_stripped_copy_in_one_batch_the_full_one_is_applied(
    db: p2psync.Database,
) -> None:
    author = live_author()
    entry = author.put("ledgers", "ACME", 5)
    stripped = canonical.encode([entry.signed, [None]])
    result = db.ingest([entry.wire(), stripped])
    assert result.accepted == [entry.id] and not result.rejected
    assert db.get("ledgers", "ACME") == 5
