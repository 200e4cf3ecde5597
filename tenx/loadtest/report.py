"""The `tenx loadtest` report as people read it: a terminal table, one self-contained HTML
page with plots, and single plots as PNG (for a README).

Each function is a pure function of the report dict (`"tenx_loadtest": 1`) that the run
writes as JSON. Every figure in it may be null (not measured, not applicable): it shows
as "-" in a table and as a missing point in a plot, never as an error. A step whose
`reported` is false (the load generator fell behind) is marked `*` and not judged.

matplotlib is an optional extra (`pip install 'tenx[loadtest]'`), imported when a plot
is drawn; the terminal table needs nothing beyond the standard library.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurestore.errors import TerminalError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

REPORT_VERSION = 1
MATPLOTLIB_HINT = "the loadtest report's plots need matplotlib: pip install 'tenx[loadtest]'"
NOT_JUDGED = "*"
PHASES = ("before", "during", "after")
PIPELINES = ("batch", "stream")

Report = Mapping[str, Any]


# -- reading the report: every level may be missing or null --------------------------------


def _dig(data: Any, *keys: str) -> Any:
    """`data[key][key]...`, or None where a level is missing or null."""
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _steps(report: Report) -> list[Mapping[str, Any]]:
    return [step for step in report.get("steps") or () if isinstance(step, Mapping)]


def _step_names(report: Report) -> list[str]:
    return [str(step.get("name")) for step in _steps(report)]


def _class_names(report: Report) -> list[str]:
    """The priority classes in the order the run met them (steps first, then verdicts)."""
    names = [name for step in _steps(report) for name in step.get("classes") or {}]
    return list(dict.fromkeys([*names, *(report.get("verdict") or {})]))


def _judged(step: Mapping[str, Any]) -> bool:
    return step.get("reported") is not False


def _check_version(report: Report) -> None:
    version = report.get("tenx_loadtest")
    if version != REPORT_VERSION:
        raise TerminalError(
            f"loadtest report: `tenx_loadtest` is {version!r}, expected {REPORT_VERSION}; "
            "pass the JSON that `tenx loadtest` wrote, with the tenx version that wrote it"
        )


# -- figures as text ------------------------------------------------------------------------


def _number(value: Any, form: str = "{:.1f}") -> str:
    number = _finite(value)
    return "-" if number is None else form.format(number)


def _rate(value: Any) -> str:
    return _number(value, "{:,.0f}")


def _percent(value: Any, digits: int = 1) -> str:
    share = _finite(value)
    return "-" if share is None else f"{100 * share:.{digits}f}"


def _success(value: Any) -> str:
    return _percent(value, 2)


def _dollars(value: Any, form: str = "{:,.2f}") -> str:
    number = _finite(value)
    return "-" if number is None else "$" + form.format(number)


def _per_1k(value: Any) -> str:
    return _dollars(value, "{:.4g}")


def _plain(value: Any) -> str:
    return _number(value, "{:g}")


def _ratio(value: Any) -> str:
    return _number(value, "{:.2f}")


def _multiple(value: Any) -> str:
    return f"{_plain(value)}x"


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _joined(parts: Sequence[str | None], separator: str = ", ") -> str:
    return separator.join(part for part in parts if part) or "-"


def _shares(mapping: Any) -> str:
    """`{"critical": 0.2, "sheddable": 0.8}` as `critical 20%, sheddable 80%`."""
    return _joined([f"{key} {_percent(value, 0)}%" for key, value in (mapping or {}).items()])


# -- the report as sections: the same tables in the terminal and in HTML ------------------


@dataclass(frozen=True)
class _Section:
    """One block of the report: a table (first row: its header) and notes under it; the
    HTML page shows the section's plots above its table."""

    id: str
    title: str
    rows: list[tuple[str, ...]]
    notes: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    left: int = 1  # leading columns of labels, aligned left; figures align right


# (header, key, format) of a class's figures, and of the "all" row
_CLASS_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("offered/s", "offered_per_s", _rate),
    ("completed/s", "completed_per_s", _rate),
    ("p50 ms", "p50_ms", _number),
    ("p99 ms", "p99_ms", _number),
    ("p99.9 ms", "p999_ms", _number),
    ("success %", "success", _success),
    ("shed %", "shed", _percent),
    ("throttled %", "client_throttled", _percent),
    ("429 %", "over_quota", _percent),
    ("504 %", "deadline", _percent),
    ("other %", "other", _percent),
    ("degraded %", "degraded", _percent),
    ("goodput/s", "goodput_per_s", _rate),
)


