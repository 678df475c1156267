"""Sessions between real stores over trio memory streams: full and live sync,
forwarding, resuming, and hostile peers (test doubles speaking the protocol)."""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trio.testing

import p2psync
from p2psync.clock import now_ms
from p2psync.core import canonical, hlc, messages
from p2psync.core import handshake as hs
from p2psync.core.entry import SIGN_PREFIX
from p2psync.core.identity import Identity
from p2psync.core.messages import Entries, Have
from p2psync.core.session import SessionConfig
from p2psync.errors import ConnectionLost, FrameError, HandshakeError, IdentityMismatch
from p2psync.net.stats import SessionStats
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.sync import run_session
from p2psync.net.transport import SecureStream, secure
from tests.helpers import Author

pytestmark = pytest.mark.trio_memory

MakeDb = Callable[[str], p2psync.Database]
T = TypeVar("T")


def fill(db: p2psync.Database, count: int, collection: str = "c") -> None:
    db.write(
        [p2psync.Change(p2psync.OpKind.PUT, collection, f"k{i}", {"i": i})] for i in range(count)
    )


async def connect(a: p2psync.Database, b: p2psync.Database) -> tuple[SecureStream, SecureStream]:
    left, right = trio.testing.memory_stream_pair()
    out: dict[str, SecureStream] = {}

    async def side(name: str, stream: trio.abc.Stream, db: p2psync.Database, init: bool) -> None:
        out[name] = await secure(stream, db.identity, initiator=init, name=db.home.name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "a", left, a, True)
        nursery.start_soon(side, "b", right, b, False)
    return out["a"], out["b"]


async def sync_pair(
    a: p2psync.Database, b: p2psync.Database, *, live_b: bool = True
) -> tuple[SessionStats, SessionStats]:
    """a syncs once; b serves (live, like an agent)."""
    sa, sb = await connect(a, b)
    results: dict[str, SessionStats] = {}

    async def run(name: str, stream: SecureStream, db: p2psync.Database, live: bool) -> None:
        results[name] = await run_session(stream, TrioStore(db.store), ChangeFeed(), live=live)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "a", sa, a, False)
        nursery.start_soon(run, "b", sb, b, live_b)
    return results["a"], results["b"]


def same_entries(*dbs: p2psync.Database) -> bool:
    heads = [{(x.author, x.seq, x.head) for x in db.authors() if x.seq} for db in dbs]
    return all(h == heads[0] for h in heads)


