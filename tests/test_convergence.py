"""Convergence: any two agents holding the same entries hold the same records
and the same conflict list, whatever order the entries arrived in (property test
over three agents writing concurrently, with partial, shuffled, duplicated
deliveries)."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import p2psync
from p2psync import home as home_mod

pytestmark = pytest.mark.pure

AGENTS = 3
COLLECTIONS = ["ledgers", "vouchers"]
KEYS = ["A", "B", "C"]

write = st.tuples(
    st.just("write"),
    st.integers(0, AGENTS - 1),
    st.sampled_from(["put", "put", "put", "delete", "resolve", "tx"]),
    st.sampled_from(COLLECTIONS),
    st.sampled_from(KEYS),
    st.integers(0, 99),
)
deliver = st.tuples(
    st.just("deliver"),
    st.integers(0, AGENTS - 1),
    st.integers(0, AGENTS - 1),
    st.floats(0.0, 1.0),
    st.booleans(),
    st.integers(1, 5),
)
programs = st.lists(st.one_of(write, deliver), min_size=1, max_size=40)


def state(db: p2psync.Database) -> tuple[Any, Any]:
    records = {c: list(db.scan(c)) for c in COLLECTIONS}
    conflicts = [
        (c.collection, c.key, c.winner.entry, c.winner.value, [v.entry for v in c.losers])
        for c in db.conflicts()
    ]
    return records, conflicts


def deliver_entries(
    rng: random.Random,
    source: p2psync.Database,
    target: p2psync.Database,
    fraction: float,
    duplicate: bool,
    batches: int,
) -> None:
    wires = list(source.export())
    chosen = [w for w in wires if rng.random() < fraction]
    if duplicate:
        chosen += rng.sample(chosen, k=len(chosen) // 2)
    rng.shuffle(chosen)
    step = max(1, len(chosen) // batches)
    for start in range(0, len(chosen), step):
        result = target.ingest(chosen[start : start + step])
        assert not result.rejected, [r.describe() for r in result.rejected]


def run_write(db: p2psync.Database, kind: str, collection: str, key: str, n: int) -> None:
    if kind == "put":
        db.put(collection, key, {"n": n, "by": db.identity.short_id})
    elif kind == "delete":
        db.delete(collection, key)
    elif kind == "resolve":
        db.resolve(collection, key, {"resolved": n})
    else:
        with db.transaction() as tx:
            tx.put(collection, key, n)
            tx.put(COLLECTIONS[0] if collection != COLLECTIONS[0] else COLLECTIONS[1], key, -n)


@pytest.mark.slow  # 100 random programs: ~9 s
# A seed, not st.randoms(): how many random numbers a delivery draws depends on how
# many entries the source holds, which depends on the entry IDs (random salts and
# keys); Hypothesis took a replay that drew a different count for flaky data
# generation (FlakyStrategyDefinition) and failed the run.
@given(programs, st.integers(0, 2**32 - 1))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_three_agents_converge(program: list[tuple[Any, ...]], seed: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        dbs = []
        for i in range(AGENTS):
            home_mod.init(Path(tmp) / f"agent{i}")
            dbs.append(p2psync.open(Path(tmp) / f"agent{i}"))
        try:
            for step in program:
                if step[0] == "write":
                    _, agent, kind, collection, key, n = step
                    run_write(dbs[agent], kind, collection, key, n)
                else:
                    _, src, dst, fraction, duplicate, batches = step
                    if src != dst:
                        deliver_entries(rng, dbs[src], dbs[dst], fraction, duplicate, batches)
            # finally everyone gets everything, in a random order, with duplicates
            for target in dbs:
                for source in dbs:
                    if source is not target:
                        deliver_entries(rng, source, target, 1.0, True, rng.randint(1, 4))
            for db in dbs:
                assert db.store.held_count() == 0
                assert db.verify().ok
            heads = [sorted((a.author, a.seq, a.head) for a in db.authors()) for db in dbs]
            assert heads[0] == heads[1] == heads[2]
            states = [state(db) for db in dbs]
            assert states[0] == states[1] == states[2]
        finally:
            for db in dbs:
                db.close()
