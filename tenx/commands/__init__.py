"""The CLI's commands that stand in modules of their own; `tenx.cli` assembles the group."""
