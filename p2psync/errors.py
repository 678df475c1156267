"""The one exception tree of p2psync.

Every error p2psync raises on purpose is a :class:`P2PSyncError`, and every
exception class p2psync defines is here (``tests/test_errors.py`` checks both).
Foreign exceptions (``sqlite3``, ``nacl``, ``cbor2``, ``OSError``) are translated
at the module that touches them, with ``raise X from exc``.

Who broke it? As in h11, a :class:`RemoteProtocolError` means **the peer** did:
what it sent (a frame, a handshake message, a sync message, a rule object, an
entry) is malformed or proves it broken or hostile, and a session closes the
connection for it. A :class:`LocalProtocolError` means **we** did: our own code
misused a protocol machine (a bug here, never the peer's doing). A
:class:`UsageError` is the caller's doing (user, CLI, API).

::

    P2PSyncError
    ├── UsageError                     the caller's: can never succeed as given (CLI exit 2)
    │   ├── InvalidDeviceID            a device ID failed its check characters
    │   └── InvalidRecord              bad collection name, key or value
    ├── NotFoundError                  no such peer, author, rule, invite or record, or several
    ├── StateError                     well-formed, but refused in the current state
    │   ├── PairingError               an invite is unknown, used, expired or withdrawn
    │   ├── AgentNotRunning            no agent answers on this home's control socket
    │   ├── AgentSocketError           the agent's sockets cannot be placed or trusted (an OSError)
    │   └── RelayUnavailable           no relay answers, or it did not admit us
    ├── HomeError                      home folder missing, uninitialised, or already initialised
    ├── StoreError                     the SQLite store could not be read or written
    ├── HttpError                      the HTTP API refused a request (too large, too many)
    ├── ConnectionLost                 the other end closed the connection or it broke
    ├── ProtocolError                  a protocol was broken (by one side or the other)
    │   ├── RemoteProtocolError        REMOTE: the peer broke it; the connection is closed for it
    │   │   ├── FrameError             a frame was oversize, cut short or failed authentication
    │   │   ├── RuleError              a rule object is malformed, wrongly signed or not allowed
    │   │   ├── RemoteHandshakeError¹  what the peer sent fails the handshake
    │   │   │   ├── DecryptError       a handshake message failed its AEAD tag
    │   │   │   └── IdentityMismatch   the peer is not the one expected, or is not trusted
    │   │   ├── EnvelopeError          a relay envelope or receipt is malformed, oversize or forged
    │   │   │   ├── EnvelopeSealError  its seal does not open, or it is addressed to someone else
    │   │   │   ├── EnvelopeSignatureError  its sender's (a receipt's signer's) signature fails
    │   │   │   ├── EnvelopeMismatchError   inner names differ from the outer header or depositor
    │   │   │   └── BundleError    an envelope's bundle, or a bundle file, is malformed or oversize
    │   │   ├── PolicyError            a signed mailbox policy is malformed or not its owner's
    │   │   └── HostileEntry²          an entry that proves its sender broken or hostile
    │   ├── LocalProtocolError         LOCAL: our own code misused a protocol machine (a bug)
    │   │   └── LocalHandshakeError¹   the Noise machine was misused (out of turn, bad keys)
    │   └── HandshakeError             the handshake failed: the ¹ classes, or it timed out
    ├── EntryError                     an entry from elsewhere was refused (carries a reason)
    │   ├── HostileEntry²              REMOTE: the sender's fault; the session closes the connection
    │   │   ├── DecodeError            bytes from elsewhere are malformed: an entry, or any CBOR
    │   │   │   │                      value (rule objects, invite codes, messages raise it too)
    │   │   │   ├── NonCanonicalError  valid CBOR, but not its one canonical encoding
    │   │   │   ├── OversizeError      larger than the limits
    │   │   │   └── NestingError       nested deeper than the limit
    │   │   ├── SignatureError         signature does not verify
    │   │   ├── ChainError             does not fit its author's chain (order, clock)
    │   │   ├── RuleViolationError     a payload this agent may not receive was sent
    │   │   └── ForkError³             its author signed two different entries at one seq
    │   ├── FutureTimestampError       clock too far ahead of ours
    │   ├── FrozenAuthorError          its author is frozen after a fork
    │   ├── WithheldError              a payload this agent may see was left out
    │   ├── HeldLimitError             too many entries already waiting for predecessors
    │   └── AuthorLimitError           the store holds as many authors' logs as it may
    └── IntegrityError                 stored or received data proves tampering or misbehaviour
        ├── ForkError³                 an author signed two different entries at one seq
        └── CorruptionError            the local store does not verify

A class drawn twice has two parents: ¹ is also a :class:`HandshakeError`,
² is both a :class:`RemoteProtocolError` and an :class:`EntryError`, ³ is both
a :class:`HostileEntry` and an :class:`IntegrityError`. The refused entries of
the other five :class:`EntryError` classes are not the sender's fault: the
session logs them and goes on.

The CLI exits 2 for a :class:`UsageError` (an argument or option value that can
never be valid, whatever the state: a malformed device ID, duration, address or
JSON value) and 1 for every other error: what was named is not there
(:class:`NotFoundError`), the state refuses it (:class:`StateError`), or it
failed.
"""

from __future__ import annotations


class P2PSyncError(Exception):
    """Base class of every error p2psync raises on purpose."""


# ---------------------------------------------------------------- the caller's


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


class PairingError(StateError):
    """A pairing step was refused: the invite is unknown, already used, expired or
    withdrawn."""


class AgentNotRunning(StateError):
    """No agent answers on the control socket."""


