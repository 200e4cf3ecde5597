"""`python -m tenx` runs the CLI."""

from tenx.cli import main

main()
