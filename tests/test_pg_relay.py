"""Several relay nodes on one PostgreSQL database (issue 12), real processes:
`relay serve` nodes sharing one identity, agents' relay clients in this process
(127.0.0.1 and Unix sockets only), and a throwaway PostgreSQL cluster
(tests/pgcluster.py).

* an envelope deposited through node 1 is fetched through node 2, and a recipient
  on node 2 is told at once (LISTEN/NOTIFY);
* a device allowed on one node's home is admitted by every node; a deny ends its
  sessions on every node;
* a splice asked of the node that does not hold the peer is sent to the node that
  does, and works; running agents on different nodes sync live through it;
* kill -9 of a node in the middle of deposits: nothing acknowledged is lost, no
  quota leaks (what is charged is what is stored);
* failover: a synchronous standby promoted after kill -9 of the primary; the node
  reconnects by itself and everything acknowledged before the kill is fetched.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import trio

import p2psync
from p2psync.clock import now_ms
from p2psync.core import relaywire as wire
from p2psync.core.envelope import EnvelopeClass, seal_envelope
from p2psync.core.identity import Identity, parse_device_id
from p2psync.core.policy import sign_policy
from p2psync.core.rules import Route, Terms
from p2psync.mail.mailer import Mailer
from p2psync.net.relayclient import RelayClient, open_relay
from p2psync.net.splice import join_splice
from p2psync.store.ledger import State
from p2psync.store.relays import Relay
from tests.agents import SpawnedAgent, cli, wait_for
from tests.pgcluster import PgCluster, multi_host_conninfo, temp_root, unavailable_reason
from tests.relaynode import RelayNode, pair_by_rule
from tests.test_relay_node import records, site, use_relay, write

pytestmark = pytest.mark.process


def envelope(sender: Identity, recipient: bytes, seq: int, size: int = 100) -> bytes:
    return seal_envelope(
        sender, recipient, seq, EnvelopeClass.DATA, 0, os.urandom(size), os.urandom(32)
    )


async def allow(client: RelayClient, identity: Identity, *senders: Identity) -> None:
    signed = sign_policy(identity, 1, [s.public_key for s in senders], now_ms())
    assert isinstance(await client.set_policy(signed), wire.Done)


def at(node: RelayNode) -> Relay:
    return Relay(parse_device_id(node.device_id), (node.address,))


@pytest.fixture
def two_nodes(
    tmp_path: Path, pg_conninfo: str
) -> Iterator[tuple[RelayNode, RelayNode, dict[str, Identity]]]:
    """Two nodes of one relay on one database, admitting a to d (allowed through
    node 1's home only: the list is shared)."""
    one = RelayNode(tmp_path / "node1", "hub").init("--store", f"postgresql:{pg_conninfo}")
    two = RelayNode(tmp_path / "node2", "hub").init("--node-of", str(one.home))
    assert one.device_id == two.device_id
    people = {name: Identity(os.urandom(32)) for name in ("a", "b", "c", "d")}
    for identity in people.values():
        cli(one.home, "relay", "allow", identity.device_id)
    one.start()
    two.start()
    yield one, two, people
    one.stop()
    two.stop()


async def test_deposit_through_one_node_fetch_through_the_other_told_at_once(
    two_nodes: tuple[RelayNode, RelayNode, dict[str, Identity]],
) -> None:
    one, two, who = two_nodes
    async with (
        open_relay(who["a"], "a", at(one)) as a,
        open_relay(who["b"], "b", at(two)) as b,
    ):
        await allow(b, who["b"], who["a"])
        seen = b.arrived
        for seq in range(1, 21):
            answer = await a.deposit(envelope(who["a"], who["b"].public_key, seq))
            assert isinstance(answer, wire.Stored), answer
        with trio.fail_after(5):  # the agent's own tick is a minute: this is the push
            while (seen := await b.wait_arrived(seen)) < 20:
                pass
        got = await b.fetch(0)
        assert [h.position for h in got.held] == list(range(1, 21))
        assert await b.delete([(who["a"].public_key, seq) for seq in range(1, 21)]) == 20
        assert isinstance(
            await a.deposit(envelope(who["a"], who["b"].public_key, 1)), wire.Stored
        )  # deleted: the key is free again
    status = json.loads(cli(two.home, "relay", "status", "--json"))
    assert status["backend"] == "postgresql" and len(status["nodes"]) == 2
    assert {d["device_id"] for d in status["admitted"]} == {i.device_id for i in who.values()}
    assert status["replication"]["primary"] is True
    text = cli(one.home, "relay", "status")
    assert "relay nodes on this database: 2" in text and "mailbox store: postgresql:" in text


async def test_a_deny_through_one_nodes_home_ends_the_session_on_the_other(
    two_nodes: tuple[RelayNode, RelayNode, dict[str, Identity]],
) -> None:
    """node 2's home has no admission.json: the list is the database's."""
    one, two, who = two_nodes
    assert not (two.home / "admission.json").exists()
    async with open_relay(who["b"], "b", at(two)) as b:
        cli(one.home, "relay", "deny", who["b"].device_id)
        with trio.fail_after(5):
            while True:  # the session ends with the relay's Bye
                try:
                    await b.fetch(0)
                except Exception as exc:
                    assert "no longer admitted" in str(exc), exc
                    break
                await trio.sleep(0.2)


async def test_a_splice_asked_of_the_node_without_the_peer_is_sent_to_the_node_with_it(
    two_nodes: tuple[RelayNode, RelayNode, dict[str, Identity]],
) -> None:
    one, two, who = two_nodes
    async with (
        open_relay(who["a"], "a", at(one)) as a,
        open_relay(who["b"], "b", at(two)) as b,
        open_relay(who["c"], "c", at(two)) as c,
    ):
        await allow(b, who["b"], who["a"])
        await allow(c, who["c"], who["d"])  # c does not list a
        assert isinstance(await a.connect(who["c"].public_key), wire.Refused)
        assert isinstance(await a.connect(os.urandom(32)), wire.Refused)
        invitation = await a.connect(who["b"].public_key)
        assert isinstance(invitation, wire.Invitation), invitation
        assert invitation.address == two.address
        with trio.fail_after(5):
            invited = await b.next_invitation()
        assert invited.peer == who["a"].public_key
        relay = at(one).key
        # a key presented at the node that made it (not where it was handed) is refused
        streams: dict[str, trio.abc.Stream] = {}

        async def join(name: str, key: bytes, peer: Identity, address: str) -> None:
            streams[name] = await join_splice(
                who[name], name, relay, address, key, peer.public_key, wait=5
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(join, "a", invitation.key, who["b"], invitation.address)
            nursery.start_soon(join, "b", invited.key, who["a"], two.address)
        await streams["a"].send_all(b"hello b")
        await streams["b"].send_all(b"hello a")
        with trio.fail_after(5):
            assert await streams["b"].receive_some(7) == b"hello b"
            assert await streams["a"].receive_some(7) == b"hello a"
        for stream in streams.values():
            await stream.aclose()
        del c


def deposited(sender: Path, recipient: Path) -> bool:
    """Whether ``sender`` has data for ``recipient`` waiting at a relay."""
    with p2psync.open(sender) as db, p2psync.open(recipient) as them:
        rows = Mailer(db).ledger(them.identity.public_key)
    return any(r.state is State.AT_RELAY and r.cls == EnvelopeClass.DATA.value for r in rows)


def test_running_agents_on_two_nodes_sync_live_and_a_site_syncs_through_either(
    tmp_path: Path, pg_conninfo: str, agents: Callable[[str], SpawnedAgent]
) -> None:
    """Head office on node 1, branch on node 2, no address for each other: writes
    reach the other side live through a splice the nodes arrange; a third site
    that only runs `p2psync sync` now and then deposits through node 2 and
    collects through node 1; when node 1 dies, the head office (which lists both
    nodes' addresses) carries on through node 2."""
    one = RelayNode(tmp_path / "node1", "hub").init("--store", f"postgresql:{pg_conninfo}")
    two = RelayNode(tmp_path / "node2", "hub").init("--node-of", str(one.home))
    a, b = agents("head"), agents("branch")
    pair_by_rule(a.home, b.home, Terms.make(["*"], route=Route.AUTO))
    field = site(tmp_path, "field")
    pair_by_rule(a.home, field, Terms.make(["*"], route=Route.RELAY))
    one.start()
    two.start()
    try:
        for home in (a.home, b.home, field):
            cli(two.home, "relay", "allow", json.loads(cli(home, "status", "--json"))["device_id"])
        cli(a.home, "relay", "add", one.device_id, "--address", one.address,
            "--address", two.address)  # one relay, two nodes: the first that answers
        use_relay(b.home, two)
        for agent in (a, b):
            agent.start()
        write(a.home, 40, "h")
        wait_for(lambda: len(records(b.home)) == 40, timeout=30)
        write(b.home, 10, "b")
        wait_for(lambda: len(records(a.home)) == 50, timeout=30)
        assert f"path: via relay {one.device_id[:7]} (live)" in cli(a.home, "peers")
        # the field site: through node 2 only, never online with the head office
        use_relay(field, two)
        write(field, 5, "f")
        cli(field, "sync", "--timeout", "30")
        wait_for(lambda: len(records(a.home)) == 55, timeout=30)  # pushed from node 2 to 1
        cli(field, "relay", "remove", one.device_id)
        cli(field, "relay", "add", one.device_id, "--address", one.address)
        # whether the field's first sync (through node 2) already collected what the
        # head office deposited for it depends on timing (when it had, this sync found
        # nothing: 1 run in 7 under load); what the head office writes now, once
        # deposited, can only be collected here, through node 1
        write(a.home, 5, "h", collection="notes")
        wait_for(lambda: deposited(a.home, field), timeout=30)
        out = cli(field, "sync", "--timeout", "30")
        assert "entries received" in out, out
        assert len(records(field)) >= 40
        # node 1 dies: the head office goes on through node 2 by itself
        one.kill()
        write(b.home, 5, "late")
        wait_for(lambda: len(records(a.home)) == 60, timeout=60)
        assert two.address in cli(a.home, "status")
    finally:
        one.stop()
        two.stop()


def _ledger(conninfo: str) -> tuple[int, int, list[tuple[bytes, int]]]:
    """What the database holds: envelopes and bytes (summed), the mailbox quota
    charged (count and bytes, summed), and every (sender, seq)."""
    with psycopg.connect(conninfo) as conn:
        held = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM envelopes").fetchone()
        charged = conn.execute(
            "SELECT COALESCE(SUM(count), 0), COALESCE(SUM(bytes), 0) FROM quotas "
            "WHERE kind = 'mailbox'"
        ).fetchone()
        senders = conn.execute(
            "SELECT COALESCE(SUM(count), 0), COALESCE(SUM(bytes), 0) FROM quotas "
            "WHERE kind = 'sender'"
        ).fetchone()
        keys = conn.execute("SELECT sender, seq FROM envelopes").fetchall()
    assert held is not None and charged is not None and senders is not None
    assert (int(charged[0]), int(charged[1])) == (int(held[0]), int(held[1])), (held, charged)
    assert (int(senders[0]), int(senders[1])) == (int(held[0]), int(held[1])), (held, senders)
    return int(held[0]), int(held[1]), [(bytes(s), int(q)) for s, q in keys]


async def _deposit_until_cut(
    client: RelayClient, sender: Identity, recipient: bytes, first: int, acked: set[int]
) -> int:
    """Deposit seqs from ``first`` on, 4 at a time, until the relay goes; the seqs
    acknowledged (Stored or Duplicate) are added to ``acked``; the next seq."""
    seq = first

    async def one(s: int) -> None:
        answer = await client.deposit(envelope(sender, recipient, s, 300))
        if isinstance(answer, wire.Stored | wire.Duplicate):
            acked.add(s)

    try:
        while True:
            async with trio.open_nursery() as nursery:
                for s in range(seq, seq + 4):
                    nursery.start_soon(one, s)
            seq += 4
    except Exception:  # the relay died mid-request: what was acknowledged counts
        return seq


async def test_kill_9_of_a_node_mid_deposit_loses_nothing_acknowledged_leaks_no_quota(
    two_nodes: tuple[RelayNode, RelayNode, dict[str, Identity]], pg_conninfo: str
) -> None:
    one, two, who = two_nodes
    recipient = who["b"].public_key
    async with open_relay(who["b"], "b", at(two)) as b:
        await allow(b, who["b"], who["a"], who["c"])
    acked: set[int] = set()
    seq = 1
    for round_ in range(5):
        killed = False

        async def kill_soon(delay: float) -> None:
            nonlocal killed
            await trio.sleep(delay)
            await trio.to_thread.run_sync(one.kill)
            killed = True

        async with open_relay(who["a"], "a", at(one)) as a, trio.open_nursery() as nursery:
            nursery.start_soon(kill_soon, 0.3 + 0.15 * round_)
            seq = await _deposit_until_cut(a, who["a"], recipient, seq, acked)
            nursery.cancel_scope.cancel()
        assert killed
        one.start()
    count, size, keys = _ledger(pg_conninfo)
    held = {q for s, q in keys if s == who["a"].public_key}
    assert acked <= held, sorted(acked - held)
    assert len(acked) > 20
    # and the other node serves every one of them
    async with open_relay(who["b"], "b", at(two)) as b:
        fetched = [h async for h in b.fetch_all()]
    assert len(fetched) == count and sum(len(h.envelope) for h in fetched) >= size


# ---------------------------------------------------------------- failover


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[PgCluster, PgCluster]]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    root = temp_root("pgc-failover-")
    primary = PgCluster.create(root, "primary", sync_standby="standby1")
    standby: PgCluster | None = None
    try:
        primary.start()
        standby = PgCluster.standby_of(primary, root, "standby", application_name="standby1")
        yield primary, standby
    finally:
        for cluster in (primary, standby):
            if cluster is not None:
                cluster.destroy()
        shutil.rmtree(root, ignore_errors=True)


async def test_failover_to_a_synchronous_standby_loses_nothing_acknowledged(
    tmp_path: Path, replicated: tuple[PgCluster, PgCluster]
) -> None:
    primary, standby = replicated
    conninfo = multi_host_conninfo([primary, standby], "postgres")
    node = RelayNode(tmp_path / "node", "hub").init("--store", f"postgresql:{conninfo}")
    a, b = Identity(os.urandom(32)), Identity(os.urandom(32))
    for identity in (a, b):
        cli(node.home, "relay", "allow", identity.device_id)
    node.start()
    try:
        async with open_relay(b, "b", at(node)) as cb:
            await allow(cb, b, a)
        acked: set[int] = set()
        async with open_relay(a, "a", at(node)) as ca:
            for seq in range(1, 41):
                answer = await ca.deposit(envelope(a, b.public_key, seq))
                assert isinstance(answer, wire.Stored)
                acked.add(seq)
            # the primary dies while deposits go on; the standby is promoted
            killed_at = trio.current_time()
            await trio.to_thread.run_sync(primary.kill9)
            await trio.to_thread.run_sync(standby.promote)
            seq, resumed = 41, None
            with trio.fail_after(60):
                while resumed is None:
                    answer = await ca.deposit(envelope(a, b.public_key, seq))
                    if isinstance(answer, wire.Stored):
                        acked.add(seq)
                        resumed = trio.current_time() - killed_at
                    else:
                        assert isinstance(answer, wire.Refused), answer
                        assert answer.code is wire.RefusalCode.BUSY, answer
                        await trio.sleep(0.1)
                    seq += 1
        async with open_relay(b, "b", at(node)) as cb:
            fetched = [h async for h in cb.fetch_all()]
        got = {wire_seq(h.envelope) for h in fetched}
        assert acked <= got, sorted(acked - got)
        assert resumed is not None and resumed < 30
        status = node.status()  # from the database itself: the promoted standby
        assert status["replication"]["primary"] is True
        assert status["replication"]["server"].startswith(str(standby.socket_dir))

        def heartbeat_seen() -> bool:  # the node's own view (state.json, each second)
            running = node.status()["running"]
            return bool(running["nodes"]) and running["nodes"][0]["node"] == running["node"]

        wait_for(heartbeat_seen, timeout=10)
    finally:
        node.stop()


def wire_seq(data: bytes) -> int:
    from p2psync.core.envelope import read_header  # noqa: PLC0415

    return read_header(data).seq
