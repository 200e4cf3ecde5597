"""The loadtest report as people read it: terminal table, self-contained HTML, PNG plots."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from featurestore.errors import TerminalError
from tenx.loadtest.report import PLOT_NAMES, html_report, terminal_table, write_html, write_plot_png

COMMAND = "tenx loadtest --find-capacity --steps 1,3,5,10 <script>alert(1)</script>"
# (name, multiple, critical p50/p99/p99.9, sheddable p99, shed share, cost per 1k)
STEPS = (
    ("1x", 1.0, (3.1, 8.2, 12.0), 40.0, 0.0, 0.0021),
    ("3x", 3.0, (4.0, 23.4, 31.5), 95.0, 0.02, 0.0019),
    ("5x", 5.0, (5.2, 41.7, 55.0), 180.0, 0.21, 0.0017),
    ("10x", 10.0, (9.9, 61.3, 88.8), 420.0, 0.55, 0.0016),
)


def _figures(offered: float, p50: float, p99: float, p999: float, shed: float) -> dict[str, Any]:
    completed = offered * (1 - shed)
    return {
        "offered_per_s": offered,
        "completed_per_s": completed,
        "p50_ms": p50,
        "p99_ms": p99,
        "p999_ms": p999,
        "success": 1 - shed - 0.001,
        "shed": shed,
        "client_throttled": shed / 2,
        "over_quota": 0.0,
        "deadline": 0.0005,
        "other": 0.0005,
        "degraded": 0.01,
        "goodput_per_s": completed * 0.99,
    }


def _step(
    name: str, multiple: float, critical: tuple[float, ...], sheddable_p99: float, shed: float, cost: float
) -> dict[str, Any]:
    offered = 2000.0 * multiple
    return {
        "name": name,
        "multiple": multiple,
        "offered_per_s": offered,
        "completed_per_s": offered * (1 - shed),
        "reported": True,
        "generator": {"lag_p99_ms": 0.4, "fell_behind": False, "note": None, "cpu_pct": 35.0},
        "classes": {
            "critical": _figures(0.2 * offered, *critical, shed=0.0),
            "sheddable": _figures(0.8 * offered, critical[0] * 2, sheddable_p99, sheddable_p99 * 1.5, shed),
        },
        "all": _figures(offered, critical[0] * 2, sheddable_p99, sheddable_p99 * 1.5, shed * 0.8),
        "cost": {"per_1k_predictions": cost, "dollars": cost * offered * 30 / 1000, "predictions": int(offered * 300)},
        "server": {"shed_by_reason": {"overload": 10, "evicted": 0}, "fallbacks": 0},
        "rounds": [
            {"reported": True, "classes": {"critical": {"p99_ms": critical[1] * scale}, "sheddable": {"p99_ms": None}}}
            for scale in (0.8, 1.0, 1.3)
        ],
    }


def _timeline(ok: float, p99: float) -> dict[str, list[Any]]:
    """40 buckets of 0.5 s from 10 s into the step; Redis is down from 15 s to 20 s."""
    down = [10 <= i < 20 for i in range(40)]
    return {
        "sent": [ok] * 40,
        "throttled": [0] * 40,
        "ok": [ok * (0.3 if d else 1.0) for d in down],
        "degraded": [ok * (0.6 if d else 0.0) for d in down],
        "shed": [ok * (0.1 if d else 0.0) for d in down],
        "errors": [None if i == 5 else 0.0 for i in range(40)],
        "p99_ms": [p99 * (4 if d else 1) for d in down],
    }


def sample_report() -> dict[str, Any]:
    """A full report: 4 steps, 2 classes, a fault and the pipelines (also used by the browser test)."""
    steps = [_step(*step) for step in STEPS]
    return {
        "tenx_loadtest": 1,
        "started_at": "2026-12-07T00:10:00Z",
        "finished_at": "2026-12-07T00:14:30Z",
        "command": COMMAND,
        "machine": {"cpus": 2, "platform": "Linux-6.1-x86_64", "python": "3.11.2"},
        "target": {"kind": "model-server", "url": "http://127.0.0.1:8081", "what": "model mlp"},
        "settings": {
            "steps": [1, 3, 5, 10],
            "duration_s": 30,
            "rounds": 3,
            "warmup_s": 2,
            "mix": {"critical": 0.2, "sheddable": 0.8},
            "tenants": {"acme": 1.0},
            "entities_per_request": 10,
            "client_throttle": True,
            "slo": {
                "critical": {"p99_ms": 50, "success": 0.999},
                "default": {"p99_ms": 100, "success": 0.99},
                "sheddable": {"p99_ms": 200, "success": 0.5},
            },
            "seed": 0,
        },
        "capacity": {"per_s": 5000.0, "base_rate": 2000.0, "how": "found", "search": []},
        "steps": steps,
        "verdict": {
            "critical": {
                "p99_growth": {"1x": 1.0, "3x": 2.85, "5x": 5.09, "10x": 7.48},
                "first_broken_step": "10x",
                "why": "p99 61 ms > SLO 50 ms",
                "slo": {"p99_ms": 50, "success": 0.999},
            },
            "sheddable": {
                "p99_growth": {"1x": 1.0, "3x": 2.38, "5x": 4.5, "10x": 10.5},
                "first_broken_step": None,
                "why": None,
                "slo": {"p99_ms": 200, "success": 0.5},
            },
        },
        "overload_bar": {
            "critical_p99_3x_over_1x": 2.85,
            "p99_met": False,
            "critical_success_10x": 0.999,
            "success_met": True,
            "per_round_p99_3x_over_1x": [2.61, 3.2, None],
        },
        "cost": {
            "per_1k": {name: cost for name, *_, cost in STEPS},
            "monthly": {"1x": 120.0, "3x": 330.0, "5x": 510.0, "10x": 900.0},
            "monthly_at_1x": 120.0,
            "monthly_at_10x": 900.0,
            "growth": "sub-linear",
            "reason": "batches fill: 3.1 rows per batch at 1x, 48 at 10x; cache hits 0% -> 12%",
        },
        "fault": {
            "component": "redis",
            "at_s": 15.0,
            "down_s": 5.0,
            "step": "1x",
            "bucket_s": 0.5,
            "stopped_at_s": 15.02,
            "restarted_at_s": 20.1,
            "timeline": {
                "t_s": [10 + 0.5 * i for i in range(40)],
                "classes": {"critical": _timeline(200.0, 8.0), "sheddable": _timeline(800.0, 40.0)},
            },
            "summary": {
                "critical": {
                    "before": {"success": 1.0, "degraded": 0.0, "p99_ms": 8.0},
                    "during": {"success": 0.931, "degraded": 0.64, "errors": 0.004, "p99_ms": 33.5},
                    "after": {"success": 0.9995, "degraded": 0.0, "p99_ms": 9.1},
                    "recovery_s": 1.5,
                },
                "sheddable": {
                    "before": {"success": 0.99, "degraded": 0.0, "p99_ms": 40.0},
                    "during": {"success": 0.4, "degraded": 0.6, "p99_ms": 160.0},
                    "after": {"success": 0.99, "degraded": 0.0, "p99_ms": 42.0},
                    "recovery_s": None,
                },
            },
        },
        "pipelines": {
            "scale": 10,
            "batch": {
                "1x": {"events": 100000, "seconds": 12.0, "us_per_event": 120.0, "peak_mib": 900.0},
                "10x": {"events": 1000000, "seconds": 97.2, "us_per_event": 97.2, "peak_mib": 1800.0},
                "growth": "sub-linear",
                "time_ratio": 8.1,
                "memory_ratio": 2.0,
            },
            "stream": {
                "1x": {"events": 100000, "seconds": 20.0, "us_per_event": 200.0, "peak_mib": 300.0},
                "10x": {"events": 1000000, "seconds": 260.0, "us_per_event": 260.0, "peak_mib": 310.0},
                "growth": "super-linear",
                "time_ratio": 13.0,
                "memory_ratio": 1.03,
            },
        },
    }


def _nulled(value: Any) -> Any:
    """Every number in `value` replaced by None (booleans and strings kept)."""
    if isinstance(value, dict):
        return {key: _nulled(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nulled(item) for item in value]
    return None if isinstance(value, int | float) and not isinstance(value, bool) else value


def sparse_report() -> dict[str, Any]:
    """Nulls everywhere, no fault, no pipelines, 10x not reported, 5x without its classes."""
    report = _nulled(sample_report())
    report["tenx_loadtest"] = 1
    report["fault"] = report["pipelines"] = None
    report["steps"][3]["reported"] = False
    report["steps"][3]["generator"] = {"lag_p99_ms": 35.2, "fell_behind": True, "note": "CPU at 100%", "cpu_pct": None}
    report["steps"][2]["classes"] = None
    report["steps"][2]["all"] = None
    report["verdict"]["critical"] = None
    report["cost"] = None
    return report


def _cell(table: str, title: str, row_starts: tuple[str, ...], column: str) -> str:
    """The cell under `column` in the row whose leading cells are `row_starts`, in the
    table under the line `title` (figures are right-aligned: they end where their header ends)."""
    lines = table.splitlines()
    header = lines[lines.index(title) + 1]
    ends = {m.group(): m.end() for m in re.finditer(r"\S+(?: \S+)*", header)}
    body = lines[lines.index(title) + 2 :]
    row = next(line for line in body if re.split(r"\s{2,}", line)[: len(row_starts)] == list(row_starts))
    end = ends[column]
    return "" if row[end - 1 : end] in {"", " "} else re.split(r"\s{2,}", row[:end])[-1]


def test_the_table_shows_each_steps_figures_on_its_row() -> None:
    table = terminal_table(sample_report())
    assert _cell(table, "Steps", ("3x", "critical"), "p99 ms") == "23.4"
    assert _cell(table, "Steps", ("10x", "critical"), "p99.9 ms") == "88.8"
    assert _cell(table, "Steps", ("10x", "sheddable"), "shed %") == "55.0"
    assert _cell(table, "Steps", ("10x", "sheddable"), "throttled %") == "27.5"
    assert _cell(table, "Steps", ("1x", "critical"), "success %") == "99.90"
    assert _cell(table, "Steps", ("5x", "all"), "offered/s") == "10,000"
    assert _cell(table, "Steps", ("5x", "all"), "$/1k pred") == "$0.0017"
    assert _cell(table, "Steps", ("5x", "critical"), "$/1k pred") == ""
    assert "not judged" not in table


def test_the_verdict_names_the_first_broken_step_and_why() -> None:
    table = terminal_table(sample_report())
    assert _cell(table, "Verdict", ("critical",), "first broken") == "10x"
    assert _cell(table, "Verdict", ("critical",), "p99 ×10x") == "7.48"
    assert _cell(table, "Verdict", ("sheddable",), "first broken") == "none"
    lines = table.splitlines()
    assert "critical (SLO p99 50 ms, success 99.9%): first broke at 10x: p99 61 ms > SLO 50 ms" in lines
    assert "sheddable (SLO p99 200 ms, success 50.0%): held its SLO at every judged step" in lines
    assert "overload bar: critical p99 at 3x / 1x 2.85 (not met), critical success at 10x 99.90% (met)" in lines
    assert "  3x / 1x round by round (each pair ran side by side): 2.61, 3.20, -" in lines
    assert "duration:              30 s a step in 3 interleaved rounds, each after 2 s of warm-up" in lines


def test_a_class_without_an_slo_is_not_called_held() -> None:
    report = sample_report()
    report["verdict"]["sheddable"]["slo"] = None  # the run had no SLO for the class: it judged nothing
    table = terminal_table(report)
    assert _cell(table, "Verdict", ("sheddable",), "first broken") == "-"
    assert "sheddable (SLO p99 - ms, success -%): no SLO for the class: not judged" in table.splitlines()


def test_the_cost_fault_and_pipelines_blocks() -> None:
    table = terminal_table(sample_report())
    assert _cell(table, "Cost", ("$ per 1k predictions",), "10x") == "$0.0016"
    assert "projected monthly: $120.00 at 1x, $900.00 at 10x" in table
    assert _cell(table, "Cost", ("$ a month at this load",), "5x") == "$510.00"
    assert "growth: sub-linear: batches fill: 3.1 rows per batch at 1x, 48 at 10x; cache hits 0% -> 12%" in table
    assert "Fault: redis stopped" in table
    assert _cell(table, "Fault: redis stopped", ("critical", "during"), "success %") == "93.10"
    assert _cell(table, "Fault: redis stopped", ("critical", "after"), "recovery s") == "1.5"
    assert _cell(table, "Fault: redis stopped", ("critical", "during"), "errors %") == "0.4"
    assert _cell(table, "Fault: redis stopped", ("critical", "before"), "errors %") == "-"
    assert _cell(table, "Fault: redis stopped", ("sheddable", "after"), "recovery s") == "-"
    assert "it stopped at 15.02 s and restarted at 20.10 s" in table
    assert _cell(table, "Pipelines", ("stream", "10x"), "µs/event") == "260.0"
    assert _cell(table, "Pipelines", ("stream", "10x"), "growth") == "super-linear"
    assert _cell(table, "Pipelines", ("batch", "10x"), "time ×") == "8.10"
    assert _cell(table, "Pipelines", ("batch", "1x"), "time ×") == ""


def test_the_table_survives_nulls_and_marks_a_step_it_does_not_judge() -> None:
    table = terminal_table(sparse_report())
    assert _cell(table, "Steps", ("10x *", "critical"), "p99 ms") == "-"
    assert _cell(table, "Steps", ("5x", "critical"), "p99 ms") == "-"
    assert _cell(table, "Steps", ("5x", "all"), "offered/s") == "-"
    assert (
        "* 10x: the load generator fell behind (its lag p99 35.2 ms; CPU at 100%): figures shown, not judged" in table
    )
    assert _cell(table, "Verdict", ("critical",), "first broken") == "-"
    assert "critical (SLO p99 - ms, success -%): no verdict" in table.splitlines()
    assert "projected monthly: - at 1x, - at 10x" in table
    assert "Fault" not in table
    assert "Pipelines" not in table


def pipelines_only_report() -> dict[str, Any]:
    """What `tenx loadtest --pipelines-only` writes: no target, no steps, no cost."""
    full = sample_report()
    return {
        "tenx_loadtest": 1,
        "started_at": full["started_at"],
        "command": "tenx loadtest --pipelines-only",
        "machine": full["machine"],
        "target": None,
        "settings": {"pipeline_events": 100000, "pipeline_scale": 10, "seed": 0},
        "capacity": None,
        "steps": [],
        "verdict": {},
        "overload_bar": None,
        "cost": None,
        "fault": None,
        "pipelines": full["pipelines"],
    }


def test_a_pipelines_only_report_shows_the_pipelines_alone() -> None:
    report = pipelines_only_report()
    table = terminal_table(report)
    assert table.splitlines()[0] == "tenx loadtest: pipelines (2026-12-07T00:10:00Z)"
    assert [line for line in table.splitlines() if line and line[0].isupper()] == ["Pipelines"]
    assert _cell(table, "Pipelines", ("batch", "10x"), "peak MiB") == "1,800"
    assert "capacity" not in table
    assert re.findall(r'<figure class="plot" id="plot-(\w+)">', html_report(report)) == ["pipelines"]


def test_html_is_one_self_contained_page_with_a_plot_per_block(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(sample_report(), path)
    page = path.read_text(encoding="utf-8")
    figures = re.findall(r'<figure class="plot" id="plot-(\w+)">\s*<svg\b', page)
    assert figures == ["latency", "throughput", "cost", "fault", "pipelines"]
    assert page.count("<svg") == len(figures)
    assert not re.search(
        r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?(?!#)|@import|<link|<img""", page, re.I
    )
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<title>tenx loadtest: model mlp (2026-12-07T00:10:00Z)</title>" in page
    assert "<td>critical</td>" in page
    assert "first broke at 10x: p99 61 ms &gt; SLO 50 ms" in page
    assert "critical p99 per round" in page  # the steps ran in rounds: each round's p99 is drawn too