async def test_initial_sync_both_ways(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    fill(a, 2500, "from_a")
    fill(b, 700, "from_b")
    stats_a, stats_b = await sync_pair(a, b)
    assert stats_a.synced and stats_b.synced
    assert stats_a.sent == 2500 and stats_b.sent == 700  # nothing sent twice
    assert stats_a.received == 700 and stats_b.received == 2500
    assert same_entries(a, b)
    assert b.get("from_a", "k2499") == {"i": 2499} and a.get("from_b", "k0") == {"i": 0}
    assert a.verify().ok and b.verify().ok


async def test_noop_resync_is_small(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    fill(a, 500)
    await sync_pair(a, b)
    stats_a, _ = await sync_pair(a, b)
    assert stats_a.synced and stats_a.sent == 0 and stats_a.received == 0
    assert stats_a.bytes_sent + stats_a.bytes_received < 1024


async def test_third_party_entries_are_forwarded(make_db: MakeDb) -> None:
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    fill(a, 50)
    await sync_pair(a, b)
    stats, _ = await sync_pair(c, b)  # c never meets a
    assert stats.received == 50 and c.get("c", "k49") == {"i": 49}
    assert same_entries(a, b, c)


async def test_live_push_reaches_the_peer(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    sa, sb = await connect(a, b)
    feed_a = ChangeFeed()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_session(sa, TrioStore(a.store), feed_a, live=True))
        nursery.start_soon(lambda: run_session(sb, TrioStore(b.store), ChangeFeed(), live=True))
        for i in range(5):
            a.put("live", f"k{i}", i)
            feed_a.bump()  # what the notification socket does in the agent
            with trio.fail_after(5):
                while b.get("live", f"k{i}") != i:
                    await trio.sleep(0.005)
        nursery.cancel_scope.cancel()


async def test_interrupted_session_resumes_without_resending(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    fill(a, 5000)
    sa, sb = await connect(a, b)
    received = 0

    def progress(stats: SessionStats) -> None:
        nonlocal received
        received = stats.received

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_session(sa, TrioStore(a.store), ChangeFeed(), live=True))
        nursery.start_soon(
            lambda: run_session(
                sb, TrioStore(b.store), ChangeFeed(), live=True, on_progress=progress
            )
        )
        with trio.fail_after(10):
            while received < 1000:
                await trio.sleep(0.001)
        await sa.stream.aclose()  # the cable is cut
    held = b.authors()[0].seq
    assert 1000 <= held < 5000
    _, stats_a = await sync_pair(b, a)
    assert stats_a.sent == 5000 - held  # only what b did not commit
    assert same_entries(a, b)


async def test_untrusted_initiator_is_refused(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    left, right = trio.testing.memory_stream_pair()
    errors: list[BaseException] = []

    async def responder() -> None:
        try:
            await secure(right, b.identity, initiator=False, name="b", trust=lambda k: False)
        except IdentityMismatch as exc:
            errors.append(exc)
            await right.aclose()

    async def initiator() -> None:
        try:
            await secure(left, a.identity, initiator=True, name="a", timeout=2)
        except (ConnectionLost, HandshakeError) as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder)
        nursery.start_soon(initiator)
    assert any(isinstance(e, IdentityMismatch) for e in errors)
    assert a.authors() == [] and b.authors() == []


async def capture(call: Callable[[], object], errors: list[BaseException]) -> None:
    try:
        await call()  # type: ignore[misc]
    except (HandshakeError, ConnectionLost, FrameError) as exc:
        errors.append(exc)


async def test_initiator_stops_when_the_peer_is_not_who_it_dialled(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    left, right = trio.testing.memory_stream_pair()
    errors: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            capture,
            lambda: secure(right, b.identity, initiator=False, name="b", timeout=1),
            errors,
        )
        await capture(
            lambda: secure(left, a.identity, initiator=True, name="a", expect=os.urandom(32)),
            errors,
        )
        await left.aclose()
    assert isinstance(errors[0], IdentityMismatch)
    # the responder never learnt who dialled: message 3 was not sent
    assert isinstance(errors[1], ConnectionLost | HandshakeError)


async def test_wrong_static_key_binding_is_refused(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer claims an identity whose X25519 form is not its handshake key."""
    a, b = make_db("a"), make_db("b")
    claimed = make_db("c").identity.public_key
    original = hs.Handshake.__init__

    def lying_init(self: hs.Handshake, identity: Identity, **kw: object) -> None:
        original(self, identity, **kw)  # type: ignore[arg-type]
        if identity is b.identity:
            fields = canonical.decode(self._payload, what="p", max_depth=1)
            fields[1] = claimed
            self._payload = canonical.encode(fields)

    monkeypatch.setattr(hs.Handshake, "__init__", lying_init)
    left, right = trio.testing.memory_stream_pair()
    errors: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            capture,
            lambda: secure(right, b.identity, initiator=False, name="b", timeout=1),
            errors,
        )
        await capture(lambda: secure(left, a.identity, initiator=True, name="a"), errors)
        await left.aclose()
    assert "does not match" in str(errors[0])


# ---------------------------------------------------------------- hostile peers


class Hostile:
    """A test double that completes the handshake honestly, then misbehaves."""

    def __init__(self, db: p2psync.Database, stream: SecureStream) -> None:
        self.db = db
        self.stream = stream

    async def send(self, message: messages.Message) -> None:
        await self.stream.send(messages.encode(message))

    async def raw(self, data: bytes) -> None:
        await self.stream.stream.send_all(data)


async def against_hostile(
    victim: p2psync.Database,
    attacker: p2psync.Database,
    behave: Callable[[Hostile], object],
    config: SessionConfig | None = None,
) -> SessionStats:
    sa, sb = await connect(attacker, victim)
    result: list[SessionStats] = []
    done = trio.Event()

    async def serve() -> None:
        result.append(
            await run_session(sb, TrioStore(victim.store), ChangeFeed(), live=True, config=config)
        )
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        hostile = Hostile(attacker, sa)
        await hostile.send(Have({}))
        await behave(hostile)  # type: ignore[misc]
        with trio.fail_after(120):
            await done.wait()
        nursery.cancel_scope.cancel()
    return result[0]


async def test_forged_entries_close_the_connection_and_keep_valid_ones(
    make_db: MakeDb,
) -> None:
    victim, attacker = make_db("victim"), make_db("attacker")
    fill(attacker, 3)
    wires = list(attacker.export())
    last = wires[-1]
    forged = bytearray(last)
    forged[-40] ^= 1  # inside the signature or payload area of the last entry

    async def behave(h: Hostile) -> None:
        await h.send(Entries(1, [*wires[:2], bytes(forged)]))

    stats = await against_hostile(victim, attacker, behave)
    assert stats.error and "invalid entry" in stats.reason
    assert victim.authors()[0].seq == 2  # the valid ones were kept
    assert victim.verify().ok


async def test_forked_chain_closes_the_connection(make_db: MakeDb) -> None:
    victim, attacker = make_db("victim"), make_db("attacker")
    author = Author()
    author.clock = hlc.from_wall(now_ms())
    chain = author.chain(2)
    victim.ingest([e.wire() for e in chain])
    author.seq, author.prev = 1, chain[0].id
    other = author.put("c", "evil", 1)

    async def behave(h: Hostile) -> None:
        await h.send(Entries(1, [other.wire()]))

    stats = await against_hostile(victim, attacker, behave)
    assert stats.error and "signed two different entries" in stats.reason
    assert victim.store.forks()


async def test_replayed_frame_closes_the_connection(make_db: MakeDb) -> None:
    victim, attacker = make_db("victim"), make_db("attacker")

    async def behave(h: Hostile) -> None:
        sealer = h.stream._sealer
        frame = sealer.seal(messages.encode(messages.Ping(1)))
        await h.raw(frame)
        await h.raw(frame)  # the same frame again: its nonce is stale

    stats = await against_hostile(victim, attacker, behave)
    assert stats.error and "authentication" in stats.reason


async def test_huge_length_prefix_is_refused_before_allocating(make_db: MakeDb) -> None:
    victim, attacker = make_db("victim"), make_db("attacker")

    async def behave(h: Hostile) -> None:
        await h.raw(struct.pack(">I", 0xFFFFFFFF))

    stats = await against_hostile(victim, attacker, behave)
    assert stats.error and "limit" in stats.reason


async def test_garbage_after_the_handshake_closes(make_db: MakeDb) -> None:
    victim, attacker = make_db("victim"), make_db("attacker")

    async def behave(h: Hostile) -> None:
        await h.raw(struct.pack(">I", 100) + os.urandom(100))

    stats = await against_hostile(victim, attacker, behave)
    assert stats.error and "authentication" in stats.reason


def store_calls_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run what the sessions hand to threads (store calls) inline, for virtual time:
    a task waiting on a thread counts as blocked, so an autojump clock jumps to the
    next deadline while a store call runs in its thread. On a loaded machine a call
    often takes over 20 real ms, and the next deadline may be a test's own (120 s:
    a TooSlowError) or the 5 s pairing deadline (the session ends "not paired"):
    each failed about 1 run in 20."""

    async def inline(work: Callable[..., T], *args: object, **_: object) -> T:
        return work(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> trio.testing.MockClock:
    """Virtual time: jumps ahead whenever every task has waited 20 real ms (store
    calls run inline: :func:`store_calls_inline`)."""
    store_calls_inline(monkeypatch)
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_stalling_mid_batch_times_out(make_db: MakeDb, clock: trio.testing.MockClock) -> None:
    victim, attacker = make_db("victim"), make_db("attacker")
    fill(attacker, 2)

    async def behave(h: Hostile) -> None:
        frame = h.stream._sealer.seal(messages.encode(Entries(1, list(attacker.export()))))
        await h.raw(frame[: len(frame) // 2])  # and never the rest

    config = SessionConfig(keepalive=15, idle_timeout=45)
    started = trio.current_time()
    stats = await against_hostile(victim, attacker, behave, config)
    assert stats.error and "nothing received for 45 s" in stats.reason
    assert 45 <= trio.current_time() - started < 60  # virtual seconds
    assert victim.authors() == []


async def test_unexpected_message_closes(make_db: MakeDb) -> None:
    victim, attacker = make_db("victim"), make_db("attacker")

    async def behave(h: Hostile) -> None:
        await h.send(messages.Ack(5))

    stats = await against_hostile(victim, attacker, behave)
    assert stats.error and "acknowledgement" in stats.reason


@pytest.mark.pure
def test_signed_prefix_constant() -> None:
    assert SIGN_PREFIX.startswith(b"p2psync/v1/")


async def test_store_restored_from_a_backup_refuses_writes_until_synced(
    make_db: MakeDb, tmp_path: Path
) -> None:
    a, b = make_db("a"), make_db("b")
    fill(a, 5)
    backup = tmp_path / "backup.sqlite"
    a.store._reader.conn.execute(f"VACUUM INTO '{backup}'")
    fill(a, 10, "later")
    await sync_pair(a, b)
    a.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(a.home.store_path) + suffix).unlink(missing_ok=True)
    shutil.copy(backup, a.home.store_path)
    restored = p2psync.open(a.path)
    try:
        assert restored.authors()[0].seq == 5
        # the peer's Have shows our own log at 15: writing now would fork it
        restored.store.note_peer_heads(b.identity.public_key, b.store.heads())
        with pytest.raises(p2psync.IntegrityError, match="restored from a backup"):
            restored.put("c", "new", 1)
        await sync_pair(restored, b)
        assert restored.authors()[0].seq == 15
        restored.put("c", "new", 1)  # our log is whole again
        assert restored.verify().ok
    finally:
        restored.close()