def _class_cells(figures: Any) -> tuple[str, ...]:
    return tuple(form(_dig(figures, key)) for _, key, form in _CLASS_COLUMNS)


def _step_label(step: Mapping[str, Any]) -> str:
    name = _text(step.get("name"))
    return name if _judged(step) else f"{name} {NOT_JUDGED}"


def _steps_section(report: Report) -> _Section:
    rows: list[tuple[str, ...]] = [("step", "class", *(header for header, _, _ in _CLASS_COLUMNS), "$/1k pred")]
    notes: list[str] = []
    for step in _steps(report):
        label = _step_label(step)
        rows += [(label, name, *_class_cells(_dig(step, "classes", name)), "") for name in _class_names(report)]
        # The step's own offered and completed rates: the "all" block repeats them.
        total = {**(step.get("all") or {}), **{key: step.get(key) for key in ("offered_per_s", "completed_per_s")}}
        rows.append((label, "all", *_class_cells(total), _per_1k(_dig(step, "cost", "per_1k_predictions"))))
        if not _judged(step):
            lag = _number(_dig(step, "generator", "lag_p99_ms"))
            note = _dig(step, "generator", "note")
            notes.append(
                f"{NOT_JUDGED} {_text(step.get('name'))}: the load generator fell behind "
                f"(its lag p99 {lag} ms{'; ' + note if note else ''}): figures shown, not judged"
            )
    return _Section("steps", "Steps", rows, tuple(notes), plots=("latency", "throughput"), left=2)


def _slo(report: Report, name: str) -> Any:
    """The SLO the class was judged by: its verdict's, else the run's settings for it.
    ("default" is a priority class of its own, not a fallback for the others.)"""
    verdict = _dig(report, "verdict", name)
    if isinstance(verdict, Mapping) and "slo" in verdict:
        return verdict["slo"]
    return _dig(report, "settings", "slo", name)


def _met(value: Any) -> str:
    return "-" if value is None else "met" if value else "not met"


def _verdict(report: Report, name: str) -> tuple[str, str]:
    """The class's first broken step (a table cell) and its verdict in words:
    `critical (SLO p99 50 ms, success 99.9%): first broke at 10x: p99 61 ms > SLO 50 ms`."""
    slo = _slo(report, name)
    verdict = _dig(report, "verdict", name)
    broken, why = _dig(verdict, "first_broken_step"), _dig(verdict, "why")
    if verdict is None:
        cell, outcome = "-", "no verdict"
    elif slo is None:
        cell, outcome = "-", "no SLO for the class: not judged"
    elif broken is None:  # null: no judged step broke it
        cell, outcome = "none", "held its SLO at every judged step" + (f" ({why})" if why else "")
    else:
        cell, outcome = str(broken), f"first broke at {broken}: {_text(why)}"
    held_to = f"SLO p99 {_plain(_dig(slo, 'p99_ms'))} ms, success {_percent(_dig(slo, 'success'))}%"
    return cell, f"{name} ({held_to}): {outcome}"


def _verdict_section(report: Report) -> _Section:
    names = list(dict.fromkeys(_step_names(report)))
    for verdict in (report.get("verdict") or {}).values():
        names += [name for name in _dig(verdict, "p99_growth") or {} if name not in names]
    rows: list[tuple[str, ...]] = [("class", *(f"p99 ×{name}" for name in names), "first broken")]
    notes = [f"p99 ×step: the class's p99 at the step as a multiple of its p99{f' at {names[0]}' if names else ''}"]
    for name in _class_names(report):
        growth = (_ratio(_dig(report, "verdict", name, "p99_growth", step)) for step in names)
        broken, line = _verdict(report, name)
        rows.append((name, *growth, broken))
        notes.append(line)
    if bar := report.get("overload_bar"):
        notes.append(
            f"overload bar: critical p99 at 3x / 1x {_ratio(bar.get('critical_p99_3x_over_1x'))} "
            f"({_met(bar.get('p99_met'))}), critical success at 10x {_success(bar.get('critical_success_10x'))}% "
            f"({_met(bar.get('success_met'))})"
        )
        if rounds := [_ratio(ratio) for ratio in bar.get("per_round_p99_3x_over_1x") or ()]:
            notes.append(f"  3x / 1x round by round (each pair ran side by side): {', '.join(rounds)}")
    return _Section("verdict", "Verdict", rows, tuple(notes))


