"""Errors raised by featurestore.

TenxError                     base of every error tenx raises on purpose (schemas.errors)
├── SchemaError               a schema or type is wrong, or data does not match it
├── TerminalError             retrying will not help; fix the input or the setup
│   ├── ConfigError           tenx.yaml or an environment override is wrong
│   ├── CompileError          the feature repo has mistakes; `.problems` lists all
│   ├── RegistryError         a plan version is missing or a registry file is corrupt
│   └── TransformError        a view's row transform or filter misbehaved on data
└── TransientError            a service is unreachable or timed out; retrying may help
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.errors import SchemaError, TenxError

__all__ = [
    "CompileError",
    "CompileProblem",
    "ConfigError",
    "RegistryError",
    "SchemaError",
    "TenxError",
    "TerminalError",
    "TransformError",
    "TransientError",
]


class TerminalError(TenxError):
    """Retrying will not help: fix the input, the definitions or the configuration."""


class TransientError(TenxError):
    """A service was unreachable or too slow; the same call may succeed later."""


class WriteConflict(TransientError):
    """Another writer committed to the same Delta table first, in a way this write
    depends on (e.g. the next `_seq` numbers); read again and retry."""


class ConfigError(TerminalError):
    """The configuration file or an environment override is invalid."""


class RegistryError(TerminalError):
    """The plan registry does not hold what was asked for, or a file in it is corrupt."""


class TransformError(TerminalError):
    """A feature view's row transform or `where` filter returned something unexpected."""


class DerivedCastError(TransformError):
    """A derived column's values do not cast to its declared type: a fault of the data as
    much as of the code, so the compiler's made-up sample rows cannot judge it."""


@dataclass(frozen=True, order=True)
class CompileProblem:
    """One mistake in a feature repo: where, about what, and what is wrong."""

    location: str  # "features.py:42", or "" when unknown
    subject: str  # "feature view `user_spend`"
    message: str  # "window 7m is not a multiple of every=5m"

    def __str__(self) -> str:
        where = f" ({self.location})" if self.location else ""
        return f"{self.subject}{where}: {self.message}"


class CompileError(TerminalError):
    """The feature repo did not compile; `problems` holds every mistake found."""

    def __init__(self, problems: list[CompileProblem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"the feature repo has {len(problems)} problem(s):\n{lines}")
