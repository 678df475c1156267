"""Pairing and rules between real stores over memory streams: requests, mutual
adds, rejections, revocations, invites, and filtered replication."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
from collections.abc import Callable

import pytest
import trio
from click.testing import CliRunner, Result

import p2psync
from p2psync import pairing
from p2psync.cli.main import cli
from p2psync.core import canonical
from p2psync.core.rules import Direction, RuleState, Terms
from p2psync.errors import PairingError, UsageError
from p2psync.net.link import PairLink
from p2psync.net.stats import SessionStats
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.sync import run_session
from tests.test_sync import connect

pytestmark = pytest.mark.trio_memory

MakeDb = Callable[[str], p2psync.Database]


async def session(
    a: p2psync.Database,
    b: p2psync.Database,
    *,
    live_b: bool = True,
    join: pairing.InviteCode | None = None,
) -> tuple[SessionStats, SessionStats]:
    """a dials b and syncs once (like `p2psync sync`, or `pair join` with ``join``);
    b serves like an agent."""
    sa, sb = await connect(a, b)
    out: dict[str, SessionStats] = {}

    async def side(name: str, stream, db, peer, live: bool) -> None:  # type: ignore[no-untyped-def]
        link = PairLink(
            db,
            peer.identity.public_key,
            handshake_hash=stream.handshake_hash,
            peer_name=peer.home.name,
            join=pairing.JoinTicket.of(join) if join is not None and name == "a" else None,
        )
        out[name] = await run_session(
            stream, TrioStore(db.store), ChangeFeed(), live=live, link=link, pairing_timeout=2
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "a", sa, a, b, False)
        nursery.start_soon(side, "b", sb, b, a, live_b)
    return out["a"], out["b"]


def key(db: p2psync.Database) -> bytes:
    return db.identity.public_key


def state_of(db: p2psync.Database, peer: p2psync.Database) -> set[RuleState]:
    return {rule.state for rule in db.store.rules(key(peer))}


async def test_request_then_accept(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    a.put("vouchers", "V-1", 1)
    pairing.propose(a, key(b), Terms())
    stats_a, _ = await session(a, b)
    assert not stats_a.synced and "awaits approval" in stats_a.reason
    assert b.get("vouchers", "V-1") is None  # nothing flows before an answer
    [waiting] = [r for r in b.store.rules() if r.state is RuleState.PROPOSED]
    assert waiting.proposer == key(a)
    assert b.store.peer(key(a)) is not None and b.store.peer(key(a)).name == "a"  # type: ignore[union-attr]
    pairing.accept(b, waiting)
    stats_a, _ = await session(a, b)
    assert stats_a.synced and b.get("vouchers", "V-1") == 1
    assert state_of(a, b) == {RuleState.ACCEPTED}


async def test_both_adding_each_other_is_mutual_acceptance(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    pairing.propose(a, key(b), Terms())
    pairing.propose(b, key(a), Terms.make(["vouchers"]))
    a.put("vouchers", "V-1", 1)
    a.put("payroll", "P-1", 1)
    stats_a, _ = await session(a, b)
    assert stats_a.synced
    assert b.get("vouchers", "V-1") == 1 and b.get("payroll", "P-1") is None  # the common part
    # both may have accepted the other's at once: the next session tidies that
    await session(a, b)
    one_rule_nothing_open(a, b)


def one_rule_nothing_open(a: p2psync.Database, b: p2psync.Database) -> None:
    """Both hold exactly one rule in force, the other proposal superseded (revoked)."""
    for db, peer in ((a, b), (b, a)):
        rules = db.store.rules(key(peer))
        assert [r.state for r in rules].count(RuleState.ACCEPTED) == 1, rules
        assert RuleState.PROPOSED not in {r.state for r in rules}


@pytest.mark.parametrize("attempt", range(6))  # proposal IDs are random: both orders occur
async def test_a_mutual_add_seen_one_after_the_other_leaves_nothing_open(
    make_db: MakeDb, attempt: int
) -> None:
    """a asks for everything; b sees it, then asks for vouchers (pair add both ways,
    one after the other): one rule, vouchers, nothing left pending on either side."""
    a, b = make_db(f"a{attempt}"), make_db(f"b{attempt}")
    pairing.propose(a, key(b), Terms())
    await session(a, b)  # b now holds a's request
    result = pairing.propose(b, key(a), Terms.make(["vouchers"]))
    assert result.new
    await session(b, a)
    await session(a, b)
    one_rule_nothing_open(a, b)
    [rule] = [r for r in a.store.rules(key(b)) if r.state is RuleState.ACCEPTED]
    assert rule.terms.collections == ("vouchers",)


async def test_proposing_what_is_in_force_or_already_proposed_signs_nothing(
    make_db: MakeDb,
) -> None:
    a, b = make_db("a"), make_db("b")
    first = pairing.propose(a, key(b), Terms.make(["vouchers"]))
    again = pairing.propose(a, key(b), Terms.make(["vouchers"]))
    assert first.new and not again.new and again.rule.id == first.rule.id
    pairing.propose(b, key(a), Terms.make(["vouchers"]))
    await session(a, b)
    in_force = pairing.propose(a, key(b), Terms.make(["vouchers"]))
    assert not in_force.new and in_force.rule.state is RuleState.ACCEPTED
    await session(a, b)  # the two may have accepted each other's at once: tidied now
    one_rule_nothing_open(a, b)


async def test_rejection_reason_reaches_the_proposer(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    pairing.propose(a, key(b), Terms())
    await session(a, b)
    [waiting] = b.store.rules()
    pairing.reject(b, waiting, "we do not work with you")
    await session(a, b)
    [rule] = a.store.rules()
    assert rule.state is RuleState.REJECTED and rule.reason == "we do not work with you"


async def test_revocation_stops_flow_on_both_sides(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    pairing.propose(a, key(b), Terms())
    pairing.propose(b, key(a), Terms())
    a.put("c", "before", 1)
    await session(a, b)
    assert b.get("c", "before") == 1
    for rule in a.store.rules(key(b)):
        if rule.state is not RuleState.REVOKED:
            pairing.revoke(a, rule)
    a.put("c", "after", 1)
    b.put("c", "from-b", 1)
    stats_a, _ = await session(a, b)
    assert not stats_a.synced
    assert b.get("c", "after") is None and a.get("c", "from-b") is None
    assert state_of(b, a) == {RuleState.REVOKED}  # b learnt of it too


async def test_filtered_replication_keeps_chains_verifiable(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    pairing.propose(a, key(b), Terms.make(["vouchers", "stock/*"]))
    pairing.propose(b, key(a), Terms())
    a.put("vouchers", "V-1", {"amount": 5})
    a.put("payroll", "alice", {"salary": 9000})
    with a.transaction() as tx:
        tx.put("vouchers", "V-2", {"amount": 7})
        tx.put("payroll", "bob", {"salary": 8000})
        tx.put("stock/bolts", "B-1", {"qty": 3})
    stats_a, _ = await session(a, b)
    assert stats_a.synced
    assert b.get("vouchers", "V-2") == {"amount": 7} and b.get("stock/bolts", "B-1") == {"qty": 3}
    assert b.get("payroll", "alice") is None and b.get("payroll", "bob") is None
    report = b.verify()
    assert report.ok and report.entries == 3  # the whole chain, payroll ops proven by hash
    hidden = [op for entry in b.log() for op in entry.ops if op.kind is None]
    assert {op.collection for op in hidden} == {"payroll"} and len(hidden) == 2


async def test_one_way_rule(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    pairing.propose(a, key(b), Terms.make(["*"], Direction.SEND))  # a sends, b receives
    pairing.propose(b, key(a), Terms())
    a.put("c", "from-a", 1)
    b.put("c", "from-b", 1)
    stats_a, _ = await session(a, b)
    assert stats_a.synced  # in sync for what flows: b keeps its own entry
    assert b.get("c", "from-a") == 1 and a.get("c", "from-b") is None


async def test_third_party_entries_only_along_allowing_rules(make_db: MakeDb) -> None:
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    pairing.propose(c, key(b), Terms())
    pairing.propose(b, key(c), Terms())
    pairing.propose(b, key(a), Terms.make(["vouchers"]))
    pairing.propose(a, key(b), Terms())
    c.put("vouchers", "V-9", 9)
    c.put("payroll", "eve", 1)
    await session(c, b)
    assert b.get("payroll", "eve") == 1
    await session(a, b)
    assert a.get("vouchers", "V-9") == 9 and a.get("payroll", "eve") is None
    assert a.verify().ok


async def filtered_upstream(
    make_db: MakeDb,
) -> tuple[p2psync.Database, p2psync.Database]:
    """c shares only vouchers with b; b's rule with a covers everything. c's two
    entries (payroll, then vouchers) have reached b without their payroll payload."""
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    pairing.propose(c, key(b), Terms.make(["vouchers"]))
    pairing.propose(b, key(c), Terms())
    pairing.propose(b, key(a), Terms())
    pairing.propose(a, key(b), Terms())
    c.put("payroll", "eve", 1)
    c.put("vouchers", "V-9", 9)
    await session(c, b)
    return a, b


async def test_entries_filtered_upstream_are_refused_without_losing_the_session(
    make_db: MakeDb,
) -> None:
    """c shares only vouchers with b; b's rule with a covers everything. c's entries
    reach b without their payroll payloads, so b cannot give a what a's rule says a
    may have: a refuses them (applying them would lose those payloads for good) but
    keeps everything else from b, and says what to change. Once the a-b rule leaves
    payroll out, c's entries flow with payroll proven by hash."""
    a, b = await filtered_upstream(make_db)
    assert b.get("vouchers", "V-9") == 9 and b.get("payroll", "eve") is None
    b.put("vouchers", "V-10", 10)
    stats_a, stats_b = await session(a, b)
    assert not stats_a.synced and "payroll" in stats_a.reason and not stats_b.error
    assert a.get("vouchers", "V-10") == 10  # b's own entries arrived
    assert a.get("vouchers", "V-9") is None  # c's wait behind the refused one
    for rule in a.store.rules(key(b)):
        if rule.state is not RuleState.REVOKED:
            pairing.revoke(a, rule)
    pairing.propose(a, key(b), Terms.make(["vouchers"]))
    pairing.propose(b, key(a), Terms.make(["vouchers"]))
    await session(b, a)  # the new rule reaches a
    stats_a, _ = await session(a, b)
    assert stats_a.synced and a.get("vouchers", "V-9") == 9
    assert a.verify().ok


