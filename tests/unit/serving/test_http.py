"""A request's head (request line and headers) is bounded on both servers' protocol."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from serving.http import MAX_HEAD_BYTES, BoundedHeadProtocol
from tests.processes import free_port


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":  # an answer that takes a while, for pipelining
        await asyncio.sleep(0.3)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"slow"})
        return
    if scope["path"] == "/echo":  # reads its whole body first
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"echo"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(params=["bounded", "predict"])
def port(request: pytest.FixtureRequest) -> Iterator[int]:
    import uvicorn

    from serving.models.protocol import PredictProtocol

    protocol = BoundedHeadProtocol if request.param == "bounded" else PredictProtocol
    chosen = free_port()
    config = uvicorn.Config(hello, host="127.0.0.1", port=chosen, http=protocol, log_level="error",
                            lifespan="off")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        yield chosen
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def exchange(port: int, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it may close before reading it all
            sock.sendall(head)
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer and (b"ok" in answer or b"exceed" in answer):
                break
        return answer


def test_a_head_past_the_bound_is_answered_431_and_nothing_grows(port: int) -> None:
    line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    oversized = b"GET / HTTP/1.1\r\nHost: t\r\n" + line * (MAX_HEAD_BYTES // len(line) + 2) + b"\r\n"
    answer = exchange(port, oversized)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    assert b"exceed 65536 bytes" in answer
    # A long URL counts too.
    assert exchange(port, b"GET /" + b"u" * (MAX_HEAD_BYTES + 1) + b" HTTP/1.1\r\nHost: t\r\n\r\n").startswith(
        b"HTTP/1.1 431 "
    )
    # Under the bound, and on the next connection, requests are served as before.
    fine = b"GET / HTTP/1.1\r\nHost: t\r\n" + line * 30 + b"Connection: close\r\n\r\n"
    assert exchange(port, fine).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("prefix", [b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: ", b"GET / HTTP/1.1\r\nHost: t\r\nX-"])
def test_one_header_line_that_never_ends_is_bounded_too(port: int, prefix: bytes) -> None:
    """httptools buffers a header's name or value until its line ends and only then calls
    on_header: one line sent without end grew the process without a 431."""
    from serving.http import MAX_RAW_HEAD_BYTES

    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(prefix)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 8 * MAX_RAW_HEAD_BYTES:
                sock.sendall(b"a" * 65536)
                sent += 65536
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 "), (sent, answer[:80])
    assert sent < 8 * MAX_RAW_HEAD_BYTES  # the server closed the connection long before


def read_until_closed(sock: socket.socket) -> bytes:
    answer = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("bad", ["oversized", "malformed"])
def test_a_closing_answer_waits_for_the_requests_pipelined_before_it(port: int, bad: str) -> None:
    """A 431 (or the 400 for a request that cannot be parsed) went out at once, ahead of
    the answers still due to requests pipelined before it: the client read it as the
    first request's answer. It now follows them, and the connection closes after it."""
    line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    if bad == "oversized":
        last = b"GET / HTTP/1.1\r\nHost: t\r\n" + line * (MAX_HEAD_BYTES // len(line) + 2) + b"\r\n"
    else:
        last = b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\n\r\n"
    pipelined = b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n" + b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" + last
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(pipelined)
        answer = read_until_closed(sock)
    statuses = [part.split(b"\r\n", 1)[0] for part in answer.split(b"HTTP/1.1 ")[1:]]
    expected = b"431" if bad == "oversized" else b"400"
    assert [status[:3] for status in statuses] == [b"200", b"200", expected], answer
    assert answer.index(b"slow") < answer.index(b"\r\n\r\nok") < answer.index(b"HTTP/1.1 " + expected)


@pytest.mark.parametrize("before", [b"", b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n"])
def test_a_body_that_cannot_be_parsed_is_answered_400_not_left_hanging(port: int, before: bytes) -> None:
    """The 400 for a body that cannot be parsed (a bad chunk size) is that request's own
    answer: it waited for that request's response, which waited for the rest of its
    body, so the connection hung until the client gave up."""
    bad = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n"
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(before + bad)
        answer = read_until_closed(sock)
    assert time.monotonic() - began < 4
    statuses = [part.split(b"\r\n", 1)[0][:3] for part in answer.split(b"HTTP/1.1 ")[1:]]
    assert statuses == ([b"200"] if before else []) + [b"400"], answer
