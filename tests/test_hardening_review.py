"""Review of issue 13 items 3 and 4 (log injection, permissions): what still gets
through. Each test fails on the reviewed change and states what it should do."""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from p2psync import home as home_mod
from p2psync.cli.logformat import FORMAT, SafeFormatter
from p2psync.cli.main import Group
from p2psync.errors import RelayUnavailable

FORGED = "\n2026-12-04 10:00:00,000 WARNING p2psync: FORGED\x1b[31m red \x1b]0;t\x07\r"


def _record(msg: str, *args: object, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("p2psync.net.dial", logging.WARNING, __file__, 1, msg, args, exc_info)  # type: ignore[arg-type]


@pytest.mark.pure
def test_an_exception_message_in_a_logged_traceback_is_escaped_too() -> None:
    """dial.py:82, relay/node.py:314 and agent/control.py:73 log with exc_info; the
    last traceback line is ``Type: str(exc)``, which SafeFormatter leaves raw."""
    try:
        raise ValueError("peer said" + FORGED)
    except ValueError:
        record = _record("dialling %s failed", "x", exc_info=sys.exc_info())
    text = SafeFormatter(FORMAT).format(record)
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text, repr(text)
    assert not any(line.startswith("2026-12-04 10:00:00") for line in text.splitlines()), text


@pytest.mark.pure
def test_unicode_line_separators_in_a_peer_word_never_split_a_log_line() -> None:
    """output.safe escapes C0/C1 and bidi controls but not U+2028/U+2029: a reader
    splitting on Unicode lines (str.splitlines, as test_log_injection itself does,
    editors, JSON/JS log viewers) sees a forged line."""
    forged = "bye\u20282026-12-04 10:00:00,000 WARNING p2psync: FORGED\u2029x"
    text = SafeFormatter(FORMAT).format(_record("closing connection with %s: %s", "peer", forged))
    assert len(text.splitlines()) == 1, text.splitlines()


@pytest.mark.pure
def test_an_error_sentence_with_a_relays_words_is_escaped_on_the_terminal() -> None:
    """main.fail prints str(exc) raw. A relay's Bye reason reaches it
    (relayclient.py:378 -> cli/relaysync.py:56 -> pair.py:143 / agent.py:229)."""

    @click.group(cls=Group)
    def top() -> None:
        pass

    @top.command()
    def sync() -> None:
        raise RelayUnavailable("relay ab12cd34: " + "no" + FORGED)

    result = CliRunner().invoke(top, ["sync"])
    assert result.exit_code == 1
    assert "\x1b" not in result.output and "\x07" not in result.output, repr(result.output)
    assert "\r" not in result.output, repr(result.output)


@pytest.mark.pure
def test_verify_flags_a_subfolder_others_may_write(tmp_path: Path) -> None:
    """A 0777 folder in the home (a backup copy of the store, say) is not flagged:
    only the home, files and sockets are (home.py:235)."""
    home = tmp_path / "site"
    home_mod.init(home, "site")
    (home / "backup").mkdir()
    os.chmod(home / "backup", 0o777)
    assert stat.S_IMODE((home / "backup").stat().st_mode) == 0o777
    flagged = {p.name for p, _ in home_mod.loose_permissions(home)}
    assert "backup" in flagged, flagged
