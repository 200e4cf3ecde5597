"""Whether the stream job can reach its Kafka broker, as one fact with a start time.

librdkafka retries a lost broker by itself and, by default, logs every failed attempt
(a couple of dozen lines a second). The job's Kafka clients log nothing themselves and
report errors here instead (`error_cb`); `tenx stream` prints one line when the broker
is lost (since when, that it retries) and one when it is back.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

# Errors that mean "cannot talk to the broker" (librdkafka's transport-level codes).
_CONNECTION_ERRORS = {"_TRANSPORT", "_ALL_BROKERS_DOWN", "_RESOLVE", "_TIMED_OUT", "_MSG_TIMED_OUT"}


@dataclass(frozen=True)
class Outage:
    since: float  # time.time() of the first failure
    error: str  # the latest error


class BrokerHealth:
    """The current outage, if any (thread-safe: Kafka clients call in from every worker)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outage: Outage | None = None

    def unreachable(self, error: str) -> None:
        with self._lock:
            since = self._outage.since if self._outage is not None else time.time()
            self._outage = Outage(since, error)

    def reachable(self) -> None:
        if self._outage is not None:
            with self._lock:
                self._outage = None

    @property
    def outage(self) -> Outage | None:
        return self._outage

    def on_error(self, error: Any) -> None:
        """librdkafka's `error_cb` (a KafkaError): connection failures become an outage."""
        if error.name() in _CONNECTION_ERRORS or error.fatal():
            self.unreachable(error.str())


BROKER = BrokerHealth()


def kafka_client_config(bootstrap: str, **extra: Any) -> dict[str, Any]:
    """Settings every Kafka client of the stream job starts from: a connection timeout,
    no librdkafka log lines, errors reported to `BROKER`."""
    return {
        "bootstrap.servers": bootstrap,
        "socket.connection.setup.timeout.ms": 5000,
        "log_level": 0,
        "error_cb": BROKER.on_error,
        **extra,
    }
