"""Collecting definitions from a feature repo: an explicit module list or a folder.

Modules are imported with the repo folder first on sys.path, and forgotten again
afterwards, so compiling two repos in one process never mixes their modules.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from featurestore.definitions import Entity, FeatureView, Source
from featurestore.errors import CompileProblem

_SKIP_DIRS = {"__pycache__", "tests", "test", "data", "node_modules", "venv", "build", "dist"}


@dataclass
class Collected:
    """Everything found in the repo's modules, in a stable order."""

    entities: list[Entity] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    views: list[FeatureView] = field(default_factory=list)
    problems: list[CompileProblem] = field(default_factory=list)


def modules_under(path: Path) -> list[str]:
    """Dotted names of the Python modules in a folder (hidden folders, tests and
    virtualenvs skipped), sorted."""
    names: list[str] = []
    for directory, subdirs, files in os.walk(path):
        subdirs[:] = sorted(
            d for d in subdirs if not d.startswith(".") and d not in _SKIP_DIRS and not d.endswith(".egg-info")
        )
        for filename in sorted(files):
            if not filename.endswith(".py") or filename.startswith(("test_", "conftest", "setup.py")):
                continue
            relative = Path(directory, filename).relative_to(path).with_suffix("")
            parts = list(relative.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
                if not parts:
                    continue
            names.append(".".join(parts))
    return names


@contextmanager
def repo_on_path(repo_dir: Path) -> Iterator[None]:
    root = str(repo_dir.resolve())
    before = set(sys.modules)
    sys.path.insert(0, root)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(root)
        for name in set(sys.modules) - before:
            module = sys.modules.get(name)
            module_file = getattr(module, "__file__", None) or ""
            if os.path.abspath(module_file).startswith(root + os.sep):
                del sys.modules[name]


def collect(repo_dir: Path, module_names: Sequence[str]) -> Collected:
    """Import the modules (inside `repo_on_path`) and pick out the definitions."""
    found = Collected()
    seen: set[int] = set()
    for module_name in module_names:
        module = _import(module_name, repo_dir, found.problems)
        if module is None:
            continue
        for value in vars(module).values():
            if id(value) in seen:
                continue
            if isinstance(value, Entity):
                found.entities.append(value)
            elif isinstance(value, Source):
                found.sources.append(value)
            elif isinstance(value, FeatureView):
                found.views.append(value)
            else:
                continue
            seen.add(id(value))
    return found


def _import(module_name: str, repo_dir: Path, problems: list[CompileProblem]) -> ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            problems.append(
                CompileProblem(
                    "",
                    f"module `{module_name}`",
                    f"not found in {repo_dir}; check `features.modules` in tenx.yaml",
                )
            )
            return None
        problems.append(_import_problem(module_name, error, repo_dir))
        return None
    except Exception as error:  # noqa: BLE001 - any import failure is reported, not raised
        problems.append(_import_problem(module_name, error, repo_dir))
        return None


def _import_problem(module_name: str, error: BaseException, repo_dir: Path) -> CompileProblem:
    root = str(repo_dir.resolve())
    location = ""
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, SyntaxError) and error.filename:
        location = f"{os.path.basename(error.filename)}:{error.lineno}"
    for frame in reversed(frames):
        if os.path.abspath(frame.filename).startswith(root + os.sep):
            location = f"{os.path.basename(frame.filename)}:{frame.lineno}"
            break
    return CompileProblem(
        location,
        f"module `{module_name}`",
        f"import failed: {type(error).__name__}: {error}",
    )
