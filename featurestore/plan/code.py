"""Shipping user functions inside the Plan as source, and loading them back.

A row transform or `where` filter is captured as its own canonical source (decorators,
annotations and docstring removed, so only behaviour changes the version), plus the
modules and literal constants it reads from its module. Engines rebuild the function
from that alone: they never import the user's feature modules.

A Plan is code. Load plans only from a registry you trust, as you would your repo.
"""

from __future__ import annotations

import ast
import builtins
import dis
import importlib
import inspect
import linecache
import os
import types
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

from featurestore.plan.model import CodeSpec


class CaptureError(Exception):
    """A function cannot be shipped as source; the message says why and what to do."""


def capture(function: Callable[..., Any], *, user_dirs: tuple[str, ...] = ()) -> CodeSpec:
    """Capture `function` as a CodeSpec. `user_dirs` are the feature repo's folders:
    callables defined there cannot be referenced (engines do not import user code)."""
    code = getattr(function, "__code__", None)
    if code is None:
        raise CaptureError(f"expected a Python function, got {type(function).__name__}")
    node = _find_node(function, code)
    is_lambda = isinstance(node, ast.Lambda)
    if is_lambda:
        source = ast.unparse(node)
        name = "<lambda>"
    else:
        assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        source = ast.unparse(_strip(node))
        name = node.name
    imports, constants = _captured_globals(function, code, user_dirs)
    return CodeSpec(
        name=name,
        kind="lambda" if is_lambda else "def",
        source=source,
        imports=tuple(sorted(imports)),
        constants=tuple(sorted(constants)),
        location=f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}",
    )


def _find_node(function: Callable[..., Any], code: types.CodeType) -> ast.AST:
    filename = code.co_filename
    linecache.checkcache(filename)  # the file may have been edited since it was cached
    lines = linecache.getlines(filename)
    if not lines:
        try:
            lines = inspect.getsourcelines(function)[0]
        except (OSError, TypeError) as error:
            raise CaptureError(
                "its source is not available (defined in an interactive session or exec?); define it in a module file"
            ) from error
    try:
        tree = ast.parse("".join(lines))
    except SyntaxError as error:
        raise CaptureError(f"its file does not parse: {error}") from error
    first = code.co_firstlineno
    if code.co_name == "<lambda>":
        argnames = list(code.co_varnames[: code.co_argcount])
        lambdas = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Lambda) and n.lineno == first and [a.arg for a in n.args.args] == argnames
        ]
        if len(lambdas) != 1:
            raise CaptureError(
                f"{len(lambdas)} lambdas with arguments ({', '.join(argnames)}) start on line "
                f"{first}; write it as a `def` function"
            )
        return lambdas[0]
    for n in ast.walk(tree):
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == code.co_name:
            starts = {n.lineno} | {d.lineno for d in n.decorator_list}
            if first in starts:
                return n
    raise CaptureError(f"no definition of `{code.co_name}` found at line {first} of its file")


