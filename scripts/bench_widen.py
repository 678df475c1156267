"""``scripts/bench widen`` (issue 13, item 7): fetching payloads withheld under a
narrower rule, against a fresh pairing with the wider rule, interleaved in one run.

A holds N entries, each changing one record in 'stock' and one in 'misc'. Per run,
in turn (the order alternates between runs):

* **fresh** — a new site F, paired with A for stock and misc, syncs once (on
  demand, over TCP on 127.0.0.1): every entry arrives in full.
* **widen** — a new site B, paired with A for stock only, syncs once (every entry
  arrives, its 'misc' op withheld; not timed); B then pairs with A for misc too and
  syncs again: B asks A for the N entries (``Want``) and merges the misc ops late.
  Timed: that second sync.

Both are one session from dial to ``Bye("synced")``; entries/s and the ratio widen /
fresh (time) are printed per run, then median (min-max). After every widen run B's
records and stored payloads must equal F's (else the run fails).

With ``--via mailbox`` the rules have route relay and each sync is envelopes
handed between the two sites' mailers until neither has anything for the other
(``mail/outbox.py``, ``mail/inbox.py``; no relay node, no network): widen is B
asking in bundles' ``wants``, A answering in its next bundles, B merging, and
the receipts; fresh is A's bundles to F and F's receipts.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import trio

import p2psync
from p2psync import home as home_mod
from p2psync import pairing
from p2psync.clock import now_ms
from p2psync.core.rules import Route, Terms
from p2psync.mail.mailer import Mailer
from p2psync.net.link import PairLink
from p2psync.net.stats import SessionStats
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.sync import run_session
from p2psync.net.transport import secure


def _open(base: Path, name: str) -> p2psync.Database:
    home_mod.init(base / name, name)
    return p2psync.open(base / name)


ROUTE = Route.AUTO


def _agree(a: p2psync.Database, b: p2psync.Database, collections: list[str]) -> None:
    """a proposes, b accepts: both hold every rule object (as after a sync)."""
    ka, kb = a.identity.public_key, b.identity.public_key
    proposal = pairing.propose(a, kb, Terms.make(collections, route=ROUTE)).rule
    b.store.add_rule_objects(kb, a.store.rule_objects(kb), now_ms())
    pairing.accept(b, next(r for r in b.store.rules(ka) if r.id == proposal.id))
    a.store.add_rule_objects(ka, b.store.rule_objects(ka), now_ms())


async def _sync(site: p2psync.Database, source: p2psync.Database) -> SessionStats:
    """``site`` dials ``source`` over TCP on 127.0.0.1 and syncs once; ``source``
    serves live, like an agent."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    out: dict[str, SessionStats] = {}

    async def serve() -> None:
        stream = await listeners[0].accept()
        secured = await secure(stream, source.identity, initiator=False, name="source")
        link = PairLink(source, site.identity.public_key, handshake_hash=secured.handshake_hash)
        # live, like an agent: it ends when the site says Bye
        await run_session(secured, TrioStore(source.store), ChangeFeed(), live=True, link=link)

    async def dial() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        secured = await secure(stream, site.identity, initiator=True, name="site")
        link = PairLink(site, source.identity.public_key, handshake_hash=secured.handshake_hash)
        out["site"] = await run_session(
            secured, TrioStore(site.store), ChangeFeed(), live=False, link=link
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        nursery.start_soon(dial)
    await listeners[0].aclose()
    stats = out["site"]
    if not stats.synced:
        raise SystemExit(f"widen bench: the sync did not end in step: {stats.reason}")
    return stats


def _by_mail(site: p2psync.Database, source: p2psync.Database) -> SessionStats:
    """Envelopes both ways until neither site has anything for the other."""
    ms, mo = Mailer(site), Mailer(source)
    ks, ko = site.identity.public_key, source.identity.public_key
    stats = SessionStats()
    for _ in range(100):
        out = mo.outgoing(ks, now_ms(), max_envelopes=None)
        for envelope in out:
            got = ms.incoming(envelope.wire, now_ms())
            stats.received += got.applied
            stats.filled += got.filled
        back = ms.outgoing(ko, now_ms(), max_envelopes=None)
        for envelope in back:
            mo.incoming(envelope.wire, now_ms())
        if not out and not back:
            return stats
    raise SystemExit("widen bench: the sites still exchange envelopes after 100 rounds")


def _timed(site: p2psync.Database, source: p2psync.Database) -> tuple[float, SessionStats]:
    started = time.perf_counter()
    stats = _by_mail(site, source) if ROUTE is Route.RELAY else trio.run(_sync, site, source)
    return time.perf_counter() - started, stats


def _held(db: p2psync.Database) -> tuple[object, ...]:
    conn = sqlite3.connect(db.home.store_path)
    try:
        return (
            sorted(conn.execute("SELECT id, payloads FROM entries")),
            sorted(conn.execute("SELECT collection, key, entry, payload FROM records")),
            conn.execute("SELECT count(*) FROM payloads_missing").fetchone()[0],
        )
    finally:
        conn.close()


def run_widen(args: argparse.Namespace) -> None:
    global ROUTE  # noqa: PLW0603 (one setting for the whole run)
    ROUTE = Route.RELAY if args.via == "mailbox" else Route.AUTO
    n = args.records
    with tempfile.TemporaryDirectory(prefix="p2psync-bench-widen-") as tmp:
        base = Path(tmp)
        source = _open(base, "a")
        for start in range(0, n, 1000):
            source.write(
                [
                    p2psync.Change(p2psync.OpKind.PUT, "stock", f"s{i}", {"qty": i}),
                    p2psync.Change(p2psync.OpKind.PUT, "misc", f"m{i}", {"note": f"n{i}"}),
                ]
                for i in range(start, min(n, start + 1000))
            )
        print(
            f"p2psync widen benchmark: {n:,} entries (a stock op and a misc op each), "
            f"{args.runs} runs, fresh and widen interleaved, "
            + ("envelopes handed between mailers" if ROUTE is Route.RELAY else "live sessions")
        )
        fresh_rates, widen_rates, ratios = [], [], []
        for run in range(args.runs):
            times: dict[str, float] = {}
            for case in ("fresh", "widen") if run % 2 == 0 else ("widen", "fresh"):
                site = _open(base, f"{case}{run}")
                if case == "fresh":
                    _agree(site, source, ["stock", "misc"])
                    times[case], stats = _timed(site, source)
                    if stats.received != n:
                        raise SystemExit(f"widen bench: fresh got {stats.received} of {n}")
                    fresh = site
                else:
                    _agree(site, source, ["stock"])
                    _timed(site, source)
                    _agree(site, source, ["misc"])
                    times[case], stats = _timed(site, source)
                    if stats.filled != n:
                        raise SystemExit(f"widen bench: widen filled {stats.filled} of {n}")
                    widened = site
            if _held(widened)[:2] != _held(fresh)[:2] or _held(widened)[2] != 0:
                raise SystemExit("widen bench: the widened site holds something else")
            widened.close()
            fresh.close()
            fresh_rates.append(n / times["fresh"])
            widen_rates.append(n / times["widen"])
            ratios.append(times["widen"] / times["fresh"])
            print(
                f"run {run + 1}: fresh {n / times['fresh']:,.0f} entries/s, widen "
                f"{n / times['widen']:,.0f} entries/s, widen/fresh time {ratios[-1]:.2f}"
            )
        source.close()

    def line(label: str, values: list[float], fmt: str) -> None:
        print(
            f"{label:<34} {statistics.median(values):{fmt}}  "
            f"({min(values):{fmt}}-{max(values):{fmt}}, n={len(values)})"
        )

    line("fresh pairing, entries/s", fresh_rates, ",.0f")
    line("widened rule (fill), entries/s", widen_rates, ",.0f")
    line("widen / fresh, time", ratios, ".2f")
