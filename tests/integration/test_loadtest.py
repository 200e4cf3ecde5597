"""`tenx loadtest` as a user runs it: against `tenx serve-models` on the Redis that
scripts/services starts, the capacity found, steps 1x/3x/5x/10x, a model failed mid-step
through the server's fault file, and the HTML report opened in headless Chromium.

Figures are not asserted (a shared 2-core machine): what is asserted is what a user
relies on: every step and class reported or marked, the fault seen (degraded answers
while the model is down, none failing) and recovered from, cost per step, and a report
that renders."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.loadgen import native_binary
from tests.integration.test_loadtest_browser import browser  # noqa: F401  (the headless Chromium fixture)
from tests.model_repo import DemoRepo, build_demo_repo, with_two_models
from tests.processes import clean_environment, free_port, serving

pytestmark = pytest.mark.integration

TENX = str(Path(sys.executable).with_name("tenx"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> DemoRepo:
    project = f"loadtest_{uuid.uuid4().hex[:8]}"  # keys of its own in the shared Redis
    return with_two_models(build_demo_repo(tmp_path_factory.mktemp("loadtest") / "repo", redis_url=redis_url,
                                           project=project))  # fmt: skip


@pytest.fixture(scope="module")
def server(repo: DemoRepo, redis_url: str) -> Iterator[tuple[str, Path]]:
    fault_file = repo.root / "fault"
    command = [TENX, "serve-models", "--model", "buys", "--cpu", "--fault-file", str(fault_file)]
    with serving(
        command, cwd=repo.root, env=clean_environment(TENX_REDIS_URL=redis_url), ready_path="/health/ready"
    ) as url:
        yield url, fault_file


def loadtest(*args: str, cwd: Path, code: int = 0) -> str:
    done = subprocess.run([TENX, "loadtest", *args], cwd=cwd, env=clean_environment(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == code, output
    assert "Traceback" not in output
    return output


def test_find_capacity_steps_a_model_fault_and_a_report_that_renders(
    server: tuple[str, Path],
    repo: DemoRepo,
    tmp_path: Path,
    browser: Any,  # noqa: F811
) -> None:
    url, fault_file = server
    out = tmp_path / "report"
    output = loadtest(
        "--target", url, "--find-capacity", "--capacity-step", "1s", "--steps", "1,3,5,10", "--duration", "2s",
        "--rounds", "2", "--warmup", "0.5s",
        "--entities", "1-300", "--fault", "model@2s", "--fault-for", "3s", "--fault-file", str(fault_file),
        "--out", str(out), cwd=repo.root,
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())

    assert report["target"] == {"kind": "model-server", "url": url, "what": "buys"}
    capacity = report["capacity"]
    assert capacity["how"] == "found"
    assert capacity["per_s"] > 0
    assert capacity["base_rate"] == pytest.approx(0.4 * capacity["per_s"])
    assert [step["name"] for step in report["steps"]] == ["1x", "3x", "5x", "10x"]
    for step in report["steps"]:
        assert set(step["classes"]) == {"critical", "sheddable"}
        assert step["offered_per_s"] == pytest.approx(step["multiple"] * capacity["base_rate"], rel=0.25)
        assert step["cost"]["per_1k_predictions"] > 0  # priced from the server's cost counters
        critical = step["classes"]["critical"]
        assert critical["client_throttled"] == 0  # critical work is never throttled by the client
        assert len(step["rounds"]) == 2  # two 1 s rounds, interleaved with the other steps, pooled
        assert set(step["rounds"][0]["classes"]) == {"critical", "sheddable"}
    first = report["steps"][0]
    if first["reported"]:
        assert first["classes"]["critical"]["success"] == 1.0  # 40% of the capacity: everything answered
    assert set(report["verdict"]) == {"critical", "sheddable"}
    assert report["cost"]["growth"] in {"sub-linear", "linear", "super-linear"}
    assert report["cost"]["monthly_at_1x"] > 0
    assert report["cost"]["monthly_at_10x"] > 0

    fault = report["fault"]
    assert fault["component"] == "model"
    assert fault["stopped_at_s"] is not None
    assert fault["restarted_at_s"] - fault["stopped_at_s"] == pytest.approx(3, abs=0.5)
    assert not fault_file.exists()  # restarted: the model serves again
    for label, phases in fault["summary"].items():
        assert phases["during"]["degraded"] > 0.5, label  # the route's fallbacks answered while the model was down
        assert phases["during"]["errors"] == 0.0, label  # and nothing failed for it: no less answered than before
        # Critical work keeps its answers. A request the fallbacks answer costs more (the
        # failed model's try, then the fallback's), so the gate may shed a little more
        # sheddable work on a loaded 2-core machine: shedding, not failure (96.7% against
        # 99.9% before broke a 1-point margin once in CI).
        margin = 0.01 if label == "critical" else 0.05
        assert phases["during"]["success"] >= phases["before"]["success"] - margin, label
        assert phases["before"]["degraded"] == 0.0, label
    assert "Fault: model stopped" in output
    assert f"report: {out / 'report.html'}" in output

    from selenium.webdriver.common.by import By

    browser.get((out / "report.html").as_uri())
    figures = browser.find_elements(By.CSS_SELECTOR, "figure.plot")
    assert {figure.get_attribute("id") for figure in figures} >= {"plot-latency", "plot-throughput", "plot-fault"}
    for figure in figures:
        box = browser.execute_script("const b = arguments[0].getBBox(); return [b.width, b.height];",
                                     figure.find_element(By.TAG_NAME, "svg"))  # fmt: skip
        assert min(box) > 100, figure.get_attribute("id")
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []


def test_mistakes_get_a_clear_message_and_no_traceback(server: tuple[str, Path], repo: DemoRepo) -> None:
    url, _ = server
    output = loadtest("--target", url, "--fault", "redis", "--base-rate", "10", cwd=repo.root, code=2)
    assert "--fault 'redis': write COMPONENT@SECONDS, e.g. redis@15s" in output
    output = loadtest("--target", url, "--mix", "critical=abc", "--base-rate", "10", cwd=repo.root, code=2)
    assert "write NAME=SHARE pairs separated by commas" in output
    output = loadtest("--target", url, "--model", "nope", "--base-rate", "10", cwd=repo.root, code=2)
    assert "answered 404 to a first request" in output
    assert "unknown model `nope`" in output
    output = loadtest("--target", f"http://127.0.0.1:{free_port()}", "--model", "buys", "--base-rate", "10",
                      cwd=repo.root, code=1)  # fmt: skip
    assert "nothing answers at" in output
    assert "is `tenx serve-models` running there?" in output


def test_the_feature_api_takes_the_same_load(repo: DemoRepo, redis_url: str, tmp_path: Path) -> None:
    with serving([TENX, "serve"], cwd=repo.root, env=clean_environment(TENX_REDIS_URL=redis_url)) as url:
        out = tmp_path / "report"
        output = loadtest("--api", "features", "--target", url, "--view", "user_spend", "--base-rate", "200",
                          "--steps", "1,3", "--duration", "2s", "--rounds", "1", "--warmup", "0.5s",
                          "--entities", "1-300", "--generator-nice", "13", "--no-client-throttle",
                          "--out", str(out), cwd=repo.root)  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == {"kind": "feature-api", "url": url, "what": "user_spend"}
    for step in report["steps"]:
        assert step["all"]["success"] == 1.0  # 200 and 600 lookups/s: every one answered
        assert step["cost"] == {}  # the feature API exports no cost counters
        assert step["generator"]["nice"] == 13  # read back by the generator: below the server on a shared machine
        # Nothing throttled: the native generator sends it where it is built (`make setup` does).
        assert step["generator"]["engine"] == ("native" if native_binary() else "python")
    assert "no cost counters on the target" in output
