"""Dialling (net/dial.py, over real loopback sockets) and what a session that ended
leaves in the peers table (net/peernote.py, pure): the agent's dialers and
one-shot syncs share both."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from functools import partial

import pytest
import trio

import p2psync
from p2psync.core.identity import Identity
from p2psync.core.messages import Head
from p2psync.errors import IdentityMismatch, P2PSyncError
from p2psync.net.dial import dial
from p2psync.net.peernote import PeerNote, after_session
from p2psync.net.stats import SessionStats
from p2psync.net.transport import secure

MakeDb = Callable[[str], p2psync.Database]

pytestmark = pytest.mark.process


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_first_address_that_answers_as_the_peer_is_kept() -> None:
    me, peer, other = (Identity(os.urandom(32)) for _ in range(3))

    async def answer(identity: Identity, stream: trio.SocketStream) -> None:
        with contextlib.suppress(P2PSyncError):  # the dialler hangs up on the wrong one
            secured = await secure(stream, identity, initiator=False, name="far")
            await secured.aclose()

    async with trio.open_nursery() as nursery:
        ports = []
        for identity in (other, peer):
            [listener] = await nursery.start(
                partial(trio.serve_tcp, partial(answer, identity), 0, host="127.0.0.1")
            )
            ports.append(listener.socket.getsockname()[1])
        dead = f"127.0.0.1:{closed_port()}"
        wrong, right = (f"127.0.0.1:{port}" for port in ports)
        failures: list[tuple[str, type[Exception]]] = []

        async def failed(address: str, exc: Exception) -> None:
            failures.append((address, type(exc)))

        secured, address = await dial(
            me, "me", peer.public_key, ["nonsense", dead, wrong, right], on_failed=failed
        )
        assert secured is not None and secured.peer == peer.public_key and address == right
        await secured.aclose()
        # "nonsense" is not HOST:PORT: skipped, not reported as dialled
        assert [a for a, _ in failures] == [dead, wrong]
        assert issubclass(failures[0][1], OSError) and failures[1][1] is IdentityMismatch
        nursery.cancel_scope.cancel()


async def test_why_nothing_answered_is_the_last_failure_in_words() -> None:
    me = Identity(os.urandom(32))
    dead = f"127.0.0.1:{closed_port()}"
    secured, why = await dial(me, "me", None, [dead])
    assert secured is None and why.startswith(f"cannot reach {dead}: ")
    assert await dial(me, "me", None, []) == (None, "no address to dial")


async def test_an_address_that_does_not_answer_in_time_is_given_up() -> None:
    """A listener whose queue is full drops new connection attempts (they would
    hang): the dial gives up after its timeout for that address."""
    me = Identity(os.urandom(32))
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        address = f"127.0.0.1:{full.getsockname()[1]}"
        queued = []
        for _ in range(3):  # fill the accept queue (never accepted)
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(full.getsockname())
            queued.append(sock)
        try:
            with trio.fail_after(5):
                secured, why = await dial(me, "me", None, [address], timeout=lambda a: 0.2)
        finally:
            for sock in queued:
                sock.close()
    assert secured is None and why == f"cannot reach {address}: no answer in time"


T = 1_700_000_000_000
HEADS = {b"a" * 32: Head(7, b"\x01" * 32)}


@pytest.mark.pure
def test_a_session_that_ended_in_step_clears_the_error_and_keeps_the_heads() -> None:
    stats = SessionStats(reason="closed", in_sync_ms=T - 5)
    assert after_session(stats, in_step=True, heads=HEADS, now_ms=T) == PeerNote(
        seen=T, synced=T, heads={b"a" * 32: 7}, clear_error=True
    )


@pytest.mark.pure
def test_a_session_that_ended_out_of_step_says_why_and_when_it_last_was() -> None:
    stats = SessionStats(reason="connection closed by the peer", error=True, in_sync_ms=T - 5)
    note = after_session(stats, in_step=False, heads=HEADS, now_ms=T)
    assert note == PeerNote(
        seen=T, synced=T - 5, error="connection closed by the peer", heads={b"a" * 32: 7}
    )
    stuck = SessionStats(reason="closed", stuck="entries of 1 author were not applied")
    assert after_session(stuck, in_step=False, heads={}, now_ms=T).error == (
        "cannot get in step: entries of 1 author were not applied"
    )


@pytest.mark.pure
def test_an_error_after_being_in_step_is_not_recorded_as_in_sync_now() -> None:
    stats = SessionStats(reason="broke", error=True, synced=True, in_sync_ms=T - 5)
    assert after_session(stats, in_step=True, heads={}, now_ms=T).synced == T - 5


@pytest.mark.pure
def test_a_side_connection_leaves_the_error_and_heads_to_the_one_beside_it() -> None:
    stats = SessionStats(reason="another connection between us is kept")
    note = after_session(stats, in_step=False, heads=HEADS, now_ms=T, side=True)
    assert note == PeerNote(seen=T, synced=None, error=None, heads=None, clear_error=False)


@pytest.mark.pure
def test_a_note_is_written_to_the_peers_table(make_db: MakeDb) -> None:
    db, peer = make_db("a"), Identity(os.urandom(32)).public_key
    db.store.add_peer(peer, "b", [], T)
    PeerNote(seen=T, error="it broke").write(db.store, peer)
    stored = db.store.peer(peer)
    assert stored is not None and stored.last_error == "it broke"
    PeerNote(seen=T, synced=T, clear_error=True, heads={b"a" * 32: 3}).write(db.store, peer)
    stored = db.store.peer(peer)
    assert stored is not None and stored.last_error is None
    assert db.store.peer_heads(peer) == {b"a" * 32: 3}
