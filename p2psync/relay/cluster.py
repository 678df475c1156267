"""What the relay nodes sharing one PostgreSQL database know of each other
(``docs/relay.md``, "Several relay nodes").

Nodes are stateless: they share the relay's identity (the same ``identity.key``
in each node's home) and everything else sits in the database
(:mod:`p2psync.store.pgmailbox` makes the tables):

* ``relay_nodes``: each running node (a random ID per process), the addresses
  agents reach it at, and a heartbeat every :data:`HEARTBEAT_S`; a node not seen
  for :data:`STALE_MS` is gone (killed, or cut off from the database) and counts
  nowhere;
* ``relay_sessions``: which node holds a session of which device, so a node asked
  for a splice with a device it does not hold can send the asker to the node that
  does;
* ``relay_invites``: such a splice's invitation, handed to that node (which pushes
  it to its device and accepts both joins);
* two ``LISTEN``/``NOTIFY`` channels: :data:`ARRIVED_CHANNEL` (a deposit stored
  through any node: every node tells its sessions of the recipient at once) and
  :data:`INVITE_CHANNEL` (an invitation is waiting for a node).

Every call here is blocking (run it in a worker thread); :class:`Listener` is the
one long-lived connection that waits for notifications.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p2psync.errors import StoreError
from p2psync.store.pgmailbox import ARRIVED_CHANNEL
from p2psync.store.pgpool import Pool, describe

if TYPE_CHECKING:
    import psycopg

    Conn = psycopg.Connection[tuple[Any, ...]]

INVITE_CHANNEL = "p2psync_invite"
#: Seconds between a node's heartbeats, and how long before it counts as gone.
HEARTBEAT_S = 2.0
STALE_MS = 10_000
#: Rows of nodes gone this long are removed (with their sessions) by any node.
FORGET_MS = 3_600_000
#: Every time in these tables is the database's clock (nodes' clocks may differ).
_NOW = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"


@dataclass(frozen=True)
class NodeInfo:
    node: str
    name: str
    addresses: tuple[str, ...]
    host: str
    pid: int
    started_ms: int
    ago_ms: int  # since its last heartbeat, by the database's clock

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "name": self.name,
            "addresses": list(self.addresses),
            "host": self.host,
            "pid": self.pid,
            "started": self.started_ms,
            "seen_ms_ago": max(0, self.ago_ms),
        }


@dataclass(frozen=True)
class Handed:
    """A splice invitation another node handed to this one."""

    asker: bytes
    target: bytes
    asker_key: bytes
    target_key: bytes
    life_ms: int  # how long its keys are good from now (the database's clock)


class Cluster:
    """This node's view of the others, through ``pool``'s database."""

    def __init__(self, pool: Pool, name: str) -> None:
        self.pool = pool
        self.name = name
        self.node = os.urandom(8).hex()
        self.host = socket.gethostname()
        self.addresses: tuple[str, ...] = ()
        self.started_ms = 0

    # ------------------------------------------------------------ nodes

    def join(self, addresses: list[str], now_ms: int) -> None:
        """Register this node (its advertised addresses); forget long-gone nodes.
        ``now_ms`` is only shown (as its start); staleness is the database's clock."""
        self.addresses = tuple(addresses)
        self.started_ms = now_ms
        self.pool.transaction(self._upsert)

    def _upsert(self, conn: Conn) -> None:
        conn.execute(
            "INSERT INTO relay_nodes (node, name, addresses, host, pid, started_ms, seen_ms) "
            f"VALUES (%s, %s, %s, %s, %s, %s, {_NOW}) ON CONFLICT (node) DO UPDATE SET "
            "seen_ms = excluded.seen_ms",
            (self.node, self.name, json.dumps(list(self.addresses)), self.host, os.getpid(),
             self.started_ms),
        )
        conn.execute(
            "DELETE FROM relay_sessions WHERE node IN "
            f"(SELECT node FROM relay_nodes WHERE seen_ms < {_NOW} - %s)",
            (FORGET_MS,),
        )
        conn.execute(f"DELETE FROM relay_nodes WHERE seen_ms < {_NOW} - %s", (FORGET_MS,))

    def heartbeat(self, devices: Iterable[bytes] = ()) -> list[NodeInfo]:
        """Say this node is alive (its row made again if another node removed it)
        and which devices it holds sessions of now (what opened or closed while
        the database was away is right again); every node seen lately (this one
        first)."""
        held = sorted(set(devices))

        def work(conn: Conn) -> list[NodeInfo]:
            self._upsert(conn)
            conn.execute(
                "DELETE FROM relay_sessions WHERE node = %s AND NOT (device = ANY(%s))",
                (self.node, held),
            )
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO relay_sessions (device, node, since_ms) "
                    f"VALUES (%s, %s, {_NOW}) ON CONFLICT (device, node) DO NOTHING",
                    [(device, self.node) for device in held],
                )
            conn.execute(  # invitations nobody took
                f"DELETE FROM relay_invites WHERE expires_ms < {_NOW} - 60000"
            )
            return self._nodes(conn)

        nodes = self.pool.transaction(work)
        return sorted(nodes, key=lambda n: n.node != self.node)

    @staticmethod
    def _nodes(conn: Conn) -> list[NodeInfo]:
        rows = conn.execute(
            f"SELECT node, name, addresses, host, pid, started_ms, {_NOW} - seen_ms "
            f"FROM relay_nodes WHERE seen_ms >= {_NOW} - %s ORDER BY started_ms, node",
            (STALE_MS,),
        ).fetchall()
        return [_node(row) for row in rows]

    def nodes(self) -> list[NodeInfo]:
        """Every node seen lately, oldest first (``relay status`` from any home)."""
        return self.pool.transaction(self._nodes)

    def leave(self) -> None:
        def work(conn: Conn) -> None:
            conn.execute("DELETE FROM relay_sessions WHERE node = %s", (self.node,))
            conn.execute("DELETE FROM relay_invites WHERE node = %s", (self.node,))
            conn.execute("DELETE FROM relay_nodes WHERE node = %s", (self.node,))

        self.pool.transaction(work)

    # ------------------------------------------------------------ sessions

    def opened(self, device: bytes) -> None:
        self.pool.transaction(
            lambda conn: conn.execute(
                "INSERT INTO relay_sessions (device, node, since_ms) "
                f"VALUES (%s, %s, {_NOW}) "
                "ON CONFLICT (device, node) DO UPDATE SET since_ms = excluded.since_ms",
                (device, self.node),
            )
        )

    def closed(self, device: bytes) -> None:
        self.pool.transaction(
            lambda conn: conn.execute(
                "DELETE FROM relay_sessions WHERE device = %s AND node = %s",
                (device, self.node),
            )
        )

    def locate(self, device: bytes) -> NodeInfo | None:
        """Another live node holding a session of ``device`` (the most recent)."""
        row = self.pool.transaction(
            lambda conn: conn.execute(
                "SELECT n.node, n.name, n.addresses, n.host, n.pid, n.started_ms, "
                f"{_NOW} - n.seen_ms "
                "FROM relay_sessions s JOIN relay_nodes n ON n.node = s.node "
                f"WHERE s.device = %s AND s.node <> %s AND n.seen_ms >= {_NOW} - %s "
                "ORDER BY s.since_ms DESC LIMIT 1",
                (device, self.node, STALE_MS),
            ).fetchone()
        )
        return None if row is None else _node(row)

    # ------------------------------------------------------------ handed invitations

    def hand(self, node: str, invitation: Handed) -> None:
        """Hand a splice invitation to ``node`` (its device is there)."""

        def work(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO relay_invites (node, asker, target, asker_key, target_key, "
                f"expires_ms) VALUES (%s, %s, %s, %s, %s, {_NOW} + %s)",
                (node, invitation.asker, invitation.target, invitation.asker_key,
                 invitation.target_key, invitation.life_ms),
            )
            conn.execute("SELECT pg_notify(%s, %s)", (INVITE_CHANNEL, node))

        self.pool.transaction(work)

    def take_handed(self) -> list[Handed]:
        """The invitations handed to this node (each taken once)."""
        rows = self.pool.transaction(
            lambda conn: conn.execute(
                "DELETE FROM relay_invites WHERE node = %s "
                f"RETURNING asker, target, asker_key, target_key, expires_ms - {_NOW}",
                (self.node,),
            ).fetchall()
        )
        return [
            Handed(bytes(a), bytes(t), bytes(ak), bytes(tk), int(e)) for a, t, ak, tk, e in rows
        ]

    # ------------------------------------------------------------ the database itself

    def replication(self) -> dict[str, Any]:
        """What this node's database connection sees of replication."""

        def work(conn: Conn) -> dict[str, Any]:
            (recovery,) = conn.execute("SELECT pg_is_in_recovery()").fetchone()  # type: ignore[misc]
            (names,) = conn.execute("SHOW synchronous_standby_names").fetchone()  # type: ignore[misc]
            (commit,) = conn.execute("SHOW synchronous_commit").fetchone()  # type: ignore[misc]
            rows = conn.execute(
                "SELECT application_name, state, sync_state, "
                "COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn), 0) "
                "FROM pg_stat_replication ORDER BY application_name"
            ).fetchall()
            info = conn.info
            return {
                "server": f"{info.host}:{info.port}",
                "server_version": info.server_version,
                "primary": not recovery,
                "synchronous_standby_names": names,
                "synchronous_commit": commit,
                "standbys": [
                    {"name": n, "state": s, "sync_state": ss, "flush_lag_bytes": int(lag)}
                    for n, s, ss, lag in rows
                ],
            }

        try:
            return self.pool.transaction(work)
        except StoreError as exc:
            return {"error": str(exc)}


def _node(row: tuple[Any, ...]) -> NodeInfo:
    node, name, addresses, host, pid, started, ago = row
    try:
        listed = tuple(str(a) for a in json.loads(addresses))
    except ValueError:
        listed = ()
    # a wildcard address tells no agent where this node is
    usable = tuple(a for a in listed if not a.startswith(("0.0.0.0:", "[::]:")))
    return NodeInfo(node, name, usable, host, int(pid), int(started), int(ago))


class Listener:
    """One connection LISTENing on :data:`ARRIVED_CHANNEL` and
    :data:`INVITE_CHANNEL`; :meth:`wait` (blocking, in a worker thread) returns
    what arrived within ``timeout`` seconds. A lost connection is made again at
    the next call (notifications sent meanwhile are missed: agents also poll)."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self._conn: Conn | None = None
        self.error = ""
        self._lock = threading.Lock()
        self._waiting = False  # a thread is in wait(): it closes the connection itself
        self._closed = False

    def _connect(self) -> Conn:
        import psycopg  # noqa: PLC0415

        conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=3)
        conn.execute(f"LISTEN {ARRIVED_CHANNEL}")
        conn.execute(f"LISTEN {INVITE_CHANNEL}")
        return conn

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        """(channel, payload) pairs that arrived; [] on a timeout or a lost link."""
        import psycopg  # noqa: PLC0415

        with self._lock:
            if self._closed:
                return []
            self._waiting = True
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
                self.error = ""
            notes = self._conn.notifies(timeout=timeout, stop_after=1)
            return [(n.channel, n.payload) for n in notes]
        except psycopg.Error as exc:
            self.error = describe(exc)
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            return []
        finally:
            with self._lock:
                self._waiting = False
                if self._closed:
                    self._close()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        """Close the connection, now or (while a thread waits on it) when it returns."""
        with self._lock:
            self._closed = True
            if not self._waiting:
                self._close()
