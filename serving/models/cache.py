"""The exact prediction cache: a model version's score for a feature vector, kept for a
short time, to answer when that model cannot (a fallback step, `"cache"` in a route).

Exact: the key is the model, its version, the precision it ran at (a version redeployed
at INT8 scores otherwise) and the vector's float32 bytes, so a hit is the score the
model gave those same inputs. Entries live at most `ttl_s` (a route's
`cache_ttl_s`, capped by the shortest ttl of the views the model reads: a cached score
is never older than its features may be). Bounded: past `max_entries` the oldest
entries go first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np


class PredictionCache:
    def __init__(self, *, max_entries: int = 200_000, clock: Callable[[], float]) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, int, str, bytes], tuple[float, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(
        self, model: str, version: int, precision: str, matrix: np.ndarray, scores: np.ndarray, ttl_s: float
    ) -> None:
        """Remember each scored row (NaN scores, rows the policy refused, are skipped)."""
        expires = self._clock() + ttl_s
        entries = self._entries
        rows = np.ascontiguousarray(matrix, dtype=np.float32)
        width = rows.shape[1] * 4
        raw = rows.tobytes()
        for index, score in enumerate(scores.tolist()):
            if score != score:  # NaN
                continue
            key = (model, version, precision, raw[index * width : (index + 1) * width])
            entries[key] = (expires, score)
            entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def get(self, model: str, version: int, precision: str, matrix: np.ndarray) -> list[float] | None:
        """Every row's cached score, or None when any row misses (a partial answer would
        mix sources within one request)."""
        now = self._clock()
        rows = np.ascontiguousarray(matrix, dtype=np.float32)
        width = rows.shape[1] * 4
        raw = rows.tobytes()
        found = []
        for index in range(len(rows)):
            entry = self._entries.get((model, version, precision, raw[index * width : (index + 1) * width]))
            if entry is None or entry[0] < now:
                self.misses += 1
                return None
            found.append(entry[1])
        self.hits += 1
        return found
