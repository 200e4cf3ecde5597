"""Seeded, realistic demo card transactions, generated in bounded-memory chunks.

Realism that matters to a feature store: a few users make most transactions (Zipf-like
popularity), traffic follows the time of day, a small share of events arrives out of
order (within the default allowed lateness), and malformed records can be mixed in to
exercise validation and dead-letter paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurestore.durations import MINUTE
from schemas.timestamps import from_micros, to_micros
from schemas.transactions import TRANSACTIONS

COUNTRIES = np.array(["FR", "DE", "ES", "US", "GB", "JP"])
COUNTRY_WEIGHTS = np.array([0.55, 0.12, 0.08, 0.12, 0.09, 0.04])
CURRENCY_OF = {"FR": "EUR", "DE": "EUR", "ES": "EUR", "US": "USD", "GB": "GBP", "JP": "JPY"}
CATEGORIES = np.array(["grocery", "restaurants", "travel", "electronics", "fuel", "online", "health", "leisure"])
CATEGORY_WEIGHTS = np.array([0.30, 0.18, 0.05, 0.05, 0.12, 0.20, 0.05, 0.05])
DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class DemoConfig:
    events: int = 100_000
    users: int = 1_000
    merchants: int = 200
    days: int = 7
    start: datetime = DEFAULT_START
    seed: int = 42
    out_of_order: float = 0.01  # share of events delayed in the log (not in time)
    max_delay_us: int = 2 * MINUTE  # under the demo source's 5m allowed lateness
    malformed: int = 0  # malformed records mixed in (reported separately)
    chunk_rows: int = 500_000


@dataclass(frozen=True)
class DemoSummary:
    path: Path
    events: int
    malformed: int
    first_time: datetime
    last_time: datetime
    bytes_written: int


def _popularity(count: int, exponent: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Ids 1..count with Zipf-like weights, the ranks shuffled so popular ids scatter."""
    ranks = np.arange(1, count + 1, dtype=np.float64)
    weights = ranks**-exponent
    ids = rng.permutation(count).astype(np.int64) + 1
    return ids, np.cumsum(weights / weights.sum())


def _minute_counts(config: DemoConfig, rng: np.random.Generator) -> np.ndarray:
    """Events per minute over the whole range: a diurnal curve (quiet at 4am, busy at
    6pm), drawn as one multinomial so the total is exact."""
    minutes = config.days * 24 * 60
    hour = (np.arange(minutes) % (24 * 60)) / 60.0
    rate = 1.0 + 0.85 * np.sin((hour - 11.0) / 24.0 * 2 * np.pi)
    return rng.multinomial(config.events, rate / rate.sum())


def generate(config: DemoConfig, *, progress: Callable[[int], None] | None = None) -> Iterator[pa.Table]:
    """Yield valid transactions as Arrow tables of about `chunk_rows` rows, in log order
    (mostly time order, with `out_of_order` of them late in the log)."""
    rng = np.random.default_rng(config.seed)
    user_ids, user_cdf = _popularity(config.users, 0.9, rng)
    merchant_ids, merchant_cdf = _popularity(config.merchants, 1.1, rng)
    per_minute = _minute_counts(config, rng)
    start_us = to_micros(config.start)
    emitted = 0
    minute = 0
    while minute < len(per_minute):
        total = 0
        first = minute
        while minute < len(per_minute) and total < config.chunk_rows:
            total += int(per_minute[minute])
            minute += 1
        counts = per_minute[first:minute]
        base = start_us + np.repeat(np.arange(first, minute, dtype=np.int64), counts) * MINUTE
        times = np.sort(base + rng.integers(0, MINUTE, size=total, dtype=np.int64))
        # Out of order: a few events keep their time but reach the log up to
        # max_delay_us later, as a phone that was briefly offline would send them.
        delayed = rng.random(total) < config.out_of_order
        delay = rng.integers(1, config.max_delay_us, size=total, dtype=np.int64)
        times = times[np.argsort(times + np.where(delayed, delay, 0), kind="stable")]
        table = _chunk(times, emitted, config, rng, user_ids, user_cdf, merchant_ids, merchant_cdf)
        emitted += table.num_rows
        if progress is not None:
            progress(table.num_rows)
        yield table


