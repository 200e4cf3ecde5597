"""Ingests racing in separate processes on one events table: every event stored once,
`_seq` unique and gap-free, no file recorded twice (they overlapped before)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from featurestore.plan import Plan, compile_repo
from featurestore.plan.model import SEQUENCE
from featurestore.stores.offline import DeltaOfflineStore
from pipelines.ingest import ingest_file
from tenx.demo_data import DemoConfig, write_demo_data

ROOT = Path(__file__).resolve().parents[3]
PROCESSES = 4
FILES_EACH = 3
ROWS = 1_500

RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from featurestore.plan import compile_repo
    from featurestore.stores.offline import DeltaOfflineStore
    from pipelines.ingest import ingest_file

    plan = compile_repo(Path({root!r}) / "tenx" / "templates" / "repo", project="demo", modules=["features"])
    store = DeltaOfflineStore(sys.argv[1])
    go = Path(sys.argv[2])
    while not go.exists():  # start together
        time.sleep(0.005)
    for name in sys.argv[3:]:
        summary = ingest_file(store, plan.source("transactions"), Path(name))
        print(name, summary.ingested, summary.skipped, flush=True)
    """
)


@pytest.fixture(scope="module")
def plan() -> Plan:
    return compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])


def race(tmp_path: Path, files_per_process: list[list[Path]], *, store: str | None = None) -> list[str]:
    """Run one process per list of files, all starting together, each ingesting its
    files into the store at `store` (default: tmp_path/offline); their output lines."""
    script = tmp_path / "racer.py"
    script.write_text(RACER.format(root=str(ROOT)))
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, str(script), store or str(tmp_path / "offline"), str(go), *map(str, files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for files in files_per_process
    ]
    time.sleep(3.0)  # every racer imported and waiting
    go.touch()
    lines = []
    for racer in racers:
        out, err = racer.communicate(timeout=300)
        assert racer.returncode == 0, err
        lines += out.splitlines()
    return lines


@pytest.mark.parametrize("table", ["existing", "new"])
def test_concurrent_ingests_store_every_event_once_with_unique_sequence_numbers(
    tmp_path: Path, plan: Plan, table: str
) -> None:
    # "existing": the everyday case (numbers overlapped before); "new": the racers also
    # create the table (one of them crashed with "Metadata changed" before).
    source = plan.source("transactions")
    store = DeltaOfflineStore(tmp_path / "offline")
    seeded = 0
    if table == "existing":
        write_demo_data(tmp_path / "seed.parquet", DemoConfig(events=100, users=5, merchants=3, days=1, seed=99))
        seeded = ingest_file(store, source, tmp_path / "seed.parquet").ingested
    files = []
    for index in range(PROCESSES * FILES_EACH):
        path = tmp_path / f"events_{index}.parquet"
        write_demo_data(path, DemoConfig(events=ROWS, users=50, merchants=10, days=2, seed=100 + index))
        rows = pq.read_table(path)
        ids = pc.binary_join_element_wise(f"f{index}", rows.column("transaction_id"), "-")
        pq.write_table(rows.set_column(rows.schema.get_field_index("transaction_id"), "transaction_id", ids), path)
        files.append(path)
    lines = race(tmp_path, [files[i::PROCESSES] for i in range(PROCESSES)])

    assert sorted(int(line.split()[1]) for line in lines) == [ROWS] * len(files)
    events = store.read_events(source)
    sequence = np.sort(events.column(SEQUENCE).to_numpy())
    assert len(sequence) == ROWS * len(files) + seeded
    assert (sequence == np.arange(len(sequence))).all()  # unique, gap-free
    # each file's events got one contiguous run of numbers, in file order
    for path in files:
        ids = pc.is_in(events.column("transaction_id"), value_set=pq_ids(path))
        numbers = np.sort(events.filter(ids).column(SEQUENCE).to_numpy())
        assert numbers[-1] - numbers[0] == ROWS - 1, path.name
    assert sorted(r.file_sha256 for r in store.ingests(source)) == sorted(
        {r.file_sha256 for r in store.ingests(source)}
    )
    assert store.next_sequence(source) == ROWS * len(files) + seeded


