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
is the deadline (plus a little for the network) when one is given. Failures raise
serving.errors types: Overloaded (503, shed: retry later or elsewhere; also raised
without sending by the client's own throttle, `AdaptiveThrottle`, while the server sheds
most of its non-critical requests), ModelUnavailable
(503), QuotaExceeded (429, with retry_after_s), DeadlineExceeded (504),
UnknownModelError (404), SkewError (409), ValueError (400).
"""

from __future__ import annotations

import collections
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    probability max(0, (requests - k * accepts) / (requests + 1)). Critical requests are
    never throttled here; the server's admission decides for them.
    """

    def __init__(
        self,
        *,
        k: float = 2.0,
        window_s: float = 60.0,
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
    return orjson.dumps(body), headers, timeout


_SHED = ("overload", "evicted", "fair_share")


def _throttled(throttle: AdaptiveThrottle | None, priority: str | None) -> None:
    if throttle is None or priority == "critical":
        return
    if throttle.refuse():
        raise Overloaded(
            f"refused by this client's throttle: the server shed most recent requests (sending "
            f"{1 - throttle.probability():.0%} of them until it accepts more); retry later"
        )


def _answer(response: httpx.Response, throttle: AdaptiveThrottle | None = None) -> Prediction:
    status = response.status_code
    if status == 200:
        if throttle is not None:
            throttle.answered(True)
        return Prediction.from_json(orjson.loads(response.content))
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
        raise QuotaExceeded(message, float(response.headers.get("retry-after", "1")))
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
        """`throttle`: client-side throttling of non-critical requests (default: on, k=2)."""
        self.url = url.rstrip("/")
        self.throttle = throttle or AdaptiveThrottle()
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
        _throttled(self.throttle, priority)
        body, headers, timeout = _request(model, entities, priority, tenant, deadline_ms, context)
        try:
            response = self._client.post(
                "/predict", content=body, headers=headers, timeout=timeout if timeout else httpx.USE_CLIENT_DEFAULT
            )
        except httpx.TransportError as error:
            raise _transport_error(error, self.url) from error
        return _answer(response, self.throttle)

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
        self.throttle = throttle or AdaptiveThrottle()
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
        _throttled(self.throttle, priority)
        body, headers, timeout = _request(model, entities, priority, tenant, deadline_ms, context)
        try:
            response = await self._client.post(
                "/predict", content=body, headers=headers, timeout=timeout if timeout else httpx.USE_CLIENT_DEFAULT
            )
        except httpx.TransportError as error:
            raise _transport_error(error, self.url) from error
        return _answer(response, self.throttle)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> AsyncModelClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
