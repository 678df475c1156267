"""Fewer garbage-collector passes while a batch of entries is decoded and applied.

A batch allocates tens of thousands of container objects (decoded CBOR, entries,
record versions) that all live until the batch commits. Python's collector runs a
young-generation pass every 700 such allocations and finds nothing to free, and
its older generations rescan the whole heap now and then: ~10 % of an ingest's
time (measured with ``scripts/bench local``). Raising the first threshold for the
length of a batch (at most 2,000 entries or ~1 MiB, a few tens of milliseconds)
skips that work; nothing is disabled, and cycles are still collected afterwards.

The threshold is process-wide, so nested and concurrent batches (the agent runs
one per connection, in threads) share one raise and the last one out restores it.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

BATCH_THRESHOLD = 200_000  # allocations before a young-generation pass, during a batch

_lock = threading.Lock()
_active = 0
_saved: tuple[int, int, int] = (0, 0, 0)


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Raise the collector's first threshold until the block ends."""
    global _active, _saved  # noqa: PLW0603 - one process-wide setting, guarded by _lock
    with _lock:
        if _active == 0:
            _saved = gc.get_threshold()
            if _saved[0] != 0:  # 0: the collector is disabled; leave it so
                gc.set_threshold(max(_saved[0], BATCH_THRESHOLD), _saved[1], _saved[2])
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0 and gc.get_threshold()[0] == max(_saved[0], BATCH_THRESHOLD):
                gc.set_threshold(*_saved)
