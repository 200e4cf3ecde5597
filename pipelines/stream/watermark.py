"""Event-time watermarks of one stream shard, from the progress of every input partition.

The rule (Flink's and Kafka Streams'): each input partition has its own event-time
progress, the newest valid event time it has delivered. A shard of the stream job is
fed by every partition of its source, so its watermark is the *minimum* over the
partitions, minus the source's allowed lateness:

    watermark = max(previous watermark, min over partitions p of progress(p) - lateness)

- An event is late when its time is below the watermark: it is more than the lateness
  behind what its *own* partition (or a slower one) had already delivered, so no
  interleaving of partitions makes an event late that was in order within its partition
  (within the lateness).
- A partition that has said nothing yet holds the watermark back entirely: it may still
  deliver anything.
- An idle partition (caught up with its log, verified with the broker, and without a
  message for the source's `idle_timeout`) stops holding the watermark back: it counts
  as the processing time at which it was found caught up, so on a quiet stream the
  watermark follows the clock and window expiries are emitted.
- A partition that ended (a bounded input read to its end) keeps its last progress,
  and one that ended without delivering anything counts no more: the watermark at the
  end of a replay is the same whatever order the partitions were read in (the slowest
  partition's last event minus the lateness). The end of an input is not time passing;
  `--drain` is the explicit way to emit what remains.
- Statuses (idle, ended) are facts about the running job, not about the data: a
  snapshot keeps each partition's progress and the watermark but not the statuses, so a
  restarted job waits to hear from every partition again.

Pure: no clock, no I/O. Sources report `Progress` items; the decode step adds one per
partition and micro-batch for the events it found valid.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any


class PartitionStatus(Enum):
    """What a source says about one of its partitions."""

    ACTIVE = "active"  # delivering events: holds the watermark at its newest event time
    IDLE = "idle"  # caught up and quiet for the idle timeout: counts as the clock
    ENDED = "ended"  # a bounded input read to its end: keeps its last progress


@dataclass(frozen=True, slots=True)
class Progress:
    """One input partition's progress, as every shard of every view learns it.

    `event_time`: the newest valid event time of a micro-batch of the partition (µs);
    `clock`: for IDLE, the processing time (µs) at which the partition was found caught
    up; `partitions`: the input's partition count, announced by the source when it
    starts each partition (shards need it to know whom to wait for).
    """

    partition: int
    event_time: int | None = None
    status: PartitionStatus = PartitionStatus.ACTIVE
    clock: int | None = None
    partitions: int | None = None


class Watermarks:
    """The watermark of one shard (see the module docstring).

    >>> marks = Watermarks(lateness=10)
    >>> marks.observe([Progress(0, partitions=2), Progress(0, event_time=500)])
    >>> marks.value is None  # partition 1 has not said anything yet
    True
    >>> marks.observe([Progress(1, event_time=300)])
    >>> marks.value
    290
    >>> marks.observe([Progress(1, status=PartitionStatus.IDLE, clock=1_000)])
    >>> marks.value  # an idle partition follows the clock: the other one rules
    490
    """

    def __init__(self, lateness: int) -> None:
        self.lateness = lateness
        self.partitions: int | None = None
        self.newest: dict[int, int] = {}
        self.value: int | None = None
        self._status: dict[int, PartitionStatus] = {}
        self._clock: dict[int, int] = {}

    def observe(self, reports: Iterable[Progress]) -> None:
        """Apply progress reports in the order they arrived, moving the watermark after
        each (a partition's last progress counts before the report that it ended)."""
        for report in reports:
            partition = report.partition
            if report.partitions is not None:
                self.partitions = report.partitions
            if report.event_time is not None:
                known = self.newest.get(partition)
                if known is None or report.event_time > known:
                    self.newest[partition] = report.event_time
            self._status[partition] = report.status
            if report.status is PartitionStatus.IDLE and report.clock is not None:
                self._clock[partition] = report.clock
            self._move()

    def status(self, partition: int) -> PartitionStatus:
        return self._status.get(partition, PartitionStatus.ACTIVE)

    def is_late(self, time: int) -> bool:
        return self.value is not None and time < self.value

    def _move(self) -> None:
        partitions = range(self.partitions) if self.partitions is not None else sorted({*self.newest, *self._status})
        lowest: int | None = None
        for partition in partitions:
            status = self._status.get(partition, PartitionStatus.ACTIVE)
            progress = self.newest.get(partition)
            if status is PartitionStatus.ENDED and progress is None:
                continue  # ended without an event: nothing to wait for
            if status is PartitionStatus.IDLE and partition in self._clock:
                clock = self._clock[partition]
                progress = clock if progress is None else max(progress, clock)
            if progress is None:
                return  # a partition that may still deliver anything holds everything back
            lowest = progress if lowest is None else min(lowest, progress)
        if lowest is None:
            return  # no partition delivered anything: time does not pass
        candidate = lowest - self.lateness
        if self.value is None or candidate > self.value:
            self.value = candidate

    # Statuses describe the running job: a restarted one waits to hear from every partition.
    def __getstate__(self) -> dict[str, Any]:
        return {"lateness": self.lateness, "partitions": self.partitions, "newest": self.newest, "value": self.value}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.lateness = state["lateness"]
        self.partitions = state["partitions"]
        self.newest = dict(state["newest"])
        self.value = state["value"]
        self._status = {}
        self._clock = {}

    @classmethod
    def resumed(cls, lateness: int, value: int | None) -> Watermarks:
        """A tracker for a snapshot taken before per-partition progress existed: it keeps
        the old watermark as a floor and learns every partition anew."""
        marks = cls(lateness)
        marks.value = value
        return marks
