"""Rule objects and invites in the store.

``rule_objects`` keeps every verified signed rule object (proposals, answers,
revocations) that concerns this agent, exactly as signed; the state of each
proposal is folded from them (:func:`p2psync.core.rules.fold`). ``invites``
keeps the invites this agent issued (secret, terms, expiry, who used it, when
it was withdrawn).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from p2psync.core import canonical
from p2psync.core import rules as core
from p2psync.core.rules import Rule, RuleObject
from p2psync.errors import RuleError

#: Limits per peer: a stranger can only fill its own small corner of the store.
MAX_OPEN_PROPOSALS = 16
#: Rule objects a peer may have signed with us (~500 rule changes), and their bytes.
#: Objects we sign ourselves never count: our own revocation must always go through.
MAX_OBJECTS_PER_PEER = 1024
MAX_BYTES_PER_PEER = 1 << 20
#: A *stranger* is a peer we have no acceptance with (ever) and never asked to
#: pair, whose proposals we were not expecting (no invite code of its presented):
#: its requests are the only objects a throwaway key can make us store.
#: Strangers with a request awaiting our answer: beyond this many, requests from
#: further strangers are refused until some are answered, rejected (``pair reject
#: --all-pending``) or expire. Invite codes still work, both ways.
MAX_STRANGERS = 64
#: A stranger's pair holds at most this much signed by it (rejected ones too)...
MAX_OBJECTS_PER_STRANGER = 32
MAX_BYTES_PER_STRANGER = 64 << 10
#: ...and the strangers with a request awaiting our answer together at most this.
STRANGERS_BYTES = 4 << 20
#: A stranger's pair is forgotten (its rule objects deleted: :func:`expire_requests`)
#: this long after its first object, answered (rejected) or not: asking again does
#: not keep it.
REQUEST_TTL_MS = 7 * 24 * 3600 * 1000
_FLOOR = "rules_floor"  # meta: the rules version, kept moving forward across deletions
_BUDGET_HINT = (
    "answer or reject them (`p2psync pair pending`, `p2psync pair reject --all-pending`), "
    "or use an invite"
)


def add_objects(
    conn: sqlite3.Connection,
    me: bytes,
    signed: Iterable[bytes],
    now_ms: int,
    peer_only: bytes | None = None,
    *,
    expected: bool = False,
) -> list[RuleObject]:
    """Verify and keep rule objects that concern ``me``; return the new ones.

    Objects about other pairs (or, with ``peer_only``, about any pair but ``me``
    and that peer), answers to proposals we do not hold, and objects beyond the
    per-peer limits (and a stranger's beyond the strangers' ones) are refused.
    ``expected``: we presented an invite code of ``peer_only``, whose proposal we
    wait for: it is no stranger.
    """
    added = []
    known: dict[bytes, tuple[bytes, bytes]] = {}  # proposal ID -> (other party, proposer)
    usage: dict[bytes, list[int]] = {}  # peer -> [objects, bytes] it has signed with us
    strangers = _Strangers(conn, me, peer_only if expected else None)
    if peer_only is not None and peer_only != me:
        _expire_pair(conn, me, peer_only, now_ms)  # a request after its pair's time is new
    pending = []
    for blob in signed:
        obj = core.decode(blob)
        if conn.execute("SELECT 1 FROM rule_objects WHERE id = ?", (obj.id,)).fetchone():
            continue
        pending.append(obj)
    # proposals first, so answers arriving in the same batch find them
    for obj in sorted(pending, key=lambda o: o.kind is not core.Kind.PROPOSE):
        if obj.kind is core.Kind.PROPOSE:
            assert obj.acceptor is not None
            if me not in (obj.signer, obj.acceptor):
                raise RuleError("a rule proposal between other agents")
            peer = obj.acceptor if obj.signer == me else obj.signer
            proposal = obj.id
            known[obj.id] = (peer, obj.signer)
            if obj.signer != me and _open_proposals(conn, peer) >= MAX_OPEN_PROPOSALS:
                raise RuleError(f"{MAX_OPEN_PROPOSALS} proposals from this agent await answers")
            if (
                obj.signer != me
                and strangers.of(peer)
                and not strangers.asking(peer)
                and strangers.count() >= MAX_STRANGERS
            ):
                raise RuleError(
                    f"{MAX_STRANGERS} pairing requests from other agents await an "
                    f"answer here; {_BUDGET_HINT}"
                )
        else:
            assert obj.proposal is not None
            if obj.proposal not in known:
                row = conn.execute(
                    "SELECT peer, signer FROM rule_objects WHERE id = ? AND kind = 'propose'",
                    (obj.proposal,),
                ).fetchone()
                if row is None and obj.kind is core.Kind.REVOKE and obj.signer != me:
                    continue  # withdraws a request we no longer hold (expired): nothing to do
                if row is None:
                    raise RuleError("an answer to a proposal this agent does not hold")
                known[obj.proposal] = (row[0], row[1])
            peer, proposer = known[obj.proposal]
            acceptor = peer if proposer == me else me
            if obj.kind in (core.Kind.ACCEPT, core.Kind.REJECT) and obj.signer != acceptor:
                # only the acceptor answers (fold ignores any other answer); storing
                # one would let a proposer close its own requests and dodge quotas
                raise RuleError("an answer to a proposal not signed by its acceptor")
            if obj.signer not in (me, peer):
                raise RuleError("a rule answer signed by a third agent")
            proposal = obj.proposal
        if peer_only is not None and peer != peer_only:
            raise RuleError("a rule object about another pair")
        if obj.signer != me:
            if peer not in usage:
                usage[peer] = list(
                    conn.execute(
                        "SELECT count(*), coalesce(sum(size), 0) FROM rule_objects "
                        "WHERE peer = ? AND signer = ?",
                        (peer, peer),
                    ).fetchone()
                )
            count, size = usage[peer]
            if count >= MAX_OBJECTS_PER_PEER or size + len(obj.signed) > MAX_BYTES_PER_PEER:
                raise RuleError(
                    f"this agent already holds {count} rule objects ({size} bytes) signed by "
                    "that peer, the most it keeps"
                )
            if strangers.of(peer):
                strangers.charge(peer, (count, size), len(obj.signed))
            usage[peer] = [count + 1, size + len(obj.signed)]
        position = version(conn) + 1  # its rowid: the rules version once it is in
        conn.execute(
            "INSERT INTO rule_objects "
            "(rowid, id, proposal, kind, signer, peer, signed, received, size) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                position,
                obj.id,
                proposal,
                obj.kind.value,
                obj.signer,
                peer,
                obj.signed,
                now_ms,
                len(obj.signed),
            ),
        )
        added.append(obj)
    return added


class _Strangers:
    """Who is a stranger, and what strangers hold, read once per batch of objects
    (under the write lock; from indexes)."""

    def __init__(self, conn: sqlite3.Connection, me: bytes, expected: bytes | None) -> None:
        self.conn = conn
        self.me = me
        self.expected = expected
        self._of: dict[bytes, bool] = {}
        self._asking: set[bytes] | None = None
        self._bytes: int | None = None

    def of(self, peer: bytes) -> bool:
        """``peer`` is a stranger: no acceptance in the pair, no proposal of ours, no
        invite code of its presented by us (live, or waiting at a relay)."""
        if peer not in self._of:
            known = peer == self.expected
            for sql, args in (
                ("SELECT 1 FROM rule_objects WHERE kind = 'accept' AND peer = ?", (peer,)),
                (
                    "SELECT 1 FROM rule_objects WHERE kind = 'propose' AND peer = ? "
                    "AND signer = ?",
                    (peer, self.me),
                ),
                ("SELECT 1 FROM relay_joins WHERE inviter = ?", (peer,)),
            ):
                known = known or self.conn.execute(sql + " LIMIT 1", args).fetchone() is not None
            self._of[peer] = not known
        return self._of[peer]

    def asking(self, peer: bytes) -> bool:
        """``peer`` (a stranger) has a request awaiting our answer."""
        return peer in self._waiting()

    def count(self) -> int:
        return len(self._waiting())

    def _waiting(self) -> set[bytes]:
        """The strangers we never answered (nothing signed by us in the pair): a
        request open, or withdrawn by the stranger itself; only our rejection (or
        the expiry) frees a stranger's slot and bytes. Reads a covering index."""
        if self._asking is None:
            rows = self.conn.execute(
                "SELECT peer FROM rule_objects INDEXED BY rule_objects_by_signer "
                "GROUP BY peer HAVING max(signer = ?) = 0",
                (self.me,),
            ).fetchall()
            self._asking = {peer for (peer,) in rows if self.of(peer)}
        return self._asking

    def charge(self, peer: bytes, held: tuple[int, int], more: int) -> None:
        """Refuse an object of ``more`` bytes from stranger ``peer`` (``held``: the
        objects and bytes signed by it held) beyond the strangers' budgets."""
        count, size = held
        if count >= MAX_OBJECTS_PER_STRANGER or size + more > MAX_BYTES_PER_STRANGER:
            raise RuleError(
                f"this agent already holds {count} rule objects ({size} bytes) from that "
                "agent, the most it keeps for an agent it is not paired with"
            )
        if self._bytes is None:
            waiting = sorted(self._waiting() - {peer})
            self._bytes = sum(
                int(
                    self.conn.execute(
                        "SELECT coalesce(sum(size), 0) FROM rule_objects "
                        "WHERE peer = ? AND signer = ?",
                        (other, other),
                    ).fetchone()[0]
                )
                for other in waiting
            ) + size
        if self._bytes + more > STRANGERS_BYTES:
            raise RuleError(
                f"requests from agents not paired with this one fill their budget "
                f"({STRANGERS_BYTES >> 20} MiB); {_BUDGET_HINT}"
            )
        self._bytes += more