def _cost_section(report: Report) -> _Section:
    steps = _steps(report)
    cost = report.get("cost") or {}
    rows: list[tuple[str, ...]] = [
        ("", *_step_names(report)),
        ("$ per 1k predictions", *(_per_1k(_dig(cost, "per_1k", str(step.get("name")))) for step in steps)),
        ("predictions", *(_rate(_dig(step, "cost", "predictions")) for step in steps)),
        ("$ in the step", *(_dollars(_dig(step, "cost", "dollars"), "{:.4g}") for step in steps)),
        ("$ a month at this load", *(_dollars(_dig(cost, "monthly", str(step.get("name")))) for step in steps)),
    ]
    notes = (
        f"projected monthly: {_dollars(cost.get('monthly_at_1x'))} at 1x, "
        f"{_dollars(cost.get('monthly_at_10x'))} at 10x",
        f"growth: {_text(cost.get('growth'))}{': ' + cost['reason'] if cost.get('reason') else ''}",
    )
    return _Section("cost", "Cost", rows, notes, plots=("cost",))


def _fault_section(fault: Mapping[str, Any]) -> _Section:
    rows: list[tuple[str, ...]] = [("class", "phase", "success %", "degraded %", "errors %", "p99 ms", "recovery s")]
    for name, summary in (fault.get("summary") or {}).items():
        for phase in PHASES:
            figures = _dig(summary, phase)
            recovery = _number(_dig(summary, "recovery_s")) if phase == PHASES[-1] else ""
            rows.append(
                (
                    name,
                    phase,
                    _success(_dig(figures, "success")),
                    _percent(_dig(figures, "degraded")),
                    _percent(_dig(figures, "errors")),
                    _number(_dig(figures, "p99_ms")),
                    recovery,
                )
            )
    component = _text(fault.get("component"))
    notes = (
        f"{component} was to stop {_number(fault.get('at_s'))} s into step {_text(fault.get('step'))} "
        f"for {_number(fault.get('down_s'))} s; it stopped at {_number(fault.get('stopped_at_s'), '{:.2f}')} s "
        f"and restarted at {_number(fault.get('restarted_at_s'), '{:.2f}')} s",
        "p99 ms: the worst bucket's; recovery s: from the restart until the class is back to its figures "
        "before the stop (-: not within the step)",
    )
    return _Section("fault", f"Fault: {component} stopped", rows, notes, plots=("fault",), left=2)


def _sizes(pipeline: Any) -> list[str]:
    """A pipeline's run sizes ("1x", "10x"): its entries that hold figures."""
    return [key for key, value in (pipeline or {}).items() if isinstance(value, Mapping)]


def _pipelines_section(pipelines: Mapping[str, Any]) -> _Section:
    rows: list[tuple[str, ...]] = [
        ("pipeline", "events at", "events", "seconds", "µs/event", "peak MiB", "time ×", "memory ×", "growth")
    ]
    for kind in PIPELINES:
        pipeline = pipelines.get(kind)
        sizes = _sizes(pipeline)
        for size in sizes:
            figures = _dig(pipeline, size)
            last = size == sizes[-1]
            rows.append(
                (
                    kind,
                    size,
                    _rate(_dig(figures, "events")),
                    _number(_dig(figures, "seconds"), "{:.2f}"),
                    _number(_dig(figures, "us_per_event")),
                    _rate(_dig(figures, "peak_mib")),
                    _ratio(_dig(pipeline, "time_ratio")) if last else "",
                    _ratio(_dig(pipeline, "memory_ratio")) if last else "",
                    _text(_dig(pipeline, "growth")) if last else "",
                )
            )
    scale = _plain(pipelines.get("scale"))
    notes = (f"time ×, memory ×: the {scale}x run over the 1x run; linear time is ×{scale}",)
    return _Section("pipelines", "Pipelines", rows, notes, plots=("pipelines",), left=2)


def _sections(report: Report) -> list[_Section]:
    sections = []
    if _steps(report):  # none in a pipelines-only run
        sections += [_steps_section(report), _verdict_section(report), _cost_section(report)]
    if report.get("fault"):
        sections.append(_fault_section(report["fault"]))
    if report.get("pipelines"):
        sections.append(_pipelines_section(report["pipelines"]))
    return sections


