"""Review of the web console and the systemd unit: each test fails now, for the
reason its docstring gives."""

from __future__ import annotations

import http.cookiejar
import re
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest
from click.testing import CliRunner

from p2psync import home as home_mod
from p2psync.cli.main import cli as main_cli
from p2psync.clock import now_ms
from p2psync.http.keys import console_link_token
from p2psync.net import agentsockets
from tests.agents import SpawnedAgent
from tests.httpclient import Api
from tests.test_console import FORM, api, login, site  # noqa: F401 - fixtures
from tests.test_service import directives, exec_words

# ------------------------------------------------------------------ the console


@pytest.mark.process
def test_two_sites_on_one_machine_can_both_stay_logged_in(tmp_path: Path) -> None:
    """A browser keeps cookies per host, not per port, and every agent's cookie is
    called ``p2psync_console``: logging in to a second agent on 127.0.0.1 (two homes
    on one machine) overwrites the first one's session cookie, so the first console
    sends you back to its login page. (The same port-blindness sends the session to
    any other web server on 127.0.0.1.)"""
    one = SpawnedAgent(tmp_path / "one", "one").init()
    two = SpawnedAgent(tmp_path / "two", "two").init()
    try:
        one.start("--http", "127.0.0.1:0")
        two.start("--http", "127.0.0.1:0")
        assert one.http_url and two.http_url
        jar = http.cookiejar.CookieJar()  # a browser's rules: host-only, any port
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        for agent in (one, two):
            key = (agent.home / "http.key").read_text().strip()
            with browser.open(
                f"{agent.http_url}/console/login", urlencode({"key": key}).encode(), timeout=30
            ) as answer:
                assert answer.geturl().endswith("/console/")
        with browser.open(f"{one.http_url}/console/peers", timeout=30) as answer:
            assert answer.geturl().endswith("/console/peers"), (
                "logging in to the second site logged the browser out of the first: "
                f"{[c.name for c in jar]}"
            )
    finally:
        two.stop()
        one.stop()


@pytest.mark.process
def test_a_form_s_result_is_shown_on_the_page_it_goes_back_to(api: Api) -> None:  # noqa: F811
    """What a form did (or why it failed) is kept in the session and shown by the
    next page rendered: when another console tab's live refresh (console.js fetches
    its page on every event) comes first, it takes the message, swaps in only its
    data-live part, and the message is shown nowhere."""
    cookie, csrf = login(api)
    jar = {"Cookie": cookie}
    sent = api.call(
        "POST",
        "/console/act/propose",
        raw=urlencode({"csrf": csrf, "peer": "not-a-device"}).encode(),
        headers={**jar, **FORM},
        key=None,
    )
    assert sent.status == 303 and sent.headers["location"] == "/console/rules"
    api.call("GET", "/console/peers", key=None, headers=jar)  # the other tab's refresh
    back = api.call("GET", "/console/rules", key=None, headers=jar).body
    assert "invalid device ID" in back, "the form's problem was lost"


@pytest.mark.process
def test_a_bad_choice_in_a_form_is_a_problem_on_the_page_not_an_internal_error(
    site: SpawnedAgent,  # noqa: F811
    api: Api,  # noqa: F811
) -> None:
    """A direction (or mode, or route) not in the select's list, e.g. from a stale
    page, is a ValueError from the enum: the agent answers 500 "internal error in
    the agent: ValueError: ..." as raw JSON instead of going back to the rules page
    saying what was wrong."""
    cookie, csrf = login(api)
    form = {"csrf": csrf, "peer": site.device_id, "direction": "sideways"}
    answer = api.call(
        "POST",
        "/console/act/propose",
        raw=urlencode(form).encode(),
        headers={"Cookie": cookie, **FORM},
        key=None,
    )
    assert answer.status == 303, answer
    assert "internal error" not in str(answer.body)


