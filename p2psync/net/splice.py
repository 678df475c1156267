"""Joining a live splice at a relay (``docs/relay.md``, "Live splice").

With a key from the relay (an ``Invitation`` it answered, or an ``Invited`` it
pushed), :func:`join_splice` opens a fresh connection to the relay at the address
of our session with it, runs the relay handshake (expecting its pinned key), says
``Join(key)`` instead of ``Hello`` and waits for ``Spliced(peer)``: from there the
connection carries the peer's bytes, and the caller runs the normal agent-to-agent
handshake inside it, expecting the peer's key. The relay's ``Bye`` (the key is
not good, or the peer did not join in time) is a :class:`RelayUnavailable`.
"""

from __future__ import annotations

import trio

from p2psync.core import relaywire as wire
from p2psync.core.identity import Identity, short_id
from p2psync.errors import ConnectionLost, RelayUnavailable, RemoteProtocolError
from p2psync.net.dial import dial
from p2psync.net.transport import Prefixed

#: Seconds to reach the relay and complete its handshake.
CONNECT_SECONDS = 10.0
#: The largest frame before the splice (a ``Spliced`` or a ``Bye``).
SPLICE_FRAME = 1024


async def join_splice(
    identity: Identity,
    name: str,
    relay: bytes,
    address: str,
    key: bytes,
    peer: bytes,
    *,
    wait: float,
) -> trio.abc.Stream:
    """The byte stream to ``peer`` through ``relay`` at ``address``; ``wait``: the
    longest to wait for the peer to join (the key's remaining life)."""
    secured, how = await dial(
        identity,
        name,
        relay,
        [address],
        timeout=lambda _address: CONNECT_SECONDS,
        prologue=wire.PROLOGUE,
        max_frame=SPLICE_FRAME,
    )
    if secured is None:
        raise RelayUnavailable(f"relay {short_id(relay)} is unreachable for a splice ({how})")
    try:
        with trio.fail_after(wait):
            await secured.send(wire.encode(wire.Join(key)))
            answer = wire.decode(await secured.receive())
    except trio.TooSlowError as exc:
        await secured.aclose()
        raise RelayUnavailable(
            f"the splice with {short_id(peer)} at relay {short_id(relay)} did not start"
        ) from exc
    except (ConnectionLost, RemoteProtocolError) as exc:
        await secured.aclose()
        raise RelayUnavailable(f"relay {short_id(relay)} broke the splice: {exc}") from exc
    if isinstance(answer, wire.Bye):
        await secured.aclose()
        raise RelayUnavailable(f"relay {short_id(relay)}: no splice ({answer.reason})")
    if not isinstance(answer, wire.Spliced) or answer.peer != peer:
        await secured.aclose()
        raise RemoteProtocolError(
            f"relay {short_id(relay)} answered a splice join with {type(answer).__name__}"
        )
    raw, rest = secured.detach()
    return Prefixed(raw, rest)
