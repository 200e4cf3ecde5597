"""Window maths shared by every engine: tiles, window bounds and expiry times.

All times are integer microseconds since the Unix epoch, UTC. See docs/design.md,
"Window semantics": the value over window W with granularity g as of time t covers
events e with  tile(t) - W + g <= e.time <= t,  tile(t) = t - (t mod g).
"""

from __future__ import annotations

from featurestore.durations import DAY, HOUR, MINUTE


def default_granularity(length: int) -> int:
    """Chronon's rule: 1 day for windows of 12 days or more, 1 hour for 12 hours or
    more, else 5 minutes.

    >>> default_granularity(7 * DAY) == HOUR
    True
    """
    if length >= 12 * DAY:
        return DAY
    if length >= 12 * HOUR:
        return HOUR
    return 5 * MINUTE


def tile_start(time: int, every: int) -> int:
    """Start of the tile holding `time` (floor; correct for negative times too)."""
    return time - (time % every)


def window_start(time: int, length: int, every: int) -> int:
    """Earliest event time inside the window as of `time` (inclusive)."""
    return tile_start(time, every) - length + every


def in_window(event_time: int, as_of: int, length: int, every: int) -> bool:
    """Whether an event at `event_time` counts in the window as of `as_of`."""
    return window_start(as_of, length, every) <= event_time <= as_of


def expiry_time(event_time: int, length: int, every: int) -> int:
    """The first time at which an event no longer counts: the start of its tile plus
    the window length."""
    return tile_start(event_time, every) + length
