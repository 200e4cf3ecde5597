"""Errors raised by the schemas package, and the root of every tenx error.

    TenxError                  base of every error tenx raises on purpose
    └── SchemaError            a schema is malformed or a type is not supported (terminal)
        └── ValidationError    data does not match a schema; carries every Problem found

featurestore.errors builds the rest of the tree on TenxError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from schemas.validation import Problem


class TenxError(Exception):
    """Base of all errors raised on purpose by tenx."""


class SchemaError(TenxError):
    """A schema definition or a type name is wrong; fix the definition."""


class ValidationError(SchemaError):
    """Records do not match their schema; `problems` lists every one found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} validation problem(s):\n{lines}{more}")
