"""`tenx quickstart` at a small size in a temporary folder: every step runs for real and
leaves what it says it made."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from tests.processes import clean_environment

TENX = shutil.which("tenx", path=os.path.dirname(sys.executable)) or "tenx"


def test_quickstart_runs_the_whole_loop(tmp_path: Path) -> None:
    env = clean_environment(COLUMNS="250")
    result = subprocess.run(
        [TENX, "quickstart", "qs", "--events", "20000", "--users", "300", "--days", "9"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in (
        "scaffold feature repo",
        "compile + apply plan",
        "generate demo transactions",
        "ingest into Delta",
        "backfill with Dask",
        "materialize online store",
        "stream recent events (Bytewax)",
        "ingest + backfill the new slice",
        "export training set",
        "train a model",
        "fetch online features",
        "verify online == offline",
        "deploy + predict (model server)",
    ):
        assert step in out, step
    assert "online == offline          │        yes" in out or "online == offline" in out
    assert "0 mismatches" in out
    # The quickstart ends with a prediction from the model server, with its features' freshness.
    assert "Prediction from the model server (buys@1, fp32 on cpu):" in out
    assert out.count("P(buys within 6 h) = 0.") == 3
    assert "(features found," in out
    assert "replayed from a file (no Kafka configured: set TENX_KAFKA_BOOTSTRAP to go through Kafka)" in out
    repo = tmp_path / "qs"
    training = pq.read_table(repo / "data" / "training.parquet")
    assert training.num_rows == 20_000
    assert (repo / "data" / "training.parquet.manifest.json").exists()
    assert (repo / "data" / "online.sqlite").exists()
    assert list((repo / "data" / "offline" / "features").iterdir())
    dead = list((repo / "data" / "stream").glob("dead_letters.*.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in dead) > 0  # malformed records were caught

    verified = subprocess.run([TENX, "verify"], cwd=repo, capture_output=True, text=True, env=env, timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "user_spend: ok" in verified.stdout


def test_quickstart_runs_again_in_its_folder_and_refuses_other_repos(tmp_path: Path) -> None:
    env = clean_environment(COLUMNS="200")

    def quickstart(folder: str) -> subprocess.CompletedProcess[str]:
        command = [TENX, "quickstart", folder, "--events", "5000", "--users", "50", "--days", "8"]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)

    assert quickstart("qs").returncode == 0
    again = quickstart("qs")  # a second run starts clean: its events would overlap the first's
    assert again.returncode == 0, again.stdout + again.stderr
    assert "again: cleared" in again.stdout
    assert "0 mismatches" in again.stdout
    subprocess.run([TENX, "init", "mine"], cwd=tmp_path, env=env, check=True, capture_output=True)
    refused = quickstart("mine")
    assert refused.returncode == 2
    assert "is not empty and was not made by `tenx quickstart`" in refused.stderr
    assert not (tmp_path / "mine" / "data").exists()
