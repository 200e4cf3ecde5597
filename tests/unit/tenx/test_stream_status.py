"""What `tenx stream` prints while it runs: status lines, one line per broker outage."""

from __future__ import annotations

import io
import time

from rich.console import Console

from pipelines.stream.health import BROKER, BrokerHealth
from tenx.stream_status import Counts, StatusReporter, status_line, summary


class FakeKafkaError:
    """What librdkafka's error_cb receives (confluent_kafka.KafkaError's methods)."""

    def __init__(self, name: str, text: str) -> None:
        self._name, self._text = name, text

    def name(self) -> str:
        return self._name

    def str(self) -> str:
        return self._text

    def fatal(self) -> bool:
        return False


def test_status_line_and_summary_say_rate_lag_late_and_watermark_age() -> None:
    before = Counts(at=0.0, events=0, rows=0, late=0, dead=0, lag=0, watermark_us=None)
    after = Counts(
        at=2.0, events=100_000, rows=5_000, late=3, dead=1, lag=1_234, watermark_us=int((time.time() - 7200) * 1e6)
    )
    assert status_line(before, after) == (
        "50,000 events/s, 100,000 read, lag 1,234, 5,000 rows written, 3 late, 1 dead letters, watermark 2.0h behind"
    )
    waiting = Counts(at=2.0, events=0, rows=0, late=0, dead=0, lag=0, watermark_us=None)
    assert status_line(before, waiting).endswith("watermark: waiting for every partition")
    assert summary(before, after) == (
        "done: 100,000 events in 2.0 s (50,000/s), 5,000 rows written, 3 late, 1 dead letters"
    )


def test_connection_errors_are_one_outage_until_the_broker_answers() -> None:
    health = BrokerHealth()
    health.on_error(FakeKafkaError("_NOT_IMPLEMENTED", "unrelated"))
    assert health.outage is None
    health.on_error(FakeKafkaError("_TRANSPORT", "Connect to ipv4#127.0.0.1:9092 failed: Connection refused"))
    first = health.outage
    assert first is not None
    health.on_error(FakeKafkaError("_ALL_BROKERS_DOWN", "1/1 brokers are down"))
    assert health.outage is not None
    assert health.outage.since == first.since  # since the first failure
    assert health.outage.error == "1/1 brokers are down"
    health.reachable()
    assert health.outage is None


def test_a_lost_broker_is_one_line_and_its_return_another() -> None:
    out = io.StringIO()
    reporter = StatusReporter(Console(file=out, width=200), interval=3600, live=False, grace_s=0)
    BROKER.reachable()
    try:
        reporter._broker()
        BROKER.on_error(FakeKafkaError("_TRANSPORT", "Connect to ipv4#127.0.0.1:9092 failed: Connection refused"))
        for _ in range(24):  # librdkafka reports every retry
            BROKER.on_error(FakeKafkaError("_TRANSPORT", "Connect to ipv4#127.0.0.1:9092 failed: Connection refused"))
            reporter._broker()
        BROKER.reachable()
        reporter._broker()
        reporter._broker()
    finally:
        BROKER.reachable()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("Kafka unreachable since ")
    assert lines[0].endswith(
        "(Connect to ipv4#127.0.0.1:9092 failed: Connection refused); retrying, nothing is lost meanwhile"
    )
    assert lines[1].startswith("Kafka reachable again after ")
