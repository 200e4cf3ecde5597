"""What `tenx stream` tells its user while it runs, and how it stops.

- A status line every few seconds: events/s, consumer lag, late and dead-letter counts,
  the watermark's age (on a terminal one line rewritten in place; off a terminal, e.g.
  in `docker compose logs`, one plain line every `interval` seconds).
- One line when the Kafka broker is lost (since when; librdkafka retries by itself) and
  one when it is back, instead of librdkafka's log lines.
- Ctrl-C (or SIGTERM) stops the sources between two batches: the dataflow ends as a
  bounded input does, with a last recovery snapshot, and the command exits 128 + the
  signal number with one line. A second Ctrl-C exits at once.
- The final counts when the job ends.

Counts come from the job's Prometheus metrics of this process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.console import Console

from pipelines.stream.health import BROKER
from pipelines.stream.metrics import METRICS
from pipelines.stream.sources import stop_sources


def _total(metric: Any) -> float:
    return sum(
        float(sample.value)
        for family in metric.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    )


@dataclass(frozen=True)
class Counts:
    """The job's counters in this process at one moment."""

    at: float
    events: int
    rows: int
    late: int
    dead: int
    lag: int
    watermark_us: int | None

    @classmethod
    def now(cls) -> Counts:
        slowest = METRICS.watermarks.slowest()
        return cls(
            at=time.monotonic(),
            events=int(_total(METRICS.events_in)),
            rows=int(_total(METRICS.rows_out)),
            late=int(_total(METRICS.late)),
            dead=int(_total(METRICS.dead_letters)),
            lag=int(_total(METRICS.lag)),
            watermark_us=min(slowest.values()) if slowest else None,
        )


def _age(watermark_us: int | None) -> str:
    if watermark_us is None:
        return "watermark: waiting for every partition"
    seconds = time.time() - watermark_us / 1e6
    if seconds < 0:
        return "watermark: ahead of the clock"
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"watermark {seconds / size:.1f}{unit} behind"
    return f"watermark {seconds:.0f}s behind"


def status_line(before: Counts, after: Counts) -> str:
    rate = (after.events - before.events) / max(after.at - before.at, 1e-9)
    return (
        f"{rate:,.0f} events/s, {after.events:,} read, lag {after.lag:,}, {after.rows:,} rows written, "
        f"{after.late:,} late, {after.dead:,} dead letters, {_age(after.watermark_us)}"
    )


def summary(start: Counts, end: Counts, *, how: str = "done") -> str:
    """The final counts line: `how` says how the job ended (done, stopped)."""
    seconds = max(end.at - start.at, 1e-9)
    events = end.events - start.events
    return (
        f"{how}: {events:,} events in {seconds:.1f} s ({events / seconds:,.0f}/s), "
        f"{end.rows - start.rows:,} rows written, {end.late - start.late:,} late, "
        f"{end.dead - start.dead:,} dead letters"
    )


class StatusReporter:
    """A daemon thread printing status and broker lines to `console` (stderr)."""

    def __init__(self, console: Console, *, interval: float, live: bool, grace_s: float = 5.0) -> None:
        self.console = console
        self.interval = interval
        self.live = live
        # librdkafka also reports a connection the broker closed while idle: only an
        # outage nothing has contradicted for `grace_s` is worth a line.
        self.grace_s = grace_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tenx-stream-status", daemon=True)
        self._broker_down: float | None = None
        self.start_counts = Counts.now()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self.live:
            self.console.file.write("\r\x1b[2K")
            self.console.file.flush()

    def _run(self) -> None:
        previous = self.start_counts
        last_line = time.monotonic()
        tick = min(self.interval, 1.0)
        while not self._stop.wait(tick):
            self._broker()
            if time.monotonic() - last_line < self.interval:
                continue
            current = Counts.now()
            line = status_line(previous, current)
            if self.live:
                self.console.file.write("\r\x1b[2K" + line[: max(self.console.width - 1, 20)])
                self.console.file.flush()
            else:
                self.print(line)
            previous, last_line = current, time.monotonic()

    def _broker(self) -> None:
        outage = BROKER.outage
        if outage is not None and self._broker_down is None and time.time() - outage.since >= self.grace_s:
            self._broker_down = outage.since
            since = datetime.fromtimestamp(outage.since).strftime("%H:%M:%S")
            self.print(f"Kafka unreachable since {since} ({outage.error}); retrying, nothing is lost meanwhile")
        elif outage is None and self._broker_down is not None:
            self.print(f"Kafka reachable again after {time.time() - self._broker_down:.0f} s")
            self._broker_down = None

    def print(self, line: str) -> None:
        if self.live:
            self.console.file.write("\r\x1b[2K")
        self.console.print(line, markup=False, highlight=False)


class Stopper:
    """SIGINT/SIGTERM -> stop the sources cleanly (the first time), exit at once (the
    second time). `signal_number` says which signal stopped the job, if any."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal_number is not None:
            self.say("stopped at once: the next start resumes from the last recovery snapshot")
            sys.stderr.flush()
            os._exit(128 + number)
        self.signal_number = number
        self.say("stopping after the current batch (Ctrl-C again to stop at once) ...")
        stop_sources()
