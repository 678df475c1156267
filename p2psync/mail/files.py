"""Bundle files: the mailbox's envelopes handed over by hand (``p2psync bundle
export/import``; format in ``core/bundle.py`` and ``docs/relay.md`` "Bundle files").

**Export** writes what a peer lacks (and receipts owed to it) as sealed envelopes
in one file, written whole or not at all (a temporary file renamed), and records
each envelope "handed over as file F" until its expiry (:data:`FILE_TTL_MS`: after
that its entries go again, in the next file or by the relay).

**Import** reads a file, opens *every* envelope before applying any (a file that is
damaged, forged, of another format or not for this agent changes nothing), then
applies them in order as the relay client would, and gathers the receipts owed to
their senders, to be handed back as a file of their own. Importing a file twice,
or an old one, finds every envelope a duplicate and changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from p2psync.core.bundle import decode_file, encode_file
from p2psync.core.envelope import Envelope, EnvelopeClass, open_envelope
from p2psync.core.identity import short_id
from p2psync.errors import EnvelopeError, EnvelopeSealError, StateError
from p2psync.home import OpenHome
from p2psync.mail.mailer import Incoming, Mailer, Outgoing

#: How long an exported envelope counts as on its way (the relay's default TTL).
FILE_TTL_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Exported:
    envelopes: Sequence[Outgoing]
    size: int  # bytes of the file

    @property
    def entries(self) -> int:
        return sum(e.entries for e in self.envelopes)


@dataclass
class Imported:
    results: list[Incoming] = field(default_factory=list)
    #: receipt envelopes to hand back, per sender
    receipts: dict[bytes, list[Outgoing]] = field(default_factory=dict)


def export_file(db: OpenHome, peer: bytes, path: Path, now_ms: int) -> Exported:
    """Write what ``peer`` lacks (and owed receipts) to ``path``; nothing written
    when nothing is due."""
    mailer = Mailer(db)
    mailer.expire(now_ms)  # what expired goes again
    until = now_ms + FILE_TTL_MS
    envelopes = mailer.outgoing(peer, now_ms, expiry_ms=until, max_envelopes=None)  # one file
    if not envelopes:
        return Exported([], 0)
    size = write_file(path, [e.wire for e in envelopes])
    for envelope in envelopes:
        mailer.deposited(
            peer, envelope.seq, where=path.name, until_ms=until, now_ms=now_ms, file=True
        )
    return Exported(envelopes, size)


def write_file(path: Path, wires: Sequence[bytes]) -> int:
    data = encode_file(wires)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise StateError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return len(data)


def import_file(db: OpenHome, path: Path, now_ms: int) -> Imported:
    """Open every envelope of the file at ``path``, then apply them; gather the
    receipts owed to their senders (recorded as queued: the caller hands them over)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from exc
    opened: list[Envelope] = []
    for index, wire in enumerate(decode_file(data), 1):
        try:
            opened.append(open_envelope(db.identity, wire))
        except EnvelopeSealError as exc:
            raise EnvelopeSealError(
                f"envelope {index} of {path} is not for this agent ({exc}); nothing was imported"
            ) from exc
        except EnvelopeError as exc:
            raise type(exc)(
                f"envelope {index} of {path} is damaged or forged ({exc}); nothing was imported"
            ) from exc
    mailer, done = Mailer(db), Imported()
    for envelope in opened:
        done.results.append(mailer.apply(envelope, now_ms))
    senders = {e.sender for e in opened if e.cls is EnvelopeClass.DATA}
    for sender in sorted(senders):
        receipts = mailer.outgoing(
            sender, now_ms, expiry_ms=now_ms + FILE_TTL_MS, receipts_only=True
        )
        if receipts:
            done.receipts[sender] = receipts
    return done


def hand_over(db: OpenHome, receipts: Sequence[Outgoing], path: Path, now_ms: int) -> int:
    """Write receipt envelopes to ``path`` and record them handed over."""
    size = write_file(path, [e.wire for e in receipts])
    mailer = Mailer(db)
    for envelope in receipts:
        mailer.deposited(
            envelope.peer,
            envelope.seq,
            where=path.name,
            until_ms=now_ms + FILE_TTL_MS,
            now_ms=now_ms,
            file=True,
        )
    return size


def who(db: OpenHome, key: bytes) -> str:
    peer = db.store.peer(key)
    return peer.name if peer is not None and peer.name else short_id(key)
