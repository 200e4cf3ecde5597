"""ModelClient and AsyncModelClient against fake servers: throttling per class, the
throttle's recovery in virtual time, the whole-call deadline, odd answers, numpy ids."""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import numpy as np
import orjson
import pandas as pd
import pytest

from featurestore.errors import TransientError
from serving.errors import DeadlineExceeded, Overloaded, QuotaExceeded
from serving.models import AdaptiveThrottle, AsyncModelClient, ModelClient

ANSWER = {
    "route": "buys", "model": "buys", "version": 1, "served_by": "buys@1", "precision": "fp32", "device": "cpu",
    "degraded": False, "scores": [0.5], "status": ["found"], "as_of_ms": [0], "read_at_ms": 0,
}  # fmt: skip
SHED = {"error": "overloaded", "reason": "overload"}


def client_of(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> ModelClient:
    client = ModelClient("http://server", **options)
    client._client = httpx.Client(base_url="http://server", transport=httpx.MockTransport(handler))
    return client


def spread() -> Callable[[], float]:
    """Draws evenly spread over [0, 1) (golden-ratio steps): a throttle refuses close to
    its probability's share of requests, the same in every run."""
    steps = itertools.count()
    return lambda: (next(steps) * 0.6180339887498949) % 1.0


def send(client: ModelClient, priority: str | None) -> str:
    """ "sent" (answered), "shed" (the server refused) or "throttled" (never sent)."""
    try:
        client.predict("buys", [1], priority=priority)
    except Overloaded as error:
        return "throttled" if "client's throttle" in str(error) else "shed"
    return "sent"


def test_shed_sheddable_work_does_not_make_the_client_refuse_its_default_work() -> None:
    """The server sheds only sheddable requests (as its headroom does first): default
    requests, which it accepts, must all be sent, however many sheddable ones it shed."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("x-priority") == "sheddable":
            return httpx.Response(503, json=SHED)
        return httpx.Response(200, json=ANSWER)

    client = client_of(handler, throttle=AdaptiveThrottle(draw=spread()))
    outcomes: dict[str, list[str]] = {"default": [], "sheddable": []}
    for index in range(2000):
        priority = "default" if index % 4 == 0 else "sheddable"
        outcomes[priority].append(send(client, priority))
    assert set(outcomes["default"]) == {"sent"}
    assert outcomes["sheddable"].count("throttled") > 0.9 * len(outcomes["sheddable"])


@pytest.mark.parametrize("spelling", ["CRITICAL", " Critical ", "critical"])
def test_critical_work_is_never_throttled_however_it_is_spelled_nor_counted(spelling: str) -> None:
    """The server reads the class ignoring case. Critical answers feed no throttle: a
    server shedding critical work is no reason to hold back default requests."""
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("x-priority", "-"))
        return httpx.Response(503, json=SHED)

    client = client_of(handler, throttle=AdaptiveThrottle(draw=spread()))
    for _ in range(200):
        send(client, "sheddable")
    assert send(client, "sheddable") == "throttled"
    sent.clear()
    assert [send(client, spelling) for _ in range(100)] == ["shed"] * 100
    assert sent == ["critical"] * 100  # sent as the server reads it
    assert [send(client, "Default") for _ in range(5)] == ["shed"] * 5  # its own throttle saw only these


def test_a_request_without_a_class_has_its_own_throttle_and_an_unknown_class_none() -> None:
    """Without a class the server applies the tenant's default class, critical perhaps:
    such requests get a throttle of their own, which refuses only while the server sheds
    them (a server with a critical default hardly does, so it stays open), and never the
    default class's. An unknown class the server answers 400: not the client's to refuse."""
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("x-priority", "-"))
        return httpx.Response(503, json=SHED)

    client = client_of(handler, throttle=AdaptiveThrottle(draw=spread()))
    unclassed = [send(client, None) for _ in range(200)]
    assert 0 < unclassed.count("shed") < 60  # the rest stayed home
    assert client.throttles["default"].probability() == 0.0  # the default class's own throttle is untouched
    assert client.throttle is client.throttles["default"]
    assert [send(client, "urgent") for _ in range(50)] == ["shed"] * 50
    assert sent == ["-"] * unclassed.count("shed") + ["urgent"] * 50

    def accepted(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=ANSWER)

    answered = client_of(accepted, throttle=AdaptiveThrottle(draw=spread()))
    assert [send(answered, None) for _ in range(200)] == ["sent"] * 200  # answered: never refused


def test_after_an_overload_the_default_throttle_sends_again_within_a_minute() -> None:
    """A client at 100 requests/s, its server shedding every request for 5 minutes and
    then healthy, in virtual time. Refusals count as requests, so the share sent grows
    about k = 2 times per window: with the 10 s window the throttle refuses under 5%
    within a minute (about 40 s here); with 60 s it took close to 5 minutes."""
    now = [0.0]
    throttle = AdaptiveThrottle(clock=lambda: now[0], draw=spread())
    overload_s, rate = 300.0, 100
    sent_in_overload = 0
    recovered_after = None
    for index in itertools.count():
        now[0] = index / rate
        healthy = now[0] >= overload_s
        if not throttle.refuse():
            throttle.answered(healthy)
            sent_in_overload += not healthy
        if healthy and throttle.probability() < 0.05:
            recovered_after = now[0] - overload_s
            break
        if now[0] > overload_s + 600:
            break
    assert sent_in_overload < 0.05 * overload_s * rate  # it did throttle while shed
    assert recovered_after is not None
    assert recovered_after < 60.0


class TrickleServer:
    """An HTTP server that answers every request with a 200 whose body it sends 8 bytes
    every 100 ms: each read finishes well inside any per-read timeout."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.body = orjson.dumps(ANSWER)
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += connection.recv(65536)
                head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                connection.sendall(head % len(self.body))
                for start in range(0, len(self.body), 8):
                    if self.stopped.wait(0.1):
                        return
                    connection.sendall(self.body[start : start + 8])
            except OSError:  # the client gave up and closed: what the test wants
                return

    def close(self) -> None:
        self.stopped.set()
        self.socket.close()


@pytest.fixture
def trickle() -> Iterator[TrickleServer]:
    server = TrickleServer()
    yield server
    server.close()


def test_a_server_trickling_its_answer_is_given_up_on_at_the_deadline(trickle: TrickleServer) -> None:
    """The body takes 2.4 s: the sync client stops within one read of its deadline
    (100 ms plus 50 ms for the network)."""
    assert len(trickle.body) > 160
    with ModelClient(f"http://127.0.0.1:{trickle.port}") as client:
        began = time.perf_counter()
        with pytest.raises(DeadlineExceeded, match=r"did not answer within 150 ms"):
            client.predict("buys", [1], deadline_ms=100)
        assert time.perf_counter() - began < 0.5


def test_the_async_client_gives_a_trickling_server_up_at_the_deadline(trickle: TrickleServer) -> None:
    async def call() -> float:
        async with AsyncModelClient(f"http://127.0.0.1:{trickle.port}") as client:
            began = time.perf_counter()
            with pytest.raises(DeadlineExceeded, match=r"did not answer within 150 ms"):
                await client.predict("buys", [1], deadline_ms=100)
            return time.perf_counter() - began

    assert asyncio.run(call()) < 0.4


def test_the_timeout_without_a_deadline_bounds_the_whole_call_too(trickle: TrickleServer) -> None:
    with ModelClient(f"http://127.0.0.1:{trickle.port}", timeout_s=0.3) as client:
        began = time.perf_counter()
        with pytest.raises(DeadlineExceeded, match=r"did not answer within 300 ms"):
            client.predict("buys", [1])
        assert time.perf_counter() - began < 0.7


def test_a_retry_after_given_as_an_http_date_is_read_as_seconds() -> None:
    """RFC 9110 allows delay-seconds or an HTTP-date; a gateway's date raised ValueError."""
    in_30_s = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    retry_after = {"a": in_30_s, "b": "7", "c": "soon", "d": "-3", "e": "Wed, 21 Oct 2015 07:28:00 GMT"}
    client = client_of(
        lambda request: httpx.Response(
            429, headers={"retry-after": retry_after[request.headers["x-tenant"]]}, text="Too Many Requests"
        )
    )
    waits = {}
    for tenant in retry_after:
        with pytest.raises(QuotaExceeded, match="Too Many Requests") as refused:
            client.predict("buys", [1], tenant=tenant)
        waits[tenant] = refused.value.retry_after_s
    assert 28 <= waits.pop("a") <= 30
    assert waits == {"b": 7.0, "c": 1.0, "d": 1.0, "e": 0.0}  # unreadable: 1 s; a date passed: now


def test_a_200_whose_body_is_no_prediction_is_a_transient_error_not_a_value_error() -> None:
    """ValueError means the request was wrong; a proxy's page in place of the answer is not."""
    for body in (b"<html>proxy login</html>", b"[1, 2]"):
        client = client_of(lambda request, body=body: httpx.Response(200, content=body))
        with pytest.raises(TransientError) as error:
            client.predict("buys", [1])
        assert not isinstance(error.value, ValueError)
        assert str(error.value) == (
            "model server answered HTTP 200 with a body that is no prediction (expected a JSON object; "
            f"got {body!r}): is a proxy in between?"
        )


@pytest.mark.parametrize(
    "entities",
    [np.array([9, 37]), pd.Series([9, 37]), [np.int64(9), np.int32(37)], np.array([9, 37], dtype=np.uint16)],
    ids=["array", "series", "scalars", "uint16"],
)
def test_numpy_ids_are_sent_as_json_numbers(entities: Any) -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(orjson.loads(request.content))
        return httpx.Response(200, json=ANSWER)

    assert client_of(handler).predict("buys", entities, priority="critical").scores == [0.5]
    assert bodies == [{"model": "buys", "entities": [9, 37]}]


def test_a_body_already_whole_is_kept_when_the_deadline_passes_before_its_end_is_read() -> None:
    """The deadline was checked before every read, the last one included, which finds
    only the end of a body already whole: such an answer was thrown away as late."""
    from serving.models.client import _ByDeadline

    def stream() -> Any:
        yield b"ab"
        time.sleep(0.05)  # the last bytes arrive after the deadline
        yield b"cd"

    def late() -> DeadlineExceeded:
        return DeadlineExceeded("late")

    whole = _ByDeadline(stream(), time.monotonic() + 0.02, late, expected=4)
    assert b"".join(whole) == b"abcd"
    short = _ByDeadline(stream(), time.monotonic() + 0.02, late, expected=5)  # a byte still due at the deadline
    with pytest.raises(DeadlineExceeded):
        b"".join(short)
