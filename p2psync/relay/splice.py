"""Live splices at the relay: invitations with single-use keys, and the pipe.

An admitted agent A sends ``Connect(peer B)``. The relay invites only when B has a
session here and B's mailbox policy lists A, within the caps; anything else gets
the one answer ``Refused(unavailable)`` (no oracle of who exists, is allowed, or
is online). An invitation is **two** random 32-byte keys, one per side: A's in the
``Invitation`` answer, B's in an unasked ``Invited``, each sent only inside that
device's own Noise session with the relay. Each side then opens a fresh
connection, runs the relay handshake (so the relay knows the device) and sends
``Join(key)`` instead of ``Hello``. A key is good once, for the device it was
issued to, until its expiry (:data:`KEY_SECONDS`); a key presented by another
device, late, or again is refused with ``Bye`` and changes nothing (the rightful
holder may still use it). When both sides have joined, each gets ``Spliced(peer)``
and from the next byte the relay copies bytes between the two connections,
reading none of them: the agents run their own handshake (the sync prologue,
each expecting the other's key) end to end inside, so the relay never holds a
session key and cannot splice A to anyone but B without the handshake failing.

This module holds the state (pure, time passed in); ``relay/node.py`` does the I/O.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from p2psync.core.identity import short_id
from p2psync.core.relaywire import SPLICE_KEY_BYTES

#: Seconds an invitation's keys stay good.
KEY_SECONDS = 10.0


@dataclass(eq=False)
class Invitation:
    """One invitation: the asker's and the target's keys."""

    asker: bytes
    target: bytes
    keys: dict[bytes, bytes]  # key -> the device it was issued to
    expires: float  # trio time
    joined: dict[bytes, object] = field(default_factory=dict)  # device -> its connection

    def other(self, device: bytes) -> bytes:
        return self.target if device == self.asker else self.asker


@dataclass(eq=False)
class Live:
    """A splice the relay pipes."""

    asker: bytes
    target: bytes
    since_ms: int
    bytes_a: int = 0  # from the asker to the target
    bytes_b: int = 0  # from the target to the asker

    def describe(self) -> dict[str, object]:
        return {
            "asker": short_id(self.asker),
            "target": short_id(self.target),
            "since": self.since_ms,
            "bytes_to_target": self.bytes_a,
            "bytes_to_asker": self.bytes_b,
        }


class Splices:
    """Invitations waiting for their joins, and live splices, within the caps."""

    def __init__(self, *, per_device: int, total: int) -> None:
        self.per_device = per_device  # live splices and waiting invitations, per device
        self.total = total
        self._by_key: dict[bytes, Invitation] = {}
        self.live: list[Live] = []
        self.counters = {"invited": 0, "unavailable": 0, "spliced": 0, "refused_joins": 0}

    def _expire(self, now: float) -> None:
        for key, invitation in list(self._by_key.items()):
            if invitation.expires <= now:
                del self._by_key[key]

    def _pending(self, device: bytes) -> int:
        return len({id(i) for i in self._by_key.values() if device in (i.asker, i.target)})

    def _live(self, device: bytes) -> int:
        return sum(1 for s in self.live if device in (s.asker, s.target))

    def invite(
        self, asker: bytes, target: bytes, now: float, *, random: bytes | None = None
    ) -> Invitation | None:
        """A new invitation between ``asker`` and ``target`` (the caller checked the
        target is here and allows the asker), or None beyond a cap."""
        self._expire(now)
        if asker == target:
            return None
        for device in (asker, target):  # live and waiting together
            if self._pending(device) + self._live(device) >= self.per_device:
                return None
        if len(self.live) + len({id(i) for i in self._by_key.values()}) >= self.total:
            return None
        material = random if random is not None else os.urandom(2 * SPLICE_KEY_BYTES)
        key_a, key_b = material[:SPLICE_KEY_BYTES], material[SPLICE_KEY_BYTES:]
        invitation = Invitation(asker, target, {key_a: asker, key_b: target}, now + KEY_SECONDS)
        self._by_key[key_a] = self._by_key[key_b] = invitation
        self.counters["invited"] += 1
        return invitation

    def key_of(self, invitation: Invitation, device: bytes) -> bytes:
        return next(k for k, d in invitation.keys.items() if d == device)

    def claim(self, key: bytes, device: bytes, now: float) -> Invitation | None:
        """The invitation ``key`` belongs to, if ``device`` may present it now: it was
        issued to that device, has not expired and was not presented before. The key
        is then used up; a refusal changes nothing."""
        self._expire(now)
        invitation = self._by_key.get(key)
        if invitation is None or invitation.keys.get(key) != device:
            self.counters["refused_joins"] += 1
            return None
        del self._by_key[key]
        return invitation

    def drop(self, invitation: Invitation) -> None:
        """Forget an invitation (one side joined and gave up, or it is spliced)."""
        for key in invitation.keys:
            if self._by_key.get(key) is invitation:
                del self._by_key[key]
