"""Hybrid logical clock.

A timestamp is one non-negative 63-bit integer: milliseconds since the Unix epoch
in the high 48 bits, a logical counter in the low 16. Comparing integers
compares timestamps. Each agent keeps the largest timestamp it has issued or
seen; a new local write takes ``max(last + 1, wall_ms << 16)``, so a site whose
wall clock lags still orders its writes after everything it has seen. When the
counter overflows it carries into the millisecond part, which only moves the
clock forward.

The current wall time is always an argument: nothing here reads a clock.
"""

from __future__ import annotations

LOGICAL_BITS = 16
#: Largest timestamp (SQLite stores signed 64-bit integers).
MAX_HLC = (1 << 63) - 1

#: Default bound on how far ahead of our wall clock a received entry may be.
DEFAULT_MAX_SKEW_MS = 10 * 60 * 1000
#: How far ahead of our wall clock we let a received timestamp move our clock.
#: Kept well below the skew bound: otherwise one entry stamped at the limit would
#: drag our own later entries past the limit of every agent whose clock is a
#: little behind ours.
MAX_ADOPT_AHEAD_MS = 60 * 1000


def from_wall(wall_ms: int) -> int:
    """The timestamp of a wall-clock instant with a zero counter."""
    return wall_ms << LOGICAL_BITS


def wall_ms(hlc: int) -> int:
    """The wall-clock milliseconds part of a timestamp."""
    return hlc >> LOGICAL_BITS


def tick(last: int, now_ms: int) -> int:
    """The timestamp for a new local event after ``last`` at wall time ``now_ms``."""
    return max(last + 1, from_wall(now_ms))


def observe(clock: int, received: int, now_ms: int) -> int:
    """Our clock after accepting an entry stamped ``received`` (adoption is bounded)."""
    return max(clock, min(received, from_wall(now_ms + MAX_ADOPT_AHEAD_MS)))