def _title(report: Report) -> str:
    target = report.get("target") or {}
    subject = target.get("what") or target.get("kind") or ("pipelines" if report.get("pipelines") else None)
    return f"tenx loadtest: {_text(subject)} ({_text(report.get('started_at'))})"


def _about(report: Report) -> list[tuple[str, str]]:
    """What ran, against what, how: (label, value) lines above the tables; the load's
    lines only where the run put load on a target (not in a pipelines-only run)."""
    target, machine, capacity = (report.get(key) or {} for key in ("target", "machine", "capacity"))
    settings = report.get("settings") or {}
    cpus = f"{_text(machine.get('cpus'))} CPUs"
    lines = [
        ("command", _text(report.get("command"))),
        ("ran", _joined([report.get("started_at"), report.get("finished_at")], " to ")),
        ("machine", _joined([cpus, machine.get("platform"), f"Python {_text(machine.get('python'))}"])),
    ]
    if target:
        lines.append(("target", _joined([target.get("kind"), target.get("url"), target.get("what")], " ")))
    if capacity:
        rates = f"{_rate(capacity.get('per_s'))}/s ({_text(capacity.get('how'))})"
        lines.append(("capacity", f"{rates}, 1x = {_rate(capacity.get('base_rate'))}/s"))
    if "steps" in settings:
        throttle = settings.get("client_throttle")
        duration, warmup = _plain(settings.get("duration_s")), _plain(settings.get("warmup_s"))
        rounds = settings.get("rounds")
        spread = (
            f" in {rounds} interleaved rounds, each after {warmup} s of warm-up"
            if isinstance(rounds, int) and rounds > 1
            else f", after {warmup} s of warm-up"
        )
        lines += [
            ("steps", _joined([_multiple(step) for step in settings.get("steps") or ()])),
            ("duration", f"{duration} s a step{spread}"),
            ("mix", _shares(settings.get("mix"))),
            ("tenants", _shares(settings.get("tenants"))),
            ("entities per request", _text(settings.get("entities_per_request"))),
            ("client throttle", "-" if throttle is None else "on" if throttle else "off"),
        ]
    lines.append(("seed", _text(settings.get("seed"))))
    return lines


# -- terminal -------------------------------------------------------------------------------


def _text_table(rows: Sequence[tuple[str, ...]], *, left: int = 1) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def terminal_table(report: Report) -> str:
    """The report as plain text for a terminal: what ran, then per step and class the
    rates, latencies and outcomes, the verdict per class, cost, the fault and pipelines.

    >>> print(terminal_table(json.loads(Path("loadtest.json").read_text())))  # doctest: +SKIP
    """
    _check_version(report)
    about = _text_table([(f"{label}:", value) for label, value in _about(report)], left=2)
    blocks = [f"{_title(report)}\n{about}"]
    blocks += ["\n".join([s.title, _text_table(s.rows, left=s.left), *s.notes]) for s in _sections(report)]
    return "\n\n".join(blocks) + "\n"


# -- plots ----------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas: no pyplot, so nothing is shared between calls."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise TerminalError(MATPLOTLIB_HINT) from error
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _line(axes: Axes, xs: Sequence[Any], ys: Sequence[Any], *, positive: bool = False, **style: Any) -> bool:
    """Plot the points where both figures are there (and above 0 on a log axis);
    False when there was none."""
    points = [
        (x, y) for x, y in zip(map(_finite, xs), map(_finite, ys), strict=False) if x is not None and y is not None
    ]
    points = [(x, y) for x, y in points if y > 0 or not positive]
    if points:
        axes.plot(*zip(*points, strict=True), **style)
    return bool(points)


def _scaled(values: Any, factor: float) -> list[float | None]:
    return [None if (number := _finite(value)) is None else number * factor for value in values or ()]


def _legend(axes: Axes) -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")


def _no_data(axes: Axes) -> None:
    axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", va="center", color="grey")


def _log_or_empty(axes: Axes, drawn: bool) -> None:
    if drawn:
        axes.set_yscale("log")
    else:
        _no_data(axes)


