"""The command line: outputs, JSON documents, exit codes, no tracebacks."""

from __future__ import annotations

import json
import shlex
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import p2psync
from p2psync import api, clock
from p2psync.cli import output
from p2psync.cli.main import cli
from p2psync.core.entry import Entry, OpKind
from p2psync.core.identity import parse_device_id

pytestmark = pytest.mark.pure

Run = Callable[..., Result]


@pytest.fixture
def run(tmp_path: Path) -> Run:
    home = tmp_path / "home"

    def invoke(*args: str, input: str | None = None, home_path: Path = home) -> Result:
        return CliRunner().invoke(cli, ["--home", str(home_path), *args], input=input)

    return invoke


def test_init_prints_device_id_first(run: Run) -> None:
    result = run("init", "--name", "Head office")
    assert result.exit_code == 0
    first = result.output.splitlines()[0]
    parse_device_id(first)
    again = run("init")
    assert again.exit_code == 1 and "never overwritten" in again.output
    shown = json.loads(run("id", "--json").output)
    assert shown["device_id"] == first and shown["name"] == "Head office"
    assert run("id").output.strip() == first


def test_record_commands(run: Run) -> None:
    run("init")
    assert run("put", "vouchers", "V-1001", '{"amount": 1200, "party": "ACME"}').exit_code == 0
    assert json.loads(run("get", "vouchers", "V-1001").output) == {"amount": 1200, "party": "ACME"}
    missing = run("get", "vouchers", "V-9")
    assert missing.exit_code == 1 and "not found" in missing.output
    assert run("put", "vouchers", "V-2", "-", input='{"amount": 5}').exit_code == 0
    assert run("put", "vouchers", "V-3", "null").exit_code == 0
    assert run("get", "vouchers", "V-3").output.strip() == "null"
    listing = json.loads(run("ls", "vouchers", "--prefix", "V-", "--json").output)
    assert [item["key"] for item in listing] == ["V-1001", "V-2", "V-3"]
    assert run("ls").output.splitlines() == ["vouchers\t3"]
    assert run("del", "vouchers", "V-2").exit_code == 0
    assert run("del", "vouchers", "V-2").exit_code == 1
    assert run("put", "vouchers", "V-4", '{"blob": {"$base64": "AAEC"}}').exit_code == 0
    assert json.loads(run("get", "vouchers", "V-4").output) == {"blob": {"$base64": "AAEC"}}


def test_usage_errors_exit_2(run: Run) -> None:
    run("init")
    assert run("put", "c", "k", "{bad json").exit_code == 2
    assert run("put", "c", "k").exit_code == 2
    assert run("put", "bad*", "k", "1").exit_code == 2
    assert run("log", "--since", "NOT-A-TIME").exit_code == 2
    assert run("nonsense").exit_code == 2


def test_bulk_load_and_atomic(run: Run, tmp_path: Path) -> None:
    run("init")
    lines = "\n".join(
        json.dumps({"collection": "stock", "key": f"item{i}", "value": {"qty": i}})
        for i in range(100)
    )
    lines += '\n{"collection": "stock", "key": "item5", "delete": true}\n'
    result = run("put", "--from", "-", input=lines)
    assert result.exit_code == 0 and "101 changes written" in result.output
    log = json.loads(run("log", "--json").output)["entries"]
    assert len(log) == 101
    atomic = "\n".join(
        json.dumps({"collection": "ledgers", "key": f"L{i}", "value": i}) for i in range(10)
    )
    result = run("put", "--from", "-", "--atomic", input=atomic)
    assert result.exit_code == 0
    log = json.loads(run("log", "--json").output)["entries"]
    assert len(log) == 102 and len(log[-1]["ops"]) == 10
    bad = '{"collection": "c", "key": "a", "value": 1}\n{"collection": "c"}\n'
    result = run("put", "--from", "-", input=bad)
    assert result.exit_code == 2 and "line 2" in result.output
    assert run("get", "c", "a").exit_code == 1  # nothing from the failed load was kept


