"""The local HTTP API (``docs/http-api.md``) against real agent processes over
loopback sockets: every endpoint, the key, the Host check, bad requests refused
with a JSON error and nothing written, and the event stream carrying a peer's
write, a pairing request and a peer connecting."""

from __future__ import annotations

import json
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents import SpawnedAgent, cli, http_agent, run, serving, wait_for
from tests.httpclient import Api, EventStream

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedAgent]:
    with serving(tmp_path_factory.mktemp("http"), "hq") as agent:
        yield agent


@pytest.fixture
def api(site: SpawnedAgent) -> Api:
    return Api.of_agent(site)


# ---------------------------------------------------------------- the key and the host


def test_status_says_where_the_api_is(site: SpawnedAgent) -> None:
    assert f"HTTP API and console: {site.http_url}/" in cli(site.home, "status")


def test_the_key_is_made_for_the_home_alone_and_required(site: SpawnedAgent, api: Api) -> None:
    key = site.home / "http.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = site.last_change()
    for given in (None, "not-the-key", api.key + "x"):  # type: ignore[operator]
        answer = api.call("PUT", "/records/k/a", 1, key=given)
        assert answer.status == 401, answer
        assert "API key" in answer.body["error"] and answer.body["status"] == 401
    assert api.call("GET", "/status", key=None).status == 401
    bearer = api.call("GET", "/status", key=None, headers={"Authorization": f"Bearer {api.key}"})
    assert bearer.status == 200
    assert site.last_change() == before  # nothing written on a refused request


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example", 421),
        ("evil.example:7718", 421),
        ("127.0.0.1.nip.io", 421),
        ("localhost:1", 200),
        ("127.0.0.1", 200),
        ("[::1]:7718", 200),
        ("10.1.2.3:80", 200),
        ("[::1", 421),
        ("a:b:c", 421),
        ("localhost:x", 421),
    ],
)
def test_a_host_that_dns_rebinding_could_give_is_refused(
    site: SpawnedAgent, api: Api, host: str, status: int
) -> None:
    before = site.last_change()
    answer = api.call("PUT", "/records/hosts/x", 1, headers={"Host": host})
    assert answer.status == status, (host, answer)
    if status != 200:
        assert "host" in answer.body["error"]
        assert site.last_change() == before


