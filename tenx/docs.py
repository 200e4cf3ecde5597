"""Generate docs/cli.md from the CLI itself: `python -m tenx.docs > docs/cli.md`."""

from __future__ import annotations

from typing import Any

import click

from tenx.cli import main


def render() -> str:
    # The main group's context settings, given explicitly: a Context built by hand does
    # not apply them, and click caches each command's help option on first use.
    settings: dict[str, Any] = {"max_content_width": 100, "terminal_width": 100, "help_option_names": ["-h", "--help"]}
    context = click.Context(main, info_name="tenx", **settings)
    parts = [
        "# CLI reference",
        "",
        "Generated from the CLI (`python -m tenx.docs > docs/cli.md`); a test keeps it current.",
        "",
    ]
    parts += ["```", main.get_help(context).rstrip(), "```", ""]
    for name in sorted(main.list_commands(context)):
        command = main.get_command(context, name)
        assert command is not None
        sub = click.Context(command, info_name=name, parent=context, **settings)
        parts += [f"## tenx {name}", "", "```", command.get_help(sub).rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
