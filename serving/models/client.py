"""`ModelClient` and `AsyncModelClient`: predictions from a tenx model server.

    with ModelClient("http://localhost:8001") as client:
        prediction = client.predict("buys", [17, 42], priority="critical", deadline_ms=100)
        prediction.scores     # [0.12, 0.53]
        prediction.status     # ["found", "stale"]
        prediction.age_s      # [2.5, 90061.0]: seconds since each entity's as_of
        prediction.served_by  # "buys@3" ("buys_small@1", "cache:buys@3", "rule:by_amount" when degraded)

One pooled keep-alive connection set per client (httpx); every call has a timeout,
and a deadline travels as the X-Deadline-Ms header, so the server drops a request
that can no longer be answered in time instead of working on it. The call's timeout
is the deadline (plus a little for the network) when one is given, else `timeout_s`,
and it bounds the call, not each network wait: a server that trickles its answer is
given up on at the deadline (the sync client: connecting and the answer's head are each
bounded by the timeout, its body by the deadline). Failures raise serving.errors types: Overloaded (503,
shed: retry later or elsewhere; also raised without sending by the client's own
throttle, one `AdaptiveThrottle` per class, while the server sheds most of that class's
requests), ModelUnavailable (503), QuotaExceeded (429, with retry_after_s),
DeadlineExceeded (504, or no full answer within the call's timeout), UnknownModelError
(404), SkewError (409), ValueError (400), TransientError (a 5xx, or a 200 whose body is
no prediction: a proxy's page).
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from serving.errors import (
    DeadlineExceeded,
    ModelUnavailable,
    Overloaded,
    QuotaExceeded,
    SkewError,
    TransientError,
    UnknownModelError,
)

DEFAULT_TIMEOUT_S = 5.0
NETWORK_ALLOWANCE_S = 0.05  # added to a deadline for the call's own timeout
DEFAULT_RETRY_AFTER_S = 1.0  # a 429 without a Retry-After the client can read
# The classes the client throttles, each with its own throttle; critical work never is.
# A request without a class gets its tenant's default class on the server, which the
# client cannot know: it has a throttle of its own (`UNSPECIFIED`), which refuses only
# while the server sheds such requests (it rarely sheds critical ones: then it stays open).
UNSPECIFIED = "unspecified"
THROTTLED_CLASSES = ("default", "sheddable", UNSPECIFIED)


@dataclass(frozen=True)
class Prediction:
    route: str
    model: str | None  # None when a rule answered
    version: int | None
    served_by: str
    precision: str | None
    device: str | None
    degraded: bool  # a fallback answered because the step before it failed; `reason` says why
    scores: list[float | None]
    status: list[str]
    as_of_ms: list[int | None]
    read_at_ms: int | None  # when the server read the features (None: a rule answered without them)
    reason: str | None = None

    @property
    def age_s(self) -> list[float | None]:
        """Each entity's feature age in seconds when read (None: no features)."""
        read_at = self.read_at_ms
        return [None if t is None or read_at is None else (read_at - t) / 1000 for t in self.as_of_ms]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Prediction:
        values: dict[str, Any] = {name: data.get(name) for name in cls.__dataclass_fields__}
        return cls(**values)


