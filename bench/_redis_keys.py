"""Cleaning up benchmark keys in Redis (shared by bench/online.py and bench/stream.py)."""

from __future__ import annotations

import time
from typing import Any


def unlink_matching(client: Any, pattern: str, cap_s: float = 120.0) -> int:
    """Delete the keys matching `pattern` (SCAN + UNLINK); the number deleted."""
    deleted = 0
    deadline = time.perf_counter() + cap_s
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            deleted += client.unlink(*batch)
            batch = []
        if time.perf_counter() > deadline:
            raise SystemExit(f"deleting {pattern} took over {cap_s:.0f} s")
    if batch:
        deleted += client.unlink(*batch)
    return deleted
