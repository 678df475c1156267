"""Review of the local HTTP API (``p2psync/http/``, ``docs/http-api.md``) as a
hostile party and a newcomer: each test fails on the code as reviewed, for the
reason its docstring gives."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2psync.core.rules import MAX_PATTERN_CHARS, Terms
from p2psync.errors import UsageError
from tests.agents import SpawnedAgent, http_agent, serving
from tests.httpclient import Api, EventStream


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedAgent]:
    with serving(tmp_path_factory.mktemp("review"), "hq") as agent:
        yield agent


@pytest.fixture
def api(site: SpawnedAgent) -> Api:
    return Api.of_agent(site)


@pytest.mark.process
def test_resolve_with_a_null_entry_is_a_400_not_a_500(api: Api) -> None:
    """``POST /conflicts/resolve`` with ``"entry": null`` (and no ``"value"``)
    passes the either/or check ("entry" is in the body), then reads
    ``body["value"]``: a KeyError, answered ``500 internal error in the agent:
    KeyError: 'value'`` where a malformed request is a 400 with one sentence."""
    answer = api.call(
        "POST", "/conflicts/resolve", {"collection": "c", "key": "k", "entry": None}
    )
    assert answer.status == 400, answer
    assert "KeyError" not in answer.body["error"]


@pytest.mark.process
def test_a_transaction_that_puts_and_deletes_one_record_is_refused(
    site: SpawnedAgent, api: Api
) -> None:
    """A transaction that changes one record twice is refused ("a transaction may
    change each record only once") when both are puts, but a put then a delete of
    a record not yet live is answered 200 ``"changes": 2`` while only the put is
    written: the delete is dropped as a no-op (``store.local._write_one`` judges
    "live" from the store before the transaction), so the record the client
    deleted exists, and the answer counts a change that was not made."""
    before = site.last_change()
    answer = api.call(
        "POST",
        "/transactions",
        {
            "changes": [
                {"collection": "twice", "key": "a", "value": 1},
                {"collection": "twice", "key": "a", "delete": True},
            ]
        },
    )
    assert answer.status == 400, answer
    assert site.last_change() == before
    with site.db() as db:
        assert not db.exists("twice", "a")


@pytest.mark.process
def test_listing_after_a_key_below_the_prefix_keeps_to_the_prefix(api: Api) -> None:
    """``GET /records/C?prefix=B-&after=A`` lists ``A-1`` and ``AZ``: with
    ``after`` given the scan starts after it instead of at the prefix
    (``store.records.scan_page``: ``low = after``), so keys outside the prefix come
    back; a client resuming a prefix listing from a stored cursor gets records it
    did not ask for."""
    for key in ("A-1", "AZ", "B-1", "B-2"):
        api.ok("PUT", f"/records/pages/{key}", 1)
    page = api.ok("GET", "/records/pages?prefix=B-&after=A")
    assert [r["key"] for r in page["records"]] == ["B-1", "B-2"], page


@pytest.mark.process
def test_hello_gives_the_latest_change_when_resuming(site: SpawnedAgent, api: Api) -> None:
    """The ``hello`` event's ``last_change`` is "the latest change number" (the
    ``_stream`` docstring; ``store.last_change`` of ``/status`` in the docs), but a
    stream resumed with ``since``/``Last-Event-ID`` says the number it was given:
    a client cannot tell from ``hello`` how far behind it is."""
    start = api.ok("GET", "/status")["store"]["last_change"]
    api.ok("PUT", "/records/hello/a", 1)
    api.ok("PUT", "/records/hello/b", 2)
    latest = site.last_change()
    events = EventStream(api, f"/events?since={start}")
    try:
        kind, hello, _ = events.next()
        assert kind == "hello"
        assert hello["last_change"] == latest, (hello, latest)
    finally:
        events.close()


@pytest.mark.process
def test_a_client_that_stops_reading_events_does_not_keep_the_agent_from_stopping(
    tmp_path: Path,
) -> None:
    """A client of ``/events`` that stops reading (a frozen tab, a SIGSTOPped
    consumer) while changes keep coming fills the socket buffers; Hypercorn's
    send is shielded from cancellation (``trio/tcp_server.protocol_send``), so on
    SIGTERM the agent waits on that send for ever and has to be killed (exit -9
    after the grace period) instead of ending in a second like with an idle
    stream or a long-poll."""
    agent = http_agent(tmp_path, "stuck")
    sock = socket.socket()
    try:
        assert agent.http_url is not None
        api = Api.of(agent.http_url, agent.home)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((api.host, api.port))
        sock.sendall(
            f"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {api.key}\r\n\r\n".encode()
        )
        time.sleep(0.5)
        big = "x" * 20_000
        for i in range(10):  # some 8 MB of change events nobody reads
            changes = [{"collection": "c", "key": f"k{i}-{j}", "value": big} for j in range(40)]
            api.ok("POST", "/transactions", {"changes": changes})
        time.sleep(1)
        began = time.monotonic()
        code = agent.stop(grace=8)
        took = time.monotonic() - began
        assert code == 0 and took < 5, f"exit {code} after {took:.1f} s"
    finally:
        sock.close()
        if agent.running:
            agent.kill9()


@pytest.mark.process
def test_an_error_quotes_little_of_a_long_input(api: Api) -> None:
    """A bad key of a million characters was quoted whole in the error (a 1 MB
    answer, and as much in any log that keeps errors)."""
    long_key = "k\n" * 500_000
    answer = api.call(
        "POST", "/transactions", {"changes": [{"collection": "c", "key": long_key, "value": 1}]}
    )
    assert answer.status == 400 and "invalid record key" in answer.body["error"], answer.status
    assert len(answer.body["error"]) < 300, len(answer.body["error"])


@pytest.mark.pure
def test_a_long_rule_pattern_is_quoted_in_part_with_the_reason() -> None:
    with pytest.raises(UsageError, match=f"1-{MAX_PATTERN_CHARS} characters") as caught:
        Terms.make(["x" * 100_000])
    assert len(str(caught.value)) < 200


@pytest.mark.process
def test_listing_requests_reads_without_writing(site: SpawnedAgent, api: Api) -> None:
    """GET /requests (and the events hub's and the console's looks at requests)
    swept expired requests first: a write on every read, which waits for the
    store's writer (a long sync batch) and fails when the store cannot be written.
    The running agent sweeps them hourly; a look needs no write."""
    with sqlite3.connect(site.home / "store.sqlite", timeout=1) as writer:
        writer.execute("BEGIN IMMEDIATE")  # another writer holds the store
        try:
            began = time.monotonic()
            answer = api.call("GET", "/requests")
            took = time.monotonic() - began
        finally:
            writer.rollback()
    assert answer.status == 200, answer
    assert took < 1, f"{took:.1f} s"