def test_a_request_without_a_host_is_refused(api: Api) -> None:
    with socket.create_connection((api.host, api.port), timeout=10) as sock:
        sock.sendall(f"GET /status HTTP/1.0\r\nX-API-Key: {api.key}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400", head
    assert json.loads(body)["error"] == "the request has no Host header"


def test_a_name_the_operator_allowed_is_answered(tmp_path: Path) -> None:
    agent = http_agent(tmp_path, "named", "--http-host", "hq.branch.lan")
    try:
        assert agent.http_url is not None
        api = Api.of(agent.http_url, agent.home)
        assert api.call("GET", "/status", headers={"Host": "hq.branch.lan:7718"}).status == 200
        assert api.call("GET", "/status", headers={"Host": "other.lan"}).status == 421
    finally:
        agent.stop()


def test_a_key_others_may_read_stops_the_agent_from_starting(tmp_path: Path) -> None:
    agent = SpawnedAgent(tmp_path / "loose", "loose").init()
    key = agent.home / "http.key"
    key.write_text("x" * 43 + "\n")
    key.chmod(0o644)
    result = run(agent.home, "run", "--no-discovery", "--listen", "127.0.0.1:0",
                 "--http", "127.0.0.1:0", timeout=30)
    assert result.returncode == 1, result
    assert "may be read by other users" in result.stderr and "chmod 600" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_http_port_in_use_is_said_plainly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = SpawnedAgent(tmp_path / "busy", "busy").init()
        result = run(agent.home, "run", "--no-discovery", "--listen", "127.0.0.1:0",
                     "--http", f"127.0.0.1:{port}", timeout=30)
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "--no-http" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- records


def test_records_put_get_delete_and_list_by_page(site: SpawnedAgent, api: Api) -> None:
    written = api.ok("PUT", "/records/stock/A-1", {"qty": 5, "bin": {"$base64": "AAE="}})
    assert len(written["entry"]) == 64
    got = api.ok("GET", "/records/stock/A-1")
    assert got["value"] == {"qty": 5, "bin": {"$base64": "AAE="}}
    assert got["author"] == site.device_id and got["entry"] == written["entry"]
    assert got["conflict"] is False
    with site.db() as db:
        assert db.get("stock", "A-1") == {"qty": 5, "bin": b"\x00\x01"}
    for i in range(5):
        api.ok("PUT", f"/records/stock/B-{i}", i)
    page = api.ok("GET", "/records/stock?prefix=B-&limit=2")
    assert [r["key"] for r in page["records"]] == ["B-0", "B-1"] and page["next"] == "B-1"
    page = api.ok("GET", f"/records/stock?prefix=B-&limit=2&after={page['next']}")
    assert [r["key"] for r in page["records"]] == ["B-2", "B-3"]
    page = api.ok("GET", f"/records/stock?prefix=B-&limit=2&after={page['next']}")
    assert [r["key"] for r in page["records"]] == ["B-4"] and page["next"] is None
    assert api.ok("DELETE", "/records/stock/B-4") == {"deleted": True}
    gone = api.call("GET", "/records/stock/B-4")
    assert gone.status == 404 and "was deleted" in gone.body["error"]
    assert api.call("DELETE", "/records/stock/B-4").status == 404
    listed = {c["collection"]: c["records"] for c in api.ok("GET", "/records")["collections"]}
    assert listed["stock"] == 5


def test_names_with_slashes_and_other_characters(site: SpawnedAgent, api: Api) -> None:
    api.ok("PUT", "/records/a%2Fb/x/y%20z", "slashes")
    with site.db() as db:
        assert db.get("a/b", "x/y z") == "slashes"
    assert api.ok("GET", "/records/a%2Fb/x%2Fy%20z")["value"] == "slashes"
    assert api.ok("GET", "/records/a%2Fb")["records"] == [{"key": "x/y z", "value": "slashes"}]


def test_a_transaction_is_one_entry_and_all_or_nothing(site: SpawnedAgent, api: Api) -> None:
    api.ok("PUT", "/records/tx/gone", 0)
    answer = api.ok(
        "POST",
        "/transactions",
        {
            "changes": [
                {"collection": "tx", "key": "a", "value": 1},
                {"collection": "tx", "key": "b", "value": [1, 2]},
                {"collection": "tx", "key": "gone", "delete": True},
            ]
        },
    )
    assert answer["changes"] == 3
    with site.db() as db:
        assert db.get("tx", "a") == 1 and db.get("tx", "b") == [1, 2]
        assert not db.exists("tx", "gone")
        entries = [e for e in db.log() if e.id.hex() == answer["entry"]]
    assert len(entries) == 1 and len(entries[0].ops) == 3
    before = site.last_change()
    bad = api.call(
        "POST",
        "/transactions",
        {"changes": [{"collection": "tx", "key": "c", "value": 1}, {"collection": "tx"}]},
    )
    assert bad.status == 400 and "key" in bad.body["error"]
    assert site.last_change() == before
    with site.db() as db:
        assert db.get("tx", "c") is None


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "words"),
    [
        ("PUT", "/records/bad/a", b"{nope", 400, "not valid JSON"),
        ("PUT", "/records/bad/a", b"", 400, "no body"),
        ("PUT", "/records/bad/a", b"\xff\xfe", 400, "UTF-8"),
        ("PUT", "/records/bad/a", b'{"x": NaN}', 400, "NaN"),
        ("PUT", "/records/bad/a", b'{"$base64": "!!"}', 400, "base64"),
        ("PUT", "/records/ba%2A/a", b"1", 400, "invalid collection name"),
        ("PUT", "/records/bad", b"1", 400, "/records/COLLECTION/KEY"),
        ("GET", "/records/never-written", None, 404, "no collection named"),
        ("GET", "/records/bad/none", None, 404, "does not exist"),
        ("POST", "/transactions", b"[]", 400, "changes"),
        ("POST", "/transactions", b'{"changes": []}', 400, "no changes"),
        ("POST", "/transactions", b'{"changes": [{"collection": "bad", "key": "a"}]}', 400,
         '"value" or "delete"'),
        ("POST", "/transactions", b'{"changes": [{"collection": "bad", "key": "a", '
         b'"value": 1, "extra": 2}]}', 400, "unknown fields"),
        ("GET", "/records/bad?limit=0", None, 400, "out of range"),
        ("GET", "/records/bad?limit=x", None, 400, "whole number"),
        ("GET", "/changes?since=-1", None, 400, "out of range"),
        ("GET", "/changes?timeout=nan", None, 400, "out of range"),
        ("GET", "/nowhere", None, 404, "no such path"),
        ("PATCH", "/records/bad/a", b"1", 405, "does not take that method"),
        ("POST", "/requests/zz/accept", None, 400, "not a rule ID"),
        ("POST", "/requests/" + "a" * 12 + "/accept", None, 404, "no rule"),
        ("GET", "/peers/NOT-A-DEVICE", None, 400, ""),
        ("PUT", "/records/bad/a%0Ab", b"1", 400, "invalid record key"),
        ("GET", "/changes?collection=", None, 400, "invalid collection name"),
        ("GET", "/changes?collection=a&collection=b%2A", None, 400, "invalid collection name"),
    ],
)
def test_bad_requests_get_a_json_error_and_write_nothing(
    site: SpawnedAgent,
    api: Api,
    method: str,
    path: str,
    raw: bytes | None,
    status: int,
    words: str,
) -> None:
    before = site.last_change()
    answer = api.call(method, path, raw=raw)
    assert answer.status == status, answer
    assert answer.headers.get("content-type") == "application/json"
    assert answer.body["status"] == status and words in answer.body["error"], answer.body
    assert "Traceback" not in answer.body["error"]
    assert site.last_change() == before


