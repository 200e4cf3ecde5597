"""The docs stay true: the CLI reference is current, and every tenx command a page shows
names a real command with options it declares."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from tenx.cli import main
from tenx.docs import render

ROOT = Path(__file__).resolve().parents[2]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]


def test_cli_reference_is_current() -> None:
    assert (ROOT / "docs" / "cli.md").read_text() == render(), "run: python -m tenx.docs > docs/cli.md"


def tenx_lines() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for block in re.findall(r"```(?:bash|console)\n(.*?)```", page.read_text(), flags=re.DOTALL):
            for line in block.splitlines():
                for part in line.split("#", 1)[0].split("&&"):
                    if part.strip().startswith("tenx "):
                        found.append((page.name, part.strip()))
    return found


@pytest.mark.parametrize(("page", "line"), tenx_lines())
def test_commands_shown_exist_with_their_options(page: str, line: str) -> None:
    words = shlex.split(line)
    command = [words[1]]
    if words[1] in getattr(main, "commands", {}) and hasattr(main.commands[words[1]], "commands") and len(words) > 2:
        command.append(words[2])  # a group's subcommand: `tenx models add ...`
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, f"{page}: `{line}`: no command `{' '.join(command)}`"
    declared = set(re.findall(r"--[a-z-]+", result.output))
    used = {w.split("=")[0] for w in words[2:] if w.startswith("--")}
    assert used <= declared, f"{page}: `{line}` uses {sorted(used - declared)}"
