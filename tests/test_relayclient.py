"""The agent's relay client (p2psync/net/relayclient.py) against a faulty relay
connection: a request must never outlive the session it was made on."""

from __future__ import annotations

import pytest
import trio

from p2psync.errors import ConnectionLost
from p2psync.net.relayclient import RelayClient

pytestmark = pytest.mark.trio_memory


class SilentStream:
    """Stands in for the secured stream of a relay that ends the session: sends go
    nowhere (the relay's Bye is what ends it)."""

    peer = b"r" * 32

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.sent.append(data)


async def test_a_request_waiting_to_send_when_the_session_ends_fails_at_once() -> None:
    """Found in a flaky PostgreSQL test (4 runs in 6): `_request` checked for a
    failed session before waiting for the send lock; when the relay's Bye was
    handled during that wait, ``_fail`` emptied the pending requests, then this
    one added its slot, which nothing would ever complete: it hung for the
    120 s answer timeout instead of failing with the session's reason."""
    client = RelayClient(SilentStream(), None, "relay:1")  # type: ignore[arg-type]
    outcome: list[BaseException] = []

    async def deposit() -> None:
        try:
            await client.deposit(b"envelope")
        except ConnectionLost as exc:
            outcome.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await client._send_lock.acquire()  # another request is sending
            nursery.start_soon(deposit)
            await trio.testing.wait_all_tasks_blocked()  # it waits for the lock
            client._fail(ConnectionLost("the relay ended the session: bye"))
            client._send_lock.release()
    assert outcome and "bye" in str(outcome[0])
    assert client.stream.sent == []  # nothing sent on a session that has ended
