"""Every bench script still runs: `--smoke` (tiny sizes, JSON and data in a temp folder)
end to end, the script's own checks included, without touching bench/results/. No
timing is judged. A benchmark that breaks fails CI, not the next person who runs it
(bench/online.py once stopped at its HTTP part unnoticed: its keys lacked the project).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CAP_S = 240  # per script; a smoke run takes 5-30 s on 2 cores


@dataclass(frozen=True)
class Script:
    name: str
    services: tuple[str, ...]  # fixtures of tests/services.py: skip (or fail under CI=true) without them
    keys: frozenset[str]  # top-level keys of its JSON


# In this order: export and ingest reuse the small events and backfill batch leaves in the
# shared smoke folder (run alone, each prepares its own).
SCRIPTS = [
    Script(
        "batch",
        (),
        frozenset({"events", "users", "days", "machine", "prepare", "results", "polars_verified", "targets"}),
    ),
    Script("export", (), frozenset({"machine", "results", "targets"})),
    Script("ingest", (), frozenset({"machine", "results"})),
    Script("gpu_kernel", (), frozenset({"events", "users", "days", "device", "versions", "results"})),
    Script(
        "online",
        ("redis_url",),
        frozenset({"entities", "calls", "serve_prefix", "materialize", "lookups", "http", "targets"}),
    ),
    Script("serving", ("redis_url",), frozenset({"entities", "ceiling", "loads", "ratios", "targets"})),
    Script("overload", ("redis_url",), frozenset({"capacity", "base_rate", "runs", "figures", "targets"})),
    Script(
        "stream",
        ("redis_url", "kafka_bootstrap"),
        frozenset({"events", "events_per_s", "raw", "jobs", "profile", "freshness", "targets"}),
    ),
]
ENVIRONMENT = {"redis_url": "TENX_REDIS_URL", "kafka_bootstrap": "TENX_KAFKA_BOOTSTRAP"}


@pytest.fixture(scope="module")
def smoke_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-smoke")


@pytest.mark.slow
@pytest.mark.timeout(CAP_S + 30)
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_bench_script_runs_at_smoke_size(script: Script, smoke_folder: Path, request: pytest.FixtureRequest) -> None:
    environment = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT.values()}
    for fixture in script.services:
        environment[ENVIRONMENT[fixture]] = request.getfixturevalue(fixture)
    environment["TENX_BENCH_SMOKE_DIR"] = str(smoke_folder)
    quoted = ROOT / "bench" / "results" / f"{script.name}.json"
    before = quoted.stat().st_mtime_ns if quoted.exists() else None

    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{script.name}.py"), "--smoke"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=CAP_S,
        check=False,
    )

    assert done.returncode == 0, (
        f"bench/{script.name}.py --smoke exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    written = smoke_folder / f"{script.name}.json"
    assert f"wrote {written}" in done.stdout
    result = json.loads(written.read_text())
    assert script.keys <= set(result), f"missing keys: {sorted(script.keys - set(result))}"
    after = quoted.stat().st_mtime_ns if quoted.exists() else None
    assert after == before, f"a smoke run rewrote {quoted}"


@pytest.mark.slow
@pytest.mark.timeout(CAP_S + 30)
def test_the_batch_bench_runs_on_s3_beside_local_and_removes_its_prefix(s3_location: str, tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    from featurestore.stores.location import Location

    environment = dict(os.environ, TENX_BENCH_SMOKE_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "batch.py"), "--smoke", "--skip-baselines", "--offline", s3_location],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=CAP_S,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "offline store: local folder vs s3://" in done.stdout
    s3 = json.loads((tmp_path / "batch.json").read_text())["offline_s3"]
    assert {"export_local", "s3_raw", "s3_ingest", "s3_backfill", "export_s3"} <= set(s3)
    assert s3["s3_ingest"]["rows"] == 20_000
    location = Location.parse(s3_location)
    listed = location.filesystem().get_file_info(pafs.FileSelector(location.path, allow_not_found=True, recursive=True))
    assert [f.path for f in listed if f.type == pafs.FileType.File] == []  # its own prefix's objects are gone