def _open_proposals(conn: sqlite3.Connection, peer: bytes) -> int:
    """Proposals signed by ``peer`` with no answer yet."""
    row = conn.execute(
        "SELECT count(*) FROM rule_objects p WHERE p.peer = ? AND p.signer = ? "
        "AND p.kind = 'propose' AND NOT EXISTS (SELECT 1 FROM rule_objects a "
        "WHERE a.proposal = p.id AND a.kind != 'propose')",
        (peer, peer),
    ).fetchone()
    return int(row[0])


def version(conn: sqlite3.Connection) -> int:
    """Grows whenever a rule object is added or deleted: each object's rowid is the
    version after it was added, and a deletion (of strangers' requests only) moves
    ``rules_floor`` past every rowid there was, so no version is ever seen twice."""
    top = conn.execute("SELECT coalesce(max(rowid), 0) FROM rule_objects").fetchone()[0]
    floor = conn.execute("SELECT value FROM meta WHERE key = ?", (_FLOOR,)).fetchone()
    return max(int(top), int(floor[0]) if floor else 0)


def _expire_pair(conn: sqlite3.Connection, me: bytes, peer: bytes, now_ms: int) -> None:
    """Forget the pair with stranger ``peer`` if its time is up (as
    :func:`expire_requests` would at its next sweep), before it asks anew: from the
    pair's rows of one covering index."""
    row = conn.execute(
        "SELECT min(received), max(kind = 'accept'), max(kind = 'propose' AND signer = ?) "
        "FROM rule_objects INDEXED BY rule_objects_by_expiry WHERE peer = ?",
        (me, peer),
    ).fetchone()
    if row[0] is None or row[1] or row[2] or row[0] >= now_ms - REQUEST_TTL_MS:
        return
    _forget(conn, [peer], peer_rows=False)  # it is asking again: its name stays


