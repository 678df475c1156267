"""The wall clock, read in one place: milliseconds since the epoch.

The pure core never reads it (time is passed in); the store, the sessions, the
agent and the relay take ``now_ms()`` from here. ``P2PSYNC_CLOCK_SKEW_MS`` (an
integer, may be negative) shifts this process's clock: how the end-to-end tests
let days pass for a relay's expiry without waiting for them. Nothing else should
set it.
"""

from __future__ import annotations

import os
import time

SKEW_VARIABLE = "P2PSYNC_CLOCK_SKEW_MS"


def _skew() -> int:
    raw = os.environ.get(SKEW_VARIABLE, "")
    try:
        return int(raw) if raw else 0
    except ValueError:
        return 0


_SKEW_MS = _skew()


def now_ms() -> int:
    """Wall time now, in whole milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000 + _SKEW_MS
