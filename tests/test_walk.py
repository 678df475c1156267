"""A new user's first week, found by an independent walk of the README (each test
failed before its fix): on-demand rules while the agents run, peers with no rule in
force, figures after a stop or a one-shot sync, problems shown only while true, the
words for rejections and revocations, exit codes. Real agents on 127.0.0.1
(--no-discovery, but one test runs mDNS bound to 127.0.0.1 only)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import p2psync
from p2psync import pairing
from p2psync.core.identity import device_id
from p2psync.core.rules import Terms
from p2psync.views.peers import relationship
from tests.agents import SpawnedAgent, cli, run, value_at, wait_for

pytestmark = pytest.mark.process

Make = Callable[[str], SpawnedAgent]
MakeDb = Callable[[str], p2psync.Database]


def pair(x: SpawnedAgent, y: SpawnedAgent, *rule: str) -> None:
    """Both sides `pair add` each other with the same terms: one rule in force."""
    for a, b in ((x, y), (y, x)):
        cli(a.home, "pair", "add", b.device_id, "--name", b.name, "--address", b.address, *rule)

    def in_force() -> bool:
        for a, b in ((x, y), (y, x)):
            rows = json.loads(cli(a.home, "rule", "list", "--json"))
            if not any(r["state"] == "accepted" and r["peer"] == b.device_id for r in rows):
                return False
        return True

    wait_for(in_force, timeout=15)


def peer_row(agent: SpawnedAgent, other: SpawnedAgent) -> dict[str, Any]:
    rows = json.loads(cli(agent.home, "peers", "--json"))
    return next(r for r in rows if r["device_id"] == other.device_id)  # type: ignore[no-any-return]


def holds(agent: SpawnedAgent, author: SpawnedAgent, seq: int) -> bool:
    with agent.db() as db:
        return any(device_id(a.author) == author.device_id and a.seq >= seq for a in db.authors())


# ------------------------------------------------------------ 1. silent loss


@pytest.mark.slow
def test_a_record_withheld_by_a_hub_is_fetched_from_a_peer_that_holds_it(
    agents: Make,
) -> None:
    """a-b and b-c share vouchers; a-c share stock (online). c first gets a's stock
    entry through b (payload withheld, legitimately: b may not send stock). When a
    and c then connect, c asks a for the entry again (Want) and merges the stock
    change late: the record arrives, and `peers`, `status` and `sync` no longer
    note changes waiting for their contents."""
    a, b, c = agents("a").start(), agents("b").start(), agents("c").start()
    pair(a, b, "-c", "vouchers")
    pair(b, c, "-c", "vouchers")
    pair(a, c, "-c", "stock")
    c.stop()
    cli(a.home, "put", "stock", "S-1", '{"qty": 3}')
    wait_for(lambda: holds(b, a, 1), timeout=10)
    a.stop()
    c.start()
    wait_for(lambda: holds(c, a, 1), timeout=15)  # through b, stock withheld
    assert value_at(c, "stock", "S-1") is None
    assert "1 change to 'stock' arrived here without its contents" in cli(c.home, "peers")
    a.start()
    wait_for(lambda: value_at(c, "stock", "S-1") == {"qty": 3}, timeout=20)
    wait_for(lambda: peer_row(c, a)["in_sync"], timeout=20)
    assert peer_row(c, a)["incomplete"] == {}
    for text in (cli(c.home, "peers"), cli(c.home, "status")):
        assert "without its contents" not in text, text
    synced = run(c.home, "sync", "a", "--timeout", "10")
    assert synced.returncode == 0 and "without its contents" not in synced.stderr, synced


# ------------------------------------------------------------ 2. on-demand rules


@pytest.mark.slow
def test_an_on_demand_rule_syncs_on_p2psync_sync_while_the_agents_run(agents: Make) -> None:
    a, b = agents("a").start(), agents("b").start()
    pair(a, b, "-c", "stock", "--mode", "on-demand")
    cli(a.home, "put", "stock", "S-1", '{"qty": 3}')
    result = run(b.home, "sync", "a", "--timeout", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    assert value_at(b, "stock", "S-1") == {"qty": 3}


@pytest.mark.slow
def test_a_pair_with_only_on_demand_rules_is_not_called_unpaired(agents: Make) -> None:
    a, b = agents("a").start(), agents("b").start()
    pair(a, b, "-c", "stock", "--mode", "on-demand")

    time.sleep(7)  # the live session of an on-demand pair ends after 5 s
    text = cli(b.home, "peers") + cli(b.home, "status")
    assert "not paired" not in text, text
    assert "syncing" not in text, text


# ------------------------------------------------------------ 3. stale figures


@pytest.mark.slow
def test_a_completed_sync_is_not_recorded_as_a_problem(agents: Make) -> None:
    """b syncs once (its agent stopped) with a's agent: a then lists b with
    'problem: synced' (peers) and 'last error: synced' (status)."""
    a, b = agents("a").start(), agents("b").start()
    pair(a, b)
    b.stop()
    cli(b.home, "put", "c", "k", "1")
    result = run(b.home, "sync", "--timeout", "10")
    assert result.returncode == 0, result.stderr
    text = cli(a.home, "peers") + cli(a.home, "status")
    assert "synced" not in text.replace("last in sync", ""), text


@pytest.mark.slow
def test_peers_shows_no_problem_while_connected_and_in_sync(agents: Make) -> None:
    """The README walk with discovery (mDNS on 127.0.0.1 only): b asks by name, a
    accepts. Both know each other's address, so both dial; the connection that
    gives way (or the pending one) ends *after* the kept one started and its
    reason ('connection closed by the peer', 'another connection between us is
    kept', 'synced') is stored as the peer's last error. `peers` prints it as
    'problem: ...' under a peer it shows connected and in sync; `status` shows
    no error there: the two disagree."""
    a, b = agents("a"), agents("b")
    for x in (a, b):
        x.args = ["--discovery-interface", "127.0.0.1"]
        x.start()
    wait_for(
        lambda: "a" in [r["name"] for r in json.loads(cli(b.home, "peers", "--json"))], timeout=15
    )
    wait_for(
        lambda: "b" in [r["name"] for r in json.loads(cli(a.home, "peers", "--json"))], timeout=15
    )
    cli(b.home, "pair", "add", "a", "-c", "vouchers")
    wait_for(lambda: "asks" in cli(a.home, "pair", "pending"), timeout=10)
    cli(a.home, "pair", "accept", "b")
    for x, y in ((a, b), (b, a)):
        wait_for(lambda x=x, y=y: peer_row(x, y)["in_sync"] is True, timeout=15)

    time.sleep(6)  # the pending connections' 5 s deadline has passed
    rows = [peer_row(x, y) for x, y in ((a, b), (b, a))]
    assert all(r["connected"] and r["in_sync"] for r in rows)
    shown = [(r["name"], r["problem"] or r["last_error"]) for r in rows]  # `peers` prints these
    assert shown == [("b", None), ("a", None)], shown


@pytest.mark.slow
def test_an_agent_that_stops_keeps_what_it_knew_at_the_end(agents: Make) -> None:
    """b writes while connected, a gets it, b stops: b's `peers` then says
    'N ahead at last contact' (the final record is cancelled on SIGTERM)."""
    a, b = agents("a").start(), agents("b").start()
    cli(a.home, "put", "c", "k0", "0")  # so that the heads first stored are not empty
    pair(a, b)
    wait_for(lambda: value_at(b, "c", "k0") == 0, timeout=10)
    wait_for(lambda: peer_row(b, a)["in_sync"] is True, timeout=10)
    cli(b.home, "put", "c", "k1", "1")
    cli(b.home, "put", "c", "k2", "2")
    wait_for(lambda: value_at(a, "c", "k2") == 2, timeout=10)
    wait_for(lambda: peer_row(b, a)["in_sync"] is True, timeout=10)
    b.stop()
    row = peer_row(b, a)
    assert (row["behind"], row["ahead"]) == (0, 0), row


@pytest.mark.slow
def test_a_one_shot_sync_updates_behind_and_ahead(agents: Make) -> None:
    """`p2psync sync` without an agent says 'in sync', then `peers` says
    '0 behind, 2 ahead at last contact': the one-shot sync stores no heads."""
    a, b = agents("a").start(), agents("b").start()
    cli(a.home, "put", "c", "k0", "0")  # so that the heads first stored are not empty
    pair(a, b)
    wait_for(lambda: value_at(b, "c", "k0") == 0, timeout=10)
    wait_for(lambda: peer_row(b, a)["in_sync"] is True, timeout=10)
    b.stop()
    cli(b.home, "put", "c", "k1", "1")
    cli(b.home, "put", "c", "k2", "2")
    assert run(b.home, "sync", "--timeout", "10").returncode == 0
    assert value_at(a, "c", "k2") == 2
    row = peer_row(b, a)
    assert (row["behind"], row["ahead"]) == (0, 0), row


@pytest.mark.slow
def test_sync_through_the_agent_skips_removed_peers_and_says_why_a_peer_failed(
    agents: Make,
) -> None:
    """`pair remove` then `sync`: the removed peer still counts ('NOT in sync: not
    paired: ...', exit 1); and a peer whose agent is down is reported with the
    stored last error, which can be 'synced'."""
    a, b = agents("a").start(), agents("b").start()
    pair(a, b)
    cli(a.home, "pair", "remove", "b")
    result = run(a.home, "sync", "--timeout", "8")
    assert "b (" not in result.stdout, result.stdout + result.stderr


# ------------------------------------------------------------ 4. wrong words


@pytest.mark.slow
def test_a_rejected_request_is_not_shown_as_connected_and_syncing(agents: Make) -> None:
    a, b = agents("a").start(), agents("b").start()
    cli(b.home, "pair", "add", a.device_id, "--address", a.address, "--name", "a")
    wait_for(
        lambda: (
            "b asks" in cli(a.home, "pair", "pending") or "asks" in cli(a.home, "pair", "pending")
        ),
        timeout=10,
    )
    cli(a.home, "pair", "reject", b.device_id[:7], "--reason", "no")
    seen = []

    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:
        seen.append(cli(b.home, "peers"))
        time.sleep(0.25)
    assert not any("syncing" in text for text in seen), next(t for t in seen if "syncing" in t)


def _exchange(x: p2psync.Database, y: p2psync.Database) -> None:
    kx, ky = x.identity.public_key, y.identity.public_key
    for _ in range(3):
        pairing.receive(y, kx, x.store.rule_objects(ky))
        pairing.receive(x, ky, y.store.rule_objects(kx))


@pytest.mark.pure
def test_a_revoked_pair_is_not_described_as_rejected(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    ka, kb = a.identity.public_key, b.identity.public_key
    first = pairing.propose(a, kb, Terms.make(["stock"])).rule
    _exchange(a, b)
    pairing.reject(b, next(r for r in b.store.rules(ka) if r.id == first.id), "use the invite")
    second = pairing.propose(a, kb, Terms.make(["vouchers"])).rule
    _exchange(a, b)
    pairing.accept(b, next(r for r in b.store.rules(ka) if r.id == second.id))
    _exchange(a, b)
    pairing.revoke(b, next(r for r in b.store.rules(ka) if r.id == second.id))
    _exchange(a, b)
    peer = b.store.peer(ka)
    assert peer is not None
    said = relationship(kb, peer, b.store.rules(ka)), pairing.unpaired_reason(b, ka)
    assert not any("use the invite" in s for s in said), said


@pytest.mark.pure
def test_the_latest_rejection_is_the_one_shown(make_db: MakeDb) -> None:
    b = make_db("b")
    kb = b.identity.public_key
    # A first request whose ID sorts high (a fresh site until one does), so that a later
    # one soon sorts before it: each later try is one proposal and one revocation b
    # holds, and b keeps at most 32 objects from an agent it never paired with (with a
    # low first ID the tries ran past that cap, 1 run in 16).
    for n in range(64):
        a = make_db(f"a{n}")
        first = pairing.propose(a, kb, Terms.make(["stock"])).rule
        if first.id[0] >= 0xC0:
            break
    ka = a.identity.public_key
    _exchange(a, b)
    pairing.reject(b, next(r for r in b.store.rules(ka) if r.id == first.id), "first")
    for i in range(15):  # a later request whose ID sorts before the first one
        later = pairing.propose(a, kb, Terms.make([f"c{i}"])).rule
        if later.id < first.id:
            break
        pairing.revoke(a, later)
        _exchange(a, b)  # one at a time: b caps the requests it holds open (16)
    assert first.id[0] >= 0xC0 and later.id < first.id, "unlucky IDs (about 1 run in 10^8)"
    _exchange(a, b)
    pairing.reject(b, next(r for r in b.store.rules(ka) if r.id == later.id), "second")
    _exchange(a, b)
    peer = b.store.peer(ka)
    assert peer is not None
    said = relationship(kb, peer, b.store.rules(ka)), pairing.unpaired_reason(b, ka)
    assert all("second" in s for s in said), said


# ------------------------------------------------------------ 5. exit codes


def test_bad_timeouts_are_usage_errors(make_db: MakeDb, tmp_path: Path) -> None:
    make_db("a")
    for args in (("sync", "--timeout", "-1"), ("sync", "--timeout", "nan")):
        result = run(tmp_path / "a", *args)
        assert result.returncode == 2, (args, result.returncode, result.stderr)
        assert "internal error" not in result.stderr, result.stderr


def test_pasting_a_code_at_the_site_that_made_it_exits_1(make_db: MakeDb, tmp_path: Path) -> None:
    """README: 2 only for what is malformed whatever the store holds; this code is
    well-formed and works at any other site."""
    make_db("a")
    code = cli(tmp_path / "a", "pair", "invite", "--address", "127.0.0.1:7717")
    result = run(tmp_path / "a", "pair", "join", code.strip().splitlines()[-1])
    assert result.returncode == 1, (result.returncode, result.stderr)


def test_a_failed_join_names_the_inviter_once(make_db: MakeDb, tmp_path: Path) -> None:
    make_db("a")
    make_db("b")
    code = cli(tmp_path / "a", "pair", "invite", "--address", "127.0.0.1:9")
    result = run(tmp_path / "b", "pair", "join", code.strip().splitlines()[-1])
    assert result.returncode == 1
    short = result.stderr.split("pairing with ")[1].split(" ")[0]
    assert result.stderr.count(short) == 1, result.stderr


@pytest.mark.pure
def test_pair_add_that_meets_the_peers_request_reports_the_rule_it_made(
    make_db: MakeDb,
) -> None:
    """b's earlier rule (stock) is in force; b now asks for misc and a runs
    `pair add b -c misc`. When a accepts b's request (b's ID is the smaller),
    `propose` returns `agreed[-1]` of every accepted rule b proposed, in ID
    order: sometimes the old stock rule, so `pair add` prints 'paired with b:
    stock ...; they had asked for this too'."""
    for _ in range(64):
        a, b = make_db(f"a{_}"), make_db(f"b{_}")
        ka, kb = a.identity.public_key, b.identity.public_key
        old = pairing.propose(b, ka, Terms.make(["stock"])).rule
        _exchange(b, a)
        pairing.accept(a, next(r for r in a.store.rules(kb) if r.id == old.id))
        _exchange(a, b)
        theirs = pairing.propose(b, ka, Terms.make(["misc"])).rule
        _exchange(b, a)
        result = pairing.propose(a, kb, Terms.make(["misc"]))
        if theirs.id < result.rule.id or result.rule.id == old.id:
            break
    assert result.rule.terms.collections == ("misc",), (result.rule.terms, old.terms)


@pytest.mark.slow
def test_pairing_two_branches_for_another_collection_says_what_to_do_at_the_head_office(
    agents: Make,
) -> None:
    """README topology: hq<->b1 vouchers (both), hq->b2 vouchers (send only). b2
    writes a voucher (it never flows back: fine). Then b1 and b2 pair for `misc`.
    b2's entry reaches b1 (voucher withheld) and b1 forwards it to hq, which may
    receive vouchers from b1: applying it without its voucher would lose it for good,
    so hq holds it (until payloads can be fetched later) and cannot get in step with
    b1. It says so naming b2, with advice that does not cut the main voucher flow
    first, and without internal jargon."""
    hq, b1, b2 = agents("hq").start(), agents("b1").start(), agents("b2").start()
    pair(hq, b1, "-c", "vouchers")
    cli(
        hq.home,
        "pair",
        "add",
        b2.device_id,
        "--name",
        "b2",
        "--address",
        b2.address,
        "-c",
        "vouchers",
        "--direction",
        "send",
    )
    cli(
        b2.home,
        "pair",
        "add",
        hq.device_id,
        "--name",
        "hq",
        "--address",
        hq.address,
        "-c",
        "vouchers",
        "--direction",
        "receive",
    )
    cli(b2.home, "put", "vouchers", "V-2", "2")
    pair(b1, b2, "-c", "misc")
    wait_for(lambda: holds(b1, b2, 1), timeout=10)

    time.sleep(3)
    result = run(hq.home, "sync", "b1", "--timeout", "10")
    said = result.stdout + result.stderr
    assert result.returncode == 1 and "cannot get in step" in said, said
    b2_short = b2.device_id[:7]
    assert f"from {b2_short}" in said and f"pair with {b2_short}" in said, said
    assert "input #" not in said
    assert said.index(f"let the sender receive 'vouchers' from {b2_short}") < said.index(
        "leave it out of the rule with the sender"
    )
    assert cli(hq.home, "peers").count("cannot get in step") == 1
