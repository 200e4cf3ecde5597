"""`tenx loadtest --pipelines`: the growth verdict at its edges, the input it refuses, a
small real run of both engines at two sizes, and a stream run that loses an event
failing instead of reporting a fast figure."""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from featurestore.errors import TerminalError
from tenx.loadtest import pipelines
from tenx.loadtest.pipelines import LINEAR_TOLERANCE, growth, run_pipelines

# -- growth ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "scale", "expected"),
    [
        (10.0, 10, "linear"),
        (8.5, 10, "linear"),  # the lower edge, 10 x (1 - 0.15), is linear
        (8.49, 10, "sub-linear"),
        (11.5, 10, "linear"),  # the upper edge, 10 x (1 + 0.15), is linear
        (11.51, 10, "super-linear"),
        (1.7, 2, "linear"),
        (1.69, 2, "sub-linear"),
        (2.3, 2, "linear"),
        (2.31, 2, "super-linear"),
        (2.55, 3, "linear"),  # 3 x 0.85 rounds to 2.5500000000000003: still the edge
        (0.5, 10, "sub-linear"),  # cheaper at 10x than at 1x: fixed costs dominated 1x
        (100.0, 10, "super-linear"),
        (1.5, 1.5, "linear"),  # a float scale
    ],
)
def test_growth_at_and_around_the_edges(ratio: float, scale: float, expected: str) -> None:
    assert growth(ratio, scale) == expected


def test_growth_tolerance_is_fifteen_percent() -> None:
    assert LINEAR_TOLERANCE == 0.15


@pytest.mark.parametrize(
    ("ratio", "scale", "message"),
    [
        (0.0, 10, "growth: ratio must be a finite number above 0, got 0.0"),
        (-1.0, 10, "growth: ratio must be a finite number above 0, got -1.0"),
        (math.nan, 10, "growth: ratio must be a finite number above 0, got nan"),
        (math.inf, 10, "growth: ratio must be a finite number above 0, got inf"),
        (5.0, 1, "growth: scale must be a finite number above 1, got 1"),
        (5.0, math.inf, "growth: scale must be a finite number above 1, got inf"),
    ],
)
def test_growth_refuses_meaningless_input(ratio: float, scale: float, message: str) -> None:
    with pytest.raises(ValueError, match=r"^growth") as caught:
        growth(ratio, scale)
    assert str(caught.value) == message


# -- input run_pipelines refuses -------------------------------------------------------------


def test_too_few_events_says_how_many_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^events") as caught:
        run_pipelines(tmp_path / "work", events=999)
    assert str(caught.value) == (
        "events=999: too few to time (fixed start-up costs would dominate); pass events=1000 or more (default 200000)"
    )
    assert not (tmp_path / "work").exists()  # refused before anything was made


@pytest.mark.parametrize("scale", [1, 0, -3, True])
def test_scale_below_two_says_what_to_pass(tmp_path: Path, scale: int) -> None:
    with pytest.raises(ValueError, match=r"^scale") as caught:
        run_pipelines(tmp_path / "work", events=10_000, scale=scale)
    assert str(caught.value) == f"scale={scale!r}: compares a size with itself; pass scale=2 or more (default 10)"


def test_a_folder_of_someone_elses_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not made by") as caught:
        run_pipelines(tmp_path, events=10_000)
    assert str(caught.value) == (
        f"{tmp_path} is not empty and was not made by `tenx loadtest --pipelines`: its contents would be replaced; "
        "pass a new or empty folder"
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- real runs -------------------------------------------------------------------------------


@pytest.mark.slow
def test_both_engines_at_two_sizes(tmp_path: Path) -> None:
    said: list[str] = []
    block = run_pipelines(tmp_path / "work", events=3_000, scale=3, progress=said.append)

    assert set(block) == {"scale", "batch", "stream"}
    assert block["scale"] == 3
    for kind in ("batch", "stream"):
        part = block[kind]
        assert set(part) == {"1x", "3x", "growth", "time_ratio", "memory_ratio"}
        small, large = part["1x"], part["3x"]
        assert small["events"] == 3_000
        assert large["events"] == 3 * small["events"]
        for figures in (small, large):
            assert set(figures) == {"events", "seconds", "us_per_event", "peak_mib"}
            assert figures["seconds"] > 0
            assert figures["us_per_event"] == pytest.approx(figures["seconds"] / figures["events"] * 1e6, rel=1e-3)
            # A Python process with pandas and the engine loaded is well over 80 MiB;
            # far over 4 GiB at 9,000 events would be a leak or the wrong process.
            assert 80 < figures["peak_mib"] < 4096
        assert part["time_ratio"] == pytest.approx(large["seconds"] / small["seconds"], rel=1e-2)
        assert part["memory_ratio"] == pytest.approx(large["peak_mib"] / small["peak_mib"], rel=1e-2)
        assert part["growth"] in ("sub-linear", "linear", "super-linear")
        assert part["growth"] == growth(part["time_ratio"], 3)
    assert said[0] == "pipelines 1x: generating and ingesting 3,000 demo events (30 users, 14 days)"
    assert any(line.startswith("pipelines 3x: stream job (Bytewax, file replay) of 9,000") for line in said)
    assert (tmp_path / "work" / "3x" / "online.sqlite").exists()  # the embedded store, no Redis


@pytest.mark.slow
def test_a_stream_run_that_loses_an_event_fails(tmp_path: Path) -> None:
    plan = pipelines._compile_plan(tmp_path / "repo")
    folder = tmp_path / "1x"
    start = datetime.now(UTC) - timedelta(days=15)
    written = pipelines._in_fresh_process("1x data", pipelines._prepare, folder, plan, 2_000, 20, start, 0)
    replay = folder / "events.jsonl"
    lines = replay.read_bytes().splitlines(keepends=True)
    assert len(lines) == written == 2_000
    replay.write_bytes(b"".join(lines[:-1]))  # the input lost its last event

    with pytest.raises(TerminalError, match="did not apply every event") as caught:
        pipelines._in_fresh_process("1x stream", pipelines._stream_run, folder, plan, written, None, "tenx:test")
    assert "read 1,999 of 2,000, 0 dead letters" in str(caught.value)


def test_a_run_whose_process_dies_says_so() -> None:
    with pytest.raises(TerminalError) as caught:
        pipelines._in_fresh_process("10x batch", os._exit, 9)  # as the kernel's OOM killer would end it
    assert str(caught.value) == (
        "loadtest pipelines: the 10x batch run ended without a result (its process was killed, e.g. out of memory); "
        "pass fewer events"
    )
