"""Ingest of CSV and Parquet files on a schema of every field type: what a cell becomes,
what is rejected with which reason, and which files are refused before anything is
written. (End-to-end ingest with the demo source is in test_batch_engine.py.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurestore.errors import TerminalError
from featurestore.plan.model import SourceSpec
from featurestore.stores.offline import DeltaOfflineStore
from pipelines.ingest import ingest_file
from schemas.schema import EventSchema, Field

SCHEMA = EventSchema(
    "ev",
    [
        Field("eid", "string"),
        Field("key", "string"),
        Field("ival", "int64", nullable=True),
        Field("fval", "float64", nullable=True),
        Field("flag", "bool", nullable=True),
        Field("txt", "string", nullable=True),
        Field("event_time", "timestamp[us, UTC]"),
    ],
    event_time="event_time",
    entity_keys=("key",),
)
SOURCE = SourceSpec(name="ev", schema=SCHEMA, topic="ev", table="ev", allowed_lateness=0)
HEADER = "eid,key,ival,fval,flag,txt,event_time\n"
TIME = "2024-01-01T00:00:00Z"


@pytest.fixture
def store(tmp_path: Path) -> DeltaOfflineStore:
    return DeltaOfflineStore(tmp_path / "offline")


def stored(store: DeltaOfflineStore, *columns: str) -> list[tuple[object, ...]]:
    rows = store.read_events(SOURCE).sort_by("eid").to_pylist()
    return [tuple(row[name] for name in columns) for row in rows]


def reasons(store: DeltaOfflineStore) -> list[tuple[int, str]]:
    return [(r["row"], r["reason"]) for r in store.read_rejects(SOURCE).sort_by("row").to_pylist()]


def test_csv_text_that_spells_null_is_kept_as_text(tmp_path: Path, store: DeltaOfflineStore) -> None:
    # Arrow's default null spellings turned Namibia's country code NA into a null: a
    # required key was rejected, a nullable text silently stored as null.
    path = tmp_path / "na.csv"
    path.write_text(
        HEADER + f"e1,NA,1,1.0,true,hello,{TIME}\n"
        f"e2,k2,2,2.0,true,NA,{TIME}\n"
        f"e3,k3,3,3.0,true,null,{TIME}\n"
        f"e4,k4,4,4.0,true,N/A,{TIME}\n"
        f'e5,k5,5,5.0,true,"",{TIME}\n'
        f"e6,nan,6,6.0,true,,{TIME}\n"
    )
    summary = ingest_file(store, SOURCE, path)
    assert (summary.ingested, summary.rejected) == (6, 0)
    assert stored(store, "eid", "key", "txt") == [
        ("e1", "NA", "hello"),
        ("e2", "k2", "NA"),
        ("e3", "k3", "null"),
        ("e4", "k4", "N/A"),
        ("e5", "k5", ""),  # quoted: the empty string, as Parquet and JSON lines keep it
        ("e6", "nan", None),  # unquoted empty: null
    ]


def test_csv_spellings_of_null_are_null_in_number_bool_and_time_columns(
    tmp_path: Path, store: DeltaOfflineStore
) -> None:
    """No number, bool or time is spelled NA, null, N/A or nan: there they are a missing
    value as CSV writers write one (R's write.csv writes NA), and null as before; only a
    string column keeps them as text. Other words are rejected with the reason."""
    path = tmp_path / "numbers.csv"
    path.write_text(
        HEADER + f"e1,k,NA,1.0,true,x,{TIME}\n"
        f"e2,k,2,null,true,x,{TIME}\n"
        f"e3,k,3,3.0,N/A,x,{TIME}\n"
        f"e4,k,4,4.0,true,x,NA\n"
        f"e5,k,,,,,{TIME}\n"
        f'e6,k,"","","","",{TIME}\n'  # every field quoted, as csv.QUOTE_ALL writes a missing value
        f"e7,k,7,nan,true,NA,{TIME}\n"
        f"e8,k,eight,8.0,true,x,{TIME}\n"
    )
    summary = ingest_file(store, SOURCE, path)
    assert (summary.ingested, summary.rejected) == (6, 2)
    assert reasons(store) == [
        (3, "field `event_time`: expected timestamp[us, UTC] (not null), got null"),
        (7, "field `ival`: expected int64, got 'eight'"),
    ]
    assert stored(store, "eid", "ival", "fval", "flag", "txt") == [
        ("e1", None, 1.0, True, "x"),
        ("e2", 2, None, True, "x"),
        ("e3", 3, 3.0, None, "x"),
        ("e5", None, None, None, None),
        ("e6", None, None, None, ""),
        ("e7", 7, None, True, "NA"),
    ]


def test_a_nullable_column_spelled_otherwise_in_the_file_is_refused(tmp_path: Path, store: DeltaOfflineStore) -> None:
    # Only required columns were checked: `Fval` and `txt ` were ignored and the
    # schema's fval and txt stored as all null, without a word.
    path = tmp_path / "m.csv"
    path.write_text(f"eid,key,ival,Fval,flag,txt ,event_time\ne0,k0,1,2.5,true,hello,{TIME}\n")
    with pytest.raises(TerminalError) as refused:
        ingest_file(store, SOURCE, path)
    assert str(refused.value) == (
        f"{path}: nullable column(s) `fval` (the file has `Fval`), `txt` (the file has `txt `) of source `ev` "
        "not found by name, so they would be stored as all null: rename the file's column(s) to the schema's "
        "names (if one really is another column, add an empty column of the schema's name); "
        "the file has: eid, key, ival, Fval, flag, txt , event_time"
    )
    assert store.ingests(SOURCE) == []
    # A close spelling is not refused: it may well be another column (`fval2`, `txt_en`).
    other = tmp_path / "other.csv"
    other.write_text(f"eid,key,ival,fval2,flag,txt_en,event_time\ne0,k0,1,2.5,true,hello,{TIME}\n")
    assert ingest_file(store, SOURCE, other).ingested == 1
    # A misspelled required column is named in the same message.
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({"eid": ["e0"], "kye": ["k0"], "Flag": [True], "event_time": [TIME]}), parquet)
    with pytest.raises(TerminalError) as refused:
        ingest_file(store, SOURCE, parquet)
    assert str(refused.value) == (
        f"{parquet}: missing column(s) `key` (the file has `kye`) of source `ev`; nullable column(s) `flag` "
        "(the file has `Flag`) of source `ev` not found by name, so they would be stored as all null: rename "
        "the file's column(s) to the schema's names (if one really is another column, add an empty column of "
        "the schema's name); the file has: eid, kye, Flag, event_time"
    )
    # Columns the schema does not know, unlike any of its names, are still ignored.
    other = tmp_path / "other.csv"
    other.write_text(f"eid,key,comment,event_time\ne0,k0,hi,{TIME}\n")
    assert ingest_file(store, SOURCE, other).ingested == 1


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_file_naming_a_schema_column_twice_is_refused(tmp_path: Path, store: DeltaOfflineStore, suffix: str) -> None:
    # It crashed with a bare KeyError ('Field "ival" exists 2 times in schema').
    path = tmp_path / f"d{suffix}"
    names = ["eid", "key", "ival", "ival", "note", "note", "event_time"]
    if suffix == ".csv":
        path.write_text(",".join(names) + f"\ne0,k0,1,2,a,b,{TIME}\n")
    else:
        columns = [pa.array(["e0"]), pa.array(["k0"]), pa.array([1]), pa.array([2]), pa.array(["a"]), pa.array(["b"])]
        pq.write_table(pa.Table.from_arrays([*columns, pa.array([TIME])], names=names), path)
    with pytest.raises(TerminalError) as refused:
        ingest_file(store, SOURCE, path)
    assert str(refused.value) == (
        f"{path}: the file names column(s) `ival` of source `ev` more than once; tenx cannot tell which is meant: "
        "rename or drop the extra ones"
    )
    assert store.ingests(SOURCE) == []


def test_rejects_stream_into_one_commit_and_are_recorded_once(store: DeltaOfflineStore, tmp_path: Path) -> None:
    """Rejects were kept in memory until the commit (and delta-rs's writer held them all
    again): memory grew with the rejected rows. They stream, batch by batch, to a
    scratch file and from it into one Parquet file that one commit adds; a second record
    of the same file is refused. (The memory itself is measured, not asserted: 4M
    rejected CSV rows peaked at 1.6 GB flat from the first batches, against 1.8-2.1 GB
    growing with the rows before.)"""
    from featurestore.stores.offline import REJECTS_SCHEMA
    from pipelines import ingest

    path = tmp_path / "old.parquet"  # before the schema's min_time: every row rejected, batch by batch
    pq.write_table(
        pa.table(
            {
                "eid": [f"e{i}" for i in range(2_500)],
                "key": ["k"] * 2_500,
                "event_time": pa.array([631_152_000_000_000] * 2_500, pa.timestamp("us", tz="UTC")),  # 1990
            }
        ),
        path,
    )
    original = ingest.BATCH_ROWS
    ingest.BATCH_ROWS = 1_000
    try:
        summary = ingest_file(store, SOURCE, path)
    finally:
        ingest.BATCH_ROWS = original
    assert (summary.ingested, summary.rejected) == (0, 2_500)
    rows = reasons(store)
    assert [row for row, _ in rows] == list(range(2_500))
    assert len({reason for _, reason in rows}) == 1
    assert summary.reasons == ((rows[0][1], 2_500),)
    assert len(list((store.root / "rejects" / "ev").glob("*.parquet"))) == 1  # one file, one commit
    again = pa.RecordBatchReader.from_batches(REJECTS_SCHEMA, iter(store.read_rejects(SOURCE).to_batches()))
    (digest,) = store.rejected_files(SOURCE)
    assert not store.append_rejects(SOURCE, again, metadata={"tenx.file_sha256": digest})
    assert store.read_rejects(SOURCE).num_rows == 2_500
