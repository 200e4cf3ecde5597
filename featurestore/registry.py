"""A file-backed registry of applied plans: every version kept, plus the apply history.

Layout under the registry folder:

    plans/<version>.json     each plan ever applied, immutable
    history.jsonl            one line per apply: version, time, who, previous version
    current                  the version now applied

A plan holds the source of its views' transforms, which every engine executes: whoever
can write this folder can run code wherever tenx runs (docs/design.md, "Threat model").
A plan file whose content hash is not its name is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from featurestore.errors import RegistryError
from featurestore.plan.model import Plan


@dataclass(frozen=True)
class ApplyRecord:
    version: str
    applied_at: str  # ISO-8601, UTC
    applied_by: str
    previous: str | None


class _Unchecked:
    """`FileRegistry.apply` without an expected current version: whatever is current."""


UNCHECKED = _Unchecked()


class Registry(Protocol):
    """Where plans are kept and which one is applied."""

    def get(self, version: str) -> Plan: ...

    def current(self) -> Plan | None: ...

    def apply(self, plan: Plan, *, expected: str | _Unchecked | None = ...) -> ApplyRecord: ...


class FileRegistry:
    """A Registry in a local (or mounted) folder. Writes are atomic renames."""

    def __init__(self, root: Path, *, clock: type[datetime] = datetime) -> None:
        self.root = Path(root)
        self._clock = clock
        _check_folder(self.root)

    def __repr__(self) -> str:
        return f"FileRegistry({str(self.root)!r})"

    def _plan_path(self, version: str) -> Path:
        return self.root / "plans" / f"{version}.json"

    def get(self, version: str) -> Plan:
        path = self._plan_path(version)
        if not path.exists():
            known = ", ".join(self.versions()) or "none"
            raise RegistryError(f"plan version {version} is not in the registry at {self.root}; known: {known}")
        try:
            plan = Plan.from_json(path.read_text())
        except (ValueError, KeyError) as error:
            raise RegistryError(f"plan file {path} is unreadable: {error}") from error
        if plan.version != version:
            # A plan carries code that every engine runs: one under another plan's name is
            # refused, never run (the registry was edited by hand, or tampered with).
            raise RegistryError(
                f"plan file {path} holds plan {plan.version}, not {version} (its content hash does not match its "
                "name): refusing to run it; restore the file, or `tenx apply` from the feature repo"
            )
        return plan

    def current_version(self) -> str | None:
        path = self.root / "current"
        if not path.exists():
            return None
        return path.read_text().strip() or None

    def current(self) -> Plan | None:
        version = self.current_version()
        return self.get(version) if version else None

    def versions(self) -> list[str]:
        folder = self.root / "plans"
        if not folder.exists():
            return []
        return sorted(p.stem for p in folder.glob("*.json"))

    def history(self) -> list[ApplyRecord]:
        path = self.root / "history.jsonl"
        if not path.exists():
            return []
        return [ApplyRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]

    def apply(self, plan: Plan, *, expected: str | _Unchecked | None = UNCHECKED) -> ApplyRecord:
        """Store the plan (idempotent) and make it current. With `expected` (the version
        that was current when the plan was compiled and its diff shown, None for none),
        refuse when another apply got in first: the last writer would otherwise replace
        a plan whose diff against this one nobody saw. Applies are serialized by a lock
        file, and `current` is written before the history line (a crash between them
        leaves the history short, never naming a plan that was not applied)."""
        version = plan.version
        plan_path = self._plan_path(version)
        if not self._intact(plan_path, version):
            atomic_write(plan_path, plan.to_json())  # a missing or damaged file of this version is (re)written
        with self._locked():
            previous = self.current_version()
            if not isinstance(expected, _Unchecked) and previous != expected:
                raise RegistryError(
                    f"the applied plan changed while this one was compiled ({expected or 'none'} -> {previous}, "
                    "another `tenx apply`?): run `tenx apply` again to see the changes against it"
                )
            record = ApplyRecord(
                version=version,
                applied_at=self._clock.now(UTC).isoformat(timespec="seconds"),
                applied_by=_user(),
                previous=previous,
            )
            atomic_write(self.root / "current", version + "\n")
            with (self.root / "history.jsonl").open("a") as handle:
                handle.write(json.dumps(asdict(record)) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        return record

    @staticmethod
    def _intact(path: Path, version: str) -> bool:
        """Whether `path` holds plan `version` (a re-apply of the same definitions from
        moved lines keeps the file as first written: plan files are history)."""
        try:
            return Plan.from_json(path.read_text()).version == version
        except (OSError, ValueError, KeyError):
            return False

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".apply.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _check_folder(root: Path) -> None:
    """The registry folder may not exist yet, but neither it nor a folder above it may be a file:
    reads would find nothing ("nothing applied yet") and the first apply would fail."""
    for path in (root, *root.parents):
        if path.exists():
            if path.is_dir():
                return
            what = "is a file" if path == root else f"is inside {path}, which is a file"
            raise RegistryError(
                f"registry path {root} {what}; it must be a folder: point `registry:` in tenx.yaml "
                "(or TENX_REGISTRY) at a folder, or move the file away"
            )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the name points at it
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    # ... and the rename too: after a power loss, `current` names a plan that exists.
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    except OSError as error:  # some network and FUSE filesystems cannot sync a folder: the write stands
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(folder)
