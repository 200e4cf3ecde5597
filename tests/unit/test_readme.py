"""Every `tenx` command the README shows runs, in order, as a new user would run it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TENX = shutil.which("tenx", path=os.path.dirname(sys.executable)) or "tenx"


def readme_commands() -> list[str]:
    """Shell lines of the README's `bash` blocks that run tenx (or cd), comments cut."""
    text = (ROOT / "README.md").read_text()
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.splitlines():
            command = line.split("#", 1)[0].strip()
            if command.startswith(("tenx ", "cd ")):
                lines.append(command)
    return lines


def test_readme_shows_the_main_loop() -> None:
    commands = " ".join(readme_commands())
    for step in (
        "tenx quickstart",
        "tenx init",
        "tenx plan",
        "tenx apply",
        "tenx demo-data",
        "tenx ingest",
        "tenx backfill",
    ):
        assert step in commands


def test_readme_tenx_commands_run(tmp_path: Path) -> None:
    cwd = tmp_path
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("TENX_CONFIG", None)
    env.pop("TENX_REDIS_URL", None)  # the embedded store: other test repos of project `demo` share CI's Redis
    ran = []
    for line in readme_commands():
        for part in (p.strip() for p in line.split("&&")):
            words = shlex.split(part)
            if words[0] == "cd":
                cwd = (cwd / words[1]).resolve()
                continue
            if words[:2] == ["tenx", "demo-data"]:
                words = [*words[:3], "--events", "20000", "--users", "200", "--days", "3"]  # smaller, same path
            if words[:2] == ["tenx", "quickstart"]:
                words = [*words, "--events", "20000", "--users", "300", "--days", "9"]
            result = subprocess.run([TENX, *words[1:]], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
            assert result.returncode == 0, f"`{part}` failed:\n{result.stdout}\n{result.stderr}"
            ran.append(words[1])
    assert ran == ["quickstart", "init", "plan", "apply", "demo-data", "ingest", "backfill", "materialize", "verify"]