def raw_request(api: Api, head: str, chunks: Iterator[bytes]) -> tuple[int, bytes]:
    """Send a request by hand (the server may answer and close before the body is
    all sent); the status and body of its answer."""
    with socket.create_connection((api.host, api.port), timeout=20) as sock:
        try:
            sock.sendall(head.encode())
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_an_oversize_body_is_refused_whether_declared_or_chunked(
    site: SpawnedAgent, api: Api
) -> None:
    before = site.last_change()
    size = 9 << 20
    head = (
        f"POST /transactions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {api.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    )
    status, body = raw_request(api, head, iter([b" " * (1 << 20)] * 9))
    assert status == 413 and b"at most" in body

    def chunked() -> Iterator[bytes]:
        for _ in range(10):
            yield b"100000\r\n" + b" " * (1 << 20) + b"\r\n"
        yield b"0\r\n\r\n"

    head = (
        f"POST /transactions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {api.key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    status, body = raw_request(api, head, chunked())
    assert status == 413, body
    assert site.last_change() == before
    assert api.ok("GET", "/status")["running"]  # and the agent goes on


# ---------------------------------------------------------------- the feed


def test_changes_pages_and_long_polls(site: SpawnedAgent, api: Api) -> None:
    start = api.ok("GET", "/status")["store"]["last_change"]
    api.ok("PUT", "/records/feed/a", 1)
    api.ok("PUT", "/records/other/b", 2)
    answer = api.ok("GET", f"/changes?since={start}")
    assert [(c["collection"], c["key"]) for c in answer["changes"]] == [
        ("feed", "a"),
        ("other", "b"),
    ]
    assert answer["last"] == start + 2
    only = api.ok("GET", f"/changes?since={start}&collection=feed")
    assert [c["key"] for c in only["changes"]] == ["a"]
    # past the changes it does not follow too: the next read starts after them
    assert only["last"] == start + 2
    empty = api.ok("GET", f"/changes?since={answer['last']}")
    assert empty == {"changes": [], "last": answer["last"]}
    # a long-poll returns when a change comes (written by another process: the CLI)
    import threading  # noqa: PLC0415

    writer = threading.Timer(0.5, lambda: cli(site.home, "put", "feed", "late", "3"))
    writer.start()
    waited = api.ok("GET", f"/changes?since={answer['last']}&timeout=20")
    writer.join()
    assert [c["key"] for c in waited["changes"]] == ["late"]
    beyond = api.call("GET", f"/changes?since={waited['last'] + 1000}")
    assert beyond.status == 400 and "beyond" in beyond.body["error"]


def test_events_resume_after_the_last_event_id(site: SpawnedAgent, api: Api) -> None:
    first = EventStream(api)
    try:
        kind, hello, _ = first.next()
        assert kind == "hello" and hello["device_id"] == site.device_id
        api.ok("PUT", "/records/ev/one", 1)
        kind, change, ident = first.until(lambda k, d: k == "change")
        assert change["key"] == "one" and ident == str(change["change"])
    finally:
        first.close()
    api.ok("PUT", "/records/ev/two", 2)  # while nobody listens
    again = EventStream(api, headers={"Last-Event-ID": str(ident)})
    try:
        again.next()  # hello
        _, change, _ = again.until(lambda k, d: k == "change")
        assert change["key"] == "two"
    finally:
        again.close()


def test_a_quiet_stream_gets_keepalive_comments(api: Api) -> None:
    events = EventStream(api, "/events?keepalive=1")
    try:
        events.next()  # hello
        assert events.conn.sock is not None
        events.conn.sock.settimeout(5)
        lines = [events.response.readline() for _ in range(2)]
        assert lines == [b": keepalive\n", b"\n"], lines
    finally:
        events.close()
    bad = api.call("GET", "/events?keepalive=0")
    assert bad.status == 400


def test_event_streams_are_capped_and_a_closed_one_frees_its_place(api: Api) -> None:
    streams = [EventStream(api) for _ in range(64)]
    try:
        assert [s.status for s in streams] == [200] * 64
        refused = api.call("GET", "/events")
        assert refused.status == 429 and "64 event streams" in refused.body["error"]
    finally:
        for stream in streams:
            stream.close()

    def open_again() -> bool:
        stream = EventStream(api)
        stream.close()
        return stream.status == 200

    wait_for(open_again, timeout=10)


def test_openapi_lists_every_path(api: Api) -> None:
    document = api.ok("GET", "/openapi.json")
    assert document["openapi"].startswith("3.")
    paths = set(document["paths"])
    for path in ("/status", "/records/{collection}/{key}", "/transactions", "/changes",
                 "/events", "/peers", "/requests/{rule}/accept", "/conflicts/resolve",
                 "/ledger", "/rules/{rule}/revoke"):
        assert path in paths


# ---------------------------------------------------------------- two sites


def test_pairing_a_peer_s_write_and_a_conflict_through_the_api(tmp_path: Path) -> None:
    """HQ serves the API; a branch asks to pair. HQ's event stream shows the
    request arrive, HQ accepts it narrowed through the API, the branch connects
    (a peer event), the branch's write arrives as a change event, and a conflict
    is ended by choosing a version."""
    hq = SpawnedAgent(tmp_path / "hq", "hq").init()
    branch = SpawnedAgent(tmp_path / "branch", "branch").init()
    try:
        hq.start("--http", "127.0.0.1:0")
        branch.start()
        assert hq.http_url is not None
        api = Api.of(hq.http_url, hq.home)
        events = EventStream(api)
        try:
            events.next()  # hello
            branch.pair(hq)  # the branch asks, at HQ's address
            _, request, _ = events.until(lambda k, d: k == "request", timeout=20)
            assert request["event"] == "arrived" and request["peer"] == branch.device_id
            pending = api.ok("GET", "/requests")["requests"]
            assert [r["id"] for r in pending] == [request["id"]]
            accepted = api.ok(
                "POST", f"/requests/{request['id'][:12]}/accept", {"collections": ["stock*"]}
            )
            assert accepted["accepted"] == request["id"] and "stock*" in accepted["terms"]
            again = api.call("POST", f"/requests/{request['id']}/accept")
            assert again.status == 409
            events.until(
                lambda k, d: k == "peer" and d["device_id"] == branch.device_id
                and d["connected"],
                timeout=20,
            )
            cli(branch.home, "put", "stock", "S-1", '{"qty": 7}')
            _, change, _ = events.until(
                lambda k, d: k == "change" and d["key"] == "S-1", timeout=20
            )
            assert change["author"] == branch.device_id and change["value"] == {"qty": 7}
            peers = api.ok("GET", "/peers")["peers"]
            assert [p["device_id"] for p in peers] == [branch.device_id]
            assert api.ok("GET", f"/peers/{branch.device_id}")["state"] == "paired"
            rules = api.ok("GET", "/rules")["rules"]
            assert rules and rules[0]["state"] == "accepted"
            proposal = {"peer": branch.device_id, "collections": ["vouchers"],
                        "direction": "send"}
            made = api.call("POST", "/rules", proposal)
            assert made.status == 201 and made.body["new"], made
            assert made.body["rule"]["state"] == "proposed"
            assert made.body["rule"]["direction"] == "send"
            same = api.call("POST", "/rules", proposal)
            assert same.status == 200 and not same.body["new"]
            stranger = api.call("POST", "/rules", {**proposal, "peer": hq.device_id})
            assert stranger.status == 404  # this site is not its own peer
            assert api.ok("GET", "/ledger") == {"ledger": []}  # nothing by relay or file
        finally:
            events.close()
        # a conflict: both write the same record while apart
        branch.stop()
        api.ok("PUT", "/records/stock/S-2", "hq")
        cli(branch.home, "put", "stock", "S-2", '"branch"')
        branch.start()
        wait_for(lambda: bool(api.ok("GET", "/conflicts")["conflicts"]), timeout=20)
        conflict = api.ok("GET", "/conflicts")["conflicts"][0]
        versions = [conflict["winner"], *conflict["losers"]]
        chosen = next(v for v in versions if v["value"] == "branch")
        done = api.ok(
            "POST",
            "/conflicts/resolve",
            {"collection": "stock", "key": "S-2", "entry": chosen["entry"]},
        )
        assert done["resolved"] == "stock/S-2"
        assert api.ok("GET", "/conflicts")["conflicts"] == []
        assert api.ok("GET", "/records/stock/S-2")["value"] == "branch"
        wait_for(lambda: branch.db().get("stock", "S-2") == "branch", timeout=20)
        not_now = api.call(
            "POST", "/conflicts/resolve", {"collection": "stock", "key": "S-2", "value": 1}
        )
        assert not_now.status == 409
        rules = [r for r in api.ok("GET", "/rules")["rules"] if r["state"] == "accepted"]
        revoked = api.ok("POST", f"/rules/{rules[0]['id']}/revoke")
        assert revoked["revoked"] == rules[0]["id"]
        assert api.call("POST", f"/rules/{rules[0]['id']}/revoke").status == 409
    finally:
        branch.stop()
        hq.stop()


def test_a_request_rejected_with_a_reason(tmp_path: Path) -> None:
    hq = SpawnedAgent(tmp_path / "hq", "hq").init()
    branch = SpawnedAgent(tmp_path / "branch", "branch").init()
    try:
        hq.start("--http", "127.0.0.1:0")
        branch.start()
        assert hq.http_url is not None
        api = Api.of(hq.http_url, hq.home)
        branch.pair(hq)
        wait_for(lambda: bool(api.ok("GET", "/requests")["requests"]), timeout=20)
        rule = api.ok("GET", "/requests")["requests"][0]
        no_reason = api.call("POST", f"/requests/{rule['id']}/reject", {})
        assert no_reason.status == 400 and "why" in no_reason.body["error"]
        api.ok("POST", f"/requests/{rule['id']}/reject", {"reason": "not our branch"})
        assert api.ok("GET", "/requests")["requests"] == []
        wait_for(
            lambda: "not our branch" in cli(branch.home, "peers"), timeout=20
        )
    finally:
        branch.stop()
        hq.stop()