def test_log_verify_conflicts_resolve(run: Run, tmp_path: Path) -> None:
    other = tmp_path / "other"
    run("init")
    run("init", home_path=other)
    run("put", "stock", "bolts", '{"qty": 1}')
    run("put", "stock", "bolts", '{"qty": 2}', home_path=other)
    with p2psync.open(tmp_path / "home") as a, p2psync.open(other) as b:
        a.ingest(list(b.export()))
    text = run("conflicts").output
    assert "stock/bolts" in text and "applied:" in text and "kept:" in text
    listed = json.loads(run("conflicts", "--json").output)
    assert len(listed) == 1 and len(listed[0]["losers"]) == 1
    assert run("resolve", "stock", "bolts", '{"qty": 3}').exit_code == 0
    assert run("conflicts", "--json").output.strip() == "[]"
    verified = run("verify")
    assert verified.exit_code == 0
    assert verified.output.strip() == "3 entries from 2 authors verified"
    log_text = run("log").output
    assert "put stock/bolts" in log_text
    entry = json.loads(run("log", "--json").output)["entries"][0]
    assert {"author", "seq", "id", "hlc", "ops", "signature"} <= set(entry)


@pytest.mark.process
def test_real_process_errors_have_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "p2psync", "--home", str(tmp_path / "none"), "get", "c", "k"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("p2psync: no p2psync home")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_verify_reports_damage(run: Run, tmp_path: Path) -> None:
    run("init")
    run("put", "c", "k", "1")
    run("put", "c", "k2", "2")
    conn = sqlite3.connect(tmp_path / "home" / "store.sqlite")
    conn.execute("UPDATE entries SET payloads = x'8140' WHERE seq = 1")
    conn.commit()
    conn.close()
    result = run("verify")
    assert result.exit_code == 1 and "entry 1 of" in result.output


def test_hostile_text_is_escaped_when_printed(run: Run, tmp_path: Path) -> None:
    run("init")
    run("put", "c", "k\u202e", '"\u009b31m evil"')
    listing = run("ls", "c").output
    assert "\u009b" not in listing and "\\u009b" in listing
    assert "\u202e" not in listing and "\\u202e" in listing
    assert "\u202e" not in run("ls", "c", "--json").output
    assert "\u009b" not in run("log").output


@pytest.mark.parametrize(
    "value", ["1" * 5000, "[" * 100_000 + "]" * 100_000, '"\\ud800"', '{"\\udc00": 1}']
)
def test_awkward_json_is_refused_cleanly(run: Run, value: str) -> None:
    run("init")
    result = run("put", "c", "k", value)
    assert result.exit_code == 2
    assert "internal error" not in result.output


def test_prefix_ending_before_the_surrogates(run: Run) -> None:
    run("init")
    run("put", "c", "a\ud7ffz", "1")
    assert run("ls", "c", "--prefix", "a\ud7ff").exit_code == 0


def test_pairing_commands(run: Run, tmp_path: Path) -> None:
    own = run("init").output.splitlines()[0]
    other = run("init", home_path=tmp_path / "other").output.splitlines()[0]
    assert "no peer called" in run("pair", "add", "NOT-AN-ID").output  # names a peer, or an ID
    typo = other[:-1] + ("A" if other[-1] != "A" else "B")
    assert "invalid device ID" in run("pair", "add", typo).output
    assert run("pair", "add", own).exit_code == 2  # ourselves
    assert run("pair", "add", other, "--address", "no-port").exit_code == 2
    added = run("pair", "add", other, "--address", "10.0.0.2:7717", "--name", "Branch")
    assert added.exit_code == 0 and "p2psync pair add " + own in added.output
    listed = json.loads(run("peers", "--json").output)
    assert listed[0]["name"] == "Branch" and listed[0]["addresses"] == ["10.0.0.2:7717"]
    assert listed[0]["connected"] is False and listed[0]["behind"] is None
    assert run("pair", "remove", "Nobody").exit_code == 1  # not found: not a usage error
    assert run("pair", "remove", "Branch").exit_code == 0
    [removed] = json.loads(run("peers", "--json").output)
    assert removed["state"] == "removed"
    [rule] = json.loads(run("rule", "list", "--json").output)
    assert rule["state"] == "revoked" and rule["proposed_by"] == "you"
    status = json.loads(run("status", "--json").output)
    assert status["running"] is False and status["store"]["entries"] == 0


def _log(run: Run, *args: str) -> list[dict[str, object]]:
    result = run("log", "--json", *args)
    assert result.exit_code == 0, result.output
    entries: list[dict[str, object]] = json.loads(result.output)["entries"]
    return entries