async def test_invite_code_pairs_once(make_db: MakeDb) -> None:
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    a.put("vouchers", "V-1", 1)
    code = pairing.create_invite(a, Terms.make(["vouchers"]), 600, ["127.0.0.1:7717"])
    invite = pairing.parse_invite(code)
    assert invite.inviter == key(a) and invite.addresses == ("127.0.0.1:7717",)
    stats_b, _ = await session(b, a, join=invite)
    assert stats_b.synced and b.get("vouchers", "V-1") == 1
    assert state_of(a, b) == state_of(b, a) == {RuleState.ACCEPTED}
    # the same code again, from another agent: refused
    stats_c, stats_a = await session(c, a, join=invite)
    assert not stats_c.synced and "already used" in stats_a.reason
    assert c.get("vouchers", "V-1") is None


async def test_wrong_or_expired_invite_is_refused(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    code = pairing.create_invite(a, Terms(), 600, ["127.0.0.1:1"])
    invite = pairing.parse_invite(code)
    forged = pairing.InviteCode(invite.inviter, invite.invite, os.urandom(16), (), 0, invite.terms)
    _, stats_a = await session(b, a, join=forged)
    assert "did not issue it" in stats_a.reason
    expired = pairing.create_invite(a, Terms(), -1, ["127.0.0.1:1"])
    _, stats_a = await session(b, a, join=pairing.parse_invite(expired))
    assert "expired" in stats_a.reason
    assert state_of(a, b) == set()


@pytest.mark.pure
def test_invite_codes_catch_typos() -> None:
    with pytest.raises(UsageError, match="P2PS-"):
        pairing.parse_invite("hello")
    with pytest.raises(UsageError, match="mistyped"):
        pairing.parse_invite("P2PS-AAAAAAAA-BBBBBBBB")


def code_of(fields: list[object]) -> str:
    """An invite code with these CBOR fields and a valid check (as a forger makes)."""
    payload = canonical.encode(fields)  # type: ignore[arg-type]
    check = hashlib.blake2b(payload, digest_size=2).digest()
    return "P2PS-" + base64.b32encode(payload + check).decode().rstrip("=")


@pytest.mark.pure
@pytest.mark.parametrize(
    "hints, expires",
    [
        ([[bytes([127, 0, 0, 1]), 0]], 1),  # port 0
        ([[bytes([127, 0, 0, 1]), 70000]], 1),  # port out of range
        ([[2130706433, 7717]], 1),  # an address as an integer
        ([], -5),  # expiry before 1970
    ],
)
def test_invite_codes_with_impossible_fields_are_refused(
    hints: list[object], expires: int
) -> None:
    fields: list[object] = [bytes(32), bytes(8), bytes(16), hints, expires, bytes(8)]
    with pytest.raises(UsageError, match="malformed"):
        pairing.parse_invite(code_of(fields))


@pytest.mark.pure
def test_a_joiner_cut_short_may_retry_after_the_code_expired(make_db: MakeDb) -> None:
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    code = pairing.parse_invite(pairing.create_invite(a, Terms(), 600, []))
    handshake = os.urandom(32)
    proof = pairing.join_proof(code.secret, handshake)
    first = pairing.answer_join(a, key(b), code.invite, proof, handshake)
    with sqlite3.connect(a.home.store_path) as conn:  # the code expires meanwhile
        conn.execute("UPDATE invites SET expires = 1")
    assert pairing.answer_join(a, key(b), code.invite, proof, handshake) == first
    with pytest.raises(PairingError, match=r"already used|expired"):
        pairing.answer_join(a, key(c), code.invite, proof, handshake)


async def test_a_no_op_resync_of_a_paired_pair_is_small(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    pairing.propose(a, key(b), Terms())
    pairing.propose(b, key(a), Terms())
    a.put("c", "k", 1)
    await session(a, b)
    stats_a, _ = await session(a, b)  # the rule objects are not sent again
    assert stats_a.synced and stats_a.sent == stats_a.received == 0
    assert stats_a.bytes_sent + stats_a.bytes_received < 1024


def pair_cli(db: p2psync.Database, *args: str) -> Result:
    return CliRunner().invoke(cli, ["pair", *args, "--home", str(db.path)])


async def test_invites_are_listed_and_a_withdrawn_code_is_refused_like_an_unknown_one(
    make_db: MakeDb,
) -> None:
    a, b, c, d = make_db("a"), make_db("b"), make_db("c"), make_db("d")
    made = [
        pair_cli(a, "invite", "-c", "vouchers", "--address", "127.0.0.1:1").output
        for _ in range(2)
    ]
    used, withdrawn = (pairing.parse_invite(text.splitlines()[-1]) for text in made)
    assert f"p2psync pair uninvite {withdrawn.invite.hex()}" in made[1]
    stats_b, _ = await session(b, a, join=used)
    assert stats_b.synced
    result = pair_cli(a, "uninvite", withdrawn.invite.hex()[:6])
    assert result.exit_code == 0, result.output
    # c presents the withdrawn code, d a code a never made: the same refusal
    unknown = pairing.InviteCode(
        used.inviter, os.urandom(8), os.urandom(16), (), used.expires, used.terms
    )
    stats_c, stats_a_c = await session(c, a, join=withdrawn)
    stats_d, stats_a_d = await session(d, a, join=unknown)
    assert not stats_c.synced and stats_a_c.reason.replace(
        key_short(c), "X"
    ) == stats_a_d.reason.replace(key_short(d), "X")
    assert "did not issue it" in stats_a_c.reason
    assert stats_c.reason.replace(key_short(c), "X") == stats_d.reason.replace(key_short(d), "X")
    assert state_of(a, c) == set()
    rows = {row["id"]: row for row in json.loads(pair_cli(a, "invites", "--json").output)}
    assert rows[used.invite.hex()]["state"] == "used"
    assert rows[used.invite.hex()]["used_by"] == b.device_id
    assert rows[used.invite.hex()]["used_by_name"] == "b"
    assert rows[withdrawn.invite.hex()]["state"] == "withdrawn"
    assert rows[withdrawn.invite.hex()]["withdrawn"] is not None
    assert rows[withdrawn.invite.hex()]["collections"] == ["vouchers"]
    text = pair_cli(a, "invites").output
    assert "used by b" in text and "withdrawn" in text
    for invite in (used, withdrawn):  # a used or withdrawn invite cannot be withdrawn
        again = pair_cli(a, "uninvite", invite.invite.hex())
        assert again.exit_code == 1 and again.output.count("\n") == 1
    assert pair_cli(a, "uninvite", "0000").exit_code == 1  # no such invite
    assert pair_cli(a, "uninvite", "xyz").exit_code == 2  # not an invite ID


def key_short(db: p2psync.Database) -> str:
    return db.identity.short_id


@pytest.mark.pure
@pytest.mark.parametrize("expires", ["0", "0s", "-5m", "0.001s", "5s", "31d", "99999999999d"])
def test_pair_invite_refuses_absurd_lifetimes(make_db: MakeDb, expires: str) -> None:
    a = make_db("a")
    result = pair_cli(a, "invite", "--expires", expires, "--address", "127.0.0.1:1")
    assert result.exit_code == 2 and "--expires" in result.output, result.output
    assert "Traceback" not in result.output
    assert json.loads(pair_cli(a, "invites", "--json").output) == []


def cli_json(db: p2psync.Database, *args: str) -> list[dict[str, object]]:
    result = CliRunner().invoke(cli, ["--home", str(db.path), *args, "--json"])
    assert result.exit_code == 0, result.output
    rows: list[dict[str, object]] = json.loads(result.output)
    return rows


async def test_every_command_speaks_of_direction_in_this_agents_view(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    for command in (
        ["pair", "add"],
        ["pair", "invite"],
        ["pair", "accept"],
        ["rule", "propose"],
        ["rule", "accept"],
    ):
        shown = CliRunner().invoke(cli, [*command, "--help"], terminal_width=200).output
        assert "From this agent's view: send = this agent sends" in shown, command
        assert "proposer" not in shown, command
    # a proposes that a sends; b sees a request that b receive; accepted as proposed
    sent = CliRunner().invoke(
        cli, ["--home", str(a.path), "pair", "add", b.device_id, "-c", "vouchers",
              "--direction", "send"],
    )
    assert sent.exit_code == 0, sent.output
    await session(a, b)
    [asked] = cli_json(b, "pair", "pending")
    assert asked["direction"] == "receive" and "; receive;" in str(asked["terms"])
    [listed] = cli_json(b, "rule", "list")
    assert listed["direction"] == "receive"
    [mine] = cli_json(a, "rule", "list")
    assert mine["direction"] == "send" and "; send;" in str(mine["terms"])
    widened = CliRunner().invoke(
        cli, ["--home", str(b.path), "pair", "accept", "a", "--direction", "send"]
    )
    assert widened.exit_code != 0 and "widen" in widened.output
    accepted = CliRunner().invoke(
        cli, ["--home", str(b.path), "pair", "accept", "a", "--direction", "receive"]
    )
    assert accepted.exit_code == 0 and "; receive;" in accepted.output
    await session(a, b)
    assert [r["direction"] for r in cli_json(a, "rule", "list")] == ["send"]
    assert [r["direction"] for r in cli_json(b, "rule", "list")] == ["receive"]