class AdaptiveThrottle:
    """Client-side throttling (Google SRE book, "Handling Overload"): a client that sees
    its requests shed stops sending most of them, so an overloaded server spends its CPU
    on the work it can do instead of on refusing. Over the last `window_s` seconds, with
    `requests` attempted and `accepts` not shed, a new request is refused locally with
    probability max(0, (requests - k * accepts) / (requests + 1)). One throttle counts
    one priority class (`ModelClient` keeps one per class it throttles); critical
    requests are never throttled, the server's admission decides for them.

    Refusals count as requests, so after the server recovers the share sent grows about
    k times a window: with the default 10 s window (the load test's) a client at 100
    requests/s is back under 5% refusals 26-117 s (median about 45 s) after an overload
    of any length; with 60 s it took 3-9 minutes.
    """

    def __init__(
        self,
        *,
        k: float = 2.0,
        window_s: float = 10.0,
        min_requests: int = 20,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.k = k
        self.window_s = window_s
        self.min_requests = min_requests
        self._clock = clock
        self._draw = draw
        self._seconds: collections.deque[list[float]] = collections.deque()  # [second, requests, accepts]
        self.requests = 0.0
        self.accepts = 0.0

    def fresh(self) -> AdaptiveThrottle:
        """A throttle with these settings (clock and draws included) and an empty window."""
        return AdaptiveThrottle(
            k=self.k, window_s=self.window_s, min_requests=self.min_requests, clock=self._clock, draw=self._draw
        )

    def _bucket(self) -> list[float]:
        now = math.floor(self._clock())
        while self._seconds and self._seconds[0][0] <= now - self.window_s:
            _, requests, accepts = self._seconds.popleft()
            self.requests -= requests
            self.accepts -= accepts
        if not self._seconds or self._seconds[-1][0] != now:
            self._seconds.append([now, 0.0, 0.0])
        return self._seconds[-1]

    def probability(self) -> float:
        """0 until `min_requests` were seen in the window: a few refusals (a server
        starting up, one busy second) are no reason to stop sending."""
        self._bucket()
        if self.requests < self.min_requests:
            return 0.0
        return max(0.0, (self.requests - self.k * self.accepts) / (self.requests + 1))

    def refuse(self) -> bool:
        """Whether to refuse the next request here; a refused one counts as a request
        not accepted. (Requests sent count when their answer comes back, so a burst of
        requests still in flight is not mistaken for refusals.)"""
        refused = self._draw() < self.probability()
        if refused:
            self._bucket()[1] += 1
            self.requests += 1
        return refused

    def answered(self, accepted: bool) -> None:
        bucket = self._bucket()
        bucket[1] += 1
        self.requests += 1
        if accepted:
            bucket[2] += 1
            self.accepts += 1


def priority_class(priority: str | None) -> str | None:
    """The class the server reads `priority` as (it ignores case), e.g. " Critical" ->
    "critical"; None when the request names none (the server applies its tenant's)."""
    return None if priority is None else priority.strip().lower()


def _request(
    model: str,
    entities: Sequence[Any],
    priority: str | None,
    tenant: str | None,
    deadline_ms: float | None,
    context: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str], float | None]:
    body: dict[str, Any] = {"model": model, "entities": list(entities)}
    if context:
        body["context"] = context
    headers = {"content-type": "application/json"}
    if priority is not None:
        headers["x-priority"] = priority  # a header, so an overloaded server can refuse before reading the body
    if tenant is not None:
        body["tenant"] = tenant
        headers["x-tenant"] = tenant
    timeout = None
    if deadline_ms is not None:
        headers["x-deadline-ms"] = f"{deadline_ms:g}"
        timeout = deadline_ms / 1000 + NETWORK_ALLOWANCE_S
    # Ids often come from a numpy array or a pandas column: its scalars are sent as JSON numbers.
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), headers, timeout


_SHED = ("overload", "evicted", "fair_share")


def _throttles(settings: AdaptiveThrottle | None) -> dict[str, AdaptiveThrottle]:
    """One throttle per throttled class: refusals of sheddable work must not make the
    client refuse its default work, which the server still accepts."""
    settings = settings or AdaptiveThrottle()
    return {name: settings.fresh() for name in THROTTLED_CLASSES}


def _throttled(throttles: dict[str, AdaptiveThrottle], priority: str | None) -> AdaptiveThrottle | None:
    """The throttle that counts this request (None: not throttled, nor counted); raises
    Overloaded when it refuses to send it."""
    throttle = throttles.get(priority if priority is not None else UNSPECIFIED)
    if throttle is not None and throttle.refuse():
        raise Overloaded(
            f"refused by this client's throttle: the server shed most recent {priority or 'unclassed'} requests "
            f"(sending {1 - throttle.probability():.0%} of them until it accepts more); retry later"
        )
    return throttle


def retry_after_s(value: str | None, *, now: datetime | None = None) -> float:
    """A Retry-After header in seconds: delay-seconds or an HTTP-date (RFC 9110), both
    allowed and proxies send dates; `DEFAULT_RETRY_AFTER_S` when absent or unreadable.

    >>> retry_after_s("Wed, 21 Oct 2026 07:28:30 GMT", now=datetime(2026, 10, 21, 7, 28, tzinfo=UTC))
    30.0
    """
    if value is None:
        return DEFAULT_RETRY_AFTER_S
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER_S
        if when.tzinfo is None:  # "-0000": UTC without a stated zone
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
    return seconds if math.isfinite(seconds) and seconds >= 0 else DEFAULT_RETRY_AFTER_S


def _answer(response: httpx.Response, throttle: AdaptiveThrottle | None = None) -> Prediction:
    status = response.status_code
    if status == 200:
        if throttle is not None:
            throttle.answered(True)
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError as error:
            data = error
        if not isinstance(data, dict):
            # Not ValueError, which says the request was wrong: something between the client
            # and the server (a proxy's login page) answered in its place.
            raise TransientError(
                f"model server answered HTTP 200 with a body that is no prediction (expected a JSON object; "
                f"got {response.content[:60]!r}): is a proxy in between?"
            )
        return Prediction.from_json(data)
    reason = None
    try:
        data = orjson.loads(response.content)
        message = str(data.get("error", response.text))
        reason = data.get("reason")
    except (orjson.JSONDecodeError, AttributeError):
        message = response.text or f"HTTP {status}"
    shed = status == 429 or (status == 503 and reason in _SHED)
    if throttle is not None:
        throttle.answered(not shed)  # loading, a failed store, a 4xx: answered, not shed
    if status == 429:
        raise QuotaExceeded(message, retry_after_s(response.headers.get("retry-after")))
    if status == 503:
        raise (Overloaded if reason in _SHED else ModelUnavailable)(message)
    if status == 504:
        raise DeadlineExceeded(message)
    if status == 404:
        raise UnknownModelError(message)
    if status == 409:
        raise SkewError(message)
    if 400 <= status < 500:
        raise ValueError(f"HTTP {status}: {message}")
    raise TransientError(f"model server answered HTTP {status}: {message}")