def _chunk(
    times: np.ndarray,
    offset: int,
    config: DemoConfig,
    rng: np.random.Generator,
    user_ids: np.ndarray,
    user_cdf: np.ndarray,
    merchant_ids: np.ndarray,
    merchant_cdf: np.ndarray,
) -> pa.Table:
    n = len(times)
    users = user_ids[np.minimum(np.searchsorted(user_cdf, rng.random(n)), len(user_ids) - 1)]
    merchants = merchant_ids[np.minimum(np.searchsorted(merchant_cdf, rng.random(n)), len(merchant_ids) - 1)]
    countries = COUNTRIES[np.searchsorted(np.cumsum(COUNTRY_WEIGHTS), rng.random(n) * COUNTRY_WEIGHTS.sum())]
    currencies = np.vectorize(CURRENCY_OF.__getitem__, otypes=[object])(countries) if n else np.array([], dtype=object)
    categories = CATEGORIES[np.searchsorted(np.cumsum(CATEGORY_WEIGHTS), rng.random(n) * CATEGORY_WEIGHTS.sum())]
    amounts = np.round(rng.lognormal(mean=3.2, sigma=1.0, size=n), 2)
    refunds = rng.random(n) < 0.02
    amounts[refunds] *= -1
    ids = pc.binary_join_element_wise(
        "tx-", pc.utf8_lpad(pc.cast(pa.array(np.arange(offset, offset + n)), pa.string()), 10, "0"), ""
    )
    return pa.table(
        {
            "transaction_id": ids,
            "user_id": pa.array(users, pa.int64()),
            "merchant_id": pa.array(merchants, pa.int64()),
            "amount": pa.array(amounts, pa.float64()),
            "currency": pa.array(currencies, pa.string()),
            "category": pa.array(categories, pa.string()),
            "country": pa.array(countries, pa.string()),
            "event_time": pa.array(times, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        },
        schema=TRANSACTIONS.arrow_schema(),
    )


# -- malformed records --------------------------------------------------------------------

_MALFORMED_KINDS = ("null_user", "absurd_time", "nan_amount", "missing_currency", "wrong_type", "bad_json")


def _malformed_record(kind: str, index: int, good: dict[str, Any]) -> dict[str, Any] | bytes:
    record = dict(good)
    record["transaction_id"] = f"bad-{index:06d}"
    if kind == "null_user":
        record["user_id"] = None
    elif kind == "absurd_time":
        record["event_time"] = 1_700_000_000  # seconds, not microseconds
    elif kind == "nan_amount":
        record["amount"] = float("nan")
    elif kind == "missing_currency":
        record.pop("currency")
    elif kind == "wrong_type":
        record["amount"] = "12,50"
    elif kind == "bad_json":
        return b'{"transaction_id": "bad-' + str(index).encode() + b'", "user_id": 1, "amount": '
    return record


def _as_json_record(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["event_time"] = out["event_time"].isoformat().replace("+00:00", "Z")
    return out


def write_demo_data(path: Path, config: DemoConfig, *, progress: Callable[[int], None] | None = None) -> DemoSummary:
    """Write demo transactions to `path`: Parquet (`.parquet`) or JSON lines (`.jsonl`).

    Malformed records go into the same file, spread evenly: in Parquet those that the
    column types can hold (null keys, absurd times, NaN amounts, missing currency), in
    JSON lines every kind, wrong types and broken JSON included.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    jsonl = path.suffix in (".jsonl", ".json", ".ndjson")
    malformed_every = max(1, config.events // config.malformed) if config.malformed else 0
    written_bad = 0
    first: int | None = None
    last: int | None = None
    count = 0
    relaxed = pa.schema([pa.field(f.name, f.type, nullable=True) for f in TRANSACTIONS.arrow_schema()])
    writer: pq.ParquetWriter | None = None
    handle = path.open("wb") if jsonl else None
    try:
        if not jsonl:
            writer = pq.ParquetWriter(path, relaxed, compression="zstd")
        for table in generate(config, progress=progress):
            micros = pc.cast(table.column("event_time"), pa.int64())
            low, high = pc.min(micros).as_py(), pc.max(micros).as_py()
            if low is not None:
                first = low if first is None else min(first, low)
                last = high if last is None else max(last, high)
            count += table.num_rows
            bad_rows: list[dict[str, Any] | bytes] = []
            if malformed_every:
                positions = [i for i in range(table.num_rows) if (count - table.num_rows + i) % malformed_every == 0][
                    : config.malformed - written_bad
                ]
                for i in positions:
                    kind = _MALFORMED_KINDS[written_bad % (len(_MALFORMED_KINDS) if jsonl else 4)]
                    good = _as_json_record(table.slice(i, 1).to_pylist()[0])
                    bad_rows.append(_malformed_record(kind, written_bad, good))
                    written_bad += 1
            if jsonl:
                assert handle is not None
                for row in table.to_pylist():
                    handle.write(orjson.dumps(_as_json_record(row)) + b"\n")
                for bad in bad_rows:
                    line = bad if isinstance(bad, bytes) else orjson.dumps(bad, option=orjson.OPT_SERIALIZE_NUMPY)
                    handle.write(line + b"\n")
            else:
                assert writer is not None
                writer.write_table(table.cast(relaxed))
                if bad_rows:
                    writer.write_table(_bad_parquet_rows(bad_rows, relaxed))
    finally:
        if writer is not None:
            writer.close()
        if handle is not None:
            handle.close()
    return DemoSummary(
        path=path,
        events=count,
        malformed=written_bad,
        first_time=from_micros(first or 0),
        last_time=from_micros(last or 0),
        bytes_written=path.stat().st_size,
    )


def _bad_parquet_rows(rows: list[dict[str, Any] | bytes], schema: pa.Schema) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    for row in rows:
        assert isinstance(row, dict)
        for name in schema.names:
            value = row.get(name)
            if name == "event_time" and isinstance(value, str):
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            elif name == "event_time" and isinstance(value, int):
                value = from_micros(value)
            columns[name].append(value)
    return pa.table(
        {name: pa.array(values, schema.field(name).type) for name, values in columns.items()}, schema=schema
    )


def produce_to_kafka(
    path: Path, bootstrap: str, topic: str, *, timeout_s: float = 60.0, options: dict[str, str] | None = None
) -> int:
    """Produce a demo file's records to a Kafka topic as JSON, keyed by user_id (so one
    entity's events keep their order in one partition). Malformed records go as they are.
    A full producer queue waits for deliveries; a broker that takes nothing for
    `timeout_s` is a TransientError saying so."""
    from confluent_kafka import KafkaException

    from featurestore.errors import TransientError
    from pipelines.stream.producer import Delivery

    producer = Delivery(bootstrap, timeout_s=timeout_s, **{"linger.ms": 20, **(options or {})})
    sent = 0

    def send(value: bytes, key: Any) -> None:
        nonlocal sent
        producer.send(topic, value, None if key is None else str(key).encode())
        sent += 1
        if sent % 10_000 == 0:
            producer.poll()

    try:
        if path.suffix == ".parquet":
            for batch in pq.ParquetFile(path).iter_batches(batch_size=50_000):
                for row in batch.to_pylist():
                    if row.get("event_time") is not None:
                        row["event_time"] = row["event_time"].isoformat()
                    send(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY), row.get("user_id"))
        else:
            with path.open("rb") as handle:
                for line in handle:
                    if line.strip():
                        try:
                            key = orjson.loads(line).get("user_id")
                        except (orjson.JSONDecodeError, AttributeError):
                            key = None
                        send(line.rstrip(b"\n"), key)
        producer.flush()
    except KafkaException as error:
        raise TransientError(f"Kafka at {bootstrap}: {error}") from error
    return sent


LABEL = "buys_within_6h"
_HOUR_US = 3_600_000_000


def demo_labels(events: pa.Table, *, count: int = 20_000, seed: int = 3, horizon_hours: int = 6) -> pa.Table:
    """Labels for the demo events: random (user, time) pairs over the history (after its
    first day, up to `horizon_hours` before its end), labelled true when that user buys
    again within `horizon_hours`. Columns: user_id, timestamp, buys_within_6h."""
    import pyarrow.compute as pc

    users = events.column("user_id").to_numpy()
    times = pc.cast(events.column("event_time"), pa.int64()).to_numpy()
    order = np.lexsort((times, users))
    users, times = users[order], times[order]
    rng = np.random.default_rng(seed)
    picked_users = rng.choice(np.unique(users), count)
    low, high = int(times.min()), int(times.max()) - horizon_hours * _HOUR_US
    picked_times = rng.integers(low + 24 * _HOUR_US, max(high, low + 24 * _HOUR_US + 1), count)
    composite = users.astype(np.float64) * 1e17 + times
    after = np.searchsorted(composite, picked_users.astype(np.float64) * 1e17 + picked_times, side="right")
    following = np.where(after < len(times), times[np.minimum(after, len(times) - 1)], np.iinfo(np.int64).max)
    same_user = (after < len(users)) & (users[np.minimum(after, len(users) - 1)] == picked_users)
    label = same_user & (following - picked_times <= horizon_hours * _HOUR_US)
    return pa.table(
        {
            "user_id": pa.array(picked_users, pa.int64()),
            "timestamp": pa.array(picked_times, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            LABEL: pa.array(label),
        }
    )
