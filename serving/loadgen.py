"""Open-loop HTTP/1.1 load: send times fixed in advance, latency from the intended send time.

A closed loop (N clients, each waiting for its answer before sending again) slows down
with the server and so hides its queueing (coordinated omission). Here every send time
is drawn before the run from a seed (Poisson or evenly spaced arrivals at `rate` for
`duration_s`), and each request's latency is measured from that intended time: a late
generator, a full connection pool or a queue in the server all show up as latency.

The generator runs in a process of its own (`LoadGenerator`, multiprocessing spawn), not
on the event loop it measures: a scheduler thread sleeps until each send time and hands
the due requests to an asyncio loop (uvloop when installed) that writes pre-encoded
request bytes on raw keep-alive connections and reads back only the status line and
Content-Length. The pool grows, up to `max_connections`, whenever every connection is
waiting for an answer (HTTP/1.1 without pipelining: one request in flight each).

`LoadGenerator(engine="native")` runs the same plan with tenx-loadgen instead (loadgen/,
Go, built by `make loadgen`): one thread, one epoll loop, raw non-blocking sockets, the
send times kept with epoll_pwait2's nanosecond timeouts. It records what the Python
engine records (hand-off, send, answer, status, marker hit per request), and the same
code computes the figures from those records (serving/loadresults.py); it costs about
half the CPU per request (25-33 us against 52 us here, 2026-12-07), which a server
measured on the same cores then has.
It has no client-side throttle; "auto" picks it when it is built and the plan throttles
nothing.

It also judges itself: how far actual send times fell behind intended ones, and whether
it sent at least `min_send_share` of the offered rate. A step whose `lag.fell_behind` is
set did not offer the load it claims; callers must not report it as that rate.

A plan may label its requests (`labels`, parallel to `requests`: a priority class, a
tenant) and give each a deadline (`deadlines_ms`): the result then has the same figures
per label in `by_label`, with how many 2xx answers came within their deadline (goodput).
`marker`, when given, counts the 2xx answers whose body holds those bytes (a
`"degraded":true` flag). The run itself only records each request's status (and marker
hit); the split by label is computed afterwards, from the request's index.

`throttled` names labels whose requests go through a client-side adaptive throttle, one
per label, as `ModelClient` does (Google SRE book, "Handling Overload"): a request it
refuses is never sent and counts as `throttled`, not as a send the generator missed.
`timeline_s` adds per-label counts and p99 in buckets of that width over the window
(`LoadResult.timeline`), to see what happened around a fault.

    plan = LoadPlan(host="127.0.0.1", port=8081, rate=500, duration_s=10, warmup_s=1,
                    requests=(post_request("/predict", b'{"model": "buys", "entities": [1]}'),))
    with LoadGenerator() as generator:
        result = generator.run(plan)
    if not result.lag.fell_behind:
        print(result.ok_rate, result.latency.p99_ms)
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, cast

import numpy as np

from serving.loadresults import (
    FAILED,
    MAX_ERROR_SAMPLES,
    THROTTLED,
    LoadResult,
    judge_lag,
    split_by_label,
    summarize,
    timeline,
)
from serving.models.client import AdaptiveThrottle

ENGINES = ("python", "native", "auto")
NATIVE_BINARY = "tenx-loadgen"
_SCHEDULER_SWITCH_S = 0.0002  # the GIL hand-off interval in the generator's process (default 5 ms)


class Arrivals(Enum):
    POISSON = "poisson"  # exponential gaps: the bursts independent users make
    UNIFORM = "uniform"  # evenly spaced


def schedule(rate: float, duration_s: float, *, arrivals: Arrivals = Arrivals.POISSON, seed: int = 0) -> np.ndarray:
    """Send times in seconds from the start, sorted, all in [0, duration_s): the same for
    the same arguments.

    >>> schedule(4, 1.0, arrivals=Arrivals.UNIFORM).tolist()
    [0.0, 0.25, 0.5, 0.75]
    """
    if not (rate > 0 and math.isfinite(rate)) or not (duration_s > 0 and math.isfinite(duration_s)):
        raise ValueError(f"schedule: rate and duration_s must be positive and finite; got {rate}, {duration_s}")
    if arrivals is Arrivals.UNIFORM:
        count = math.ceil(rate * duration_s)
        times = np.arange(count, dtype=np.float64) / rate
        return times[times < duration_s]
    rng = np.random.default_rng(seed)
    expected = rate * duration_s
    chunk = int(expected + 6 * math.sqrt(expected) + 16)  # almost always one draw
    parts: list[np.ndarray] = []
    last = 0.0
    while last < duration_s:
        gaps = rng.exponential(1.0 / rate, chunk)
        times = last + np.cumsum(gaps)
        parts.append(times)
        last = float(times[-1])
    times = np.concatenate(parts)
    return times[times < duration_s]


def post_request(path: str, body: bytes, *, host: str = "127.0.0.1", headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A keep-alive `POST path` with a JSON body, encoded once before the run."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def get_request(path: str, *, host: str = "127.0.0.1") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


# -- a run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    """One open-loop run: `requests` (whole HTTP/1.1 requests, see `post_request`) are
    sent in turn at the schedule's times; the first `warmup_s` seconds are sent but not
    counted. After the last send, answers are awaited for up to `drain_s`."""

    host: str
    port: int
    requests: tuple[bytes, ...]
    rate: float
    duration_s: float
    warmup_s: float = 0.0
    arrivals: Arrivals = Arrivals.POISSON
    seed: int = 0
    max_connections: int = 256
    initial_connections: int = 4
    drain_s: float = 5.0
    max_p99_lag_s: float = 0.001
    min_send_share: float = 0.95
    labels: tuple[str, ...] = ()  # parallel to requests (e.g. each one's priority class); () : no split
    deadlines_ms: tuple[float, ...] | None = None  # parallel to requests: counts 2xx answers in time
    marker: bytes = b""  # counted in 2xx answer bodies (e.g. b'"degraded":true'); b"": not looked for
    throttled: tuple[str, ...] = ()  # labels sent through a client-side adaptive throttle each
    throttle_k: float = 2.0  # the throttle sends up to k times the requests the server accepted
    throttle_window_s: float = 10.0
    timeline_s: float = 0.0  # bucket width of LoadResult.timeline; 0: no timeline

    def __post_init__(self) -> None:
        problems = []
        if not self.requests:
            problems.append("requests is empty (give at least one encoded request)")
        if self.labels and len(self.labels) != len(self.requests):
            problems.append(f"labels has {len(self.labels)} entries for {len(self.requests)} requests (give one each)")
        if self.deadlines_ms is not None:
            if len(self.deadlines_ms) != len(self.requests):
                problems.append(
                    f"deadlines_ms has {len(self.deadlines_ms)} entries for {len(self.requests)} requests "
                    "(give one each)"
                )
            elif not all(d > 0 and math.isfinite(d) for d in self.deadlines_ms):
                problems.append("deadlines_ms must all be positive and finite")
        if not (self.rate > 0 and math.isfinite(self.rate)):
            problems.append(f"rate must be positive and finite, got {self.rate}")
        if not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            problems.append(f"duration_s must be positive and finite, got {self.duration_s}")
        if not (self.warmup_s >= 0 and math.isfinite(self.warmup_s)):
            problems.append(f"warmup_s must be 0 or more, got {self.warmup_s}")
        if not 1 <= self.initial_connections <= self.max_connections:
            problems.append(
                f"need 1 <= initial_connections <= max_connections, got {self.initial_connections} "
                f"and {self.max_connections}"
            )
        if not self.drain_s >= 0:
            problems.append(f"drain_s must be 0 or more, got {self.drain_s}")
        if self.throttled and not set(self.throttled) <= set(self.labels):
            problems.append(f"throttled names labels {sorted(set(self.throttled) - set(self.labels))} not in labels")
        if not (self.timeline_s >= 0 and math.isfinite(self.timeline_s)):
            problems.append(f"timeline_s must be 0 or more, got {self.timeline_s}")
        if problems:
            raise ValueError("LoadPlan: " + "; ".join(problems))


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.current = -1  # index of the request in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def send(self, index: int, payload: bytes) -> None:
        assert self.transport is not None
        self.current = index
        self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0 or not head.startswith(b"http/1."):
            self._broken(f"malformed or unsupported response (no Content-Length): {bytes(buffer[:80])!r}")
            return
        stop = head.find(b"\r\n", at + 2)
        try:
            length = int(head[at + 17 : stop if stop > 0 else len(head)])
            status = int(head[9:12])
        except ValueError:
            self._broken(f"malformed response head: {bytes(buffer[:80])!r}")
            return
        if len(buffer) < end + 4 + length:
            return
        index, self.current = self.current, -1
        if index < 0:
            self._broken(f"an answer ({status}) to no request")
            return
        marker = self.run.plan.marker
        if marker and 200 <= status < 300 and buffer.find(marker, end + 4, end + 4 + length) >= 0:
            self.run.marked[index] = True
        del buffer[: end + 4 + length]
        at = head.find(b"\r\nconnection:")
        closes = at >= 0 and head[at + 13 : head.find(b"\r\n", at + 2) % (len(head) + 1)].strip() == b"close"
        self.run.answered(self, index, status, closes=closes)

    def _broken(self, message: str) -> None:
        self.run.note_error(message)
        if self.transport is not None:
            self.transport.abort()  # connection_lost fails the request in flight

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.lost(self, exc)


class _Run:
    """The state of one run on the generator's event loop."""

    def __init__(self, plan: LoadPlan, times: np.ndarray, loop: asyncio.AbstractEventLoop) -> None:
        self.plan = plan
        self.loop = loop
        self.count = len(times)
        self.payloads = list(plan.requests)
        self.throttles = _throttles(plan)  # per request kind; None: not throttled
        nan = math.nan
        self.handed = [nan] * self.count  # the scheduler handed it to the loop
        self.sent = [nan] * self.count  # its bytes were written
        self.finished = [nan] * self.count
        self.status = [0] * self.count  # 0: no answer; -1: failed
        self.marked = [False] * self.count  # a 2xx whose body held plan.marker
        self.idle: list[_Connection] = []
        self.open: set[_Connection] = set()
        self.opening = 0
        self.most_open = 0
        self.waiting: collections.deque[int] = collections.deque()
        self.waited = 0
        self.outstanding = 0
        self.handed_all = False
        self.closing = False  # past the drain: requests still in flight are unfinished, not failed
        self.settled = asyncio.Event()
        self.error_messages: collections.Counter[str] = collections.Counter()
        self.start = 0.0  # perf_counter of offset 0
        self.tasks: set[asyncio.Task[None]] = set()  # connections being opened (the loop keeps only weak references)

    def payload(self, index: int) -> bytes:
        return self.payloads[index % len(self.payloads)]

    async def connect(self) -> _Connection:
        _, connection = await self.loop.create_connection(lambda: _Connection(self), self.plan.host, self.plan.port)
        self.open.add(connection)
        self.most_open = max(self.most_open, len(self.open))
        return connection

    def hand(self, low: int, high: int) -> None:
        """Requests [low, high) are due: send each on an idle connection, on a new one,
        or queue it for the next free one (latency still counts from its intended time)."""
        clock = time.perf_counter
        handed, sent, idle, plan = self.handed, self.sent, self.idle, self.plan
        throttles, kinds = self.throttles, len(self.payloads)
        for index in range(low, high):
            now = clock()
            handed[index] = now
            throttle = throttles[index % kinds]
            if throttle is not None and throttle.refuse():
                self.status[index] = THROTTLED
                continue
            self.outstanding += 1
            if idle:
                sent[index] = now
                idle.pop().send(index, self.payload(index))
            elif len(self.open) + self.opening < plan.max_connections:
                self.open_for(index)
            else:
                self.waiting.append(index)
                self.waited += 1

    def open_for(self, index: int) -> None:
        self.opening += 1
        task = self.loop.create_task(self._open_and_send(index))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _open_and_send(self, index: int) -> None:
        try:
            connection = await self.connect()
        except OSError as error:
            self.opening -= 1
            self.fail(index, f"connect: {type(error).__name__}: {error}")
            return
        self.opening -= 1
        self.sent[index] = time.perf_counter()
        connection.send(index, self.payload(index))

    def answered(self, connection: _Connection, index: int, status: int, *, closes: bool = False) -> None:
        now = time.perf_counter()
        self.finished[index] = now
        self.status[index] = status
        self.outstanding -= 1
        throttle = self.throttles[index % len(self.payloads)]
        if throttle is not None:
            throttle.answered(status not in (429, 503))  # refused for load or quota: not accepted
        if closes:  # `Connection: close`: a request sent on it would fail; `lost` opens a new one for the next
            assert connection.transport is not None
            connection.transport.close()
        elif self.waiting:
            following = self.waiting.popleft()
            self.sent[following] = now
            connection.send(following, self.payload(following))
        else:
            self.idle.append(connection)
        self._check_settled()

    def fail(self, index: int, message: str) -> None:
        self.status[index] = FAILED
        self.outstanding -= 1
        throttle = self.throttles[index % len(self.payloads)]
        if throttle is not None:
            throttle.answered(False)
        self.note_error(message)
        self._check_settled()

    def note_error(self, message: str) -> None:
        if len(self.error_messages) < MAX_ERROR_SAMPLES or message in self.error_messages:
            self.error_messages[message] += 1

    def lost(self, connection: _Connection, exc: Exception | None) -> None:
        self.open.discard(connection)
        if connection in self.idle:
            self.idle.remove(connection)
        if self.closing:
            return
        if connection.current >= 0:
            reason = f"{type(exc).__name__}: {exc}" if exc is not None else "closed by the server"
            self.fail(connection.current, f"connection lost before the answer ({reason})")
            connection.current = -1
        if self.waiting and len(self.open) + self.opening < self.plan.max_connections:
            self.open_for(self.waiting.popleft())

    def _check_settled(self) -> None:
        if self.handed_all and self.outstanding == 0:
            self.settled.set()


