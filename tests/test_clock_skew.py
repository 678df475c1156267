"""Issue 13, fault battery: clock skew. Two live sites whose clocks are an hour
apart, then one whose clock jumps back an hour. What the design promises
(DESIGN "Clock"): a site's own writes keep their order after a jump backwards
(hybrid logical clock), entries stamped more than 10 minutes ahead of the
receiver's clock are refused with a clear reason, shown on both sides, and
everything else keeps converging."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from p2psync.clock import SKEW_VARIABLE
from tests.agents import SpawnedAgent, cli, value_at, wait_for

pytestmark = pytest.mark.process

Make = Callable[[str], SpawnedAgent]
HOUR_MS = 3_600_000


def problem(agent: SpawnedAgent, peer: str) -> str:
    rows = json.loads(cli(agent.home, "peers", "--json"))
    return str(next(r for r in rows if r["name"] == peer)["problem"] or "")


def test_sites_an_hour_apart_and_a_clock_jumping_back_keep_converging(
    agents: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = agents("a").start()
    monkeypatch.setenv(SKEW_VARIABLE, str(HOUR_MS))  # b's clock is an hour fast
    b = agents("b").start()
    a.pair(b)
    b.pair(a)
    cli(b.home, "put", "vouchers", "V-2", "2")
    monkeypatch.delenv(SKEW_VARIABLE)
    cli(a.home, "put", "vouchers", "V-1", "1")
    # a's entries are in b's past: they flow
    wait_for(lambda: value_at(b, "vouchers", "V-1") == 1, timeout=15)
    # b's are an hour ahead of a's clock: refused, and both sides say why
    wait_for(lambda: "clock" in problem(a, "b"), timeout=15)
    assert "cannot get in step" in problem(a, "b")
    wait_for(lambda: "the peer refused what we sent" in problem(b, "a"), timeout=15)
    assert "clock" in problem(b, "a")
    assert value_at(a, "vouchers", "V-2") is None

    # a's clock jumps back an hour (now two hours behind b): its new writes still
    # come after its old ones, here and at b
    a.stop()
    monkeypatch.setenv(SKEW_VARIABLE, str(-HOUR_MS))
    a.start()
    cli(a.home, "put", "vouchers", "V-1", "10")  # replaces V-1 = 1, written "later"
    cli(a.home, "put", "vouchers", "V-3", "3")
    monkeypatch.delenv(SKEW_VARIABLE)
    assert value_at(a, "vouchers", "V-1") == 10
    wait_for(lambda: value_at(b, "vouchers", "V-3") == 3, timeout=15)
    assert value_at(b, "vouchers", "V-1") == 10  # not kept at 1 by an older clock
    conflicts = json.loads(cli(b.home, "conflicts", "--json"))
    assert conflicts == [], conflicts
    # everything but b's own entries is alike on both sides
    with a.db() as da, b.db() as db:
        ours, theirs = dict(da.scan("vouchers")), dict(db.scan("vouchers"))
    assert ours == {k: v for k, v in theirs.items() if k != "V-2"} == {"V-1": 10, "V-3": 3}
    assert "clock" in problem(a, "b")  # still said while it holds
