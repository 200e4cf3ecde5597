"""The running `docker compose` stack does what a user relies on. Skipped unless a
stack is up and TENX_COMPOSE_DIR names the folder of its docker-compose.yml, e.g.

    KEEP=1 ../shared/compose-check/run.sh
    TENX_COMPOSE_DIR=/tmp/compose-run/tenx .venv/bin/python -m pytest tests/compose -m compose

Everything goes through published ports (127.0.0.1) and `docker compose exec`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

COMPOSE_DIR = os.environ.get("TENX_COMPOSE_DIR")
pytestmark = [
    pytest.mark.compose,
    pytest.mark.skipif(not COMPOSE_DIR, reason="no compose stack: set TENX_COMPOSE_DIR (see the module docstring)"),
]
API = "http://127.0.0.1:8080"
METRICS = "http://127.0.0.1:9100/metrics"


def compose(*args: str, timeout: float = 120, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "compose", *args],
        cwd=Path(str(COMPOSE_DIR)),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )


def metrics() -> dict[str, float]:
    """Sum of each tenx_stream_* sample over its labels."""
    with urllib.request.urlopen(METRICS, timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        found = re.match(r"^(tenx_stream_[a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if found:
            totals[found.group(1)] = totals.get(found.group(1), 0.0) + float(found.group(2))
    return totals


def topic_offsets() -> dict[str, int]:
    done = compose(
        "exec",
        "-T",
        "kafka",
        "/opt/kafka/bin/kafka-get-offsets.sh",
        "--bootstrap-server",
        "localhost:9092",
        "--topic",
        "transactions",
    )
    assert done.returncode == 0, done.stderr
    found = re.findall(r"^(transactions:\d+):(\d+)$", done.stdout, flags=re.MULTILINE)  # among Kafka's log lines
    assert found, done.stdout
    return {partition: int(offset) for partition, offset in found}


def token() -> str:
    done = compose("exec", "-T", "feature-api", "cat", "/data/api-token")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def features(user: int) -> dict[str, Any]:
    """The feature API's answer for one user: status, as_of and values by name."""
    request = urllib.request.Request(
        f"{API}/features",
        data=json.dumps({"view": "user_spend", "entities": [user]}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token()}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        body = json.loads(response.read())
    row = body["results"][0]
    return {**row, "values": dict(zip(body["features"], row["values"] or [], strict=False))}


@pytest.fixture(scope="module")
def caught_up() -> dict[str, float]:
    """Wait (up to 10 minutes) until the stream job has read the whole topic."""
    expected = sum(topic_offsets().values())
    deadline = time.monotonic() + 600
    while True:
        seen = metrics()
        if seen.get("tenx_stream_events_in_total", 0) >= expected and seen.get("tenx_stream_consumer_lag", 1) == 0:
            return seen
        assert time.monotonic() < deadline, f"the stream job did not catch up: {seen}, topic {expected}"
        time.sleep(2)


def services() -> dict[str, tuple[str, str, int]]:
    """Service -> (state, health, exit code), from `docker compose ps`."""
    done = compose("ps", "--all", "--format", "json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return {row["Service"]: (row["State"], row.get("Health", ""), row.get("ExitCode", 0)) for row in rows}


def test_the_feature_api_refuses_a_request_without_its_token() -> None:
    request = urllib.request.Request(f"{API}/features", data=b'{"view": "user_spend", "entities": [1]}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 401
    refused.value.close()


def test_every_long_running_service_is_up_and_healthy() -> None:
    deadline = time.monotonic() + 120  # healthchecks run every 5-10 s
    state = services()
    while any(health == "starting" for _, health, _ in state.values()):
        assert time.monotonic() < deadline, state
        time.sleep(2)
        state = services()
    for service in ("kafka", "redis", "dask-scheduler", "stream", "feature-api", "model-server"):
        assert state[service][:2] == ("running", "healthy"), (service, state[service])
    assert state["dask-worker"][0] == "running"
    assert state["setup"][0] == "exited"
    assert state["setup"][2] == 0


def test_the_model_server_predicts_from_redis_with_the_token() -> None:
    request = urllib.request.Request(
        "http://127.0.0.1:8081/predict",
        data=b'{"model": "buys", "entities": [1, 2]}',
        method="POST",
        headers={"Authorization": f"Bearer {token()}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["served_by"] == "buys@1"
    assert len(answer["scores"]) == 2
    assert answer["status"] == ["found", "found"]


def test_the_model_server_answers_behind_tenx_front() -> None:
    # The predictions above went through the front (it holds the published port); here,
    # that it is the front: the container runs tenx-front, started by `serve-models --front`.
    script = (
        "import os\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try: print(open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ').decode())\n"
        "    except OSError: pass\n"
    )
    done = compose("exec", "-T", "model-server", "python", "-c", script)
    assert done.returncode == 0, done.stderr
    fronts = [line for line in done.stdout.splitlines() if line.startswith("/usr/local/bin/tenx-front ")]
    assert len(fronts) == 1, done.stdout
    assert "--listen 0.0.0.0:8081 " in fronts[0], fronts[0]


def test_the_stream_job_caught_up_without_a_late_event_or_a_restart(caught_up: dict[str, float]) -> None:
    assert caught_up["tenx_stream_late_total"] == 0  # the series exists from the start, at 0
    assert caught_up["tenx_stream_dead_letters_total"] == 0
    container = compose("ps", "-q", "stream").stdout.strip()
    inspected = json.loads(subprocess.run(["docker", "inspect", container], capture_output=True, text=True).stdout)
    assert inspected[0]["RestartCount"] == 0
    assert inspected[0]["State"]["Running"]


def test_online_values_equal_the_batch_engine(caught_up: dict[str, float]) -> None:
    done = compose("exec", "-T", "feature-api", "tenx", "verify", "--sample", "5000", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for view in ("user_spend", "merchant_sales"):
        assert re.search(rf"{view}: ok \d+ checked, 0 mismatching values, 0 not online", done.stdout), done.stdout


def test_three_new_events_reach_the_feature_api_within_5_seconds(caught_up: dict[str, float]) -> None:
    user = 1
    before = features(user)
    script = """
import datetime, orjson, uuid
from confluent_kafka import Producer
producer = Producer({"bootstrap.servers": "kafka:9092"})
now = datetime.datetime.now(datetime.UTC)
for i in range(3):
    record = {"transaction_id": str(uuid.uuid4()), "user_id": 1, "merchant_id": 7, "amount": 42.5,
              "currency": "EUR", "category": "grocery", "country": "FR",
              "event_time": (now - datetime.timedelta(seconds=3 - i)).isoformat()}
    producer.produce("transactions", orjson.dumps(record), key=b"1")
assert producer.flush(10) == 0
"""
    done = compose("exec", "-T", "stream", "python", "-", stdin=script)
    assert done.returncode == 0, done.stderr
    sent = time.monotonic()
    while True:
        after = features(user)
        if after["as_of"] != before["as_of"]:
            break
        assert time.monotonic() - sent < 5, f"user {user} unchanged 5 s after three new events: {after}"
        time.sleep(0.1)
    assert after["status"] == "found"
    count = after["values"]["count_1h"]
    assert count >= 3


def test_a_second_up_sends_nothing_twice(caught_up: dict[str, float]) -> None:
    offsets = topic_offsets()
    done = compose("up", "-d", timeout=600)
    assert done.returncode == 0, done.stderr
    done = compose("logs", "--no-color", "setup")
    assert "setup: already done on this data volume" in done.stdout
    assert topic_offsets() == offsets


def test_down_and_up_keep_topics_online_values_and_the_stream_place(caught_up: dict[str, float]) -> None:
    # Kafka's log, Redis' values and the stream job's snapshots live on volumes: after
    # `down` (without -v) and `up`, nothing is sent twice and nothing served is lost.
    offsets = topic_offsets()
    before = features(1)
    assert compose("down", timeout=300).returncode == 0
    done = compose("up", "-d", "--wait", timeout=600)
    assert done.returncode == 0, done.stderr
    assert topic_offsets() == offsets
    after = features(1)
    assert after["status"] == "found"
    assert after["as_of"] == before["as_of"]