def _mark_not_judged(axes: Axes, xs: Sequence[Any], steps: Sequence[Mapping[str, Any]]) -> None:
    label = "generator fell behind: not judged"
    for x, step in zip(xs, steps, strict=True):
        if not _judged(step) and (where := _finite(x)) is not None:
            axes.axvline(where, color="grey", alpha=0.3, linewidth=8, label=label)
            label = "_"  # one legend entry


def _step_axis(axes: Axes, steps: Sequence[Mapping[str, Any]]) -> list[int]:
    positions = list(range(len(steps)))
    axes.set_xticks(positions, [_step_label(step) for step in steps])
    axes.set_xlim(-0.5, max(len(steps), 1) - 0.5)
    axes.set_xlabel("load step")
    return positions


def _draw_latency(figure: Figure, report: Report) -> None:
    axes = figure.subplots()
    steps = _steps(report)
    positions = _step_axis(axes, steps)
    drawn = False
    for index, name in enumerate(_class_names(report)):
        color = f"C{index}"
        for key, linestyle in (("p99_ms", "-"), ("p50_ms", "--")):
            values = [_dig(step, "classes", name, key) for step in steps]
            label = f"{name} {key.removesuffix('_ms')}"
            drawn |= _line(
                axes, positions, values, positive=True, color=color, linestyle=linestyle, marker="o", label=label
            )
        _round_points(axes, positions, steps, name, color)
        if (slo := _finite(_dig(_slo(report, name), "p99_ms"))) is not None:
            axes.axhline(slo, color=color, linestyle=":", linewidth=1, label=f"{name} SLO p99")
    _log_or_empty(axes, drawn)
    _mark_not_judged(axes, positions, steps)
    axes.set(ylabel="ms", title="Latency per class")
    _legend(axes)


def _round_points(
    axes: Axes, positions: Sequence[int], steps: Sequence[Mapping[str, Any]], name: str, color: str
) -> None:
    """Each round's p99 of the class as a hollow point beside the step's pooled p99, when
    the steps ran in rounds: how far the machine moved shows as their spread."""
    xs: list[float] = []
    ys: list[float] = []
    for x, step in zip(positions, steps, strict=True):
        rounds = step.get("rounds") or []
        if len(rounds) < 2:
            continue
        for number, one in enumerate(rounds):
            if (y := _finite(_dig(one, "classes", name, "p99_ms"))) is not None and y > 0:
                xs.append(x + 0.06 * (number - (len(rounds) - 1) / 2))
                ys.append(y)
    if xs:
        axes.scatter(xs, ys, s=14, facecolors="none", edgecolors=color, linewidths=0.8, label=f"{name} p99 per round")


def _draw_throughput(figure: Figure, report: Report) -> None:
    from matplotlib.ticker import PercentFormatter

    rates, shares = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    steps = _steps(report)
    offered = [step.get("offered_per_s") for step in steps]
    _line(rates, offered, offered, color="grey", linestyle=":", label="offered")
    _line(rates, offered, [step.get("completed_per_s") for step in steps], marker="o", label="completed")
    _line(rates, offered, [_dig(step, "all", "goodput_per_s") for step in steps], marker="o", label="goodput")
    for x, step in zip(offered, steps, strict=True):
        if (where := _finite(x)) is not None:
            rates.annotate(
                _step_label(step),
                (where, where),
                textcoords="offset points",
                xytext=(-4, 6),
                ha="right",
                fontsize="small",
            )
    for key, label in (("shed", "shed (503)"), ("client_throttled", "throttled by the client")):
        _line(shares, offered, [_dig(step, "all", key) for step in steps], marker="o", label=label)
    shares.yaxis.set_major_formatter(PercentFormatter(1.0))
    for axes in (rates, shares):
        _mark_not_judged(axes, offered, steps)
        _legend(axes)
    rates.set(ylabel="requests/s", title="Throughput")
    shares.set(xlabel="offered requests/s", ylabel="share of offered")


def _draw_cost(figure: Figure, report: Report) -> None:
    axes = figure.subplots()
    steps = _steps(report)
    positions = _step_axis(axes, steps)
    per_1k = _dig(report, "cost", "per_1k")
    if not _line(axes, positions, [_dig(per_1k, name) for name in _step_names(report)], marker="o"):
        _no_data(axes)
    axes.set_ylim(bottom=0)
    _mark_not_judged(axes, positions, steps)
    axes.set(ylabel="$ per 1k predictions", title=f"Cost per 1k predictions ({_text(_dig(report, 'cost', 'growth'))})")
    _legend(axes)