def _throttles(plan: LoadPlan) -> list[AdaptiveThrottle | None]:
    """One client-side throttle per throttled label, shared by that label's requests
    (its draws seeded from the plan: the same run refuses the same requests)."""
    draw = random.Random(plan.seed).random
    throttles = {
        label: AdaptiveThrottle(k=plan.throttle_k, window_s=plan.throttle_window_s, draw=draw)
        for label in plan.throttled
    }
    labels = plan.labels or ("",) * len(plan.requests)
    return [throttles.get(label) for label in labels]


def _scheduler(times: Sequence[float], start: float, hand: Callable[[int, int], None], *, loop: Any) -> None:
    """Sleep until each send time and hand the due requests to the loop (one wake-up
    for all requests due at once). time.sleep is precise to ~0.1 ms; asyncio's timers
    are not (millisecond ticks)."""
    _tighten_timer_slack()
    clock = time.perf_counter
    index = 0
    count = len(times)
    while index < count:
        now = clock() - start
        due = times[index]
        if due > now:
            time.sleep(due - now)
            continue
        upto = bisect.bisect_right(times, now, lo=index)
        loop.call_soon_threadsafe(hand, index, upto)
        index = upto


def _tighten_timer_slack() -> None:
    """Linux lets a sleep overrun by 50 µs by default (timer slack); 1 µs for this thread."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    # Without it only the precision of the send times suffers, and the lag figures show that.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, nanoseconds


async def _run(plan: LoadPlan) -> LoadResult:
    loop = asyncio.get_running_loop()
    times = schedule(plan.rate, plan.warmup_s + plan.duration_s, arrivals=plan.arrivals, seed=plan.seed)
    run = _Run(plan, times, loop)
    for _ in range(plan.initial_connections):
        run.idle.append(await run.connect())
    cpu_began = time.process_time()
    run.start = time.perf_counter() + 0.01
    started_epoch = time.time() + (run.start - time.perf_counter()) + plan.warmup_s
    offsets = times.tolist()
    scheduler = loop.run_in_executor(None, lambda: _scheduler(offsets, run.start, run.hand, loop=loop))
    # Its future resolves after the last hand-off was queued, so this runs after it.
    await scheduler
    run.handed_all = True
    run._check_settled()
    last = run.start + (offsets[-1] if offsets else 0.0)
    remaining = max(0.0, last + plan.drain_s - time.perf_counter())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run.settled.wait(), timeout=remaining)
    wall = time.perf_counter() - run.start
    cpu = time.process_time() - cpu_began
    run.closing = True
    for connection in list(run.open):
        if connection.transport is not None:
            connection.transport.abort()
    await asyncio.sleep(0)  # let connection_lost run before the counts are read
    result = _result(plan, run, np.asarray(offsets), cpu, wall)
    return replace(result, started_epoch_s=started_epoch, nice=os.getpriority(os.PRIO_PROCESS, 0))


@dataclass(frozen=True)
class _Recorded:
    """What the native engine recorded, in `_Run`'s terms (its times are seconds from
    the start: `start` is 0)."""

    handed: np.ndarray
    sent: np.ndarray
    finished: np.ndarray
    status: np.ndarray
    marked: np.ndarray
    waited: int
    most_open: int
    error_messages: collections.Counter[str]
    start: float = 0.0


def _result(plan: LoadPlan, run: _Run | _Recorded, times: np.ndarray, cpu_s: float, wall_s: float) -> LoadResult:
    first = int(np.searchsorted(times, plan.warmup_s, side="left"))
    window = slice(first, len(times))
    origin = run.start + plan.warmup_s
    intended = times[window] - plan.warmup_s
    sent = np.asarray(run.sent[window]) - origin
    handed = np.asarray(run.handed[window]) - origin
    finished = np.asarray(run.finished[window]) - origin
    status = np.asarray(run.status[window], dtype=np.int64)
    answered = status > 0
    ok = (status >= 200) & (status < 300)
    codes, counts = np.unique(status[answered], return_counts=True)
    went = status != THROTTLED  # a throttled request was meant not to be sent: no lag of the generator's
    lag = judge_lag(
        intended[went],
        sent[went],
        window_s=plan.duration_s,
        max_p99_lag_s=plan.max_p99_lag_s,
        min_send_share=plan.min_send_share,
    )
    if run.waited and lag.fell_behind:
        busy = f"all {plan.max_connections} connections were busy {run.waited:,} times: the server did not keep up"
        lag = replace(lag, reason=f"{lag.reason} ({busy})")
    handed_lag = handed[~np.isnan(handed)] - intended[~np.isnan(handed)]
    latency = finished - intended
    marked = np.asarray(run.marked[window], dtype=bool) if plan.marker else None
    by_label = {}
    kinds = np.arange(first, len(times)) % len(plan.requests)  # requests are sent in turn
    if plan.labels:
        deadlines = np.asarray(plan.deadlines_ms, dtype=np.float64) / 1000 if plan.deadlines_ms else None
        by_label = split_by_label(
            plan.labels, kinds, status=status, sent=sent, latency_s=latency, deadlines_s=deadlines, marked=marked
        )
    return LoadResult(
        offered_rate=plan.rate,
        duration_s=plan.duration_s,
        scheduled=len(intended),
        sent=int((~np.isnan(sent)).sum()),
        completed=int(answered.sum()),
        ok=int(ok.sum()),
        statuses={int(c): int(n) for c, n in zip(codes, counts, strict=True)},
        errors=int((status == FAILED).sum()),
        unfinished=int((status == 0).sum()),
        error_samples=tuple(f"{message} (x{count})" for message, count in run.error_messages.most_common()),
        latency=summarize(latency[ok]),
        lag=lag,
        schedule_lag_p99_ms=float(np.percentile(handed_lag, 99)) * 1000 if len(handed_lag) else math.nan,
        waited_for_connection=run.waited,
        connections=run.most_open,
        generator_cpu_s=cpu_s,
        wall_s=wall_s,
        by_label=by_label,
        marked=int((ok & marked).sum()) if marked is not None else None,
        throttled=int((status == THROTTLED).sum()),
        timeline=timeline(
            plan.labels or ("all",) * len(plan.requests),
            kinds,
            intended_s=intended,
            status=status,
            latency_s=latency,
            marked=marked,
            bucket_s=plan.timeline_s,
            window_s=plan.duration_s,
        )
        if plan.timeline_s
        else None,
    )


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def _run_in_this_process(plan: LoadPlan) -> LoadResult:
    """One run on a fresh event loop of this process (the generator process's entry)."""
    sys.setswitchinterval(_SCHEDULER_SWITCH_S)  # the scheduler thread wakes on time when the loop is busy
    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        return runner.run(_run(plan))


def _at_least_nice(nice: int) -> None:
    """Raise this process's niceness to `nice` where it is below (lowering it takes
    privileges: a generator started nicer stays so). Before any thread: they inherit it."""
    if os.getpriority(os.PRIO_PROCESS, 0) < nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def native_binary() -> Path | None:
    """The tenx-loadgen executable: beside this Python's (where `make loadgen` puts it),
    else on PATH; None when there is none."""
    beside = Path(sys.executable).parent / NATIVE_BINARY
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(NATIVE_BINARY)
    return Path(found) if found else None


def _write_requests(path: Path, requests: Sequence[bytes]) -> None:
    with path.open("wb") as out:
        for request in requests:
            out.write(struct.pack("<I", len(request)))
            out.write(request)


def _run_native(plan: LoadPlan, binary: Path, nice: int = 0) -> LoadResult:
    """One run by tenx-loadgen (loadgen/main.go): the same schedule, connections and
    records as `_run`, its figures computed here by the same `_result`."""
    times = schedule(plan.rate, plan.warmup_s + plan.duration_s, arrivals=plan.arrivals, seed=plan.seed)
    with tempfile.TemporaryDirectory(prefix="tenx-loadgen-") as folder:
        work = Path(folder)
        _write_requests(work / "requests.bin", plan.requests)
        times.astype("<f8").tofile(work / "times.f64")
        command = [
            str(binary),
            f"-host={plan.host}",
            f"-port={plan.port}",
            f"-requests={work / 'requests.bin'}",
            f"-times={work / 'times.f64'}",
            f"-out={work / 'out'}",
            f"-max-connections={plan.max_connections}",
            f"-initial-connections={plan.initial_connections}",
            f"-drain-s={plan.drain_s}",
            f"-marker-hex={plan.marker.hex()}",
            f"-nice={nice}",
        ]
        limit = plan.warmup_s + plan.duration_s + plan.drain_s + 60.0
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"{NATIVE_BINARY} ran past {limit:.0f} s (the run and its drain take less)") from error
        if done.returncode != 0:
            raise RuntimeError(f"{NATIVE_BINARY} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        out = work / "out"
        summary = json.loads((out / "summary.json").read_text())
        recorded = _Recorded(
            handed=np.fromfile(out / "handed.f64", dtype="<f8"),
            sent=np.fromfile(out / "sent.f64", dtype="<f8"),
            finished=np.fromfile(out / "finished.f64", dtype="<f8"),
            status=np.fromfile(out / "status.i32", dtype="<i4").astype(np.int64),
            marked=np.fromfile(out / "marked.u8", dtype=np.uint8).astype(bool),
            waited=int(summary["waited"]),
            most_open=int(summary["most_open"]),
            error_messages=collections.Counter({str(k): int(v) for k, v in (summary["errors"] or {}).items()}),
        )
    result = _result(plan, recorded, times, float(summary["cpu_s"]), float(summary["wall_s"]))
    started = float(summary["started_epoch_s"]) + plan.warmup_s
    return replace(result, started_epoch_s=started, nice=int(summary["nice"]), engine="native")


class LoadGenerator:
    """A generator process of its own (spawned on first use, reused by each `run`).

    `engine`: "python" (the asyncio engine above, in a spawned process), "native"
    (tenx-loadgen, built from loadgen/ by `make loadgen`: the same run for about a
    fifth of the CPU, which matters when the generator shares a small machine with the
    server it measures) or "auto" (native when its binary is there and the plan has no
    client-side throttle, which only the Python engine has).

    `nice`: the least niceness (0-19) the generator runs at. On a machine it shares with the
    server it measures, the generator stands in for clients on other machines; at 0 its
    thread competes with the server's for the same cores at the same weight, and at 10
    the server's threads get them first. What that costs the generator shows in its own
    lag (`LoadResult.schedule_lag_p99_ms`), which callers judge; `LoadResult.nice` is the
    niceness it read back."""

    def __init__(self, engine: str = "python", *, nice: int = 0) -> None:
        if engine not in ENGINES:
            raise ValueError(f"LoadGenerator: engine must be one of {', '.join(ENGINES)}; got {engine!r}")
        if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
            raise ValueError(f"LoadGenerator: nice must be an integer from 0 to 19; got {nice!r}")
        self.engine = engine
        self.nice = nice
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    def engine_for(self, plan: LoadPlan) -> str:
        """The engine that runs `plan` ("python" or "native"), or ValueError when none can."""
        return "python" if self._native_for(plan) is None else "native"

    def _native_for(self, plan: LoadPlan) -> Path | None:
        """The tenx-loadgen binary that runs `plan`; None: the Python engine does."""
        if self.engine == "python":
            return None
        binary = native_binary()
        if self.engine == "auto":
            return binary if not plan.throttled else None
        if binary is None:
            raise ValueError(
                f"the native engine needs the {NATIVE_BINARY} binary, built from loadgen/ with Go: `make loadgen` "
                f"puts it beside {Path(sys.executable).name} in {Path(sys.executable).parent} (or put one on PATH); "
                "or use engine='python'"
            )
        if plan.throttled:
            raise ValueError("the native engine has no client-side throttle (plan.throttled): use engine='python'")
        return binary

    def run(self, plan: LoadPlan) -> LoadResult:
        binary = self._native_for(plan)
        if binary is not None:
            return _run_native(plan, binary, self.nice)
        if self._executor is None:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_at_least_nice,
                initargs=(self.nice,),
            )
        limit = plan.warmup_s + plan.duration_s + plan.drain_s + 60.0
        return self._executor.submit(_run_in_this_process, plan).result(timeout=limit)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_load(plan: LoadPlan) -> LoadResult:
    """One run in a fresh generator process (`LoadGenerator` reuses one over many runs)."""
    with LoadGenerator() as generator:
        return generator.run(plan)
