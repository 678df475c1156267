"""From the newcomer review of the seams restructure (issue 9), each failing
before its fix: the session's log lines keep their logger, the session config's
pairing timeout counts, our own misuse and limits are local errors."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio

import p2psync
from p2psync import pairing
from p2psync.core import messages
from p2psync.core.flow import Flow
from p2psync.core.frames import Sealer
from p2psync.core.rules import Permissions, Terms
from p2psync.core.session import SessionConfig, SyncSession
from p2psync.errors import LocalProtocolError, RemoteProtocolError
from p2psync.net.link import PairLink
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.sync import run_session
from tests.test_pairing import key, session
from tests.test_sync import connect

pytestmark = pytest.mark.pure

MakeDb = Callable[[str], p2psync.Database]


# ---------------------------------------------------------------- the operator's log


@pytest.mark.trio_memory
async def test_paired_with_is_still_logged_under_the_session_logger(
    make_db: MakeDb, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent logs ``%(name)s: %(message)s`` (cli/main.py). Before issue 9 an
    operator read ``p2psync.net.sync: paired with X`` and ``p2psync.net.sync: X
    joined with an invite code``; the restructure moved those lines to
    ``p2psync.net.link`` (net/link.py:34 uses ``__name__``), while net/forks.py:16
    and net/stats.py:15 hard-code ``p2psync.net.sync`` to keep theirs. A filter or
    grep on the old logger silently loses the pairing lines."""
    a, b = make_db("a"), make_db("b")
    pairing.propose(a, key(b), Terms())
    pairing.propose(b, key(a), Terms())  # both ask: the session pairs them
    with caplog.at_level(logging.INFO, logger="p2psync"):
        stats_a, _ = await session(a, b)
    assert stats_a.synced
    paired = [r for r in caplog.records if r.getMessage().startswith("paired with")]
    assert paired, caplog.text
    assert {r.name for r in paired} == {"p2psync.net.sync"}


# ---------------------------------------------------------------- one knob, two places


@pytest.mark.trio_memory
async def test_the_pairing_timeout_of_the_session_config_is_honoured(make_db: MakeDb) -> None:
    """SessionConfig gained ``pairing_timeout`` in this change (core/session.py:92),
    and the agent passes ``config=AgentConfig.session`` to run_session
    (agent/agent.py:374); but run_session overwrites it with its own
    ``pairing_timeout`` keyword, default 5.0 (net/sync.py:248,258): whatever the
    config says is silently ignored."""
    a, b = make_db("a"), make_db("b")
    sa, sb = await connect(a, b)
    seen: list[float] = []

    async def side(stream, db, peer) -> None:  # type: ignore[no-untyped-def]
        link = PairLink(
            db, peer.identity.public_key, handshake_hash=stream.handshake_hash
        )
        await run_session(
            stream,
            TrioStore(db.store),
            ChangeFeed(),
            live=True,
            link=link,
            config=SessionConfig(pairing_timeout=0.25),
            on_start=lambda machine, _stats: seen.append(machine.config.pairing_timeout),
        )

    with trio.move_on_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, sa, a, b)
            nursery.start_soon(side, sb, b, a)
    assert seen == [0.25, 0.25]


# ---------------------------------------------------------------- local misuse, local type


def test_opening_a_session_twice_is_our_misuse_and_says_so() -> None:
    """Goal: "misuse raises a local protocol error". ``begin`` a second time (our
    shell calling it out of turn) is silently ignored (core/session.py:231-232)."""
    machine = SyncSession(0.0)
    machine.begin({})
    with pytest.raises(LocalProtocolError):
        machine.begin({})


def test_changing_the_flow_after_have_is_our_misuse_and_says_so() -> None:
    """Once Have is said, a changed flow must end the session (rules_in_force
    does that); ``set_flow`` is public and swaps the flow of an open session
    without a word (core/session.py:248-250): sending what the old rules chose
    under the new ones, or the reverse."""
    machine = SyncSession(0.0)
    machine.begin({})
    machine.receive(messages.Have({}), 0.0)
    with pytest.raises(LocalProtocolError):
        machine.set_flow(Flow(Permissions()))


def test_our_own_nonce_running_out_is_not_the_peers_fault() -> None:
    """The tree says RemoteProtocolError means the peer broke the protocol; our
    Sealer running out of nonces raises FrameError, a RemoteProtocolError
    (core/frames.py:79-81, 97), so the session would blame the peer for our limit."""
    sealer = Sealer(b"k" * 32)
    sealer._counter = (1 << 64) - 1  # as after 2**64 - 1 frames
    with pytest.raises(LocalProtocolError) as raised:
        sealer.seal(b"x")
    assert not isinstance(raised.value, RemoteProtocolError)
