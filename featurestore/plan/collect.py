"""Collecting definitions from a feature repo: an explicit module list or a folder.

Modules are imported with the repo folder first on sys.path, and forgotten again
afterwards, so compiling two repos in one process never mixes their modules.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from featurestore.definitions import Entity, FeatureView, Source, feature_view
from featurestore.definitions.route import Route
from featurestore.errors import CompileProblem

_SKIP_DIRS = {"__pycache__", "tests", "test", "data", "node_modules", "venv", "build", "dist"}


@dataclass
class Collected:
    """Everything found in the repo's modules, in a stable order."""

    entities: list[Entity] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    views: list[FeatureView] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
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
        found.problems.extend(_redefined_views(module))
        for value in vars(module).values():
            if id(value) in seen:
                continue
            if isinstance(value, Entity):
                found.entities.append(value)
            elif isinstance(value, Source):
                found.sources.append(value)
            elif isinstance(value, FeatureView):
                found.views.append(value)
            elif isinstance(value, Route):
                found.routes.append(value)
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
    """Where the import failed, in the user's code: a syntax error's own file and line, else
    the innermost traceback frame in the repo (never importlib's `<frozen ...>` frames)."""
    if isinstance(error, SyntaxError) and error.filename and error.lineno:
        # str(error) repeats the file and line, already in the location.
        location = f"{os.path.basename(error.filename)}:{error.lineno}"
        return CompileProblem(
            location, f"module `{module_name}`", f"import failed: {type(error).__name__}: {error.msg}"
        )
    root = str(repo_dir.resolve())
    location = ""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if _in_repo(frame.filename, root):
            location = f"{os.path.basename(frame.filename)}:{frame.lineno}"
            break
    return CompileProblem(location, f"module `{module_name}`", f"import failed: {type(error).__name__}: {error}")


def _in_repo(filename: str, root: str) -> bool:
    # `<frozen importlib._bootstrap>` is no file: abspath would put it under the cwd, often the repo.
    if filename.startswith("<"):
        return False
    path = os.path.abspath(filename)
    return path.startswith(root + os.sep) and "site-packages" not in Path(path).parts


def _redefined_views(module: ModuleType) -> list[CompileProblem]:
    """Views lost because a later `@feature_view def` at the top of the module took the same
    function name: definitions are collected from module attributes, so only the last one
    would reach the plan, silently."""
    filename = getattr(module, "__file__", None) or ""
    try:
        tree = ast.parse(Path(filename).read_bytes(), filename)  # bytes: the file's own encoding
    except (OSError, SyntaxError, ValueError):
        return []  # compiled or generated modules: nothing to read
    defined: dict[str, list[ast.FunctionDef | ast.AsyncFunctionDef]] = {}
    for statement in tree.body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef) and any(
            _is_feature_view(decorator, module) for decorator in statement.decorator_list
        ):
            defined.setdefault(statement.name, []).append(statement)
    problems: list[CompileProblem] = []
    # A view kept under another name (`spend_v1 = user_spend` before the redefinition)
    # is not lost: it is collected like any other.
    kept = {str(value.location) for value in vars(module).values() if isinstance(value, FeatureView)}
    for function_name, statements in defined.items():
        final = getattr(module, function_name, None)
        if len(statements) < 2 or not isinstance(final, FeatureView):
            continue
        last = _line_of(statements[-1], filename)
        for statement in statements[:-1]:
            if _line_of(statement, filename) in kept:
                continue
            lost = _view_name(statement)
            if lost == final.name:
                problems.append(duplicate_view(final.name, _line_of(statement, filename), last))
            else:
                problems.append(
                    CompileProblem(
                        _line_of(statement, filename),
                        f"feature view `{lost}`",
                        f"lost: `def {function_name}` at {last} (feature view `{final.name}`) replaces it; "
                        "give the two functions different names",
                    )
                )
    return problems


def duplicate_view(name: str, first: object, second: object) -> CompileProblem:
    """Two feature views named alike, in one module or two; `first` and `second` are locations."""
    return CompileProblem(
        f"{first} and {second}",
        f"duplicate feature view `{name}`",
        "a feature view name must be unique in the repo; rename one of them (its function, or name=...)",
    )


def _is_feature_view(decorator: ast.expr, module: ModuleType) -> bool:
    """`@feature_view(...)`, `@featurestore.feature_view(...)` or an alias of it."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    if isinstance(target, ast.Attribute):
        return target.attr == "feature_view"
    return isinstance(target, ast.Name) and getattr(module, target.id, None) is feature_view


def _view_name(statement: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The view's name= when it is a literal, else the function's name (the decorator's rule)."""
    for decorator in statement.decorator_list:
        if isinstance(decorator, ast.Call):
            for keyword in decorator.keywords:
                if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                    return str(keyword.value.value)
    return statement.name


def _line_of(statement: ast.FunctionDef | ast.AsyncFunctionDef, filename: str) -> str:
    """`features.py:17`: the first decorator's line, as FeatureView.location prints it."""
    return f"{os.path.basename(filename)}:{statement.decorator_list[0].lineno}"


def collect_routes(repo_dir: Path, modules: Sequence[str] | None = None) -> dict[str, Route]:
    """The model routes a feature repo declares (`featurestore.route`), by name. Raises
    CompileError when a module does not import or two routes share a name."""
    from featurestore.errors import CompileError

    repo_dir = repo_dir.resolve()
    names = list(modules) if modules is not None else modules_under(repo_dir)
    with repo_on_path(repo_dir):
        found = collect(repo_dir, names)
    problems = list(found.problems)
    routes: dict[str, Route] = {}
    for declared in found.routes:
        if declared.name in routes and routes[declared.name] != declared:
            problems.append(
                CompileProblem("", f"route `{declared.name}`", "declared twice; give each route its own name")
            )
        routes[declared.name] = declared
    if problems:
        raise CompileError(problems)
    return routes
