"""The fuzz harness (``fuzz/``, ``scripts/fuzz``) in CI: every target's seeds decode,
and a short atheris campaign on every target finds no crash.

Long campaigns are ``scripts/fuzz TARGET --runs N`` (README, "Fuzzing"); this is the
smoke that catches a regression: a few thousand inputs per target, with a fixed
libFuzzer seed so a failure reproduces. A crash it finds is saved under the test's
temporary folder, and its traceback is in the failure message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import corpus
from fuzz.targets import TARGETS, Target, WrongError, run_one
from p2psync.errors import RuleError, UsageError

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent
SMOKE_RUNS = 3000


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_seed_is_a_valid_input_of_its_target(name: str) -> None:
    """The seeds come from the real encoders and must decode without any error
    (a seed the decoder refuses starts the fuzzer nowhere)."""
    seeds = corpus.SEEDS[name]()
    assert seeds
    for seed in seeds:
        TARGETS[name].run(seed)


def test_every_target_has_seeds() -> None:
    assert set(corpus.SEEDS) == set(TARGETS)


def test_run_one_lets_through_only_the_documented_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def raises(error: Exception) -> Target:
        def run(data: bytes) -> None:
            raise error

        return Target(run, RuleError, "")

    monkeypatch.setitem(TARGETS, "rule-error", raises(RuleError("fine")))
    monkeypatch.setitem(TARGETS, "usage-error", raises(UsageError("the wrong branch")))
    monkeypatch.setitem(TARGETS, "index-error", raises(IndexError("a crash")))
    run_one("rule-error", b"")
    with pytest.raises(WrongError, match="UsageError escaped; only RuleError may"):
        run_one("usage-error", b"")
    with pytest.raises(IndexError):
        run_one("index-error", b"")


@pytest.mark.process
def test_a_short_campaign_on_every_target_finds_no_crash(tmp_path: Path) -> None:
    env = dict(os.environ, VENV=sys.prefix)
    done = subprocess.run(
        [
            str(ROOT / "scripts" / "fuzz"),
            "all",
            "--runs",
            str(SMOKE_RUNS),
            "--seed",
            "1",
            "--corpus",
            str(tmp_path / "corpus"),
            "--crashes",
            str(tmp_path / "crashes"),
            "--logs",
            str(tmp_path / "logs"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode == 3:
        pytest.skip(f"atheris cannot be installed: {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    for name in TARGETS:
        assert f"{name}: {SMOKE_RUNS} inputs" in done.stdout, done.stdout
