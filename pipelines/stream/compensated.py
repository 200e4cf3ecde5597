"""Float sums that do not lose what large values cancel: compensated (TwoSum/Neumaier)
sums of many segments at once, numpy only, for the stream's tiles and windows.

A plain float sum of 1e16, 0.25 and -1e16 is 0: the 0.25 is rounded away when added to
1e16. The batch engine keeps the rounding error of every addition of its prefix sums
and gets 0.25; these functions give the stream the same, within one rounding of the
result plus (n u)^2 times the magnitudes (u = 2^-53).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def compensated_sums(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums of consecutive non-empty segments of float `values` (segment j =
    `lengths[j]` values from `starts[j]`), each as (sum, rounding error to add to it):
    within one rounding of the result plus (n u)^2 times the segment's magnitudes,
    however much the values cancel (1e16 + 0.25 - 1e16 gives 0.25, not 0), as the batch
    engine's compensated prefix sums are.

    A running sum per segment (restarted at each: another segment's magnitude never
    costs this one digits) and the exact error of each of its additions (TwoSum). Short
    segments run position by position over all segments at once; long ones through
    pandas' grouped cumsum."""
    values = values.astype(np.float64, copy=False)
    if len(values) == len(starts):  # one value per segment: nothing was rounded
        return values.copy(), np.zeros(len(values))
    longest = int(lengths.max())
    if longest > _SHORT:
        codes = np.repeat(np.arange(len(starts)), lengths)
        running = pd.Series(values).groupby(codes, sort=False).cumsum().to_numpy()
        before = np.empty(len(values))
        before[0] = 0.0
        before[1:] = running[:-1]
        before[starts] = 0.0
        added = running - before
        steps = (before - (running - added)) + (values - added)
        return running[starts + lengths - 1], np.add.reduceat(steps, starts)
    # Longest segments first: those still running at each position are a prefix.
    order = np.argsort(-lengths, kind="stable")
    firsts, sizes = starts[order], lengths[order]
    running_at = np.searchsorted(-sizes, -np.arange(1, longest), side="left")  # segments longer than k
    total = values[firsts]
    error = np.zeros(len(starts))
    for position, live in enumerate(running_at.tolist(), start=1):
        part = total[:live]
        value = values[firsts[:live] + position]
        after = part + value
        added = after - part
        error[:live] += (part - (after - added)) + (value - added)
        total[:live] = after
    out_total, out_error = np.empty(len(starts)), np.empty(len(starts))
    out_total[order], out_error[order] = total, error
    return out_total, out_error


_SHORT = 64  # segments up to this long: position by position; longer: grouped cumsum


def add_compensated(
    total: np.ndarray, compensation: np.ndarray, slots: np.ndarray, exact: np.ndarray, error: np.ndarray
) -> None:
    """Add (sum, error) pairs into tiles' running totals (slots distinct), Neumaier style."""
    before = total[slots]
    after = before + exact
    added = after - before
    total[slots] = after
    compensation[slots] += ((before - (after - added)) + (exact - added)) + error


__all__ = ["add_compensated", "compensated_sums"]
