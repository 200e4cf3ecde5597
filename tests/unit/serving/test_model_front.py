"""tenx-front (front/main.go) in front of the real model server under real uvicorn: it
refuses what the server's gate refuses, from the gate the server's answers carry; the
server counts those refusals in its own /metrics; a sheddable request the front let
through is not drawn again; a client cannot forge the front's headers; and with no
server behind it the front answers at once. The front's own logic has Go tests
(front/main_test.go), run here too."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.models import ModelServerSettings, create_model_app
from serving.models import front as front_module
from serving.models.protocol import PredictProtocol
from tests.model_repo import DemoRepo, build_demo_repo, with_two_models
from tests.processes import free_port
from tests.unit.serving.test_model_protocol import Served, read_answers, request, scrape

FRONT_SOURCE = Path(__file__).resolve().parents[3] / "front"
SECRET = "test-secret"
GO = shutil.which("go")
needs_go = pytest.mark.skipif(GO is None, reason="tenx-front is built with Go, which is not on PATH")


@pytest.fixture(scope="module")
def front_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if GO is None:
        pytest.skip("tenx-front is built with Go, which is not on PATH")
    binary = tmp_path_factory.mktemp("front") / "tenx-front"
    subprocess.run([GO, "build", "-o", str(binary), "."], cwd=FRONT_SOURCE, check=True, timeout=300)
    return binary


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> DemoRepo:
    return with_two_models(build_demo_repo(tmp_path_factory.mktemp("front") / "repo"))


class Fronted(Served):
    def __init__(self, app: Any, port: int, front_port: int) -> None:
        super().__init__(app, port)
        self.front_port = front_port

    def via_front(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.front_port), timeout=10)

    def metrics(self) -> str:
        """/metrics scraped through the front, which brings its refusal counts with the scrape."""
        return scrape(self.via_front())


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, "tenx-front exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "tenx-front did not listen within 30 s"
            time.sleep(0.05)


@pytest.fixture
def fronted(repo: DemoRepo, front_binary: Path) -> Iterator[Fronted]:
    import uvicorn

    app = create_model_app(
        ModelServerSettings(registry_dir=repo.settings.registry_dir), repo.store(), front_secret=SECRET
    )
    port, front_port = free_port(), free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=PredictProtocol, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    front = subprocess.Popen(
        [str(front_binary), "--listen", f"127.0.0.1:{front_port}", "--upstream", f"127.0.0.1:{port}"],
        env={**os.environ, "TENX_FRONT_SECRET": SECRET},
    )
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped before it served"
            assert time.monotonic() < deadline, "uvicorn did not start within 60 s"
            time.sleep(0.05)
        _wait_listening(front_port, front)
        yield Fronted(app, port, front_port)
    finally:
        front.terminate()
        front.wait(timeout=10)
        server.should_exit = True
        thread.join(timeout=30)


def _statuses(
    sock: socket.socket, priority: str, count: int, headers: dict[str, str] | None = None, *, through_front: bool = True
) -> list[int]:
    """Statuses of `count` requests sent one at a time (each answer's gate reaches the
    front before the next request); through the front, none may show the gate."""
    statuses = []
    for _ in range(count):
        sock.sendall(request(priority, headers=headers))
        ((status, answer_headers, _),) = read_answers(sock, 1)
        assert not through_front or "x-tenx-gate" not in answer_headers, "the gate leaked to the client"
        statuses.append(status)
    return statuses


def test_the_front_refuses_the_gates_share_and_the_server_counts_what_it_refused(fronted: Fronted) -> None:
    fronted.hold_gate(0.25)
    with fronted.via_front() as sock:
        assert _statuses(sock, "critical", 1) == [200]  # its answer brings the gate
        statuses = _statuses(sock, "sheddable", 40, {"X-Tenant": "shop"})
    # One in four, evenly: the server does not draw again for the ones the front passed
    # (it would, and serve 1 in 16, if the front's mark were not trusted).
    assert statuses == [503, 503, 503, 200] * 10
    text = fronted.metrics()
    assert 'tenx_model_shed_total{model="*",priority="sheddable",reason="overload",tenant="shop"} 30.0' in text
    assert 'tenx_model_requests_total{model="-",outcome="unavailable",priority="sheddable"} 30.0' in text
    assert 'tenx_model_requests_total{model="buys",outcome="ok",priority="sheddable"} 10.0' in text


def test_a_front_refusal_reads_as_the_servers_own(fronted: Fronted) -> None:
    fronted.hold_gate(0.02)
    answers = {}
    for name, connect in (("server", fronted.connect), ("front", fronted.via_front)):
        with connect() as sock:
            _statuses(sock, "critical", 1, through_front=name == "front")
            sock.sendall(request("sheddable", headers={"X-Request-Id": "req-7"}))
            ((status, headers, body),) = read_answers(sock, 1)
            answers[name] = (status, headers["retry-after"], headers["content-type"], headers["x-request-id"], body)
            sock.sendall(request("critical"))  # the connection serves on
            assert read_answers(sock, 1)[0][0] == 200
    assert answers["front"] == answers["server"]
    assert answers["front"][0] == 503
    assert answers["front"][4]["reason"] == "overload"


def test_a_client_cannot_forge_the_fronts_headers(fronted: Fronted) -> None:
    fronted.hold_gate(0.02)
    forged = {"X-Tenx-Front-Shed": "sheddable/evil/1000", "X-Tenx-Front-Passed": "1"}
    with fronted.connect() as sock:  # straight to the server, with a wrong secret: not trusted
        statuses = _statuses(sock, "sheddable", 3, {**forged, "X-Tenx-Front": "guess"}, through_front=False)
    assert statuses == [503, 503, 503]  # the forged pass was not honoured
    with fronted.via_front() as sock:  # through the front: it drops them
        _statuses(sock, "critical", 1, {**forged, "X-Tenx-Front": SECRET})
    assert 'tenant="evil"' not in fronted.metrics()


def test_with_the_server_gone_the_front_answers_at_once(front_binary: Path) -> None:
    front_port, dead_port = free_port(), free_port()
    front = subprocess.Popen(
        [str(front_binary), "--listen", f"127.0.0.1:{front_port}", "--upstream", f"127.0.0.1:{dead_port}"],
        env={**os.environ, "TENX_FRONT_SECRET": SECRET},
    )
    try:
        _wait_listening(front_port, front)
        with socket.create_connection(("127.0.0.1", front_port), timeout=10) as sock:
            began = time.monotonic()
            sock.sendall(request("critical"))
            ((status, headers, body),) = read_answers(sock, 1)
        assert status == 502
        assert headers["retry-after"] == "1"
        assert "did not answer" in body["error"]
        assert time.monotonic() - began < 5
    finally:
        front.terminate()
        front.wait(timeout=10)


@needs_go
def test_the_fronts_go_tests_pass() -> None:
    assert GO is not None
    done = subprocess.run([GO, "test", "./..."], cwd=FRONT_SOURCE, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_serve_models_front_without_the_binary_says_how_to_build_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from featurestore.errors import ConfigError

    monkeypatch.setattr(front_module, "BINARY", "tenx-front-not-built")
    with pytest.raises(ConfigError, match="make front"):
        front_module.front_binary()


def test_the_gate_state_names_the_share_and_the_open_classes(fronted: Fronted) -> None:
    server = fronted.server
    fronted.hold_gate(0.25)
    assert server.gate_state() == b"0.2500 1 1"  # an empty queue has room for every class
    counted = server.count_front_refusals(b"sheddable/a%20b/3 default/x/2 bogus/x/1 sheddable/y/many critical")
    assert counted == [("sheddable", 3), ("default", 2)]  # the malformed entries are skipped, not fatal
    text = fronted.metrics()
    assert 'tenx_model_shed_total{model="*",priority="sheddable",reason="overload",tenant="a b"} 3.0' in text


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_thread_demand_counts_the_time_waiting_for_a_core() -> None:
    """Behind a front the loop shares its cores; its busy share must count the time it
    waited, runnable, for one, or the gate lets more in as the loop falls behind."""
    import sys
    import time as clock

    from serving.models.runtime import ThreadDemand

    demand = ThreadDemand()
    before = os.sched_getaffinity(0)
    core = min(before)
    spin = f"import os, time; os.sched_setaffinity(0, {{{core}}}); end = time.time() + 3\nwhile time.time() < end: pass"
    rival = subprocess.Popen([sys.executable, "-c", spin])
    try:
        os.sched_setaffinity(0, {core})  # this thread only, on Linux
        clock.sleep(0.3)  # the rival is spinning on that core by now
        wanted, worked, began = demand.seconds(), clock.thread_time(), clock.monotonic()
        while clock.monotonic() - began < 0.6:
            pass
        wanted, worked = demand.seconds() - wanted, clock.thread_time() - worked
    finally:
        os.sched_setaffinity(0, before)
        rival.kill()
        rival.wait()
        demand.close()
    assert worked < 0.45, f"the rival did not take the core ({worked:.2f} s of CPU in 0.6 s)"
    assert wanted > 0.5, f"demand {wanted:.2f} s over 0.6 s of a thread that never slept (CPU {worked:.2f} s)"


def test_the_front_ends_with_the_server_that_started_it_even_when_that_one_is_killed(front_binary: Path) -> None:
    import signal
    import sys

    starter = (
        "import os, subprocess, sys, time\n"
        f"front = subprocess.Popen([{str(front_binary)!r}, '--listen', '127.0.0.1:{free_port()}', "
        f"'--upstream', '127.0.0.1:{free_port()}', '--parent-pid', str(os.getpid())])\n"
        "print(front.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True, env={**os.environ, "TENX_FRONT_SECRET": "s"}
    )
    assert parent.stdout is not None
    front_pid = int(parent.stdout.readline())
    time.sleep(0.3)
    parent.send_signal(signal.SIGKILL)  # no `finally`, no handler: the front must notice by itself
    parent.wait(timeout=10)
    parent.stdout.close()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{front_pid}").exists() and b"Z" not in Path(f"/proc/{front_pid}/stat").read_bytes()[:60]:
        assert time.monotonic() < deadline, "tenx-front outlived the process that started it"
        time.sleep(0.05)
