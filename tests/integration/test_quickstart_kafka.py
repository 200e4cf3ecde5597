"""`tenx quickstart` with Kafka configured goes through Kafka, as it says: the recent
events are published to a topic of the run and read by the Kafka stream job; the topic
is gone afterwards (the session check fails a run that leaves topics behind)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.processes import clean_environment

TENX = str(Path(sys.executable).parent / "tenx")


def test_quickstart_streams_through_kafka_when_it_is_configured(tmp_path: Path, kafka_bootstrap: str) -> None:
    env = clean_environment(TENX_KAFKA_BOOTSTRAP=kafka_bootstrap, COLUMNS="250")
    done = subprocess.run(
        [TENX, "quickstart", "qs", "--events", "20000", "--users", "300", "--days", "9"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "published to Kafka topic tenx-quickstart-" in done.stdout
    assert f"at {kafka_bootstrap} (3 partitions) and read by the Kafka job" in done.stdout
    assert ", 0 late" in done.stdout  # three partitions, read at different paces
    assert "0 mismatches" in done.stdout
