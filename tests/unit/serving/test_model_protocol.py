"""The model server under real uvicorn with its own HTTP protocol (serving/models/protocol.py):
a shed sheddable request is answered from its headers without changing what any
request gets back, keep-alive and pipelining keep working, auth still comes first, and
the sheddable gate lets through exactly its fraction, asked once per request."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from serving.models import ModelServerSettings, create_model_app
from serving.models.protocol import PredictProtocol
from tests.model_repo import DemoRepo, build_demo_repo, with_two_models
from tests.processes import free_port


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> DemoRepo:
    return with_two_models(build_demo_repo(tmp_path_factory.mktemp("protocol") / "repo"))


class Served:
    def __init__(self, app: Any, port: int) -> None:
        self.app = app
        self.port = port

    @property
    def server(self) -> Any:
        return self.app.state.server

    def hold_gate(self, passing: float) -> None:
        """Let `passing` of sheddable requests in, whatever the loop measures."""
        pressure = self.server.pressure
        pressure.observe = lambda lag_s, busy=None: pressure.share  # the watch loop no longer moves it
        pressure.passing = passing
        pressure._credit = 0.0

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


def _serve(repo: DemoRepo, token: str | None = None, keep_alive_s: float = 5.0) -> Iterator[Served]:
    import uvicorn

    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir)
    app = create_model_app(settings, repo.store(), token=token)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=PredictProtocol, log_level="warning", lifespan="on",
        timeout_keep_alive=keep_alive_s,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped before it served"
        assert time.monotonic() < deadline, "uvicorn did not start within 60 s"
        time.sleep(0.05)
    try:
        yield Served(app, port)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def served(repo: DemoRepo) -> Iterator[Served]:
    yield from _serve(repo)


def request(priority: str | None, *, body: dict[str, Any] | bytes | None = None, close: bool = False,
            headers: dict[str, str] | None = None) -> bytes:  # fmt: skip
    payload = body if isinstance(body, bytes) else json.dumps(body or {"model": "buys", "entities": [1, 2]}).encode()
    lines = ["POST /predict HTTP/1.1", "Host: test", "Content-Type: application/json"]
    lines.append(f"Content-Length: {len(payload)}")
    if priority is not None:
        lines.append(f"X-Priority: {priority}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def read_answers(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], dict[str, Any]]]:
    """`count` whole HTTP/1.1 answers (Content-Length framed) from `sock`."""
    buffer = b""
    answers = []
    while len(answers) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(answers)} answers"
            buffer += chunk
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode().split("\r\n")
        headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)}
        length = int(headers["content-length"])
        while len(buffer) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed mid-answer"
            buffer += chunk
        body, buffer = buffer[:length], buffer[length:]
        answers.append((int(status_line.split()[1]), headers, json.loads(body)))
    return answers


def test_a_shed_request_is_answered_from_its_headers_and_the_connection_serves_the_next(served: Served) -> None:
    served.hold_gate(0.02)
    with served.connect() as sock:
        sock.sendall(request("sheddable"))
        ((status, headers, body),) = read_answers(sock, 1)
        assert status == 503
        assert headers["retry-after"] == "1"
        assert headers["content-type"] == "application/json"
        assert len(headers["x-request-id"]) == 16
        assert body["reason"] == "overload"
        assert "lets 2% of sheddable requests in" in body["error"]
        sock.sendall(request("critical"))  # same connection: the refused body was consumed, not parsed as a request
        ((status, _, body),) = read_answers(sock, 1)
        assert status == 200
        assert body["served_by"].startswith("buys@")
        assert len(body["scores"]) == 2
    text = _metrics(served)
    assert 'tenx_model_requests_total{model="-",outcome="unavailable",priority="sheddable"} 1.0' in text
    assert 'tenx_model_shed_total{model="*",priority="sheddable",reason="overload",tenant="default"} 1.0' in text


def test_a_client_that_hangs_up_after_a_refusal_leaves_no_error_and_the_server_serving(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    served.hold_gate(0.02)
    for _ in range(3):
        with served.connect() as sock:
            sock.sendall(request("sheddable"))
            ((status, _, _),) = read_answers(sock, 1)
            assert status == 503
    time.sleep(0.3)  # the server sees the connections close
    with served.connect() as sock:
        sock.sendall(request("critical"))
        ((status, _, _),) = read_answers(sock, 1)
    assert status == 200
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, [record.getMessage() for record in errors]


def test_pipelined_requests_are_answered_in_order_whichever_is_shed(served: Served) -> None:
    served.hold_gate(0.02)
    with served.connect() as sock:
        sock.sendall(request("critical") + request("sheddable") + request("sheddable") + request("critical"))
        statuses = [status for status, _, _ in read_answers(sock, 4)]
    assert statuses == [200, 503, 503, 200]
    with served.connect() as sock:
        sock.sendall(request("sheddable") + request("critical", body={"model": "buys", "entities": [3]}))
        answers = read_answers(sock, 2)
    assert [status for status, _, _ in answers] == [503, 200]
    assert len(answers[1][2]["scores"]) == 1


def test_the_gate_lets_its_fraction_through_asked_once_per_request(served: Served) -> None:
    served.hold_gate(0.25)
    with served.connect() as sock:
        sock.sendall(b"".join(request("sheddable") for _ in range(20)))  # header and body both say sheddable
        by_header = [status for status, _, _ in read_answers(sock, 20)]
    assert by_header.count(200) == 5  # each request asked once: asked twice, 0.25 * 0.25 would pass
    assert by_header.count(503) == 15
    served.hold_gate(0.5)
    body = {"model": "buys", "entities": [1], "priority": "sheddable"}
    with served.connect() as sock:
        sock.sendall(b"".join(request(None, body=body) for _ in range(10)))  # the class in the body only
        by_body = [status for status, _, _ in read_answers(sock, 10)]
    assert by_body.count(200) == 5


def test_connection_close_and_wrong_tokens_take_the_full_path(repo: DemoRepo) -> None:
    for served in _serve(repo, token="s3cret"):
        served.hold_gate(0.02)
        with served.connect() as sock:
            sock.sendall(request("sheddable"))  # no token: 401 before any shedding, as through ASGI
            ((status, _, body),) = read_answers(sock, 1)
            assert status == 401
            assert "bearer token" in body["error"]
            sock.sendall(request("sheddable", headers={"Authorization": "Bearer s3cret"}, close=True))
            ((status, _, body),) = read_answers(sock, 1)
            assert status == 503
            assert body["reason"] == "overload"
            assert sock.recv(1) == b""  # it asked to close; the server did after answering


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout_and_not_before(repo: DemoRepo) -> None:
    for served in _serve(repo, keep_alive_s=0.5):
        served.hold_gate(0.02)
        for priority in ("critical", "sheddable"):  # an answer through ASGI, then one from the headers
            with served.connect() as sock:
                sock.sendall(request(priority))
                read_answers(sock, 1)
                answered = time.monotonic()
                assert sock.recv(1) == b""  # blocks (up to the socket's 10 s) until the server closes it
                idle = time.monotonic() - answered
                # (the server counts from its loop time at the answer, a little before the client has it)
                assert 0.4 <= idle < 5.0, f"closed after {idle:.2f} s idle, timeout 0.5 s"


def test_a_refused_request_whose_body_comes_in_a_later_read_still_leaves_the_connection_to_time_out(
    repo: DemoRepo,
) -> None:
    """The 503 from the headers armed the timer; the body's read then marked the
    connection busy, and nothing re-armed it: the idle connection stayed open for ever."""
    for served in _serve(repo, keep_alive_s=0.5):
        served.hold_gate(0.0001)  # sheddable work is refused from its headers
        whole = request("sheddable")
        head, body = whole.split(b"\r\n\r\n", 1)
        with served.connect() as sock:
            sock.sendall(head + b"\r\n\r\n")
            ((status, _, _),) = read_answers(sock, 1)
            assert status == 503
            time.sleep(0.05)
            sock.sendall(body)
            began = time.monotonic()
            assert sock.recv(1) == b""  # blocks (up to the socket's 10 s) until the server closes it
            assert time.monotonic() - began < 5.0


def test_expect_100_continue_gets_its_interim_answer_at_once(repo: DemoRepo) -> None:
    """A client sending `Expect: 100-continue` waits for the 100 before its body: the
    one-write transport held the 100 back as a head waiting for its body (a stall)."""
    for served in _serve(repo):
        whole = request("critical")
        head, body = whole.split(b"\r\n\r\n", 1)
        with served.connect() as sock:
            sock.sendall(head + b"\r\nExpect: 100-continue\r\n\r\n")
            sock.settimeout(3.0)
            assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.settimeout(10.0)
            sock.sendall(body)
            ((status, _, answer),) = read_answers(sock, 1)
            assert status == 200, answer


def test_a_connection_in_use_outlives_many_keep_alive_timeouts(repo: DemoRepo) -> None:
    """The timer armed when the connection first fell idle fires while it is busy again:
    it must wait out a whole idle timeout from the last answer, not close it."""
    for served in _serve(repo, keep_alive_s=1.0):
        served.hold_gate(0.5)
        with served.connect() as sock:
            ends = time.monotonic() + 3.5
            answers = 0
            while time.monotonic() < ends:
                sock.sendall(request("critical" if answers % 2 else "sheddable"))
                read_answers(sock, 1)  # asserts the connection is open
                answers += 1
                time.sleep(0.15)
            assert answers >= 10


def _metrics(served: Served) -> str:
    return scrape(served.connect())


def scrape(sock: socket.socket) -> str:
    """GET /metrics on `sock` (closed after): the body."""
    with sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def test_an_answer_goes_out_in_one_write_and_nothing_is_held_back() -> None:
    from serving.models.protocol import _OneWrite

    class Transport:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def close(self) -> None:
            self.closed = True

        def is_closing(self) -> bool:
            return self.closed

    real = Transport()
    one = _OneWrite(real)
    one.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert real.writes == []  # the head waits for its body
    one.write(b"{}")
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    one.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 5\r\n\r\nError")  # whole: straight out
    assert real.writes[-1].endswith(b"Error")
    one.write(b"HTTP/1.1 204 No Content\r\n\r\n")  # a head with no body to come: closing sends it
    one.close()
    assert real.writes[-1] == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert real.closed
    assert one.is_closing()  # everything else is the transport's