def expire_requests(
    conn: sqlite3.Connection, me: bytes, now_ms: int, ttl_ms: int | None = None
) -> list[bytes]:
    """Forget the pairs with strangers ``ttl_ms`` (default :data:`REQUEST_TTL_MS`)
    after their first object: no acceptance ever, no proposal of ours, the oldest
    object received before ``now_ms - ttl_ms``, answered (rejected) or not, however
    often it asked again since. Their rule objects are deleted, and their ``peers``
    row if nothing else was ever learnt of them (no sync, no heads). Returns their
    keys. A stranger that asks again later is a new request. Reads one covering
    index (``rule_objects_by_expiry``)."""
    cutoff = now_ms - (REQUEST_TTL_MS if ttl_ms is None else ttl_ms)
    gone = [
        peer
        for (peer,) in conn.execute(
            "SELECT peer FROM rule_objects INDEXED BY rule_objects_by_expiry GROUP BY peer "
            "HAVING max(kind = 'accept') = 0 AND max(kind = 'propose' AND signer = ?) = 0 "
            "AND min(received) < ?",
            (me, cutoff),
        ).fetchall()
    ]
    if gone:
        _forget(conn, gone, peer_rows=True)
    return gone


def _forget(conn: sqlite3.Connection, peers: list[bytes], *, peer_rows: bool) -> None:
    """Delete every rule object of these pairs (and, with ``peer_rows``, each
    ``peers`` row nothing else was learnt of: no sync, no heads), moving the rules
    version past every rowid there was."""
    floor = version(conn) + 1
    for peer in peers:
        conn.execute("DELETE FROM rule_objects WHERE peer = ?", (peer,))
        if peer_rows:
            conn.execute(
                "DELETE FROM peers WHERE key = ? AND last_sync IS NULL AND NOT EXISTS "
                "(SELECT 1 FROM peer_heads WHERE peer = ?)",
                (peer, peer),
            )
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (_FLOOR, floor))


