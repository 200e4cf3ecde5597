"""Durations: parsing `"7d"`-style strings and timedeltas to integer microseconds."""

from __future__ import annotations

import re
from datetime import timedelta

MICROSECOND = 1
MILLISECOND = 1_000
SECOND = 1_000_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR

_UNITS = {"us": MICROSECOND, "ms": MILLISECOND, "s": SECOND, "m": MINUTE, "h": HOUR, "d": DAY}
_PATTERN = re.compile(r"^\s*(\d+)\s*(us|ms|s|m|h|d)\s*$")


def parse_duration(value: str | timedelta | int) -> int:
    """Microseconds in a duration given as `"90s"`, `"5m"`, `"1h"`, `"7d"`, a timedelta
    or an int of microseconds. Raises ValueError with the accepted forms.

    >>> parse_duration("7d") == 7 * DAY
    True
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '5m', '1h' or '7d', got {value!r}")
    if isinstance(value, int):
        micros = value
    elif isinstance(value, timedelta):
        micros = (value.days * 86_400 + value.seconds) * SECOND + value.microseconds
    elif isinstance(value, str) and (match := _PATTERN.match(value)):
        micros = int(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(
            f"expected a duration like '30s', '5m', '1h' or '7d' (units us, ms, s, m, h, d), got {value!r}"
        )
    if micros <= 0:
        raise ValueError(f"expected a positive duration, got {value!r}")
    return micros


def format_duration(micros: int) -> str:
    """The shortest exact spelling: 604800000000 -> '7d', 90 s -> '90s'.

    >>> format_duration(90 * SECOND)
    '90s'
    """
    for suffix, size in (("d", DAY), ("h", HOUR), ("m", MINUTE), ("s", SECOND), ("ms", MILLISECOND)):
        if micros % size == 0:
            return f"{micros // size}{suffix}"
    return f"{micros}us"
