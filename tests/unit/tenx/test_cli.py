"""The `tenx` command as a user runs it: a real subprocess of the installed console script."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import clean_environment, free_port, wait_until_serving
from tests.unit.featurestore.test_compile import BAD_REPO, EXPECTED

TENX = shutil.which("tenx", path=os.path.dirname(sys.executable)) or "tenx"


def tenx(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # The embedded online store: every test repo here is project `demo` with the same plan,
    # so on a shared Redis (CI runs one) they would overwrite each other's values.
    environment = {k: v for k, v in os.environ.items() if k not in ("TENX_CONFIG", "TENX_REDIS_URL")}
    environment.update({"COLUMNS": "200", **(env or {})})
    return subprocess.run([TENX, *args], cwd=cwd, capture_output=True, text=True, env=environment, timeout=120)


def test_help_lists_every_command(tmp_path: Path) -> None:
    result = tenx("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in (
        "init",
        "plan",
        "apply",
        "demo-data",
        "ingest",
        "backfill",
        "export",
        "materialize",
        "serve",
        "stream",
    ):
        assert command in result.stdout
    assert "TENX_REDIS_URL" in result.stdout


@pytest.mark.parametrize(
    "command", ["init", "plan", "apply", "demo-data", "ingest", "backfill", "materialize", "serve"]
)
def test_every_command_has_help(tmp_path: Path, command: str) -> None:
    result = tenx(command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "Usage: tenx " + command in result.stdout


def test_init_plan_apply_plan(tmp_path: Path) -> None:
    created = tenx("init", "demo", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    repo = tmp_path / "demo"
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "features.py", "tenx.yaml"]

    planned = tenx("plan", cwd=repo)
    assert planned.returncode == 0, planned.stderr
    assert "user_spend" in planned.stdout
    assert "Nothing applied yet; applying would add:" in planned.stdout
    assert "+ feature view `user_spend`: 20 features" in planned.stdout
    # Each source's Kafka topic (where `tenx stream` reads) and its timing options.
    assert re.search(r"│ transactions\s+│ transactions\s+│ transactions\s+│ 5m\s+│ 30s\s+│ 5m\s+│", planned.stdout)

    applied = tenx("apply", cwd=repo)
    assert applied.returncode == 0, applied.stderr
    version = applied.stdout.split("Applied plan ")[1].split()[0]
    assert (repo / ".tenx" / "registry" / "plans" / f"{version}.json").exists()

    again = tenx("plan", cwd=repo)
    assert f"No changes: plan {version} is applied." in again.stdout

    as_json = tenx("plan", "--json", cwd=repo)
    assert f'"version": "{version}"' in as_json.stdout


def test_breaking_change_is_marked(tmp_path: Path) -> None:
    tenx("init", "demo", cwd=tmp_path)
    repo = tmp_path / "demo"
    tenx("apply", cwd=repo)
    features = repo / "features.py"
    features.write_text(features.read_text().replace('"FR", 0.0)', '"DE", 0.0)'))
    planned = tenx("plan", cwd=repo)
    assert planned.returncode == 0
    assert "~ feature view `user_spend`: row transform  BREAKING" in planned.stdout


def test_bad_repo_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "tenx.yaml").write_text("project: bad\nfeatures:\n  modules: [features]\n")
    (tmp_path / "features.py").write_text(BAD_REPO)
    result = tenx("plan", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"error: the feature repo has {len(EXPECTED)} problem(s):"
    assert lines[1:] == [f"  - {message}" for message in EXPECTED]


def test_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    result = tenx("plan", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: no tenx.yaml in {tmp_path.resolve()} or any folder above it; run `tenx init NAME`" in result.stderr


def test_commands_find_tenx_yaml_in_a_folder_above(tmp_path: Path) -> None:
    tenx("init", "demo", cwd=tmp_path)
    below = tmp_path / "demo" / "data" / "raw"
    below.mkdir(parents=True)
    planned = tenx("plan", cwd=below)
    assert planned.returncode == 0, planned.stderr
    assert "user_spend" in planned.stdout


def test_unknown_config_key_is_named(tmp_path: Path) -> None:
    (tmp_path / "tenx.yaml").write_text("project: p\nonline_store:\n  redis_ulr: redis://x\n")
    result = tenx("plan", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown key `online_store.redis_ulr`; known keys: online_store.path, online_store.redis_url" in (
        result.stderr
    )


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    assert tenx("init", "demo", cwd=tmp_path).returncode == 0
    again = tenx("init", "demo", cwd=tmp_path)
    assert again.returncode == 2
    assert "demo/tenx.yaml, demo/features.py, demo/README.md already exist;" in again.stderr
    # A folder of the user's own, without a tenx.yaml: its files were overwritten.
    own = tmp_path / "mine"
    own.mkdir()
    (own / "features.py").write_text("# my own definitions\n")
    (own / "README.md").write_text("# mine\n")
    refused = tenx("init", "mine", cwd=tmp_path)
    assert refused.returncode == 2
    assert "features.py, " in refused.stderr
    assert "README.md already exist; tenx init never overwrites a file" in refused.stderr
    assert (own / "features.py").read_text() == "# my own definitions\n"
    assert not (own / "tenx.yaml").exists()
    # A path under a file, and `.`: clear errors, not a traceback or an empty project name.
    (tmp_path / "afile").write_text("")
    under = tenx("init", "afile/repo", cwd=tmp_path)
    assert under.returncode == 2
    assert "cannot create the folder afile/repo" in under.stderr
    (tmp_path / "dot_repo").mkdir()
    assert tenx("init", ".", cwd=tmp_path / "dot_repo").returncode == 0
    assert "project: dot_repo" in (tmp_path / "dot_repo" / "tenx.yaml").read_text()


def test_offline_loop_demo_data_ingest_backfill(tmp_path: Path) -> None:
    tenx("init", "demo", cwd=tmp_path)
    repo = tmp_path / "demo"
    assert tenx("ingest", "x.parquet", cwd=repo).returncode == 2  # nothing applied yet
    assert tenx("apply", cwd=repo).returncode == 0
    made = tenx(
        "demo-data",
        "data/tx.jsonl",
        *("--events", "3000", "--users", "50", "--days", "2", "--malformed", "4", "--start", "2026-01-01"),
        cwd=repo,
    )
    assert made.returncode == 0, made.stderr

    ingested = tenx("ingest", "data/tx.jsonl", cwd=repo)
    assert ingested.returncode == 0, ingested.stderr
    assert "3,004" in ingested.stdout
    assert "3,000" in ingested.stdout
    assert "4 rejected; most frequent reasons:" in ingested.stdout
    assert "All rejects: `tenx rejects`" in ingested.stdout
    assert "already ingested" in tenx("ingest", "data/tx.jsonl", cwd=repo).stdout
    listed = tenx("rejects", cwd=repo)
    assert listed.returncode == 0, listed.stderr
    assert "4 rejected rows of `transactions` by reason" in listed.stdout
    assert "field `currency`: expected string, got missing" in listed.stdout
    again = tenx("ingest", "data/tx.jsonl", "--force", cwd=repo)
    assert again.returncode == 2
    assert "3,000 of its 3,000 valid events are already in the events table" in again.stderr
    assert "--allow-duplicates" in again.stderr
    assert "--skip-duplicates" in again.stderr
    (repo / "new.csv").write_text(
        "transaction_id,user_id,merchant_id,amount,currency,category,country,event_time\n"
        "n0,1,2,5.0,EUR,grocery,FR,2026-01-02T10:00:00Z\n"
    )
    both = tenx("ingest", "data/tx.jsonl", "new.csv", "--force", cwd=repo)  # one refused, one fine
    assert both.returncode == 2
    assert "refused" in both.stdout
    assert "already in the events table" in both.stderr
    assert "│ new.csv       │    1 │        1 │" in both.stdout
    (repo / "naive.csv").write_text(
        "transaction_id,user_id,merchant_id,amount,currency,category,country,event_time\n"
        "n1,1,2,5.0,EUR,grocery,FR,2026-01-02T10:00:00\n"
    )
    refused = tenx("ingest", "naive.csv", cwd=repo)
    assert refused.returncode == 1  # rows, and not one valid
    assert "no valid event in naive.csv" in refused.stderr
    assert "ISO-8601 with timezone" in refused.stdout
    assert "Traceback" not in again.stderr + refused.stderr

    filled = tenx("backfill", cwd=repo)
    assert filled.returncode == 0, filled.stderr
    assert "user_spend" in filled.stdout
    assert "merchant_sales" in filled.stdout
    assert len(list((repo / "data" / "offline" / "features").iterdir())) == 2
    unchecked = tenx("verify", cwd=repo)  # nothing materialized: nothing to compare is not "ok"
    assert unchecked.returncode == 1
    assert "nothing was compared: run `tenx materialize`" in unchecked.stdout
    assert tenx("materialize", cwd=repo).returncode == 0
    checked = tenx("verify", cwd=repo)
    assert checked.returncode == 0, checked.stdout
    assert "user_spend: ok 50 checked" in checked.stdout

    ranged = tenx(
        "backfill", "--view", "user_spend", "--start", "2026-01-02", "--end", "2026-01-02T12:00:00Z", cwd=repo
    )
    assert ranged.returncode == 0, ranged.stderr

    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = pa.table(
        {
            "user_id": pa.array([1, 2, 1, 10_000], pa.int64()),
            "timestamp": pa.array(["2026-01-02T10:00:00Z"] * 4).cast(pa.timestamp("us", tz="UTC")),
            "target": [True, False, True, False],
        }
    )
    pq.write_table(labels, repo / "labels.parquet")
    exported = tenx(
        "export",
        "--labels",
        "labels.parquet",
        "--features",
        "user_spend:count_1d,user_spend:mean_amount_eur_7d",
        "--out",
        "train.parquet",
        cwd=repo,
    )
    assert exported.returncode == 0, exported.stderr
    assert "Exported 4 of 4 label rows x 2 features" in exported.stdout
    assert pq.read_table(repo / "train.parquet").column("target").to_pylist() == [True, False, True, False]
    typo = tenx(
        "export", "--labels", "labels.parquet", "--features", "user_spend:cnt_1d", "--out", "x.parquet", cwd=repo
    )
    assert typo.returncode == 2
    assert "unknown feature 'user_spend:cnt_1d'" in typo.stderr
    over = tenx(
        "export", "--labels", "labels.parquet", "--features", "user_spend:count_1d", "--out", "labels.parquet", cwd=repo
    )
    assert over.returncode == 2
    assert "is the labels file" in over.stderr
    assert pq.read_table(repo / "labels.parquet").num_rows == 4
    csv = tenx("export", "--labels", "labels.parquet", "--features", "user_spend:count_1d", "--out", "t.csv", cwd=repo)
    assert csv.returncode == 2
    assert "name it *.parquet" in csv.stderr

    naive = tenx("backfill", "--start", "2026-01-02T10:00", cwd=repo)
    assert naive.returncode == 2
    assert "has no timezone; add Z for UTC" in naive.stderr
    unknown = tenx("backfill", "--view", "nope", cwd=repo)
    assert unknown.returncode == 2
    assert "no feature view `nope`" in unknown.stderr
    gpu = tenx("backfill", "--backend", "cudf", cwd=repo)
    assert gpu.returncode == 2
    assert "the cudf backend needs an NVIDIA GPU with RAPIDS" in gpu.stderr
    assert "Traceback" not in naive.stderr + unknown.stderr + gpu.stderr


def test_stream_from_file_takes_json_lines_and_says_what_it_dropped(tmp_path: Path) -> None:
    tenx("init", "demo", cwd=tmp_path)
    repo = tmp_path / "demo"
    assert tenx("apply", cwd=repo).returncode == 0
    env = {"TENX_REDIS_URL": ""}  # the embedded store
    made = tenx("demo-data", "tx.jsonl", "--events", "500", "--users", "5", "--days", "1", "--malformed", "3", cwd=repo)
    assert made.returncode == 0, made.stderr
    assert tenx("demo-data", "tx.parquet", "--events", "50", "--users", "5", "--days", "1", cwd=repo).returncode == 0
    both = tenx("stream", "--from-file", "tx.jsonl", "--drain", "--recovery-dir", "rec", cwd=repo, env=env)
    assert both.returncode == 2
    assert "--drain and --recovery-dir do not go together" in both.stderr
    assert not (repo / "rec").exists()
    refused = tenx("stream", "--from-file", "tx.parquet", cwd=repo, env=env)
    assert refused.returncode == 2
    assert "expected JSON lines" in refused.stderr
    assert "`tenx ingest`" in refused.stderr
    replayed = tenx("stream", "--from-file", "tx.jsonl", cwd=repo, env=env)
    assert replayed.returncode == 0, replayed.stderr
    assert "written: 3 dead letters" in replayed.stdout
    assert "done: 503 events in " in replayed.stdout  # the final counts
    assert "rows written, 0 late, 3 dead letters" in replayed.stdout
    # A second source: every source replayed the same file, and a transaction, which
    # this schema accepts (extra fields are ignored), counted as a login too.
    with (repo / "features.py").open("a") as features:
        features.write(LOGINS)
    assert tenx("apply", cwd=repo).returncode == 0
    mixed = tenx("stream", "--from-file", "tx.jsonl", cwd=repo, env=env)
    assert mixed.returncode == 2
    assert "--from-file replays one source's events, and the views run read 2 sources (logins, transactions)" in (
        mixed.stderr
    )
    assert "Traceback" not in mixed.stderr
    one = tenx(
        "stream", "--from-file", "tx.jsonl", "--view", "user_spend", "--view", "merchant_sales", cwd=repo, env=env
    )
    assert one.returncode == 0, one.stderr


LOGINS = """