def test_the_same_file_ingested_twice_at_once_is_stored_once(tmp_path: Path, plan: Plan) -> None:
    path = tmp_path / "events.parquet"
    write_demo_data(path, DemoConfig(events=ROWS, users=50, merchants=10, days=2, seed=5))
    rows = pq.read_table(path)
    amounts = rows.column("amount").to_pylist()
    amounts[0] = 1e200  # beyond the float limit: one reject
    pq.write_table(rows.set_column(rows.schema.get_field_index("amount"), "amount", pa.array(amounts)), path)
    lines = race(tmp_path, [[path], [path], [path]])
    outcomes = sorted((int(line.split()[1]), line.split()[2]) for line in lines)
    assert outcomes == [(0, "True"), (0, "True"), (ROWS - 1, "False")]  # one stored it, two saw it done
    store = DeltaOfflineStore(tmp_path / "offline")
    assert store.read_events(plan.source("transactions")).num_rows == ROWS - 1
    assert store.read_rejects(plan.source("transactions")).num_rows == 1  # its reject recorded once too


def test_an_ingest_that_read_an_older_version_fails_cleanly_and_commits_nothing(tmp_path: Path, plan: Plan) -> None:
    from featurestore.errors import WriteConflict

    source = plan.source("transactions")
    store = DeltaOfflineStore(tmp_path / "offline")
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_demo_data(first, DemoConfig(events=200, users=5, merchants=3, days=1, seed=1))
    write_demo_data(second, DemoConfig(events=200, users=5, merchants=3, days=1, seed=2))
    ingest_file(store, source, first)
    stale = store.events_version(source)
    ingest_file(store, source, second)
    third = tmp_path / "c.parquet"
    write_demo_data(third, DemoConfig(events=200, users=5, merchants=3, days=1, seed=3))
    batches = pq.read_table(third).cast(source.schema.arrow_schema()).to_batches()
    with pytest.raises(WriteConflict, match="another ingest of source `transactions` committed first"):
        store.append_events(source, batches, rows=200, metadata={}, read_version=stale)
    assert store.read_events(source).num_rows == 400
    assert store.next_sequence(source) == 400


def pq_ids(path: Path) -> object:
    return pq.read_table(path, columns=["transaction_id"]).column("transaction_id")


@pytest.mark.parametrize("first_backfill", [True, False])
def test_overlapping_backfills_one_wins_and_the_other_says_why(
    tmp_path: Path, plan: Plan, first_backfill: bool
) -> None:
    overlapping_backfills(DeltaOfflineStore(tmp_path / "offline"), plan, tmp_path, first_backfill)


def overlapping_backfills(store: DeltaOfflineStore, plan: Plan, tmp_path: Path, first_backfill: bool) -> None:
    """Two backfills of one view over overlapping days, interleaved deterministically:
    both read the changelog table, one commits, then the other tries to (also run on
    S3 by tests/integration/test_offline_s3.py)."""
    from featurestore.errors import WriteConflict
    from pipelines.reference import reference_changelog

    source = plan.source("transactions")
    view = plan.view("merchant_sales")
    write_demo_data(tmp_path / "a.parquet", DemoConfig(events=300, users=5, merchants=4, days=2, seed=4))
    ingest_file(store, source, tmp_path / "a.parquet")
    changelog = reference_changelog(view, store.read_events(source).to_pandas())
    start, end = 1_700_000_000_000_000, 1_900_000_000_000_000
    if first_backfill:  # the table exists but holds nothing yet
        store.write_changelog(view, [], start=start, end=end)
    else:
        store.write_changelog(view, [changelog], start=start, end=end)
    stale = store._table(store.changelog_path(view))
    store.write_changelog(view, [changelog], start=start, end=end)  # the winner
    winner = store.read_changelog(view)
    late = store.write_changelog_files(view, changelog, start=start, end=end)
    with pytest.MonkeyPatch.context() as patch:  # only this: the caller's patches (AWS_*) stay
        patch.setattr(DeltaOfflineStore, "_table", lambda self, location, version=None: stale)
        with pytest.raises(WriteConflict, match=r"another backfill of `merchant_sales` .* committed nothing"):
            store.commit_changelog(view, late, start=start, end=end)
    assert store.read_changelog(view).equals(winner)  # nothing duplicated, the winner's rows stand


