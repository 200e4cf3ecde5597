"""The loadtest HTML report in a real browser: headless Chromium (Debian's chromium and
chromium-driver, installed by `scripts/browser install`) draws every plot, and its
console has no errors (a blocked fetch, say, would be one: the page forbids them)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tenx.loadtest.report import write_html
from tests.unit.tenx.test_loadtest_report import sample_report

PLOTS = ("latency", "throughput", "cost", "fault", "pipelines")
INSTALL_HINT = "install them with: scripts/browser install  (apt-get install chromium chromium-driver, as root)"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    needs = {"chromium": chromium, "chromedriver": chromedriver, "selenium (pip install -e '.[dev]')": webdriver}
    if missing := [name for name, found in needs.items() if found is None]:
        lacks = f"the browser test needs {', '.join(missing)}; {INSTALL_HINT}"
        if _in_ci():
            pytest.fail(f"CI is set and {lacks}", pytrace=False)
        pytest.skip(lacks)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_report_renders_every_plot_without_console_errors(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    path = tmp_path / "report.html"
    write_html(sample_report(), path)
    browser.get(path.as_uri())

    assert browser.title == "tenx loadtest: model mlp (2026-12-07T00:10:00Z)"
    figures = browser.find_elements(By.CSS_SELECTOR, "figure.plot")
    assert [figure.get_attribute("id") for figure in figures] == [f"plot-{name}" for name in PLOTS]
    for figure in figures:
        svg = figure.find_element(By.TAG_NAME, "svg")
        box = browser.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", svg)
        drawn = browser.execute_script("const b = arguments[0].getBBox(); return [b.width, b.height];", svg)
        name = figure.get_attribute("id")
        assert svg.size["width"] > 200, name
        assert svg.size["height"] > 100, name
        assert min(box) > 100, name  # laid out on the page
        assert min(drawn) > 100, name  # and its content drawn, not an empty element
        assert figure.find_element(By.TAG_NAME, "figcaption").text
    assert "first broke at 10x" in browser.find_element(By.ID, "verdict").text
    assert "<script>alert(1)</script>" in browser.find_element(By.CSS_SELECTOR, "dl.about").text  # shown, not run

    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
