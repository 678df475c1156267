"""Issue 13, item 3: what a peer says never forges a log line. A stranger's Bye
reason (500 characters, newlines and terminal escapes included), its handshake
name, and a relay's Bye are written to the agent's log escaped, on one line."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import trio

from p2psync.core import messages
from p2psync.core.identity import Identity
from p2psync.net.transport import secure
from tests.agents import SpawnedAgent, wait_for

pytestmark = pytest.mark.process

FORGED = "\n2026-12-04 10:00:00,000 WARNING p2psync: FORGED\x1b[31m red \x1b]0;title\x07\r"


async def test_a_strangers_bye_and_name_never_forge_a_log_line(
    agents: Callable[[str], SpawnedAgent],
) -> None:
    agent = agents("a").start()
    host, port = agent.address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    secured = await secure(
        stream, Identity(os.urandom(32)), initiator=True, name="evil" + FORGED[:40], timeout=5
    )
    reason = ("bye" + FORGED) * 5
    await secured.send(messages.encode(messages.Bye(reason[:500])))
    await secured.aclose()
    log = agent.log

    def logged() -> bool:
        return "bye" in log.read_text(errors="replace")

    wait_for(logged, timeout=10)
    text = log.read_text(errors="replace")
    lines = text.splitlines()
    assert not any(line.startswith("2026-12-04 10:00:00") for line in lines), text[-2000:]
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text, repr(text[-500:])
    assert "FORGED" in text  # it is there, escaped, inside the agent's own line