def test_log_filters_limit_since_collection(run: Run, tmp_path: Path) -> None:
    run("init")
    for i in range(6):
        run("put", "vouchers" if i % 2 else "stock", f"k{i}", str(i))
    every = _log(run)
    assert len(every) == 6
    newest = _log(run, "--limit", "2")
    assert newest == every[-2:]  # the newest two, still oldest first
    stock = _log(run, "-c", "sto*")
    assert [e["seq"] for e in stock] == [1, 3, 5]
    assert [e["seq"] for e in _log(run, "-c", "stock", "--limit", "1")] == [5]
    assert [e["seq"] for e in _log(run, "-c", "nothing*", "-c", "vouchers")] == [2, 4, 6]
    assert _log(run, "--since", "1h") == every
    assert _log(run, "--since", "2000-01-01") == every
    assert _log(run, "--since", "2999-01-01T10:00:00+02:00") == []
    for bad in (["--since", "yesterday"], ["--since", "2026"], ["--limit", "0"], ["--limit", "x"]):
        assert run("log", *bad).exit_code == 2
    text = run("log", "--limit", "1").output.splitlines()
    assert text[0].split()[1] == "#6" and len(text) == 2


def test_log_author_is_found_like_a_peer(run: Run, tmp_path: Path) -> None:
    own = run("init", "--name", "Head office").output.splitlines()[0]
    other = run("init", home_path=tmp_path / "other").output.splitlines()[0]
    run("put", "c", "mine", "1")
    run("put", "c", "theirs", "2", home_path=tmp_path / "other")
    with p2psync.open(tmp_path / "home") as a, p2psync.open(tmp_path / "other") as b:
        a.ingest(list(b.export()))
    run("pair", "add", other, "--name", "Branch")
    for text in (other, other[:5], other.replace("-", "")[:9].lower(), "Branch"):
        entries = _log(run, "--author", text)
        assert [e["author"] for e in entries] == [other], text
    for text in (own, own[:7], "Head office"):
        assert [e["author"] for e in _log(run, "--author", text)] == [own], text
    assert run("log", "--author", "Nobody").exit_code == 1
    assert "no author" in run("log", "--author", "Nobody").output
    typo = own[:-1] + ("A" if own[-1] != "A" else "B")
    assert run("log", "--author", typo).exit_code == 2  # a malformed device ID


def test_log_limit_decodes_only_what_it_shows(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("init")
    with p2psync.open(tmp_path / "home") as db:
        db.write([[p2psync.Change(OpKind.PUT, "c", f"k{i}", i)] for i in range(500)])
        db.put("other", "k", 1)
    decoded: list[bytes] = []
    real = api.decode_stored

    def counting(signed: bytes, payloads: bytes) -> Entry:
        decoded.append(signed)
        return real(signed, payloads)

    monkeypatch.setattr(api, "decode_stored", counting)
    assert len(_log(run, "--limit", "3")) == 3
    assert len(decoded) == 3
    decoded.clear()
    assert [e["seq"] for e in _log(run, "-c", "c", "--limit", "2")] == [499, 500]
    assert len(decoded) == 2


def test_resolve_refuses_a_record_not_in_conflict(run: Run) -> None:
    run("init")
    run("put", "ledgers", "ACME", '{"balance": 1}')
    for key in ("ACNE", "ACME"):  # a mistyped key, and a record without a conflict
        refused = run("resolve", "ledgers", key, '{"balance": 2}')
        assert refused.exit_code == 1, refused.output
        assert "not in conflict" in refused.output and "--force" in refused.output
        assert refused.output.count("\n") == 1
    assert run("get", "ledgers", "ACNE").exit_code == 1  # nothing was written
    assert json.loads(run("get", "ledgers", "ACME").output) == {"balance": 1}
    assert run("resolve", "--force", "ledgers", "ACME", '{"balance": 3}').exit_code == 0
    assert json.loads(run("get", "ledgers", "ACME").output) == {"balance": 3}


def test_home_may_follow_the_command(tmp_path: Path) -> None:
    home = str(tmp_path / "a home")

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args))

    missing = invoke("get", "--home", home, "c", "k")
    assert missing.exit_code == 1
    hint = missing.output.split("run `")[1].split("`")[0]  # the hint is a valid command line
    argv = shlex.split(hint)
    assert argv[:2] == ["p2psync", "init"]
    assert invoke(*argv[1:]).exit_code == 0
    assert invoke("put", "--home", home, "c", "k", "1").exit_code == 0
    assert invoke("--home", home, "get", "c", "k").output.strip() == "1"
    assert invoke("get", "c", "k", "--home", home).output.strip() == "1"
    assert invoke("--debug", "get", "--home", home, "c", "k").output.strip() == "1"
    assert invoke("rule", "list", "--home", home).output.strip() == "no rules"
    assert invoke("pair", "pending", "--home", home).output.strip() == "nothing pending"
    assert invoke("pair", "--home", home, "pending").output.strip() == "nothing pending"
    twice = invoke("--home", home, "get", "--home", str(tmp_path / "other"), "c", "k")
    assert twice.exit_code == 2 and "--home" in twice.output
    assert invoke("--home", home, "get", "--home", home, "c", "k").exit_code == 0


