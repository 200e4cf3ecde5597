"""A Kafka producer that waits on back-pressure instead of crashing, and fails clearly.

confluent_kafka's `produce` raises `BufferError` as soon as librdkafka's local queue is
full (100,000 messages by default): a burst of dead letters, or a demo file sent at
once, crashed the caller. `Delivery.send` serves delivery callbacks and retries until
the queue has room, within a bound; `Delivery.flush` waits for every message and raises
a `TransientError` that names the broker and what to check when messages were not
delivered (a broker that stays unreachable, a topic refused).
"""

from __future__ import annotations

import time
from typing import Any

from featurestore.errors import TransientError
from pipelines.stream.health import kafka_client_config


class Delivery:
    """Send messages to Kafka; `flush` before relying on them.

    >>> producer = Delivery("127.0.0.1:9092")     # doctest: +SKIP
    >>> producer.send("transactions", b"{}")      # doctest: +SKIP
    >>> producer.flush()                          # doctest: +SKIP
    """

    def __init__(self, bootstrap: str, *, timeout_s: float = 30.0, **config: Any) -> None:
        from confluent_kafka import Producer

        self.bootstrap = bootstrap
        self.timeout_s = timeout_s
        self.producer = Producer(kafka_client_config(bootstrap, **config))
        self.failed = 0
        self.first_failure = ""

    def _delivered(self, error: Any, message: Any) -> None:
        if error is not None:
            self.failed += 1
            if not self.first_failure:
                self.first_failure = f"{message.topic()}: {error.str()}"

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Queue one message; when the local queue is full, wait for deliveries to make
        room (at most `timeout_s`, then a TransientError)."""
        deadline: float | None = None
        while True:
            try:
                self.producer.produce(topic, value, key=key, on_delivery=self._delivered)
                return
            except BufferError:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.timeout_s
                elif now > deadline:
                    raise TransientError(
                        f"Kafka at {self.bootstrap} took no message for {self.timeout_s:.0f} s "
                        f"({len(self.producer)} waiting to be sent): is the broker up and reachable?"
                    ) from None
                self.producer.poll(0.1)

    def poll(self) -> None:
        """Serve delivery callbacks without waiting (call now and then while sending)."""
        self.producer.poll(0)

    def flush(self) -> None:
        """Wait until every queued message is delivered; raise a TransientError if some
        could not be (within `timeout_s`) or the broker refused any."""
        left = self.producer.flush(self.timeout_s)
        if left:
            raise TransientError(
                f"{left:,} message(s) not delivered to Kafka at {self.bootstrap} within {self.timeout_s:.0f} s: "
                "is the broker up and reachable?"
            )
        if self.failed:
            failed, first = self.failed, self.first_failure
            self.failed, self.first_failure = 0, ""
            raise TransientError(f"Kafka at {self.bootstrap} refused {failed:,} message(s), first: {first}")