def _transport_error(error: httpx.TransportError, url: str) -> TransientError:
    """A timeout is a missed deadline; any other transport failure, an unavailable server."""
    if isinstance(error, httpx.TimeoutException):
        return DeadlineExceeded(f"model server at {url} did not answer in time ({type(error).__name__})")
    return ModelUnavailable(f"model server at {url}: {type(error).__name__}: {error}")


def _too_late(url: str, timeout_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"model server at {url} did not answer within {timeout_s * 1000:g} ms "
        "(the call's deadline plus its network allowance, or the client's timeout_s)"
    )


class _ByDeadline(httpx.SyncByteStream):
    """A response body read before the monotonic `deadline`, or not at all. httpx's
    timeout bounds each network wait, not the call, so a server sending a few bytes at
    a time held a 100 ms call for seconds. The deadline is checked before every read
    that still waits for bytes (`expected`: the Content-Length, when given: a body
    already whole is never thrown away); a read already waiting ends by its own timeout,
    so the body ends at most one network wait past the deadline. Connecting and the
    answer's head are httpx's, each bounded by the call's timeout. The async client is
    cancelled at the deadline itself."""

    def __init__(
        self, stream: Any, deadline: float, late: Callable[[], DeadlineExceeded], expected: int | None
    ) -> None:
        self._stream = stream
        self._deadline = deadline
        self._late = late
        self._expected = expected

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._stream)
        received = 0
        while True:
            if time.monotonic() >= self._deadline and (self._expected is None or received < self._expected):
                raise self._late()
            chunk = next(chunks, None)
            if chunk is None:
                return
            received += len(chunk)
            yield chunk

    def close(self) -> None:
        self._stream.close()


class ModelClient:
    """Synchronous predictions over pooled keep-alive connections."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        max_connections: int = 32,
        throttle: AdaptiveThrottle | None = None,
    ) -> None:
        """`throttle`: the settings of the client-side throttle (default: on, k=2, 10 s
        window); each throttled class gets its own, in `throttles` ("default", "sheddable")."""
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.throttles = _throttles(throttle)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(
            base_url=self.url,
            timeout=timeout_s,
            headers=headers,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def predict(
        self,
        model: str,
        entities: Sequence[Any],
        *,
        priority: str | None = None,
        tenant: str | None = None,
        deadline_ms: float | None = None,
        context: dict[str, Any] | None = None,
    ) -> Prediction:
        """`model` names a route or a served model; `context` carries fields for the
        route's routing function and rules (an amount, a country)."""
        priority = priority_class(priority)
        throttle = _throttled(self.throttles, priority)
        body, headers, timeout = _request(model, entities, priority, tenant, deadline_ms, context)
        timeout_s = timeout or self.timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            with self._client.stream("POST", "/predict", content=body, headers=headers, timeout=timeout_s) as response:
                length = response.headers.get("content-length")
                expected = int(length) if length is not None and length.isdigit() else None
                response.stream = _ByDeadline(
                    response.stream, deadline, lambda: _too_late(self.url, timeout_s), expected
                )
                response.read()
        except httpx.TransportError as error:
            raise _transport_error(error, self.url) from error
        return _answer(response, throttle)

    @property
    def throttle(self) -> AdaptiveThrottle:
        """The default class's throttle (each class has its own: `throttles`)."""
        return self.throttles["default"]

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ModelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncModelClient:
    """The same for asyncio code."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        max_connections: int = 64,
        throttle: AdaptiveThrottle | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.throttles = _throttles(throttle)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=timeout_s,
            headers=headers,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def predict(
        self,
        model: str,
        entities: Sequence[Any],
        *,
        priority: str | None = None,
        tenant: str | None = None,
        deadline_ms: float | None = None,
        context: dict[str, Any] | None = None,
    ) -> Prediction:
        """`model` names a route or a served model; `context` carries fields for the
        route's routing function and rules (an amount, a country)."""
        priority = priority_class(priority)
        throttle = _throttled(self.throttles, priority)
        body, headers, timeout = _request(model, entities, priority, tenant, deadline_ms, context)
        timeout_s = timeout or self.timeout_s
        try:
            async with asyncio.timeout(timeout_s):  # the whole call, not each network wait
                response = await self._client.post("/predict", content=body, headers=headers, timeout=timeout_s)
        except httpx.TransportError as error:
            raise _transport_error(error, self.url) from error
        except TimeoutError as error:
            raise _too_late(self.url, timeout_s) from error
        return _answer(response, throttle)

    @property
    def throttle(self) -> AdaptiveThrottle:
        """The default class's throttle (each class has its own: `throttles`)."""
        return self.throttles["default"]

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> AsyncModelClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