def _draw_fault(figure: Figure, report: Report) -> None:
    fault = report["fault"]
    times = _dig(fault, "timeline", "t_s") or []
    bucket = _finite(fault.get("bucket_s"))
    factor, unit = (1 / bucket, "/s") if bucket else (1.0, " per bucket")
    served, trouble, latency = figure.subplots(3, 1, sharex=True)
    drawn = False
    for index, (name, series) in enumerate((_dig(fault, "timeline", "classes") or {}).items()):
        color = f"C{index}"
        _line(served, times, _scaled(_dig(series, "ok"), factor), color=color, label=f"{name} ok")
        for key, linestyle in (("degraded", "-"), ("shed", "--"), ("errors", ":")):
            _line(
                trouble,
                times,
                _scaled(_dig(series, key), factor),
                color=color,
                linestyle=linestyle,
                label=f"{name} {key}",
            )
        drawn |= _line(latency, times, _dig(series, "p99_ms") or [], positive=True, color=color, label=f"{name} p99")
    _log_or_empty(latency, drawn)
    stopped, restarted = _finite(fault.get("stopped_at_s")), _finite(fault.get("restarted_at_s"))
    for axes in (served, trouble, latency):
        if stopped is not None:  # down until the restart, or to the end where it never came back
            until = (
                restarted
                if restarted is not None
                else max([t for t in map(_finite, times) if t is not None], default=stopped)
            )
            axes.axvspan(stopped, until, color="red", alpha=0.12, label=f"{_text(fault.get('component'))} down")
        _legend(axes)
    served.set(ylabel=f"ok{unit}", title=f"Fault in step {_text(fault.get('step'))}")
    trouble.set(ylabel=f"answers{unit}")
    latency.set(ylabel="p99 ms", xlabel="seconds into the step")


def _draw_pipelines(figure: Figure, report: Report) -> None:
    pipelines = report["pipelines"]
    kinds = [kind for kind in PIPELINES if isinstance(pipelines.get(kind), Mapping)]
    sizes = list(dict.fromkeys(size for kind in kinds for size in _sizes(pipelines[kind])))
    width = 0.8 / max(len(sizes), 1)
    labels = [
        f"{kind}\n{_text(_dig(pipelines, kind, 'growth'))}, time ×{_ratio(_dig(pipelines, kind, 'time_ratio'))}"
        for kind in kinds
    ]
    time_axes, memory_axes = figure.subplots(1, 2)
    for axes, key, title in (
        (time_axes, "us_per_event", "µs per event"),
        (memory_axes, "peak_mib", "peak memory, MiB"),
    ):
        for index, size in enumerate(sizes):
            offset = (index - (len(sizes) - 1) / 2) * width
            heights = [_dig(pipelines, kind, size, key) for kind in kinds]
            shown = [(x + offset, height) for x, height in enumerate(map(_finite, heights)) if height is not None]
            axes.bar([x for x, _ in shown], [height for _, height in shown], width, color=f"C{index}", label=size)
        axes.set_xticks(range(len(kinds)), labels)
        axes.set_title(title)
        _legend(axes)


@dataclass(frozen=True)
class _Plot:
    draw: Callable[[Figure, Report], None]
    size: tuple[float, float]  # inches
    caption: str
    needs: str | None = None  # the report block it draws, absent from some runs
    missing: str = ""  # why that block may be absent


_PLOTS: dict[str, _Plot] = {
    "latency": _Plot(
        _draw_latency,
        (8, 4.5),
        "p50 (dashed) and p99 (solid) per class at each load step, log scale; hollow points: each round's p99; "
        "dotted: the class's p99 SLO",
    ),
    "throughput": _Plot(
        _draw_throughput,
        (8, 6),
        "Completed and goodput (2xx within the deadline) against the offered rate; "
        "below, the share shed by the server (503) and throttled by the client",
    ),
    "cost": _Plot(_draw_cost, (8, 4), "Cost per 1,000 predictions at each load step"),
    "fault": _Plot(
        _draw_fault,
        (8, 8),
        "Around the fault, per class: answers per second that were ok, degraded, shed or "
        "errors, and the p99; shaded: from the stop to the restart",
        "fault",
        "the run stopped no component",
    ),
    "pipelines": _Plot(
        _draw_pipelines,
        (9, 4),
        "Batch backfill and stream job: time per event and peak memory, 1x against the larger run",
        "pipelines",
        "the run did not time the pipelines",
    ),
}
PLOT_NAMES = tuple(_PLOTS)


