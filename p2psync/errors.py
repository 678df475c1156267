"""The one exception tree of p2psync.

Every error p2psync raises on purpose is a :class:`P2PSyncError`. Foreign
exceptions (``sqlite3``, ``nacl``, ``cbor2``, ``OSError``) are translated at the
module that touches them, with ``raise X from exc``.

::

    P2PSyncError
    ├── UsageError                 malformed: can never succeed as given (CLI exit 2)
    │   ├── InvalidDeviceID        a device ID failed its check characters
    │   └── InvalidRecord          bad collection name, key or value
    ├── NotFoundError              no such peer, author, rule, invite or record, or several
    ├── StateError                 well-formed, but refused in the current state
    ├── HomeError                  home folder missing, uninitialised, or already initialised
    ├── StoreError                 the SQLite store could not be read or written
    ├── EntryError                 an entry from elsewhere was refused (carries a reason)
    │   ├── DecodeError            not a well-formed entry
    │   │   ├── NonCanonicalError  valid CBOR, but not its one canonical encoding
    │   │   ├── OversizeError      larger than the limits
    │   │   └── NestingError       nested deeper than the limit
    │   ├── SignatureError         signature does not verify
    │   ├── ChainError             does not fit its author's chain (order, clock)
    │   ├── FutureTimestampError   clock too far ahead of ours
    │   ├── FrozenAuthorError      its author is frozen after a fork
    │   ├── WithheldError          a payload this agent may see was left out
    │   ├── RuleViolationError     a payload this agent may not receive was sent
    │   ├── HeldLimitError         too many entries already waiting for predecessors
    │   └── AuthorLimitError       the store holds as many authors' logs as it may
    └── IntegrityError             stored or received data proves tampering or misbehaviour
        ├── ForkError              an author signed two different entries at one seq
        └── CorruptionError        the local store does not verify

``ForkError`` is also an ``EntryError``: it is the reason an entry was refused.

The CLI exits 2 for a :class:`UsageError` (an argument or option value that can
never be valid, whatever the state: a malformed device ID, duration, address or
JSON value) and 1 for every other error: what was named is not there
(:class:`NotFoundError`), the state refuses it (:class:`StateError`), or it
failed.
"""

from __future__ import annotations


class P2PSyncError(Exception):
    """Base class of every error p2psync raises on purpose."""


class UsageError(P2PSyncError):
    """The caller (user, CLI, API) asked for something malformed: an argument that can
    never be valid, whatever the store holds. Not for lookups that find nothing
    (:class:`NotFoundError`) or requests the current state refuses
    (:class:`StateError`)."""


class InvalidDeviceID(UsageError):
    """A device ID text form is malformed or fails its check characters."""


class InvalidRecord(UsageError):
    """A collection name, record key or value is not allowed."""


class NotFoundError(P2PSyncError):
    """What the caller named is not there, or the name fits more than one thing."""


class StateError(P2PSyncError):
    """The request is well-formed, but the current state refuses it (a record not
    in conflict, a rule already revoked, an invite already used...)."""


class HomeError(P2PSyncError):
    """The home folder is missing, not initialised, or already initialised."""


class StoreError(P2PSyncError):
    """The SQLite store could not be opened, read or written."""


class EntryError(P2PSyncError):
    """An entry received from elsewhere was refused."""


class DecodeError(EntryError):
    """The bytes are not a well-formed entry."""


class NonCanonicalError(DecodeError):
    """Valid CBOR, but not the one canonical encoding of its value."""


class OversizeError(DecodeError):
    """The entry (or one of its parts) exceeds a size limit."""


class NestingError(DecodeError):
    """The entry nests containers deeper than allowed."""


class SignatureError(EntryError):
    """The author's signature does not verify."""


class ChainError(EntryError):
    """The entry does not fit its author's chain (sequence, links or clock)."""


class FutureTimestampError(EntryError):
    """The entry's clock is too far ahead of this agent's clock."""


class FrozenAuthorError(EntryError):
    """The entry's author is frozen after a fork; nothing more is accepted from it."""


class WithheldError(EntryError):
    """An op's payload was left out although this agent may see its collection."""


class RuleViolationError(EntryError):
    """The sender sent a payload of a collection no rule lets it send here."""


class HeldLimitError(EntryError):
    """Too many entries already wait for their predecessors."""


class AuthorLimitError(EntryError):
    """The store already holds the logs of as many authors as it may."""


class IntegrityError(P2PSyncError):
    """Data proves tampering, damage or author misbehaviour."""


class ForkError(IntegrityError, EntryError):
    """An author signed two different entries for one sequence number."""


class CorruptionError(IntegrityError):
    """The local store does not verify."""


class LocalProtocolError(P2PSyncError):
    """Our own code called a protocol machine out of turn (a bug here, not the peer's)."""


def is_peer_fault(error: BaseException) -> bool:
    """The error proves the peer that sent the entry broken or hostile."""
    return isinstance(
        error, DecodeError | SignatureError | ChainError | ForkError | RuleViolationError
    )