def answered_objects(conn: sqlite3.Connection) -> dict[bytes, list[bytes]]:
    """The rule objects of every pair holding an acceptance: only those can have a
    rule in force (only the acceptor's answers are stored), so strangers' piles of
    requests are never read here."""
    rows = conn.execute("SELECT DISTINCT peer FROM rule_objects WHERE kind = 'accept'")
    return {peer: objects_with(conn, peer) for (peer,) in rows.fetchall()}


def in_force(
    objects: dict[bytes, list[bytes]], *, direct: bool = False
) -> dict[bytes, set[core.Mode]]:
    """The peers among ``objects`` (see :func:`answered_objects`) with a rule in force,
    and the modes of those rules; ``direct``: only rules a direct connection carries
    (route ``direct`` or ``auto``)."""
    modes: dict[bytes, set[core.Mode]] = {}
    for peer, blobs in objects.items():
        for rule in core.in_force(core.fold([core.decode(blob) for blob in blobs]).values()):
            if direct and rule.terms.route is core.Route.RELAY:
                continue
            modes.setdefault(peer, set()).add(rule.terms.mode)
    return modes


def intake_order(conn: sqlite3.Connection, ids: Sequence[bytes]) -> dict[bytes, int]:
    """The order in which this store took in each of these rule objects (its own
    count, see :func:`version`)."""
    return {
        row[0]: int(row[1])
        for chunk in (ids[i : i + 500] for i in range(0, len(ids), 500))
        for row in conn.execute(
            "SELECT id, rowid FROM rule_objects WHERE id IN "
            f"({', '.join('?' * len(chunk))})",
            list(chunk),
        )
    }


def latest_signed(conn: sqlite3.Connection, me: bytes) -> dict[bytes, int]:
    """Per peer, the position (see :func:`version`) of the newest rule object ``me``
    signed about the pair: whether it may have news the peer has not seen."""
    rows = conn.execute(
        "SELECT peer, max(rowid) FROM rule_objects WHERE signer = ? GROUP BY peer", (me,)
    )
    return {peer: int(latest) for peer, latest in rows}


def asking(conn: sqlite3.Connection, me: bytes) -> set[bytes]:
    """Agents this one has an open proposal to (no answer, no revocation yet)."""
    rows = conn.execute(
        "SELECT DISTINCT p.peer FROM rule_objects p WHERE p.kind = 'propose' "
        "AND p.signer = ? AND NOT EXISTS (SELECT 1 FROM rule_objects a "
        "WHERE a.proposal = p.id AND a.kind != 'propose')",
        (me,),
    )
    return {peer for (peer,) in rows}


