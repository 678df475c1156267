"""Hostile review (issue 10, relay part 1): `pair add --relay` refuses after it acted."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from click.testing import CliRunner

import p2psync
from p2psync.cli.main import cli
from p2psync.core.identity import Identity, device_id
from p2psync.core.rules import RuleState

pytestmark = pytest.mark.pure

MakeDb = Callable[[str], p2psync.Database]


@pytest.mark.parametrize(
    "extra", [["--route", "direct", "--relay", "AAAA"], ["--route", "relay", "--relay", "ZZZZ"]]
)
def test_a_refused_pair_add_relay_proposes_nothing(make_db: MakeDb, extra: list[str]) -> None:
    """`pair add PEER --route direct --relay R` (or --relay naming no relay) exits with
    an error, but cli/pair.py checks --relay only after pairing.propose: the proposal
    was signed and kept anyway, and goes out at the next direct sync. A refused
    command should have changed nothing."""
    a = make_db("a")
    peer = Identity(os.urandom(32)).public_key
    result = CliRunner().invoke(
        cli, ["pair", "add", device_id(peer), "--home", str(a.path), *extra]
    )
    assert result.exit_code != 0, result.output
    proposed = [r for r in a.store.rules(peer) if r.state is RuleState.PROPOSED]
    assert proposed == [], f"exit {result.exit_code} ({result.output.strip()!r}), yet proposed"
