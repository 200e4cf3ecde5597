"""`scripts/gpu-check`, the one command a GPU machine runs, works before device time is
spent on it: its dry run (a CPU stand-in for CuPy) runs tests/gpu and the GPU kernel
benchmark and reports their results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    environment = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "EVENTS": "5000", "USERS": "50"}
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "--dry-run"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    suite = ElementTree.parse(tmp_path / "gpu-tests.xml").getroot().find("testsuite")
    assert suite is not None
    ran = int(suite.get("tests", 0)) - int(suite.get("skipped", 0))
    assert ran >= 5
    assert (suite.get("failures"), suite.get("errors")) == ("0", "0")
    results = json.loads((tmp_path / "gpu_kernel.json").read_text())
    assert results["device"] == "CPU stand-in (no GPU)"
    assert set(results["results"]) == {"user_spend", "merchant_sales"}
    for view in results["results"].values():
        assert view["rows"] > 0
        assert view["max_relative_difference"] == 0.0


def test_gpu_check_rejects_an_unknown_argument() -> None:
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "--bogus"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "unknown argument '--bogus'" in done.stderr
