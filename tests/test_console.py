"""The web console over real sockets, without a browser (``tests/test_browser.py``
drives one): logging in by the key and by a one-time link, the session cookie,
CSRF on every form, what a session may and may not do, hostile names escaped."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest

from p2psync.clock import now_ms
from p2psync.http.keys import LINK_TTL_MS, console_link_token
from tests.agents import SpawnedAgent, cli, serving, wait_for
from tests.httpclient import Api

pytestmark = pytest.mark.process

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedAgent]:
    with serving(tmp_path_factory.mktemp("console"), "hq") as agent:
        yield agent


@pytest.fixture
def api(site: SpawnedAgent) -> Api:
    return Api.of_agent(site)


def session_of(answer_headers: dict[str, str]) -> str:
    cookie = answer_headers.get("set-cookie", "")
    match = re.match(r"(p2psync_console_[A-Z2-7]{7}=[^;]+)", cookie)
    assert match, cookie
    return match.group(1)  # name=value, as a Cookie header gives it


def login(api: Api) -> tuple[str, str]:
    """Log in with the key; the session cookie and a CSRF token from a page."""
    answer = api.call("POST", "/console/login", raw=urlencode({"key": api.key}).encode(),
                      headers=FORM, key=None)
    assert answer.status == 303 and answer.headers["location"] == "/console/"
    cookie = session_of(answer.headers)
    page = api.call("GET", "/console/requests", key=None,
                    headers={"Cookie": cookie})
    assert page.status == 200
    token = re.search(r'name="csrf" value="([^"]+)"', page.body)
    assert token
    return cookie, token.group(1)


def test_login_by_key_gives_a_strict_httponly_cookie(api: Api) -> None:
    answer = api.call("POST", "/console/login", raw=urlencode({"key": api.key}).encode(),
                      headers=FORM, key=None)
    assert answer.status == 303
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    wrong = api.call("POST", "/console/login", raw=b"key=nope", headers=FORM, key=None)
    assert wrong.status == 200 and "not this site" in wrong.body
    assert "set-cookie" not in wrong.headers


def test_pages_need_a_session_and_send_a_browser_to_log_in(api: Api) -> None:
    for path in ("/console/", "/console/peers", "/console/records"):
        answer = api.call("GET", path, key=None)
        assert answer.status == 303 and answer.headers["location"] == "/console/login"
    assert api.call("GET", "/console/login", key=None).status == 200
    assert api.call("GET", "/console/static/console.js", key=None).status == 200
    page = api.call("GET", "/console/login", key=None)
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.body)
    assert assets and all(a.startswith("/") or a.startswith("#") for a in assets), assets


def test_a_one_time_link_works_once_and_only_unexpired_and_unforged(
    site: SpawnedAgent, api: Api
) -> None:
    link = cli(site.home, "console").strip()
    parts = urlsplit(link)
    path = f"{parts.path}?{parts.query}"
    first = api.call("GET", path, key=None)
    assert first.status == 303 and session_of(first.headers)
    again = api.call("GET", path, key=None)
    assert again.status == 200 and "used or expired" in again.body
    assert api.key is not None
    old = console_link_token(api.key, now_ms() - LINK_TTL_MS - 1000)
    assert "used or expired" in api.call("GET", f"/console/login?once={old}", key=None).body
    forged = console_link_token("x" * 43, now_ms())
    assert "used or expired" in api.call("GET", f"/console/login?once={forged}", key=None).body


def test_a_session_reads_but_writes_only_through_console_forms(
    site: SpawnedAgent, api: Api
) -> None:
    cookie, _csrf = login(api)
    jar = {"Cookie": cookie}
    assert api.call("GET", "/status", key=None, headers=jar).status == 200
    put = api.call("PUT", "/records/s/a", 1, key=None, headers=jar)
    assert put.status == 401
    with site.db() as db:
        assert db.get("s", "a") is None


def test_every_form_needs_the_session_s_csrf_token_and_its_origin(
    site: SpawnedAgent, api: Api
) -> None:
    api.ok("PUT", "/records/stock/C-1", 1)
    cookie, csrf = login(api)
    jar = {"Cookie": cookie, **FORM}
    body = {"collection": "stock", "key": "C-1", "value": "2"}
    for form, headers in (
        (body, jar),  # no token
        ({**body, "csrf": "wrong"}, jar),
        ({**body, "csrf": csrf}, {**jar, "Origin": "http://evil.example"}),
        ({**body, "csrf": csrf}, FORM),  # no session
    ):
        answer = api.call("POST", "/console/act/write", raw=urlencode(form).encode(),
                          headers=headers, key=None)
        if headers is FORM:  # no session at all: to the login page
            assert answer.status == 303 and answer.headers["location"] == "/console/login"
        else:
            assert answer.status == 400, answer
    with site.db() as db:
        assert db.get("stock", "C-1") == 1
    logout = api.call("POST", "/console/logout", raw=urlencode({"csrf": csrf}).encode(),
                      headers=jar, key=None)
    assert logout.status == 303
    assert api.call("GET", "/console/", key=None, headers=jar).status == 303  # ended


def test_accept_and_keep_a_version_through_the_console_and_names_escaped(
    tmp_path: Path,
) -> None:
    hq = SpawnedAgent(tmp_path / "hq", "hq").init()
    hostile = SpawnedAgent(tmp_path / "b", "b")
    hostile.name = "<script>alert(1)</script>"  # the name its requests carry
    hostile.init()
    try:
        hq.start("--http", "127.0.0.1:0")
        hostile.start()
        assert hq.http_url is not None
        api = Api.of(hq.http_url, hq.home)
        hostile.pair(hq)
        wait_for(lambda: bool(api.ok("GET", "/requests")["requests"]), timeout=20)
        cookie, csrf = login(api)
        jar = {"Cookie": cookie}
        page = api.call("GET", "/console/requests", key=None, headers=jar).body
        assert "<script>alert(1)</script>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        rule = api.ok("GET", "/requests")["requests"][0]["id"]
        done = api.call(
            "POST",
            "/console/act/accept",
            raw=urlencode({"csrf": csrf, "rule": rule, "collections": "stock",
                           "direction": ""}).encode(),
            headers={**jar, **FORM},
            key=None,
        )
        assert done.status == 303 and done.headers["location"] == "/console/requests"
        shown = api.call("GET", "/console/requests", key=None, headers=jar).body
        assert "paired with" in shown
        again = api.call("GET", "/console/requests", key=None, headers=jar).body
        assert "paired with" not in again  # shown once
        crafted = api.call("GET", "/console/requests?done=call+evil&failed=call+evil",
                           key=None, headers=jar).body
        assert "call evil" not in crafted
        wait_for(lambda: api.ok("GET", "/peers")["peers"][0]["connected"], timeout=20)
        hostile.stop()
        api.ok("PUT", "/records/stock/K", "hq")
        cli(hostile.home, "put", "stock", "K", '"branch"')
        hostile.start()
        wait_for(lambda: bool(api.ok("GET", "/conflicts")["conflicts"]), timeout=20)
        page = api.call("GET", "/console/conflicts", key=None, headers=jar).body
        entries = re.findall(r'name="entry" value="([0-9a-f]+)"', page)
        assert len(entries) == 2
        conflict = api.ok("GET", "/conflicts")["conflicts"][0]
        theirs = next(v for v in [conflict["winner"], *conflict["losers"]]
                      if v["value"] == "branch")
        kept = api.call(
            "POST",
            "/console/act/keep",
            raw=urlencode({"csrf": csrf, "collection": "stock", "key": "K",
                           "entry": theirs["entry"]}).encode(),
            headers={**jar, **FORM},
            key=None,
        )
        assert kept.status == 303
        assert "kept the version" in api.call(
            "GET", "/console/conflicts", key=None, headers=jar
        ).body
        assert api.ok("GET", "/records/stock/K")["value"] == "branch"
        assert api.ok("GET", "/conflicts")["conflicts"] == []
        # propose a rule, then revoke it, through the rules page's forms
        form = {"csrf": csrf, "peer": hostile.device_id, "collections": "vouchers",
                "direction": "send", "mode": "on-demand", "route": "auto"}
        proposed = api.call("POST", "/console/act/propose", raw=urlencode(form).encode(),
                            headers={**jar, **FORM}, key=None)
        assert proposed.status == 303
        page = api.call("GET", "/console/rules", key=None, headers=jar).body
        assert "proposed: vouchers" in page
        mine = [r for r in api.ok("GET", "/rules")["rules"] if r["state"] == "proposed"]
        assert len(mine) == 1 and mine[0]["mode"] == "on-demand"
        revoked = api.call("POST", "/console/act/revoke",
                           raw=urlencode({"csrf": csrf, "rule": mine[0]["id"]}).encode(),
                           headers={**jar, **FORM}, key=None)
        assert revoked.status == 303
        assert "revoked the rule" in api.call("GET", "/console/rules", key=None,
                                               headers=jar).body
        states = {r["id"]: r["state"] for r in api.ok("GET", "/rules")["rules"]}
        assert states[mine[0]["id"]] == "revoked"
    finally:
        hostile.stop()
        hq.stop()


@pytest.mark.pure
def test_a_link_made_before_the_agent_started_does_not_work() -> None:
    """Used links are remembered in memory: after a restart they would work again
    within their 10 minutes, so links made before the start are refused."""
    from p2psync.http.console import Sessions  # noqa: PLC0415

    key = "k" * 43
    started = now_ms()
    sessions = Sessions(key, started_ms=started)
    before = console_link_token(key, started - 60_000)
    after = console_link_token(key, now_ms())
    assert not sessions.take_link(before)
    assert sessions.take_link(after) and not sessions.take_link(after)
