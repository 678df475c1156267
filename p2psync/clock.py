"""The wall clock, read in one place: milliseconds since the epoch.

The pure core never reads it (time is passed in); the store, the sessions and the
agent take ``now_ms()`` from here, and tests or examples may patch it where it is
used.
"""

from __future__ import annotations

import time


def now_ms() -> int:
    """Wall time now, in whole milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000
