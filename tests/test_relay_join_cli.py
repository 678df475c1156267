"""`pair join CODE` through a relay, end to end with a real relay process and the
CLI in subprocesses (127.0.0.1 only): the head office makes a code naming its
relay and goes offline; the branch joins (its request waits at the relay); the
head office's `sync` collects it and answers; the branch's `sync` accepts; data
flows both ways through the relay."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2psync import home as home_mod
from tests.agents import cli, run
from tests.relaynode import RelayNode

pytestmark = pytest.mark.process


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayNode]:
    node = RelayNode(tmp_path / "relay").init()
    yield node
    node.stop()


def site(tmp_path: Path, name: str) -> Path:
    home_mod.init(tmp_path / name, name)
    return tmp_path / name


def device(home: Path) -> str:
    return cli(home, "id").strip()


def test_join_through_the_relay_with_the_inviter_offline(
    tmp_path: Path, relay: RelayNode
) -> None:
    head, branch = site(tmp_path, "head"), site(tmp_path, "branch")
    for home in (head, branch):
        cli(relay.home, "relay", "allow", device(home))
    relay.start()
    cli(head, "relay", "add", relay.device_id, "--address", relay.address)
    made = cli(head, "pair", "invite", "-c", "orders", "--relay", relay.device_id[:7])
    assert "for 7d" in made and f"through relay {relay.device_id[:7]}" in made, made
    code = made.strip().splitlines()[-1]
    # the head office is offline (no agent runs): the branch leaves its request
    joined = run(branch, "pair", "join", code, "--name", "Head office")
    assert joined.returncode == 0, joined.stdout + joined.stderr
    assert "left at relay" in joined.stdout and "added relay" in joined.stdout, joined.stdout
    assert "waiting for Head office" in cli(branch, "pair", "pending")
    # the head office comes back: its sync collects the request and answers it
    answered = cli(head, "sync", "--timeout", "20")
    assert "branch" in answered, answered
    assert "you asked branch" in cli(head, "pair", "pending")  # its proposal, sent back
    # the branch collects the answer: accepted as the code said, no question asked
    collected = run(branch, "sync", "--timeout", "20")
    pending = cli(branch, "pair", "pending").strip()
    assert pending == "nothing pending", (collected.stdout, collected.stderr, pending)
    cli(branch, "put", "orders", "o1", '{"qty": 3}')
    cli(branch, "sync", "--timeout", "20")  # the acceptance and the record
    cli(head, "sync", "--timeout", "20")
    assert json.loads(cli(head, "get", "orders", "o1")) == {"qty": 3}
    assert cli(head, "pair", "pending").strip() == "nothing pending"
    cli(head, "put", "orders", "o2", '"from the head office"')
    cli(head, "sync", "--timeout", "20")
    cli(branch, "sync", "--timeout", "20")
    assert json.loads(cli(branch, "get", "orders", "o2")) == "from the head office"
    invites = json.loads(cli(head, "pair", "invites", "--json"))
    assert [i["used_by_name"] for i in invites] == ["branch"]


def test_join_through_a_relay_that_does_not_admit_the_joiner_says_what_to_do(
    tmp_path: Path, relay: RelayNode
) -> None:
    head, branch = site(tmp_path, "head"), site(tmp_path, "branch")
    cli(relay.home, "relay", "allow", device(head))
    relay.start()
    cli(head, "relay", "add", relay.device_id, "--address", relay.address)
    made = cli(head, "pair", "invite", "-c", "orders", "--relay", relay.device_id[:7])
    code = made.splitlines()[-1]
    joined = run(branch, "pair", "join", code)
    assert joined.returncode == 1
    assert device(branch) in joined.stderr and "operator" in joined.stderr, joined.stderr
    assert "Traceback" not in joined.stderr
    # admitted later: the next sync leaves the request
    cli(relay.home, "relay", "allow", device(branch))
    cli(branch, "sync", "--timeout", "20")
    cli(head, "sync", "--timeout", "20")
    assert "you asked branch" in cli(head, "pair", "pending")


def test_a_refused_join_is_told_to_the_joiner_and_can_be_cleared(
    tmp_path: Path, relay: RelayNode
) -> None:
    """A code is good once: the second site that joins it through the relay hears
    back why it was refused (at its next sync, and in `pair pending`) instead of
    waiting for the code's whole life; `pair unjoin` clears the row."""
    head, one, two = (site(tmp_path, n) for n in ("head", "one", "two"))
    for home in (head, one, two):
        cli(relay.home, "relay", "allow", device(home))
    relay.start()
    cli(head, "relay", "add", relay.device_id, "--address", relay.address)
    made = cli(head, "pair", "invite", "-c", "orders", "--relay", relay.device_id[:7])
    code = made.strip().splitlines()[-1]
    for branch in (one, two):
        joined = run(branch, "pair", "join", code, "--name", "Head office")
        assert joined.returncode == 0 and "left at relay" in joined.stdout, joined.stdout
    cli(head, "sync", "--timeout", "20")  # answers one, refuses two (the code is used)
    told = run(two, "sync", "--timeout", "20")
    assert "refused" in told.stdout and "already used" in told.stdout, told.stdout
    pending = cli(two, "pair", "pending")
    assert "Head office refused your join" in pending and "already used" in pending, pending
    (row,) = json.loads(cli(two, "pair", "pending", "--json"))
    assert row["kind"] == "join" and "already used" in row["refused"], row
    cleared = cli(two, "pair", "unjoin", row["invite"][:6])
    assert row["invite"] in cleared, cleared
    assert cli(two, "pair", "pending").strip() == "nothing pending"
    assert "not pending" not in cli(one, "pair", "pending")  # the first joiner pairs
    run(one, "sync", "--timeout", "20")
    assert cli(one, "pair", "pending").strip() == "nothing pending"
    missing = run(two, "pair", "unjoin", "ffff")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr, missing.stderr
