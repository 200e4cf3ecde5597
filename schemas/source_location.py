"""Where in the user's code a definition was written, for error messages."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(__file__)).rsplit(os.sep, 1)[0] + os.sep + package + os.sep
    for package in ("schemas", "featurestore")
)


@dataclass(frozen=True, order=True)
class SourceLocation:
    """A file and line; prints as `features.py:42` (the file's base name)."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{os.path.basename(self.path)}:{self.line}"

    @classmethod
    def unknown(cls) -> SourceLocation:
        return cls("<unknown>", 0)


def caller_location() -> SourceLocation:
    """The first stack frame outside tenx's definition packages.

    Definitions call this from their constructors so that an error found at compile
    time can point at the user's line, not ours.
    """
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_LIBRARY_DIRS) and not frame.f_code.co_filename.startswith("<"):
            return SourceLocation(filename, frame.f_lineno)
        frame = frame.f_back  # type: ignore[assignment]
    return SourceLocation.unknown()