@pytest.mark.process
def test_a_form_sent_after_the_session_ended_goes_to_the_login_page(api: Api) -> None:  # noqa: F811
    """After an agent restart (sessions live in memory) or 12 idle hours, pressing
    any button (even "Log out") shows the browser raw JSON: 401 "an API key is
    required: send it in the X-API-Key header" — the guard redirects only GETs."""
    stale = {"Cookie": "p2psync_console_AAAAAAA=from-before-the-restart", **FORM}
    for path in ("/console/logout", "/console/act/write"):
        answer = api.call("POST", path, raw=b"csrf=x", headers=stale, key=None)
        assert answer.status == 303 and answer.headers.get("location") == "/console/login", (
            path,
            answer,
        )


@pytest.mark.pure
def test_a_used_link_does_not_work_again_after_a_quick_restart() -> None:
    """Links made up to LINK_SKEW_MS (2 s) before the agent started are taken, and
    the used ones are forgotten with the restart: a link made and used just before
    a restart logs in once more after it (replay)."""
    from p2psync.http.console import Sessions  # noqa: PLC0415

    key = "k" * 43
    made = now_ms()
    token = console_link_token(key, made)
    before = Sessions(key, started_ms=made - 60_000)
    assert before.take_link(token)  # used
    after = Sessions(key, started_ms=made + 1000)  # the agent restarted a second later
    assert not after.take_link(token), "a used one-time link logged in again"


# ------------------------------------------------------------------ the unit


def _unit(home: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        main_cli, ["--home", str(home), "service", "unit", "--executable", "/bin/true", *args]
    )
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.pure
def test_read_write_paths_names_a_home_with_a_dollar_as_it_is(tmp_path: Path) -> None:
    """systemd expands $ only in Exec lines: ReadWritePaths="…$$…" is a path with
    two dollars, so a home called "a$b" stays read-only and the agent cannot write
    its store (the unit's _quote doubles $ for both directives)."""
    home = tmp_path / "cash$box"
    home_mod.init(home, "a")
    code, text, err = _unit(home, "--user", "root")
    assert code == 0, err
    value = directives(text)["ReadWritePaths"]
    assert value.startswith('"') and value.endswith('"'), value
    as_systemd_reads_it = re.sub(r"\\(.)", r"\1", value[1:-1]).replace("%%", "%")
    assert as_systemd_reads_it == str(home.resolve()), value


@pytest.mark.pure
def test_a_deep_home_s_sockets_stay_where_the_cli_finds_them(tmp_path: Path) -> None:
    """A home deeper than ~100 bytes keeps its control socket in /tmp/p2psync-UID
    (a system service has no XDG_RUNTIME_DIR): the unit's PrivateTmp=yes hides it
    from `p2psync status`/`console`/writes' notifications, and ProtectSystem=strict
    makes the real /tmp read-only. The unit should refuse, or let it through."""
    home = tmp_path / ("deep-" + "d" * 100)
    home_mod.init(home, "a")
    place = Path(agentsockets.socket_path(home, agentsockets.CONTROL)).parent
    assert not place.is_relative_to(home.resolve())  # the case in question
    code, text, _err = _unit(home, "--user", "root")
    if code != 0:
        return
    found = directives(text)
    writable = exec_words(found["ReadWritePaths"])
    assert found.get("PrivateTmp") != "yes" and any(place.is_relative_to(w) for w in writable), (
        f"control socket in {place}, unit: PrivateTmp={found.get('PrivateTmp')}, {writable}"
    )


@pytest.mark.pure
def test_a_user_who_cannot_read_the_home_is_not_taken_silently(tmp_path: Path) -> None:
    """--user nobody for a home that root owns (mode 0700, http.key 0600) prints a
    unit that can never start (the agent cannot read its own home), without a word:
    the home's owner should at least be named."""
    home = tmp_path / "a"
    home_mod.init(home, "a")
    assert home.stat().st_uid == 0 and not home.stat().st_mode & 0o077
    code, _text, err = _unit(home, "--user", "nobody")
    assert code != 0 or "root" in err, err
