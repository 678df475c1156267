"""Third review: a92670d (+ db85b06) the re-check of entries a session sent
unacknowledged when the peer ends it; 5486d93 the clock-ahead setting of a home;
db85b06 the fixes after the second mend review. Read as a hostile peer and as a
newcomer would. Each test fails at d74bb6a and says what should happen instead;
none fixes anything."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

import p2psync
from p2psync import clock
from p2psync import home as home_mod
from p2psync.cli.main import cli
from p2psync.clock import now_ms
from p2psync.core.entry import withhold
from p2psync.core.events import StuckOnRefused
from p2psync.core.session import SyncSession
from tests.agents import SpawnedAgent
from tests.agents import run as run_cli
from tests.test_item6_review import AUTHOR, deliver, head
from tests.test_mend import damage, damage_entry
from tests.test_mend_review2 import RECEIVE_ONLY, SEND_ONLY, entry_ids
from tests.test_pairing import key
from tests.test_sync import sync_pair
from tests.test_widen import NARROW, only_stock

MakeDb = Callable[[str], p2psync.Database]


def marked(db: p2psync.Database) -> list[tuple[object, ...]]:
    with sqlite3.connect(db.home.store_path) as conn:
        return conn.execute("SELECT author, seq FROM entries_damaged").fetchall()


# ------------------------------------------------------------ (1) the re-check


@pytest.mark.trio_memory
async def test_damage_in_an_entry_sent_as_a_want_answer_is_rechecked(
    make_db: MakeDb, caplog: pytest.LogCaptureFixture
) -> None:
    """c holds a's entry without its 'misc' payload (a narrower rule once) and asks
    b for it (``Want``). b's copy has a bit flipped in that payload: c finds it
    invalid and ends the session (``Bye``), as it will at every session. The
    batch b sent is unacknowledged, but ``send_entries`` alone records spans:
    ``resend`` (a Want answer) records none, so ``unacked_spans()`` is empty and
    ``_check_sent`` never runs: b keeps serving the damaged copy, and every
    session with c ends in "invalid entry" for ever. A Want answer is sent like
    any batch: its entries must be re-checked too (and the damage marked, so that
    a sound copy from a peer mends it)."""
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    a.put("misc", "m", "x" * 60)
    a.put("misc", "m", "again")  # entry 1's version is gone from b's records
    wires = list(a.export(key(a)))
    b.store.ingest(wires, now_ms())
    c.store.ingest([withhold(w, only_stock) for w in wires], now_ms(), flow=NARROW)
    assert c.store.incomplete() == {"misc": 2}
    damage(b, 1, "payloads")

    with caplog.at_level(logging.WARNING), trio.fail_after(10):
        stats_c, _ = await sync_pair(c, b)
    assert "invalid entry" in stats_c.reason, stats_c  # c found it, and said so
    assert marked(b), (
        "b sent its damaged entry 1 of a as a Want answer; c ended the session at it, "
        f"yet b re-checked nothing and still serves it (log: {caplog.text!r})"
    )


@pytest.mark.trio_memory
async def test_own_damage_the_records_still_hold_is_mended_not_held_back(
    make_db: MakeDb, caplog: pytest.LogCaptureFixture
) -> None:
    """b's own latest entry has a bit flipped in its payload; its record still
    holds that version byte for byte, so `verify --repair` would mend it from
    b's rows alone. c (the first to receive it) finds it invalid and ends the
    session; b's re-check "marks ... as `verify --repair` would" (protocol.md
    section 5, 6a) but only marks: it never tries the records. b's own entry is
    now held back from every peer, no peer holds a copy (the log still promises
    "the next sync with a peer that holds it mends it"), and every sync with c
    says "cannot get in step" until someone runs `verify --repair` by hand.
    The re-check should mend from the records first, as repair does."""
    b, c = make_db("b"), make_db("c")
    b.put("stock", "s1", "x" * 60)
    damage(b, 1, "payloads")

    with caplog.at_level(logging.WARNING), trio.fail_after(10):
        stats_c, _ = await sync_pair(c, b)
    assert "invalid entry" in stats_c.reason, stats_c
    assert not marked(b) and b.verify().ok, (
        "b's own entry, still held in its records, was marked (held back from every "
        f"peer) instead of mended; b's log: {caplog.text!r}"
    )
    with trio.fail_after(10):
        await sync_pair(c, b)
    assert c.get("stock", "s1") == "x" * 60


@pytest.mark.trio_memory
async def test_damage_the_chain_cannot_confirm_is_not_said_to_be_no_longer_sent(
    make_db: MakeDb, caplog: pytest.LogCaptureFixture
) -> None:
    """b holds a's entries 1-4; entry 2's payload and entry 3's signed part are
    damaged, so nothing confirms entry 2's ID (``_confirmed`` refuses a successor
    whose signed part does not hash to its ID) and ``damage_in`` returns it
    without a mark: nothing is marked, b goes on serving entry 2 (c ends every
    session at it). Yet ``_check_sent`` logs the same sentence for every finding:
    "it is no longer sent, and the next sync with a peer that holds it mends it",
    both untrue here; the user waits for a mend that cannot come. Damage that is
    not marked must be told apart: still served, no peer's copy can be matched to
    it, restore a backup (what `verify` says of it)."""
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    for i in range(4):
        a.put("stock", f"s{i}", "x" * 40)
    b.store.ingest(list(a.export(key(a))), now_ms())
    ids = entry_ids(b, key(a))
    with sqlite3.connect(b.home.store_path) as conn:
        (blob,) = conn.execute("SELECT payloads FROM entries WHERE id = ?", (ids[1],)).fetchone()
    damage_entry(b, ids[1], "payloads", (len(blob) - 4) * 8)
    damage_entry(b, ids[2], "signed", 200)

    with caplog.at_level(logging.WARNING), trio.fail_after(10):
        stats_c, _ = await sync_pair(c, b)
    assert "invalid entry" in stats_c.reason, stats_c
    # entry 2: the chain confirms nothing (not marked); entry 3 (its ID confirmed
    # by entry 4) may be marked, and said to be no longer sent
    assert (key(a), 2) not in marked(b)
    said_of_2 = [line for line in caplog.text.splitlines() if "entry 2 of" in line]
    assert said_of_2 and all("no longer sent" not in line for line in said_of_2), (
        "b logs that an entry it still serves is no longer sent: " + caplog.text
    )


# ------------------------------------------------------------ (3) held back


@pytest.mark.pure
def test_each_own_write_behind_a_damaged_entry_is_not_a_new_warning() -> None:
    """The sender (live, one-way) holds AUTHOR's entries up to 5 with entry 2
    marked damaged; the receiver holds entry 1. The sender is rightly stuck and
    says so once ("cannot get in step with ...", a WARNING in the log, and the
    agent's ``on_stuck``). Since db85b06 the held-back seq is part of the verdict's
    state and of the reason ("lacks entries 2-N"), so every later own write of
    AUTHOR (re-read at each local change: ``pending``/``local``) is a new stuck
    state: 20 writes, 20 more warnings per live peer, for as long as the damage
    lasts (the very churn the removed comment in ``why_unsendable`` avoided: "no
    count, which later writes of that author would make stale"). A stuck state
    already said should not be said again because the same author wrote more
    behind the same damaged entry."""
    sender = SyncSession(0.0)
    sender.set_flow(SEND_ONLY)
    receiver = SyncSession(0.0)
    receiver.set_flow(RECEIVE_ONLY)
    seen: list[object] = []
    seen += sender.begin({AUTHOR: head(1)}, (), {AUTHOR: (2, 5)})
    receiver.begin({AUTHOR: head(1)})
    for _ in range(4):
        deliver(sender, receiver)
        seen += deliver(receiver, sender)
    assert sender.stuck_reason is not None and not sender.synced
    for seq in range(6, 26):  # own writes: heads still stop at 1
        sender.local_changed({AUTHOR: head(1)}, {AUTHOR: (2, seq)})
        seen += sender.poll_synced()
        deliver(sender, receiver)
        seen += deliver(receiver, sender)
    said = [e for e in seen if isinstance(e, StuckOnRefused)]
    assert len(said) <= 2, (
        f"{len(said)} 'cannot get in step' warnings for one damaged entry and 20 own "
        f"writes behind it; the last: {said[-1].reason!r}"
    )


# ------------------------------------------------------------ (2) the setting


def invoke(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--home", str(home), *args])
    return result.exit_code, result.output


@pytest.mark.pure
def test_a_duration_too_large_for_a_float_is_a_usage_error(tmp_path: Path) -> None:
    """``parse_duration`` takes any run of digits; 400 of them make ``float``
    infinite, and ``settings`` then calls ``int(inf)``: OverflowError, shown as
    "internal error: OverflowError: cannot convert float infinity to integer
    (rerun with --debug for details)", exit 1. A malformed command line is a
    usage error (exit 2), in the sentence the other out-of-range values get."""
    home = tmp_path / "home"
    assert invoke(home, "init")[0] == 0
    code, text = invoke(home, "settings", "--max-clock-ahead", "9" * 400 + "s")
    assert code == 2 and "internal error" not in text, (code, text)


@pytest.mark.pure
def test_settings_does_not_overwrite_a_config_it_could_not_read(tmp_path: Path) -> None:
    """config.json holds the site's name (peers see it in every handshake). A
    hand edit leaves a trailing comma: ``read_config`` warns and uses the defaults
    (right: the home still opens). But ``settings --max-clock-ahead 1h`` then
    writes that empty default plus the new key over the file: the name the user
    chose is gone for good (the site now shows its short ID), with exit 0 and
    nothing said. A file that could not be read must not be replaced: refuse,
    saying to fix or remove it."""
    home = tmp_path / "home"
    assert invoke(home, "init", "--name", "Head office")[0] == 0
    config = home / "config.json"
    before = config.read_text().replace('"Head office"', '"Head office",')  # a typo
    config.write_text(before)
    code, text = invoke(home, "settings", "--max-clock-ahead", "1h")
    assert config.read_text() == before or "Head office" in config.read_text(), (
        f"exit {code}, {text!r}; config.json is now {config.read_text()!r}"
    )


@pytest.mark.pure
def test_an_unreadable_config_does_not_silently_put_the_bound_back(tmp_path: Path) -> None:
    """5486d93: a bad ``max_clock_ahead_s`` "is an error, not ignored: it guards
    what this site accepts". But a config.json that does not parse (a hand edit
    left a stray comma) is ignored whole by ``read_config``: the bound the user
    set (1h) silently becomes the default 600 s, `p2psync settings` prints "max
    clock ahead: 600 s" and exits 0 (a running agent only logs "ignoring
    config.json"), and entries 10 min to 1 h ahead are refused again. Now that the
    file guards what the store accepts, one that cannot be read should be the
    same error as a bad value in it (or at least not be shown as the setting)."""
    home = tmp_path / "home"
    assert invoke(home, "init", "--name", "Head office")[0] == 0
    assert invoke(home, "settings", "--max-clock-ahead", "1h")[0] == 0
    config = home / "config.json"
    config.write_text(config.read_text().replace("3600", "3600,"))  # a typo
    code, text = invoke(home, "settings")
    assert code != 0 or "600 s" not in text, (code, text)


@pytest.mark.pure
def test_settings_writes_nothing_into_a_relays_home(tmp_path: Path) -> None:
    """``settings --max-clock-ahead`` skips ``load`` when identity.key exists (so
    that a bad value can be set again), and a relay's home has one too: it writes
    an agent's config.json into the relay's home, then ``load`` refuses it ("is a
    relay's home, not an agent's"). The command fails, but the stray file stays.
    Nothing should be written into a home the command then refuses."""
    home = tmp_path / "relay"
    code, text = invoke(home, "relay", "init")
    assert code == 0, text
    code, text = invoke(home, "settings", "--max-clock-ahead", "1h")
    assert code == 1 and "relay" in text, (code, text)
    assert not (home / "config.json").exists(), (home / "config.json").read_text()


@pytest.mark.pure
def test_the_lowest_bound_allowed_refuses_an_honest_sites_writes(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """home.py says of the range: "below a minute, ordinary clock drift gets
    entries refused". But a site's clock follows what it accepts up to
    ``hlc.MAX_ADOPT_AHEAD_MS`` (60 s) ahead of its wall clock ("kept well below the
    skew bound"), so at the lowest setting (1m) the bound equals that drag: y,
    whose clock is right, accepts z's entry stamped 5 min ahead (its default
    bound), writes, and x, set to 1m with a clock 5 s behind y's, refuses y's own
    honest write as "from the future" (the pair stuck until the wall clock
    catches up). The lowest bound allowed must leave room above the adoption
    limit (or the adoption follow the bound)."""
    x, y, z = make_db("x"), make_db("y"), make_db("z")
    monkeypatch.setattr(clock, "_SKEW_MS", 5 * 60 * 1000)  # z is 5 min fast
    z.put("c", "z", 1)
    monkeypatch.setattr(clock, "_SKEW_MS", 0)
    assert y.ingest(list(z.export(key(z)))).accepted
    y.put("c", "y", 1)  # y's own write, its wall clock right
    lowest = home_mod.CLOCK_AHEAD_RANGE_S[0]  # (1m when this was found; now 2m)
    code, text = invoke(x.path, "settings", "--max-clock-ahead", f"{lowest}s")
    assert code == 0, text
    monkeypatch.setattr(clock, "_SKEW_MS", -5_000)  # x's clock 5 s behind y's
    with p2psync.open(x.path) as reopened:  # (it reads the setting)
        result = reopened.ingest(list(y.export(key(y))))
    assert not result.rejected, result.rejected[0].describe()


@pytest.mark.trio_memory
async def test_the_sending_site_is_not_told_to_change_its_own_bound(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b's clock is 30 min fast; c refuses b's entry and its on-demand sync ends
    "cannot get in step: ... check the sender's clock (and ours: `p2psync settings
    --max-clock-ahead` sets the bound here)". That refusal is said to b too (the
    Bye here, a Stuck in a live session: "the peer refused what we sent: ..."),
    where "ours" and "here" now mean b: a clerk at b who runs `p2psync settings
    --max-clock-ahead` changes nothing (the bound that refused is c's). The
    reason said to the sender must name whose setting it is (the receiving
    site's), as ``why_unsendable`` words its reason for both sides."""
    b, c = make_db("b"), make_db("c")
    monkeypatch.setattr(clock, "_SKEW_MS", 30 * 60 * 1000)
    b.put("c", "k", 1)
    monkeypatch.setattr(clock, "_SKEW_MS", 0)
    with trio.fail_after(10):
        _, stats_b = await sync_pair(c, b)
    assert "ahead" in stats_b.reason, stats_b.reason
    assert "sets the bound here" not in stats_b.reason, stats_b.reason


@pytest.mark.process
def test_settings_says_a_running_agent_keeps_the_bound_it_started_with(
    agents: Callable[[str], SpawnedAgent],
) -> None:
    """The refusal tells the user "`p2psync settings --max-clock-ahead` sets the
    bound here"; with the agent running (the usual case: it is the agent that
    refused), ``settings --max-clock-ahead 1h`` prints "max clock ahead: 3600 s
    (entries further ahead are refused)" and exits 0, while the agent goes on
    refusing at 600 s (it reads the home once, at start: only ``--help`` says
    so). The command should say that the running agent takes it at its next start
    (or the agent take it at once)."""
    a = agents("a").start()
    result = run_cli(a.home, "settings", "--max-clock-ahead", "1h")
    assert result.returncode == 0, result.stderr
    said = (result.stdout + result.stderr).lower()
    assert "restart" in said or "next start" in said, said