def test_the_latency_plot_draws_each_rounds_p99_only_when_there_were_rounds() -> None:
    report = sample_report()
    for step in report["steps"]:
        step.pop("rounds", None)
    assert "p99 per round" not in html_report(report)
    report["steps"][1]["rounds"] = [{"classes": {"critical": {"p99_ms": 20.0}}}] * 1
    assert "p99 per round" not in html_report(report)  # one round: nothing beside the pooled figure


def test_html_escapes_the_strings_in_its_tables() -> None:
    report = sample_report()
    report["steps"][0]["name"] = "<img src=x onerror=alert(1)>"
    page = html_report(report)
    assert "<img" not in page
    assert "<td>&lt;img src=x onerror=alert(1)&gt;</td>" in page


def test_html_of_a_sparse_report_draws_what_it_has() -> None:
    page = html_report(sparse_report())
    assert re.findall(r'<figure class="plot" id="plot-(\w+)">', page) == ["latency", "throughput", "cost"]
    assert page.count("<svg") == 3
    assert "no data" in page  # the latency and cost plots have no point at all


@pytest.mark.parametrize("which", PLOT_NAMES)
def test_each_plot_as_png(tmp_path: Path, which: str) -> None:
    path = tmp_path / f"{which}.png"
    write_plot_png(sample_report(), which, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_a_plot_the_report_has_no_block_for_says_so(tmp_path: Path) -> None:
    with pytest.raises(TerminalError) as raised:
        write_plot_png(sparse_report(), "fault", tmp_path / "fault.png")
    assert str(raised.value) == "plot `fault`: the report has no `fault` block (the run stopped no component)"
    with pytest.raises(TerminalError) as raised:
        write_plot_png(sample_report(), "memory", tmp_path / "memory.png")
    assert (
        str(raised.value) == "plot `memory`: no such plot; expected one of latency, throughput, cost, fault, pipelines"
    )
    assert not list(tmp_path.iterdir())


def test_a_report_of_another_version_is_refused() -> None:
    report = sample_report()
    report["tenx_loadtest"] = 2
    with pytest.raises(TerminalError) as raised:
        terminal_table(report)
    assert str(raised.value) == (
        "loadtest report: `tenx_loadtest` is 2, expected 1; "
        "pass the JSON that `tenx loadtest` wrote, with the tenx version that wrote it"
    )


def test_without_matplotlib_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: `import` raises ImportError
    with pytest.raises(TerminalError) as raised:
        write_html(sample_report(), tmp_path / "report.html")
    assert str(raised.value) == "the loadtest report's plots need matplotlib: pip install 'tenx[loadtest]'"
    assert not (tmp_path / "report.html").exists()
    assert "23.4" in terminal_table(sample_report())  # the table needs no matplotlib
