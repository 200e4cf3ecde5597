"""What a new user meets first: `make test` on a machine without the services skips
what needs them (never a crash), and installing prints no setuptools deprecation."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.processes import clean_environment

ROOT = Path(__file__).resolve().parents[1].parent


def test_tests_that_run_their_own_redis_skip_without_redis_server(tmp_path: Path) -> None:
    # No redis-server on PATH, no services configured, not CI: skipped with the hint
    # (it raised FileNotFoundError from subprocess, failing `make test`).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = clean_environment("CI", PATH=str(bin_dir))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
            "tests/integration/test_online_redis.py::test_killed_redis_gives_a_clear_error_not_a_hang",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout
    assert "redis-server is not installed; start them with" in done.stdout


def test_the_licence_is_an_spdx_string() -> None:
    # A {text = ...} table made every `make setup` print setuptools deprecation blocks.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
