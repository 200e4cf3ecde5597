"""`tenx ingest` and `tenx materialize` edge cases, run as a user runs them (a real
subprocess; see test_cli.py)."""

from __future__ import annotations

from pathlib import Path

from tests.unit.tenx.test_cli import tenx

HEADER = "transaction_id,user_id,merchant_id,amount,currency,category,country,event_time\n"


def test_ingest_skipping_only_duplicates_succeeds_and_says_nothing_new_was_stored(tmp_path: Path) -> None:
    # It printed "error: no valid event" and exited 1, though every event was valid and stored.
    tenx("init", "demo", cwd=tmp_path)
    repo = tmp_path / "demo"
    assert tenx("apply", cwd=repo).returncode == 0
    (repo / "tx.csv").write_text(
        HEADER + "t1,1,2,5.0,EUR,grocery,FR,2026-01-02T10:00:00Z\nt2,1,2,6.0,EUR,grocery,FR,2026-01-02T11:00:00Z\n"
    )
    assert tenx("ingest", "tx.csv", cwd=repo).returncode == 0
    (repo / "again.csv").write_text(
        HEADER + "t1,1,2,5.0,EUR,grocery,FR,2026-01-02T10:00:00Z\nbad,oops,2,6.0,EUR,grocery,FR,2026-01-02T11:00:00Z\n"
    )
    skipped = tenx("ingest", "again.csv", "--skip-duplicates", cwd=repo)
    assert skipped.returncode == 0, skipped.stderr
    assert skipped.stderr == ""
    assert "again.csv: 1 events already in the table left out; nothing new was stored" in skipped.stdout
    # Rows, none valid: still a failure.
    (repo / "naive.csv").write_text(HEADER + "n1,1,2,5.0,EUR,grocery,FR,2026-01-02T10:00:00\n")
    refused = tenx("ingest", "naive.csv", "--skip-duplicates", cwd=repo)
    assert refused.returncode == 1
    assert "no valid event in naive.csv" in refused.stderr


def test_materialize_refuses_an_as_of_later_than_now(tmp_path: Path) -> None:
    # It loaded the backfill's future expiry rows: wrong values served, and the stream's
    # writes (as of now) refused as older until that time.
    tenx("init", "demo", cwd=tmp_path)
    repo = tmp_path / "demo"
    assert tenx("apply", cwd=repo).returncode == 0
    refused = tenx("materialize", "--as-of", "2999-01-01", cwd=repo)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: --as-of '2999-01-01' is later than now (")
    assert (
        "the online store would get values from the future (a backfill's expiry rows) and refuse the stream job's "
        "writes as older until then: pass a time up to now, or leave --as-of out for now"
    ) in " ".join(refused.stderr.split())
    assert "Traceback" not in refused.stderr
    past = tenx("materialize", "--as-of", "2020-01-01", cwd=repo)  # not refused for its time (nothing backfilled)
    assert "later than now" not in past.stderr
    assert "run `tenx backfill` first" in past.stderr
