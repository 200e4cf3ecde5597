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
        "tenx train",
        "tenx models deploy",
        "tenx predict",
    ):
        assert step in commands


def test_readme_tenx_commands_run(tmp_path: Path) -> None:
    cwd = tmp_path
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("TENX_CONFIG", None)
    env.pop("TENX_REDIS_URL", None)  # the embedded store: other test repos of project `demo` share CI's Redis
    env["TENX_MODEL_SERVER_URL"] = f"http://127.0.0.1:{free_port()}"  # `tenx predict`'s server, on a free port
    ran = []
    background: list[subprocess.Popen[str]] = []
    outputs = {}
    try:
        for line in readme_commands():
            for part in (p.strip() for p in line.split("&&")):
                words = shlex.split(part)
                if words[0] == "cd":
                    cwd = (cwd / words[1]).resolve()
                    continue
                if words[:2] == ["tenx", "demo-data"]:
                    words = [*words, "--events", "20000", "--users", "200", "--days", "3"]  # smaller, same path
                if words[:2] == ["tenx", "quickstart"]:
                    words = [*words, "--events", "20000", "--users", "300", "--days", "9"]
                if words[-1] == "&":  # a server the next lines talk to
                    port = env["TENX_MODEL_SERVER_URL"].rsplit(":", 1)[1]
                    background.append(
                        subprocess.Popen(
                            [TENX, *words[1:-1], "--port", port],
                            cwd=cwd,
                            env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            text=True,
                        )
                    )
                    ran.append(words[1])
                    continue
                result = subprocess.run(
                    [TENX, *words[1:]], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
                )
                assert result.returncode == 0, f"`{part}` failed:\n{result.stdout}\n{result.stderr}"
                ran.append(words[1])
                outputs[words[1]] = result.stdout
    finally:
        for process in background:
            process.terminate()
            process.communicate(timeout=30)  # also closes its pipe
    assert ran == [
        "quickstart", "init", "plan", "apply", "demo-data", "ingest", "backfill", "materialize", "verify",
        "export", "train", "models", "serve-models", "predict", "loadtest",
    ]  # fmt: skip
    assert "buys@1 (fp32 on cpu)" in outputs["predict"]
    assert outputs["predict"].count("found") == 2  # users 17 and 42 have features, scored


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