class AgentSocketError(StateError, OSError):
    """The agent's local sockets cannot be placed or trusted. Also an ``OSError``,
    as every failure to reach the agent's sockets is."""


class RelayUnavailable(StateError):
    """No configured relay could be reached, or the one reached did not admit us
    (unknown key, a token used up or expired)."""


# ---------------------------------------------------------------- local resources


class HomeError(P2PSyncError):
    """The home folder is missing, not initialised, or already initialised."""


class HttpError(P2PSyncError):
    """The HTTP API refused a request for a reason of its own, with the status code
    that says so (413 a body too large, 429 too many event streams)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers  # of the answer (e.g. that the connection closes)


class StoreError(P2PSyncError):
    """The SQLite store could not be opened, read or written."""


# ---------------------------------------------------------------- connections and protocols


class ConnectionLost(P2PSyncError):
    """The other end closed the connection or it broke."""


class ProtocolError(P2PSyncError):
    """A protocol was broken; :class:`RemoteProtocolError` and
    :class:`LocalProtocolError` say by whom."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: what it sent is malformed, or proves it broken
    or hostile. A session closes the connection, with this as the reason."""


class LocalProtocolError(ProtocolError):
    """Our own code misused a protocol machine (called out of turn, with bad
    arguments, after it closed): a bug here, never the peer's doing."""


class FrameError(RemoteProtocolError):
    """A frame was oversize, truncated, or failed authentication."""


class RuleError(RemoteProtocolError):
    """A rule object is malformed, wrongly signed, or not allowed here."""


class HandshakeError(ProtocolError):
    """The handshake failed: see its two subclasses for whose doing it was (a
    handshake that did not finish in time is this class itself)."""


class RemoteHandshakeError(HandshakeError, RemoteProtocolError):
    """A handshake message from the peer is malformed, too short or too long, carries
    a low-order key or a bad identity."""


class LocalHandshakeError(HandshakeError, LocalProtocolError):
    """The Noise machine was misused: a message out of turn, after it finished or
    failed, keys of the wrong size or missing, or its nonces exhausted."""


class DecryptError(RemoteHandshakeError):
    """An AEAD tag did not verify: the message was damaged, forged or replayed."""


class IdentityMismatch(RemoteHandshakeError):
    """The peer proved an identity other than the one expected, or an untrusted one."""


# ---------------------------------------------------------------- relay envelopes


class EnvelopeError(RemoteProtocolError):
    """A relay envelope (or a receipt inside one) that came from a relay or a sender is
    malformed, not canonical, over a size cap, or forged (``core/envelope.py``,
    ``core/receipt.py``). Malformed CBOR is this class itself (the canonical decoder's
    :class:`DecodeError` is translated, as it is not an entry's fault)."""


class EnvelopeSealError(EnvelopeError):
    """The sealed part does not open with our key, or the outer header names another
    recipient: the envelope is not for us (or was damaged)."""


class EnvelopeSignatureError(EnvelopeError):
    """The sender's signature of an envelope's inner body (or a receipt's signer's
    signature) does not verify."""


class EnvelopeMismatchError(EnvelopeError):
    """Authentic inner names (sender, recipient, sequence number, class, expiry) differ
    from the outer header the relay saw, or the sender is not the key that deposited
    the envelope; a receipt names other parties than its envelope."""


class BundleError(EnvelopeError):
    """A bundle (the payload of a data envelope, ``core/bundle.py``) or a bundle file
    (envelopes handed over as a file) is malformed, not canonical, of an unknown
    version, or over a size cap."""


class PolicyError(RemoteProtocolError):
    """A signed mailbox policy (``core/policy.py``) is malformed, not canonical, over
    its size cap, not signed by the owner it names, or not the policy of the mailbox
    it was handed over for."""


# ---------------------------------------------------------------- entries


class EntryError(P2PSyncError):
    """An entry received from elsewhere was refused."""


class HostileEntry(EntryError, RemoteProtocolError):
    """The entry proves its sender broken or hostile: the session that received it
    closes the connection. The other entry errors are not the sender's fault."""


class DecodeError(HostileEntry):
    """The bytes are not well-formed: an entry, or any CBOR value from elsewhere
    (rule objects, invite codes, messages and handshake payloads raise it too,
    usually translated at their boundary)."""


class NonCanonicalError(DecodeError):
    """Valid CBOR, but not the one canonical encoding of its value."""


class OversizeError(DecodeError):
    """The entry (or one of its parts) exceeds a size limit."""


class NestingError(DecodeError):
    """The entry nests containers deeper than allowed."""


class SignatureError(HostileEntry):
    """The author's signature does not verify."""


class ChainError(HostileEntry):
    """The entry does not fit its author's chain (sequence, links or clock)."""


class RuleViolationError(HostileEntry):
    """The sender sent a payload of a collection no rule lets it send here."""


class FutureTimestampError(EntryError):
    """The entry's clock is too far ahead of this agent's clock."""


class FrozenAuthorError(EntryError):
    """The entry's author is frozen after a fork; nothing more is accepted from it."""


class WithheldError(EntryError):
    """An op's payload was left out although this agent may see its collection."""


class HeldLimitError(EntryError):
    """Too many entries already wait for their predecessors."""


class AuthorLimitError(EntryError):
    """The store already holds the logs of as many authors as it may."""


# ---------------------------------------------------------------- integrity


class IntegrityError(P2PSyncError):
    """Data proves tampering, damage or author misbehaviour."""


class ForkError(IntegrityError, HostileEntry):
    """An author signed two different entries for one sequence number."""


class CorruptionError(IntegrityError):
    """The local store does not verify."""
