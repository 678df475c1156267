"""Filtered replication on the sending side: withhold payloads a peer may not see.

The signed part of an entry is sent whole (the receiver verifies the chain);
only the payloads of ops in collections the rules do not let us send are
replaced by ``null`` (see ``docs/entry-format.md`` §3.4).
"""

from __future__ import annotations

from collections.abc import Callable

import cbor2

from p2psync.core import canonical
from p2psync.core.entry import wire_form


def withhold(wire: bytes, may_send: Callable[[str], bool]) -> bytes:
    """``wire`` with the payloads of ops in unsendable collections replaced by null.

    The entry came from our own store, where it was verified: plain decoding is
    enough here.
    """
    signed, payloads = cbor2.loads(wire)
    body = cbor2.loads(cbor2.loads(signed)[0])
    collections = [ref[0] for ref in body[5]]
    if all(may_send(c) for c in collections):
        return wire
    kept = [p if may_send(c) else None for c, p in zip(collections, payloads, strict=True)]
    return wire_form(signed, canonical.encode(kept))
