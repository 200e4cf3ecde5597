"""Demo transactions: seeded, realistic, bounded in memory, and checked by the schema."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from featurestore.durations import MINUTE
from schemas import TRANSACTIONS, validate_batch, validate_record
from tenx.cli import main
from tenx.demo_data import DemoConfig, generate, write_demo_data

SMALL = DemoConfig(events=4_000, users=200, merchants=50, days=2, malformed=12, chunk_rows=1_500)


def _micros(value: datetime) -> int:
    return (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _times(table: pa.Table) -> np.ndarray:
    times: np.ndarray = pc.cast(table.column("event_time"), pa.int64()).to_numpy()
    return times


def _lateness(times: np.ndarray) -> np.ndarray:
    """Per event: the latest time seen before it in log order minus its own time (0 if none)."""
    seen = np.concatenate([times[:1], np.maximum.accumulate(times)[:-1]])
    late: np.ndarray = np.maximum(seen - times, 0)
    return late


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoConfig]:
    path = tmp_path_factory.mktemp("demo") / "tx.parquet"
    summary = write_demo_data(path, SMALL)
    assert (summary.events, summary.malformed) == (SMALL.events, SMALL.malformed)
    return path, SMALL


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoConfig]:
    path = tmp_path_factory.mktemp("demo") / "tx.jsonl"
    summary = write_demo_data(path, SMALL)
    assert (summary.events, summary.malformed) == (SMALL.events, SMALL.malformed)
    return path, SMALL


# -- generate ---------------------------------------------------------------------------------


def test_generate_yields_exactly_the_events_asked_for() -> None:
    reported: list[int] = []
    chunks = list(generate(SMALL, progress=reported.append))
    table = pa.concat_tables(chunks)
    assert table.num_rows == SMALL.events
    assert sum(reported) == SMALL.events
    assert table.schema == TRANSACTIONS.arrow_schema()
    assert pc.count_distinct(table.column("transaction_id")).as_py() == SMALL.events
    assert validate_batch(TRANSACTIONS, table).ok


def test_same_seed_same_data_other_seed_other_data() -> None:
    config = DemoConfig(events=2_000, users=100, days=1)
    first = pa.concat_tables(generate(config))
    again = pa.concat_tables(generate(config))
    other = pa.concat_tables(generate(DemoConfig(events=2_000, users=100, days=1, seed=7)))
    assert first.equals(again)
    assert not first.equals(other)
    assert not first.column("user_id").equals(other.column("user_id"))
    assert not np.array_equal(_times(first), _times(other))


def test_same_seed_writes_identical_files(tmp_path: Path) -> None:
    config = DemoConfig(events=2_000, users=100, days=1, malformed=5)
    for suffix in (".parquet", ".jsonl"):
        a, b, c = (tmp_path / f"{name}{suffix}" for name in "abc")
        write_demo_data(a, config)
        write_demo_data(b, config)
        write_demo_data(c, DemoConfig(events=2_000, users=100, days=1, malformed=5, seed=43))
        assert a.read_bytes() == b.read_bytes()
        assert a.read_bytes() != c.read_bytes()


def test_all_times_fall_in_the_requested_days() -> None:
    start = datetime(2026, 3, 10, tzinfo=UTC)
    times = _times(pa.concat_tables(generate(DemoConfig(events=5_000, days=3, start=start))))
    low, high = _micros(start), _micros(start + timedelta(days=3))
    assert times.min() >= low
    assert times.max() < high
    # the whole range is used, not just its first hours
    assert times.min() < low + 60 * MINUTE
    assert times.max() > high - 60 * MINUTE


def test_a_few_users_make_most_transactions() -> None:
    table = pa.concat_tables(generate(DemoConfig(events=20_000, users=1_000, chunk_rows=5_000)))
    users = table.column("user_id").to_numpy()
    assert users.min() >= 1
    assert users.max() <= 1_000
    per_user = np.sort(np.bincount(users, minlength=1_001)[1:])[::-1]
    assert per_user[:100].sum() / len(users) > 0.30  # top 10% of users
    assert (per_user > 0).sum() > 500  # ...yet most users appear


@pytest.mark.parametrize("share", [0.0, 0.01, 0.05, 0.2])
def test_out_of_order_share_and_lateness_are_bounded(share: float) -> None:
    config = DemoConfig(events=20_000, users=1_000, days=2, out_of_order=share, chunk_rows=5_000)
    lateness = _lateness(_times(pa.concat_tables(generate(config))))
    late_share = (lateness > 0).mean()
    assert share * 0.7 <= late_share <= share * 1.1 + 0.001
    assert lateness.max() < 2 * MINUTE
    if share >= 0.05:
        assert lateness.max() > MINUTE  # delays really spread up to the bound


def test_generate_is_lazy_and_chunks_stay_near_chunk_rows() -> None:
    huge = DemoConfig(events=5_000_000, users=10_000, days=7, chunk_rows=1_000)
    first = list(itertools.islice(generate(huge), 5))  # would take ages if all were made
    busiest_minute = 2 * huge.events / (huge.days * 24 * 60)  # the daily curve peaks below 2x the mean
    assert all(huge.chunk_rows <= chunk.num_rows <= huge.chunk_rows + busiest_minute for chunk in first)

    config = DemoConfig(events=20_000, users=1_000, days=2, chunk_rows=1_000)
    sizes = [chunk.num_rows for chunk in generate(config)]
    assert sum(sizes) == config.events
    assert len(sizes) >= config.events // (2 * config.chunk_rows)
    assert all(size < 2 * config.chunk_rows for size in sizes)
    assert all(size >= config.chunk_rows for size in sizes[:-1])


# -- files ------------------------------------------------------------------------------------


def test_parquet_validates_with_exactly_the_malformed_rows_rejected(parquet_file: tuple[Path, DemoConfig]) -> None:
    path, config = parquet_file
    table = pq.read_table(path)
    assert table.num_rows == config.events + config.malformed
    result = validate_batch(TRANSACTIONS, table)
    assert result.valid.num_rows == config.events
    assert result.rejected.num_rows == config.malformed
    assert result.valid.schema == TRANSACTIONS.arrow_schema()
    assert all(tx.startswith("tx-") for tx in result.valid.column("transaction_id").to_pylist())
    assert all(tx.startswith("bad-") for tx in result.rejected.column("transaction_id").to_pylist())
    reasons = result.rejected.column("reason").to_pylist()
    assert reasons[0] == "field `user_id`: expected int64 (not null), got null"
    assert reasons[1].startswith("field `event_time`: expected a time in [2000-01-01T00:00:00+00:00, ")
    assert reasons[2:4] == [
        "field `amount`: expected finite float64 within ±1e+140, got nan",
        "field `currency`: expected string (not null), got null",
    ]
    assert sorted(reason.split("`")[1] for reason in reasons) == sorted(
        ["user_id", "event_time", "amount", "currency"] * 3
    )


def test_parquet_summary_matches_the_file(tmp_path: Path) -> None:
    start = datetime(2026, 2, 1, tzinfo=UTC)
    path = tmp_path / "nested" / "tx.parquet"
    summary = write_demo_data(path, DemoConfig(events=3_000, users=100, days=1, start=start, malformed=2))
    assert summary.path == path
    assert (summary.events, summary.malformed) == (3_000, 2)
    assert summary.bytes_written == path.stat().st_size
    good = validate_batch(TRANSACTIONS, pq.read_table(path)).valid
    times = _times(good)
    assert _micros(summary.first_time) == times.min()
    assert _micros(summary.last_time) == times.max()
    assert start <= summary.first_time <= summary.last_time < start + timedelta(days=1)


def test_jsonl_lines_validate_except_exactly_the_malformed(jsonl_file: tuple[Path, DemoConfig]) -> None:
    path, config = jsonl_file
    lines = path.read_bytes().splitlines()
    assert len(lines) == config.events + config.malformed
    valid: list[dict[str, object]] = []
    failures: list[str] = []
    for line in lines:
        try:
            decoded = orjson.loads(line)
        except orjson.JSONDecodeError:
            failures.append("bad json")
            continue
        out, problems = validate_record(TRANSACTIONS, decoded)
        if problems:
            assert out is None
            failures.append(str(problems[0]).split("`")[1])
            assert decoded["transaction_id"].startswith("bad-")
        else:
            assert out is not None
            valid.append(out)
    assert len(valid) == config.events
    assert len(failures) == config.malformed
    # every kind of malformed record appears: JSON lines can hold all six
    assert set(failures) == {"bad json", "user_id", "event_time", "amount", "currency"}
    assert failures.count("amount") == 4  # NaN amounts and "12,50" strings
    # the good lines carry the same events as the Parquet output of the same config
    table = pa.concat_tables(generate(config))
    assert [v["transaction_id"] for v in valid] == table.column("transaction_id").to_pylist()
    assert [v["event_time"] for v in valid] == _times(table).tolist()
    assert [v["amount"] for v in valid] == table.column("amount").to_pylist()


# -- the command ------------------------------------------------------------------------------


def test_cli_writes_demo_data(tmp_path: Path) -> None:
    out = tmp_path / "x.parquet"
    result = CliRunner().invoke(main, ["demo-data", str(out), "--events", "5000", "--users", "100", "--malformed", "3"])
    assert result.exit_code == 0, result.output
    assert out.exists()
    table = pq.read_table(out)
    assert table.num_rows == 5_003
    assert validate_batch(TRANSACTIONS, table).rejected.num_rows == 3
    assert "5,000 events + 3 malformed" in " ".join(result.stdout.split())
    # Without --start the data ends at today's midnight (UTC): served values are fresh.
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    times = pc.cast(table.column("event_time").drop_null(), pa.int64())
    assert pc.max(times).as_py() < today.timestamp() * 1e6
    assert pc.max(times).as_py() > (today - timedelta(hours=6)).timestamp() * 1e6


def test_cli_checks_kafka_before_writing_anything(tmp_path: Path) -> None:
    out = tmp_path / "x.parquet"
    result = CliRunner(env={"TENX_KAFKA_BOOTSTRAP": ""}).invoke(main, ["demo-data", str(out), "--to-kafka", "t"])
    assert result.exit_code == 2
    assert "--to-kafka needs TENX_KAFKA_BOOTSTRAP" in " ".join(result.stderr.split())
    assert not out.exists()


def test_cli_rejects_an_unknown_suffix_without_a_traceback(tmp_path: Path) -> None:
    out = tmp_path / "x.csv"
    result = CliRunner().invoke(main, ["demo-data", str(out), "--events", "10"])
    assert result.exit_code == 2
    assert f"output {out} must end in .parquet or .jsonl" in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    assert not out.exists()