def _plot_figure(report: Report, which: str) -> Figure:
    plot = _PLOTS.get(which)
    if plot is None:
        raise TerminalError(f"plot `{which}`: no such plot; expected one of {', '.join(PLOT_NAMES)}")
    if plot.needs is not None and not report.get(plot.needs):
        raise TerminalError(f"plot `{which}`: the report has no `{plot.needs}` block ({plot.missing})")
    figure = _new_figure(*plot.size)
    plot.draw(figure, report)
    return figure


def _svg(figure: Figure) -> str:
    """The figure as an inline `<svg>` element: text as text (no glyph ids that would
    clash between the page's plots), no XML prolog, no creator or date."""
    from matplotlib import rc_context

    buffer = io.StringIO()
    with rc_context({"svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", metadata={"Creator": None, "Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def write_plot_png(report: Report, which: str, path: Path) -> None:
    """Write one plot (`latency`, `throughput`, `cost`, `fault` or `pipelines`) as a PNG.

    >>> write_plot_png(report, "latency", Path("docs/loadtest-latency.png"))  # doctest: +SKIP
    """
    _check_version(report)
    _plot_figure(report, which).savefig(path, format="png", dpi=150)


# -- HTML -----------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1d1d1f; max-width: 1200px; margin: 2rem auto; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2.5rem; border-bottom: 1px solid #ccc; }
dl.about { display: grid; grid-template-columns: max-content auto; gap: .15rem 1rem; }
dl.about dt { font-weight: 600; } dl.about dd { margin: 0; font-family: ui-monospace, monospace; }
div.table { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: .5rem 0; }
th, td { padding: .2rem .55rem; border-bottom: 1px solid #e3e3e3; text-align: left; white-space: nowrap; }
th { background: #f5f5f7; } .figure { text-align: right; }
p.note { color: #555; margin: .2rem 0; }
figure.plot { margin: 1rem 0; } figure.plot svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: .9rem; }
"""
# Nothing is fetched: the page holds its styles and plots, and says so to the browser.
_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _html_table(rows: Sequence[tuple[str, ...]], *, left: int) -> str:
    def cells(row: tuple[str, ...], tag: str) -> str:
        return "".join(
            f"<{tag}>{escape(cell)}</{tag}>" if i < left else f'<{tag} class="figure">{escape(cell)}</{tag}>'
            for i, cell in enumerate(row)
        )

    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows[1:])
    head = f"<thead><tr>{cells(rows[0], 'th')}</tr></thead>"
    return f'<div class="table"><table>{head}<tbody>{body}</tbody></table></div>'  # the div scrolls a wide table


def _html_figure(report: Report, which: str) -> str:
    caption = escape(_PLOTS[which].caption)
    svg = _svg(_plot_figure(report, which))
    return f'<figure class="plot" id="plot-{which}">{svg}<figcaption>{caption}</figcaption></figure>'


def _html_section(report: Report, section: _Section) -> str:
    parts = [f'<section id="{section.id}"><h2>{escape(section.title)}</h2>']
    parts += [_html_figure(report, which) for which in section.plots]
    parts.append(_html_table(section.rows, left=section.left))
    parts += [f'<p class="note">{escape(note)}</p>' for note in section.notes]
    return "\n".join([*parts, "</section>"])


def html_report(report: Report) -> str:
    """The report as one self-contained HTML page: the tables, the verdicts and the
    plots as inline SVG; no scripts, and nothing fetched from anywhere."""
    _check_version(report)
    title = escape(_title(report))
    about = "".join(f"<dt>{escape(label)}</dt><dd>{escape(value)}</dd>" for label, value in _about(report))
    sections = "\n".join(_html_section(report, section) for section in _sections(report))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_POLICY}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{_CSS}</style></head>\n"
        f'<body><main><h1>{title}</h1><dl class="about">{about}</dl>\n{sections}\n</main></body></html>\n'
    )


def write_html(report: Report, path: Path) -> None:
    """Write `html_report(report)` to `path` (UTF-8)."""
    path.write_text(html_report(report), encoding="utf-8")
