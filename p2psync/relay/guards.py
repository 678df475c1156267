"""What keeps a few sockets from exhausting a relay: inbound byte-rate caps and a
bounded set of half-open connections (accepted, not yet admitted).

* :class:`Bucket` is a token bucket that goes into debt: a reader that took more
  than its share sleeps it off, so a connection (or all of them, through the
  shared bucket) gets at most ``rate`` bytes per second after a one-second burst.
* :class:`Throttled` wraps a connection's stream so every byte read is charged to
  its own bucket and the relay's.
* :class:`~p2psync.net.halfopen.HalfOpen` (shared with the agent) tracks
  connections until they are admitted (``docs/relay.md``, "Caps").
"""

from __future__ import annotations

import trio

from p2psync.net.halfopen import HalfOpen, Ticket


class Bucket:
    def __init__(self, rate: float, *, burst: float | None = None) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)  # a one-second burst
        self.tokens = self.burst
        self.stamp = trio.current_time()

    def _refill(self) -> None:
        now = trio.current_time()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, amount: int) -> None:
        self._refill()
        self.tokens -= amount
        if self.tokens < 0:
            await trio.sleep(-self.tokens / self.rate)

    def try_take(self, amount: float) -> bool:
        """Take ``amount`` if there is that much now (no debt); False otherwise."""
        self._refill()
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


class Throttled(trio.abc.Stream):
    """``inner`` with every byte received charged to ``buckets`` (in order)."""

    def __init__(self, inner: trio.abc.Stream, *buckets: Bucket) -> None:
        self.inner = inner
        self.buckets = buckets
        self.bytes_in = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        self.bytes_in += len(data)
        for bucket in self.buckets:
            await bucket.take(len(data))
        return bytes(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()

__all__ = ["Bucket", "HalfOpen", "Throttled", "Ticket"]