def proposed_to(conn: sqlite3.Connection, me: bytes) -> set[bytes]:
    """Agents this one has proposed a rule to (answered or not)."""
    rows = conn.execute(
        "SELECT DISTINCT peer FROM rule_objects WHERE kind = 'propose' AND signer = ?", (me,)
    )
    return {peer for (peer,) in rows}


def objects_with(conn: sqlite3.Connection, peer: bytes | None) -> list[bytes]:
    """Every signed rule object shared with ``peer`` (or with anyone)."""
    if peer is None:
        rows = conn.execute("SELECT signed FROM rule_objects ORDER BY received, id")
    else:
        rows = conn.execute(
            "SELECT signed FROM rule_objects WHERE peer = ? ORDER BY received, id", (peer,)
        )
    return [row[0] for row in rows]


def rules_with(conn: sqlite3.Connection, peer: bytes | None) -> list[Rule]:
    objects = [core.decode(blob) for blob in objects_with(conn, peer)]
    return sorted(core.fold(objects).values(), key=lambda r: (r.proposer, r.id))


def find(conn: sqlite3.Connection, prefix: bytes) -> list[Rule]:
    """Rules whose ID starts with ``prefix``."""
    return [r for r in rules_with(conn, None) if r.id.startswith(prefix)]


@dataclass(frozen=True, slots=True)
class Invite:
    id: bytes
    secret: bytes
    terms: core.Terms
    expires: int
    used_by: bytes | None
    created: int = 0
    withdrawn: int | None = None  # when `pair uninvite` withdrew it
    relay: bytes | None = None  # the relay the code names (joins are collected there)


_INVITE_COLUMNS = "id, secret, terms, expires, used_by, created, withdrawn, relay"


def _invite(row: tuple[Any, ...]) -> Invite:
    invite_id, secret, terms, expires, used_by, created, withdrawn, relay = row
    decoded = core.Terms.decode(canonical.decode(terms, what="invite terms", max_depth=2))
    return Invite(invite_id, secret, decoded, expires, used_by, created, withdrawn, relay)


def add_invite(
    conn: sqlite3.Connection,
    invite_id: bytes,
    secret: bytes,
    terms: core.Terms,
    expires: int,
    now_ms: int,
    relay: bytes | None = None,
) -> None:
    conn.execute(
        "INSERT INTO invites (id, secret, terms, expires, created, relay) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (invite_id, secret, canonical.encode(terms.encode()), expires, now_ms, relay),
    )


def get_invite(conn: sqlite3.Connection, invite_id: bytes) -> Invite | None:
    """The invite with this ID, unless it was withdrawn: a withdrawn code is then
    refused exactly like one this agent never made."""
    row = conn.execute(
        f"SELECT {_INVITE_COLUMNS} FROM invites WHERE id = ? AND withdrawn IS NULL",
        (invite_id,),
    ).fetchone()
    return None if row is None else _invite(row)


def all_invites(conn: sqlite3.Connection) -> list[Invite]:
    """Every invite this agent made, withdrawn ones too, oldest first."""
    rows = conn.execute(f"SELECT {_INVITE_COLUMNS} FROM invites ORDER BY created, id")
    return [_invite(row) for row in rows.fetchall()]


def use_invite(conn: sqlite3.Connection, invite_id: bytes, by: bytes) -> bool:
    """Mark an unused invite used; False when it was already used (or withdrawn)."""
    return (
        conn.execute(
            "UPDATE invites SET used_by = ? WHERE id = ? AND used_by IS NULL "
            "AND withdrawn IS NULL",
            (by, invite_id),
        ).rowcount
        == 1
    )


def withdraw_invite(conn: sqlite3.Connection, invite_id: bytes, now_ms: int) -> bool:
    """Withdraw an unused invite; False when it was used or withdrawn meanwhile."""
    return (
        conn.execute(
            "UPDATE invites SET withdrawn = ? WHERE id = ? AND used_by IS NULL "
            "AND withdrawn IS NULL",
            (now_ms, invite_id),
        ).rowcount
        == 1
    )