def test_backfills_of_different_days_at_once_both_commit(
    tmp_path: Path, plan: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltalake import DeltaTable

    from pipelines.reference import reference_changelog

    source = plan.source("transactions")
    view = plan.view("merchant_sales")
    store = DeltaOfflineStore(tmp_path / "offline")
    write_demo_data(tmp_path / "a.parquet", DemoConfig(events=300, users=5, merchants=4, days=4, seed=4))
    ingest_file(store, source, tmp_path / "a.parquet")
    changelog = reference_changelog(view, store.read_events(source).to_pandas())
    times = changelog.column("as_of").cast("int64").to_numpy()
    middle = int(times.min()) + 2 * 86_400_000_000 - int(times.min()) % 86_400_000_000  # a midnight
    store.write_changelog(view, [], start=int(times.min()), end=int(times.max()) + 1)
    stale = DeltaTable(str(store.changelog_path(view)))
    early = changelog.filter(pa.array(times < middle))
    store.write_changelog(view, [early], start=int(times.min()), end=middle)  # the first days
    rest = changelog.filter(pa.array(times >= middle))
    assert early.num_rows > 0
    assert rest.num_rows > 0
    late = store.write_changelog_files(view, rest, start=middle, end=int(times.max()) + 1)
    monkeypatch.setattr(DeltaOfflineStore, "_table", lambda self, location, version=None: stale)
    store.commit_changelog(view, late, start=middle, end=int(times.max()) + 1)  # the other days
    monkeypatch.undo()
    assert store.read_changelog(view).num_rows == changelog.num_rows


BACKFILLER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from featurestore.errors import WriteConflict
    from featurestore.plan import compile_repo
    from featurestore.stores.offline import DeltaOfflineStore
    from pipelines.batch.engine import backfill, dask_client

    plan = compile_repo(Path({root!r}) / "tenx" / "templates" / "repo", project="demo", modules=["features"])
    store = DeltaOfflineStore(sys.argv[1])
    go = Path(sys.argv[2])
    with dask_client(None, workers=1) as client:
        while not go.exists():  # start together
            time.sleep(0.005)
        try:
            backfill(plan, store, views=["merchant_sales"], client=client)
            print("committed", flush=True)
        except WriteConflict as error:
            print("conflict", str(error).splitlines()[0], flush=True)
    """
)


@pytest.mark.parametrize("table", ["new", "existing"])
def test_backfills_racing_in_processes_leave_one_changelog_never_a_doubled_one(
    tmp_path: Path, plan: Plan, table: str
) -> None:
    # Three `backfill` processes over the same days at once: each either commits (then
    # its whole range replaced what was there) or fails saying another one won; the
    # table ends up with exactly one changelog, equal to the reference.
    from featurestore.semantics import changelog_differences
    from pipelines.reference import reference_changelog

    source, view = plan.source("transactions"), plan.view("merchant_sales")
    store = DeltaOfflineStore(tmp_path / "offline")
    write_demo_data(tmp_path / "a.parquet", DemoConfig(events=3_000, users=20, merchants=8, days=3, seed=6))
    ingest_file(store, source, tmp_path / "a.parquet")
    if table == "existing":
        store.write_changelog(view, [], start=1_700_000_000_000_000, end=1_900_000_000_000_000)
    script = tmp_path / "backfiller.py"
    script.write_text(BACKFILLER.format(root=str(ROOT)))
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "offline"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    time.sleep(4.0)
    go.touch()
    outcomes = []
    for racer in racers:
        out, err = racer.communicate(timeout=300)
        assert racer.returncode == 0, err
        outcomes.append(out.strip())
    assert any(o == "committed" for o in outcomes), outcomes
    for outcome in outcomes:
        assert outcome == "committed" or outcome.startswith("conflict another backfill of `merchant_sales`"), outcome
    expected = reference_changelog(view, store.read_events(source).to_pandas(), with_scale=True)
    kinds = {f.name: f.kind for f in view.features}
    assert changelog_differences(expected, store.read_changelog(view), key=view.entity_key, kinds=kinds) == []
