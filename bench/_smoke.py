"""What `--smoke` means for every bench script: tiny sizes, and the JSON (and any data)
in a temp folder, never bench/results/ (whose figures the README quotes). A smoke run
checks that the script still runs end to end and that its own checks pass; its timings
mean nothing. CI runs every script this way (tests/integration/test_bench_smoke.py)."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

FOLDER_VARIABLE = "TENX_BENCH_SMOKE_DIR"
HELP = (
    "Tiny sizes, JSON and data under $TENX_BENCH_SMOKE_DIR (default: <tmp>/tenx-bench-smoke), never "
    "bench/results/: checks the script and its checks still work; the timings mean nothing. "
    "Flags given beside it still win."
)


def folder() -> Path:
    """Where smoke runs write: $TENX_BENCH_SMOKE_DIR, else <tmp>/tenx-bench-smoke (created)."""
    path = Path(os.environ.get(FOLDER_VARIABLE) or Path(tempfile.gettempdir()) / "tenx-bench-smoke")
    path.mkdir(parents=True, exist_ok=True)
    return path


def parse_arguments(
    parser: argparse.ArgumentParser, smoke_defaults: Callable[[Path], dict[str, Any]]
) -> argparse.Namespace:
    """The command line, with `--smoke` added. With `--smoke`, `smoke_defaults(folder())`
    replaces the parser's defaults (sizes, --out, data folders); flags given explicitly
    still win. Without it, nothing is created."""
    parser.add_argument("--smoke", action="store_true", help=HELP)
    args = parser.parse_args()
    if args.smoke:
        defaults = smoke_defaults(folder())
        unknown = sorted(set(defaults) - {action.dest for action in parser._actions})
        if unknown:  # a typo here would silently leave a full-size default in place
            raise SystemExit(f"smoke defaults name no option of {parser.prog}: {', '.join(unknown)}")
        parser.set_defaults(**defaults)
        args = parser.parse_args()
    return args
