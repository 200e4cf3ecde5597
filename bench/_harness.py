"""Shared by the bench scripts: run one part in a fresh process (so its peak RSS is its
own) and read back the JSON line it prints."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Any


def own_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(script: str, args: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