def _strip(node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
    """Remove what does not change behaviour: decorators, annotations, docstring."""
    clone = ast.parse(ast.unparse(node)).body[0]
    assert isinstance(clone, ast.FunctionDef | ast.AsyncFunctionDef)
    clone.decorator_list = []
    clone.returns = None
    for argument in (
        *clone.args.posonlyargs,
        *clone.args.args,
        *clone.args.kwonlyargs,
        *([clone.args.vararg] if clone.args.vararg else []),
        *([clone.args.kwarg] if clone.args.kwarg else []),
    ):
        argument.annotation = None
    body = clone.body
    if (
        len(body) > 1
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        clone.body = body[1:]
    return clone


def _global_names(code: types.CodeType) -> Iterator[str]:
    """The names the code reads as globals. Not `co_names`, which also holds every
    attribute name: `tx.event_time.dt.hour` made a module's unrelated `hour = 3600` part of
    the view (its edits changed the version) or, were it a function, refused the view."""
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(instruction.argval, str):
            yield instruction.argval
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _global_names(constant)


def _captured_globals(
    function: Callable[..., Any], code: types.CodeType, user_dirs: tuple[str, ...]
) -> tuple[list[tuple[str, str, str | None]], list[tuple[str, str]]]:
    namespace: dict[str, Any] = dict(getattr(function, "__globals__", {}))
    closure = getattr(function, "__closure__", None) or ()
    for cell_name, cell in zip(code.co_freevars, closure, strict=True):
        namespace[cell_name] = cell.cell_contents
    referenced = sorted(set(_global_names(code)) | set(code.co_freevars))
    imports: list[tuple[str, str, str | None]] = []
    constants: list[tuple[str, str]] = []
    for name in referenced:
        if name not in namespace:
            continue  # a builtin or an attribute name
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            _refuse_user_code(name, getattr(value, "__file__", None), user_dirs)
            imports.append((name, value.__name__, None))
            continue
        literal = _literal(value)
        if literal is not None:
            constants.append((name, literal))
            continue
        module_name = getattr(value, "__module__", None)
        qualname = getattr(value, "__qualname__", None)
        if module_name and qualname and "." not in qualname and "<" not in qualname:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                module = None
            if module is not None and getattr(module, qualname, None) is value:
                _refuse_user_code(name, getattr(module, "__file__", None), user_dirs)
                imports.append((name, module_name, qualname))
                continue
        raise CaptureError(
            f"it uses `{name}` ({type(value).__name__}) from outside its body; the Plan ships "
            f"only the function's own source, so define `{name}` inside the function, make it "
            "a literal constant, or import it from an installed package"
        )
    return imports, constants


def _refuse_user_code(name: str, path: str | None, user_dirs: tuple[str, ...]) -> None:
    if path and any(os.path.abspath(path).startswith(d + os.sep) for d in user_dirs):
        raise CaptureError(
            f"it uses `{name}` from the feature repo ({os.path.basename(path)}); engines do "
            f"not import repo modules, so define `{name}` inside the function or in an "
            "installed package"
        )


def _literal(value: Any) -> str | None:
    """A canonical literal for plain data (sets sorted, so the text is the same under any
    hash seed), or None when `value` is not plain data."""
    if value is None or isinstance(value, bool | int | str):
        return repr(value)
    if isinstance(value, float):
        text = repr(value)
        return text if text not in ("nan", "inf", "-inf") else None
    if isinstance(value, tuple | list):
        items = [_literal(v) for v in value]
        if any(i is None for i in items):
            return None
        inner = ", ".join(items)  # type: ignore[arg-type]
        if isinstance(value, list):
            return f"[{inner}]"
        return f"({inner},)" if len(items) == 1 else f"({inner})"
    if isinstance(value, set | frozenset):
        items = [_literal(v) for v in value]
        if not items or any(i is None for i in items):
            return None
        return "{" + ", ".join(sorted(items)) + "}"  # type: ignore[arg-type]
    if isinstance(value, dict):
        pairs = [(_literal(k), _literal(v)) for k, v in value.items()]
        if any(k is None or v is None for k, v in pairs):
            return None
        return "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"
    return None


@lru_cache(maxsize=256)
def load(spec: CodeSpec) -> Callable[..., Any]:
    """Rebuild the function a CodeSpec describes (cached per spec)."""
    namespace: dict[str, Any] = {"__builtins__": builtins}
    for alias, module_name, attribute in spec.imports:
        module = importlib.import_module(module_name)
        namespace[alias] = getattr(module, attribute) if attribute else module
    for name, literal in spec.constants:
        namespace[name] = ast.literal_eval(literal)
    filename = f"<tenx {spec.kind} {spec.name} from {spec.location or 'plan'}>"
    if spec.kind == "lambda":
        function = eval(compile(spec.source, filename, "eval"), namespace)  # noqa: S307
    else:
        exec(compile(spec.source, filename, "exec"), namespace)  # noqa: S102
        function = namespace[spec.name]
    if not callable(function):
        raise TypeError(f"plan code `{spec.name}` did not define a function")
    return function  # type: ignore[no-any-return]
