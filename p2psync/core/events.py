"""What the session machine tells its shell (past tense), and the values the
shell hands back: entries read for sending, entries the store refused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from p2psync.core.messages import Head
from p2psync.errors import EntryError

# Events: what happened, for the shell to act on (past tense).


@dataclass(frozen=True, slots=True)
class PeerHeadsReceived:
    heads: dict[bytes, Head]


@dataclass(frozen=True, slots=True)
class RulesReceived:
    """Store the peer's rule objects, then call :meth:`SyncSession.rules_stored`."""

    objects: list[bytes]


@dataclass(frozen=True, slots=True)
class RulesHeldReceived:
    """Read our rule objects, then call :meth:`SyncSession.rules_held_answered`."""

    digest: bytes
    on_demand: bool


@dataclass(frozen=True, slots=True)
class JoinRequested:
    """Check the invite code, then :meth:`SyncSession.join_answered` with our proposal."""

    invite: bytes
    proof: bytes


@dataclass(frozen=True, slots=True)
class BatchReceived:
    """Ingest, then call :meth:`SyncSession.ingested`."""

    batch: int
    wires: list[bytes]


@dataclass(frozen=True, slots=True)
class RulesInForce:
    """The rules settled and one is in force: the shell may refuse the session
    (:meth:`SyncSession.close`), else it calls :meth:`SyncSession.begin`."""


@dataclass(frozen=True, slots=True)
class NothingToSync:
    """The rules settled (or the pairing deadline passed) with none in force: the
    shell closes the session with the reason, in words for both sides."""


@dataclass(frozen=True, slots=True)
class SyncedWithPeer:
    digest: bytes


@dataclass(frozen=True, slots=True)
class StuckOnRefused:
    """All has flowed that will flow in this session, yet the peer holds entries we
    do not: we refused or are holding some (the :class:`Refusal` says why)."""

    reason: str


@dataclass(frozen=True, slots=True)
class SessionClosed:
    reason: str
    by_peer: bool
    error: bool
    done: bool = False  # an on-demand session that ended because it was in sync


Event = (
    PeerHeadsReceived
    | BatchReceived
    | SyncedWithPeer
    | StuckOnRefused
    | SessionClosed
    | RulesReceived
    | JoinRequested
    | RulesHeldReceived
    | RulesInForce
    | NothingToSync
)

Position = tuple[bytes, int, bytes]  # author, seq, entry ID


class Stored(Protocol):
    """One stored entry, as the store reads it for sending."""

    @property
    def author(self) -> bytes: ...
    @property
    def seq(self) -> int: ...
    @property
    def id(self) -> bytes: ...
    @property
    def wire(self) -> bytes: ...


class MissingPayload(Protocol):
    """An op held without its payload, as the store reads it to ask a peer."""

    @property
    def entry(self) -> bytes: ...
    @property
    def collection(self) -> str: ...
    @property
    def author(self) -> bytes: ...
    @property
    def seq(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """An entry from the peer that the store did not apply, and why."""

    author: bytes | None  # None when it did not even decode
    error: EntryError
    description: str