def test_lookups_and_refusals_exit_1_usage_errors_exit_2(run: Run, tmp_path: Path) -> None:
    own = run("init").output.splitlines()[0]
    other = run("init", home_path=tmp_path / "other").output.splitlines()[0]
    stranger = run("init", home_path=tmp_path / "stranger").output.splitlines()[0]
    run("pair", "add", other, "--name", "Branch")
    [rule] = json.loads(run("rule", "list", "--json").output)
    usage = [
        ("pair", "add", own),  # this agent itself
        ("pair", "remove", own[:-1] + ("A" if own[-1] != "A" else "B")),  # a mistyped ID
        ("rule", "revoke", "not-hex!"),
        ("sync", "--address", "no-port"),
        ("pair", "invite", "--expires", "soon", "--address", "127.0.0.1:1"),
        ("log", "--since", "whenever"),
    ]
    for args in usage:
        assert run(*args).exit_code == 2, args
    errors = [
        ("pair", "remove", "Nobody"),  # no peer called that
        ("pair", "add", "NOT-AN-ID"),  # neither a device ID nor a peer's name
        ("rule", "propose", stranger),  # a valid ID, but not a known peer
        ("rule", "revoke", "abcdef"),  # no rule matches
        ("rule", "accept", rule["id"]),  # our own proposal: not waiting for us
        ("rule", "reject", rule["id"], "--reason", "no"),
        ("pair", "invite"),  # no agent running and no --address: no address for the code
        ("get", "c", "missing"),
    ]
    for args in errors:
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("p2psync: ") and result.output.count("\n") == 1
    assert run("rule", "revoke", rule["id"]).exit_code == 0
    again = run("rule", "revoke", rule["id"])
    assert again.exit_code == 1 and "already revoked" in again.output


def test_counts_agree_with_their_nouns(run: Run) -> None:
    run("init")
    one = run("put", "--from", "-", input='{"collection": "c", "key": "k", "value": 1}\n')
    assert one.output.strip() == "1 change written"
    assert run("verify").output.strip() == "1 entry from 1 author verified"
    status = run("status").output
    assert "store: 1 entry from 1 author, 0 conflicts, 0 held" in status
    two = run("put", "--from", "-", input='{"collection": "c", "key": "k", "value": 2}\n' * 2)
    assert two.output.strip() == "2 changes written"
    assert run("verify").output.strip() == "3 entries from 1 author verified"
    assert output.plural(1, "entry", "entries") == "1 entry"
    assert output.plural(0, "conflict") == "0 conflicts"


def test_the_clock_ahead_bound_is_a_setting_of_the_home(
    run: Run, tmp_path: Path, make_db: Callable[[str], p2psync.Database],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DESIGN "Clock": entries too far in the future are refused, the bound
    configurable (default 10 min): `p2psync settings --max-clock-ahead` keeps it in
    the home, every ingest of that home uses it, and a bad value in config.json
    is an error saying how to set it, not silently the default."""
    writer = make_db("writer")
    monkeypatch.setattr(clock, "_SKEW_MS", 30 * 60 * 1000)  # the writer is 30 min fast
    writer.put("c", "k", 1)
    monkeypatch.setattr(clock, "_SKEW_MS", 0)
    wires = list(writer.export(writer.identity.public_key))
    run("init")
    home = tmp_path / "home"
    with p2psync.open(home) as db:
        refused = db.ingest(wires).rejected
        assert refused and "ahead" in str(refused[0].error), refused
    assert "600 s" in run("settings").output
    assert run("settings", "--max-clock-ahead", "1h").exit_code == 0
    assert json.loads(run("settings", "--json").output)["max_clock_ahead_s"] == 3600
    with p2psync.open(home) as db:
        assert db.ingest(wires).accepted and db.get("c", "k") == 1
    assert run("settings", "--max-clock-ahead", "2d").exit_code == 2
    config = json.loads((home / "config.json").read_text())
    (home / "config.json").write_text(json.dumps({**config, "max_clock_ahead_s": "1h"}))
    result = run("status")
    assert result.exit_code == 1 and "max_clock_ahead_s" in result.output, result.output
    assert run("settings", "--max-clock-ahead", "10m").exit_code == 0  # the way out
    assert run("status").exit_code == 0