from schemas import EventSchema, Field

logins = Source(
    "logins",
    EventSchema("logins", [Field("user_id", "int64"), Field("event_time", "timestamp[us, UTC]")],
                event_time="event_time", entity_keys=["user_id"]),
)


@feature_view(entity=user, source=logins, aggregations=[Count()], windows=["1h"])
def user_logins(events: pd.DataFrame) -> pd.DataFrame:
    return events[[]]
"""


def test_an_edit_not_applied_is_pointed_out(tmp_path: Path) -> None:
    tenx("init", "demo", cwd=tmp_path)
    repo = tmp_path / "demo"
    assert tenx("apply", cwd=repo).returncode == 0
    assert "note:" not in tenx("rejects", cwd=repo).stderr
    features = repo / "features.py"
    features.write_text(features.read_text().replace('windows=["1h", "1d", "7d"]', 'windows=["1h", "1d", "7d", "30d"]'))
    edited = tenx("rejects", cwd=repo)
    assert edited.returncode == 0
    assert "note: running the applied plan" in edited.stderr
    assert "`tenx apply` puts it to use" in edited.stderr


def test_serve_on_a_busy_port_says_so_before_announcing(tmp_path: Path) -> None:
    import socket

    tenx("init", "demo", cwd=tmp_path)
    repo = tmp_path / "demo"
    assert tenx("apply", cwd=repo).returncode == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = tenx("serve", "--port", str(port), cwd=repo)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "tenx feature API on" not in result.stdout


def test_serve_reads_its_token_from_a_file_and_requires_it(tmp_path: Path) -> None:
    import signal
    import urllib.error
    import urllib.request

    tenx("init", "demo", cwd=tmp_path)
    repo = tmp_path / "demo"
    assert tenx("apply", cwd=repo).returncode == 0
    missing = tenx("serve", "--token-file", "nope.txt", cwd=repo)
    assert missing.returncode == 2
    assert "error: --token-file nope.txt: No such file or directory" in missing.stderr
    (repo / "empty.txt").write_text("\n")
    assert "is empty: write the token into it" in tenx("serve", "--token-file", "empty.txt", cwd=repo).stderr
    (repo / "token.txt").write_text("s3cret-from-a-file\n")
    both = tenx("serve", "--token", "x", "--token-file", "token.txt", cwd=repo)
    assert "give the token once" in both.stderr
    port = free_port()
    server = subprocess.Popen(
        [TENX, "serve", "--port", str(port), "--token-file", "token.txt"],
        cwd=repo,
        env=clean_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        body = b'{"view": "user_spend", "entities": [1]}'
        wait_until_serving(f"http://127.0.0.1:{port}/health/live", server)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/features", data=body), timeout=5)
        assert refused.value.code == 401
        refused.value.close()
        authorized = urllib.request.Request(
            f"http://127.0.0.1:{port}/features", data=body, headers={"Authorization": "Bearer s3cret-from-a-file"}
        )
        with urllib.request.urlopen(authorized, timeout=5) as answered:
            assert answered.status == 200
        assert "s3cret-from-a-file" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


def test_apply_repairs_a_damaged_plan_file_instead_of_refusing_for_good(tmp_path: Path) -> None:
    """A truncated plan file (a crash before data reached the disk, a hand edit) made
    every `tenx apply` fail on reading it, though the error said to apply again."""
    tenx("init", "demo", cwd=tmp_path)
    repo = tmp_path / "demo"
    first = tenx("apply", cwd=repo)
    assert first.returncode == 0, first.stderr
    version = first.stdout.split("Applied plan ")[1].split()[0]
    plan_file = repo / ".tenx" / "registry" / "plans" / f"{version}.json"
    whole = plan_file.read_text()
    plan_file.write_text(whole[: len(whole) // 2])
    assert tenx("plan", cwd=repo).returncode == 2  # reading it is still refused, with the reason
    again = tenx("apply", cwd=repo)
    assert again.returncode == 0, again.stderr
    assert "is unreadable" in again.stderr
    assert "applying without a diff against it" in again.stderr
    assert plan_file.read_text() == whole
    assert f"No changes: plan {version} is applied." in tenx("plan", cwd=repo).stdout


def test_apply_refuses_a_repo_without_views(tmp_path: Path) -> None:
    tenx("init", "demo", cwd=tmp_path)
    repo = tmp_path / "demo"
    assert tenx("apply", cwd=repo).returncode == 0
    (repo / "features.py").write_text('"""nothing here yet"""\n')
    planned = tenx("plan", cwd=repo)
    assert "warning: the feature repo defines no feature view (modules features" in planned.stderr
    applied = tenx("apply", cwd=repo)
    assert applied.returncode == 2
    assert "nothing applied" in applied.stderr
    assert "note: running the applied plan" in tenx("rejects", cwd=repo).stderr  # the old plan stays


def test_ctrl_c_exits_130_saying_what_stays() -> None:
    import click
    from click.testing import CliRunner

    from tenx.commands.common import friendly as _friendly

    @click.command()
    @_friendly
    def backfill() -> None:
        raise KeyboardInterrupt

    result = CliRunner().invoke(backfill)
    assert result.exit_code == 130
    assert "interrupted: `tenx backfill` stopped; what it had committed stays" in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


def test_materialize_loads_values_as_of_now_not_future_expiries(tmp_path: Path) -> None:
    import time

    from featurestore.registry import FileRegistry
    from featurestore.stores.codec import decode
    from featurestore.stores.online import open_online_store

    tenx("init", "demo", cwd=tmp_path)
    repo = tmp_path / "demo"
    env = {"TENX_REDIS_URL": ""}
    assert tenx("apply", cwd=repo).returncode == 0
    # Demo data ends at today's midnight: the changelog holds expiry rows up to 7 days ahead.
    assert tenx("demo-data", "tx.parquet", "--events", "2000", "--users", "20", "--days", "2", cwd=repo).returncode == 0
    assert tenx("ingest", "tx.parquet", cwd=repo).returncode == 0
    assert tenx("backfill", "--view", "user_spend", cwd=repo).returncode == 0
    early = tenx("materialize", "--view", "user_spend", "--as-of", "2020-01-01", cwd=repo, env=env)
    assert early.returncode == 0
    assert "note: user_spend: no entity has a changelog row at or before 2020-01-01T00:00:00+00:00" in early.stdout
    assert tenx("materialize", "--view", "user_spend", cwd=repo, env=env).returncode == 0
    plan = FileRegistry(repo / ".tenx" / "registry").current()
    assert plan is not None
    view = plan.view("user_spend")
    store = open_online_store(redis_url=None, sqlite_path=repo / "data" / "online.sqlite", project=plan.project)
    try:
        raws = [raw for raw in store.read(view, list(range(1, 21))) if raw is not None]
    finally:
        store.close()
    assert raws
    now_us = time.time() * 1_000_000
    assert all(decode(view, raw)[0] <= now_us for raw in raws)


def test_plan_lists_feature_names_as_export_and_the_api_take_them(tmp_path: Path) -> None:
    tenx("init", "demo", cwd=tmp_path)
    listed = tenx("plan", "--features", cwd=tmp_path / "demo")
    assert listed.returncode == 0, listed.stderr
    assert "user_spend:count_1d" in listed.stdout
    assert "merchant_sales:sum_amount_1h" in listed.stdout
    assert "sum(amount_eur)" in listed.stdout
