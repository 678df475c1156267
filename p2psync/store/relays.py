"""The relays an agent uses, in the order it tries them (``p2psync relay add``).

Kept in the store's ``meta`` table under ``relays`` as JSON: a list of
``{"key": hex, "addresses": ["host:port", ...], "token": text or null}``. The
token is kept until the relay has admitted us once (it then knows our key)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from p2psync.errors import StoreError
from p2psync.store.store import Store

META_KEY = "relays"


@dataclass(frozen=True, slots=True)
class Relay:
    """A relay as an agent pins it: its key, its addresses (tried in order), and an
    admission token's text while the relay has not admitted us yet."""

    key: bytes
    addresses: tuple[str, ...]
    token: str | None = None


def load(store: Store) -> list[Relay]:
    raw = store.get_meta(META_KEY)
    if raw is None:
        return []
    try:
        if not isinstance(raw, str | bytes):
            raise TypeError("not JSON text")
        rows = json.loads(raw)
        return [
            Relay(bytes.fromhex(r["key"]), tuple(str(a) for a in r["addresses"]), r.get("token"))
            for r in rows
        ]
    except (ValueError, TypeError, KeyError) as exc:
        raise StoreError(f"the store's list of relays is unreadable ({exc})") from exc


def save(store: Store, relays: list[Relay]) -> None:
    rows = [{"key": r.key.hex(), "addresses": list(r.addresses), "token": r.token} for r in relays]
    store.set_meta(META_KEY, json.dumps(rows))


def put(store: Store, relay: Relay) -> bool:
    """Add ``relay`` last, or replace the one with its key in place; True if new."""
    relays = load(store)
    for index, known in enumerate(relays):
        if known.key == relay.key:
            relays[index] = relay
            save(store, relays)
            return False
    save(store, [*relays, relay])
    return True


def remove(store: Store, key: bytes) -> bool:
    relays = load(store)
    kept = [r for r in relays if r.key != key]
    save(store, kept)
    return len(kept) != len(relays)


def admitted(store: Store, key: bytes) -> None:
    """The relay admitted us: its token is spent (it knows our key now)."""
    relays = load(store)
    if any(r.key == key and r.token is not None for r in relays):
        save(store, [Relay(r.key, r.addresses) if r.key == key else r for r in relays])
