"""Compiling definitions into a Plan, reporting every mistake at once."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from featurestore.definitions import Aggregation, Entity, FeatureView, Source, Window
from featurestore.durations import format_duration, parse_duration
from featurestore.errors import CompileError, CompileProblem, DerivedCastError, TransformError
from featurestore.plan.code import CaptureError, capture, load
from featurestore.plan.collect import collect, duplicate_view, modules_under, repo_on_path
from featurestore.plan.model import AS_OF, CodeSpec, EntitySpec, FeatureSpec, Plan, SourceSpec, ViewSpec, WindowSpec
from featurestore.windows import default_granularity
from schemas.dtypes import dtype_name, is_numeric, parse_dtype
from schemas.errors import SchemaError
from schemas.schema import EventSchema

MAX_WINDOW = 36_500 * 86_400_000_000  # 100 years: (entity, time) keys of the batch engine stay in int64

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_FEATURE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # from a source's field names too, kept as they are
_KEY_DTYPES = ("int64", "string")
_NUMERIC_ONLY = {"sum", "mean", "min", "max", "std"}
_FLOAT_STORAGE = ("float32", "float64")


def compile_repo(repo_dir: Path, *, project: str, modules: Sequence[str] | None = None) -> Plan:
    """Import a feature repo's modules (all modules under `repo_dir` when `modules` is
    None) and compile what they define. Raises CompileError listing every problem."""
    repo_dir = repo_dir.resolve()
    names = list(modules) if modules is not None else modules_under(repo_dir)
    with repo_on_path(repo_dir):
        found = collect(repo_dir, names)
        return compile_definitions(
            project,
            views=found.views,
            entities=found.entities,
            sources=found.sources,
            user_dirs=(str(repo_dir),),
            problems=found.problems,
        )


def compile_definitions(
    project: str,
    *,
    views: Iterable[FeatureView],
    entities: Iterable[Entity] = (),
    sources: Iterable[Source] = (),
    user_dirs: tuple[str, ...] = (),
    problems: Iterable[CompileProblem] = (),
) -> Plan:
    """Validate and normalise definitions into a Plan (views sorted by name)."""
    compiler = _Compiler(user_dirs, list(problems))
    view_list = list(views)
    for entity in [*entities, *(v.entity for v in view_list if isinstance(v, FeatureView))]:
        if isinstance(entity, Entity):  # anything else is reported with its view
            compiler.entity(entity)
    for source in [*sources, *(v.source for v in view_list if isinstance(v, FeatureView))]:
        if isinstance(source, Source):
            compiler.source(source)
    compiled = [spec for view in view_list if (spec := compiler.view(view)) is not None]
    compiler.unique_views(view_list)
    if compiler.problems:
        # By file and line; within a line, in the order found (stable sort).
        unique = list(dict.fromkeys(compiler.problems))
        raise CompileError(sorted(unique, key=_problem_order))
    return Plan(
        project=project,
        entities=tuple(sorted(compiler.entities.values(), key=lambda e: e.name)),
        sources=tuple(sorted(compiler.sources.values(), key=lambda s: s.name)),
        views=tuple(sorted(compiled, key=lambda v: v.name)),
    )


def _problem_order(problem: CompileProblem) -> tuple[str, int]:
    # A duplicate is located "a.py:3 and b.py:9": it sorts by its first location.
    file, _, line = problem.location.split(" and ")[0].rpartition(":")
    return (file, int(line) if line.isdigit() else 0)


class _Compiler:
    def __init__(self, user_dirs: tuple[str, ...], problems: list[CompileProblem]) -> None:
        self.user_dirs = user_dirs
        self.problems = problems
        self.entities: dict[str, EntitySpec] = {}
        self.sources: dict[str, SourceSpec] = {}
        self._entity_objects: dict[str, Entity] = {}
        self._source_objects: dict[str, Source] = {}

    def report(self, location: Any, subject: str, message: str) -> None:
        self.problems.append(CompileProblem(str(location) if location else "", subject, message))

    # -- entities and sources ---------------------------------------------------------
    def entity(self, entity: Entity) -> EntitySpec | None:
        subject = f"entity `{entity.name}`"
        known = self._entity_objects.get(entity.name)
        if known is not None:
            if known != entity:
                self.report(entity.location, subject, f"defined twice, differently (also at {known.location})")
            return self.entities.get(entity.name)
        self._entity_objects[entity.name] = entity
        ok = True
        if not isinstance(entity.name, str) or not _NAME.match(entity.name):
            self.report(entity.location, subject, "name must match [a-z][a-z0-9_]*")
            ok = False
        try:
            dtype = dtype_name(parse_dtype(entity.dtype))
        except SchemaError:
            dtype = str(entity.dtype)
        if dtype not in _KEY_DTYPES:
            self.report(entity.location, subject, f"key dtype must be int64 or string, got {entity.dtype}")
            ok = False
        if not ok:
            return None
        spec = EntitySpec(entity.name, entity.key, dtype, entity.description)
        self.entities[entity.name] = spec
        return spec

    def source(self, source: Source) -> SourceSpec | None:
        subject = f"source `{source.name}`"
        known = self._source_objects.get(source.name)
        if known is not None:
            if known != source:
                self.report(source.location, subject, f"defined twice, differently (also at {known.location})")
            return self.sources.get(source.name)
        self._source_objects[source.name] = source
        ok = True
        if not _NAME.match(source.name):
            self.report(source.location, subject, "name must match [a-z][a-z0-9_]*")
            ok = False
        if not isinstance(source.schema, EventSchema):
            self.report(
                source.location,
                subject,
                f"schema must be an EventSchema (e.g. schemas.TRANSACTIONS), got {type(source.schema).__name__} "
                f"{source.schema!r}",
            )
            return None
        for problem in source.schema.problems():
            self.report(source.location, subject, f"schema `{source.schema.name}`: {problem}")
            ok = False
        durations: dict[str, int] = {}
        for option in ("allowed_lateness", "idle_timeout", "max_future"):
            try:
                durations[option] = parse_duration(getattr(source, option))
            except ValueError as error:
                self.report(source.location, subject, f"{option}: {error}")
                ok = False
        for other in self.sources.values():
            for what, mine, theirs in (("topic", source.topic, other.topic), ("table", source.table, other.table)):
                if mine == theirs:
                    self.report(
                        source.location,
                        subject,
                        f"{what} `{mine}` is source `{other.name}`'s too: each source reads all of its {what}, so "
                        f"an event would count in both sources' views or be dead-lettered by the other's schema. "
                        f"Define one source and several views over it, or give each source its own {what}",
                    )
                    ok = False
        if not ok:
            return None
        spec = SourceSpec(
            name=source.name,
            schema=source.schema,
            topic=source.topic,
            table=source.table,
            allowed_lateness=durations["allowed_lateness"],
            idle_timeout=durations["idle_timeout"],
            max_future=durations["max_future"],
            description=source.description,
        )
        self.sources[source.name] = spec
        return spec

    # -- views ------------------------------------------------------------------------
    def view(self, view: FeatureView) -> ViewSpec | None:
        if not isinstance(view, FeatureView):
            self.report("", "feature view", f"expected a FeatureView, got {type(view).__name__}")
            return None
        subject = f"feature view `{view.name}`"
        wrong = [
            f"{what}= must be {kind} object, got {type(got).__name__} {got!r}"
            for what, got, kind in (("entity", view.entity, "an Entity(...)"), ("source", view.source, "a Source(...)"))
            if not isinstance(got, Entity if what == "entity" else Source)
        ]
        for problem in wrong:
            self.report(view.location, subject, problem)
        if wrong or not isinstance(view.source.schema, EventSchema):  # a wrong schema: reported with its source
            return None
        before = len(self.problems)
        if not _NAME.match(view.name):
            self.report(view.location, subject, "name must match [a-z][a-z0-9_]*")
        entity = self.entities.get(view.entity.name)
        source = self.sources.get(view.source.name)
        schema = view.source.schema
        key = view.entity.key
        if not schema.has_field(key):
            self.report(
                view.location,
                subject,
                f"entity key `{key}` is not a field of source `{view.source.name}`{_suggest(key, schema.names)}",
            )
        elif entity is not None:
            field_dtype = dtype_name(schema.field(key).dtype)
            if field_dtype != entity.dtype:
                self.report(
                    view.location,
                    subject,
                    f"entity `{entity.name}` has key dtype {entity.dtype} but field `{key}` "
                    f"of source `{view.source.name}` is {field_dtype}",
                )
            elif schema.field(key).nullable:
                self.report(view.location, subject, f"entity key `{key}` must not be nullable")
        columns = self._columns(view, subject)
        all_types: dict[str, pa.DataType] = {f.name: f.dtype for f in schema.fields if _supported(f.dtype)}
        all_types.update({name: parse_dtype(dtype) for name, dtype in columns})
        transform = self._code(view, view.transform, "row transform", subject)
        where = self._code(view, view.where, "where= filter", subject) if view.where is not None else None
        if transform is not None and source is not None and (where is not None or view.where is None):
            self._check_transform(view, columns, subject, transform, where)
        features = self._features(view, all_types, subject)
        ttl = self._ttl(view, subject)
        if len(self.problems) > before or entity is None or source is None or transform is None:
            return None
        spec = ViewSpec(
            name=view.name,
            entity=entity,
            source=source,
            columns=tuple(columns),
            transform=transform,
            where=where,
            features=tuple(features),
            ttl=ttl,
            online=bool(view.online),
            offline=bool(view.offline),
            description=view.description,
            owner=view.owner,
            tags=tuple(sorted((str(k), str(v)) for k, v in view.tags.items())),
            location=str(view.location),
        )
        return spec if self._prepares(spec, subject) else None

    def _prepares(self, spec: ViewSpec, subject: str) -> bool:
        """Whether the engines' own code path (`prepare_events`) takes a sample batch: the
        checks above see names and shapes, this one the rest the engines require (a
        boolean `where=`, one row per event). A plan that compiled but failed here failed
        the backfill and the stream job. A derived value that does not cast to its type
        is not judged: the sample's made-up values ("a", "b") say nothing of the real
        ones (digits in a string field, a lookup table of its real values)."""
        from featurestore.transforms import prepare_events

        try:
            prepare_events(spec, _sample_events(spec.source.schema))
        except DerivedCastError:
            return True
        except TransformError as error:
            self.report(spec.location, subject, f"on a sample batch: {str(error).removeprefix(subject + ': ')}")
            return False
        except Exception as error:  # noqa: BLE001 - reported as a compile problem
            self.report(spec.location, subject, f"failed on a sample batch: {type(error).__name__}: {error}")
            return False
        return True

    def _columns(self, view: FeatureView, subject: str) -> list[tuple[str, str]]:
        columns: list[tuple[str, str]] = []
        for name, dtype in view.columns.items():
            if view.source.schema.has_field(name):
                self.report(
                    view.location,
                    subject,
                    f"derived column `{name}` is already a field of source `{view.source.name}`",
                )
                continue
            try:
                parsed = parse_dtype(dtype)
            except SchemaError as error:
                self.report(view.location, subject, f"derived column `{name}`: {error}")
                continue
            if pa.types.is_timestamp(parsed):
                self.report(
                    view.location,
                    subject,
                    f"derived column `{name}`: a timestamp cannot be derived (no aggregation reads one); "
                    "derive a number from it instead, e.g. seconds since the epoch as int64",
                )
                continue
            columns.append((name, dtype_name(parsed)))
        return columns

    def _code(self, view: FeatureView, function: Any, role: str, subject: str) -> CodeSpec | None:
        if not callable(function):
            self.report(view.location, subject, f"{role} must be a function, got {type(function).__name__}")
            return None
        try:
            return capture(function, user_dirs=self.user_dirs)
        except CaptureError as error:
            self.report(view.location, subject, f"{role} cannot be shipped in the plan: {error}")
            return None

    def _check_transform(
        self,
        view: FeatureView,
        columns: list[tuple[str, str]],
        subject: str,
        transform: CodeSpec,
        where: CodeSpec | None,
    ) -> None:
        """Run the transform and filter on a tiny sample batch of the source's events:
        cheap, and it catches undeclared or missing columns before any engine runs. Run
        as the engines will run them, rebuilt from the plan (`load`), not the live
        functions: a default argument naming a module constant, or a constant that is
        not a literal, worked live and failed in every engine."""
        sample = _sample_events(view.source.schema)
        try:
            shipped = load(transform)
            filtered = load(where) if where is not None else None
        except Exception as error:  # noqa: BLE001 - reported as a compile problem
            self.report(
                view.location,
                subject,
                f"its code cannot be rebuilt from the plan as the engines run it ({type(error).__name__}: {error}); "
                "a name it uses, default arguments included, must be an import or a module constant that is a "
                "plain literal (number, string, list, dict)",
            )
            return
        try:
            derived = shipped(sample)
        except Exception as error:  # noqa: BLE001 - reported as a compile problem
            self.report(
                view.location,
                subject,
                f"row transform failed on a sample batch: {type(error).__name__}: {error}",
            )
            return
        if not hasattr(derived, "columns"):
            self.report(
                view.location,
                subject,
                f"row transform must return a DataFrame of the declared columns, got {type(derived).__name__}",
            )
            return
        declared = [name for name, _ in columns]
        got = [str(c) for c in derived.columns]
        undeclared = [c for c in got if c not in declared]
        missing = [c for c in declared if c not in got]
        if undeclared:
            self.report(
                view.location,
                subject,
                f"row transform returned undeclared column(s) {_names(undeclared)}; "
                "declare them in columns={name: type}",
            )
        if missing:
            self.report(view.location, subject, f"row transform did not return declared column(s) {_names(missing)}")
        if filtered is None or undeclared or missing:
            return
        frame = sample.copy()
        for name in declared:
            frame[name] = derived[name]
        try:
            mask = filtered(frame)
        except Exception as error:  # noqa: BLE001
            self.report(
                view.location,
                subject,
                f"where= filter failed on a sample batch: {type(error).__name__}: {error}",
            )
            return
        if not hasattr(mask, "dtype"):
            self.report(view.location, subject, f"where= must return a boolean Series, got {type(mask).__name__}")

    def _features(self, view: FeatureView, types: dict[str, pa.DataType], subject: str) -> list[FeatureSpec]:
        features: list[FeatureSpec] = []
        origin: dict[str, str] = {}
        if not view.aggregations:
            self.report(view.location, subject, "has no aggregations; give aggregations=[Count(), Sum(...), ...]")
        for aggregation in view.aggregations:
            if not isinstance(aggregation, Aggregation):
                self.report(
                    view.location,
                    subject,
                    f"aggregations must be Count(), Sum(col), ...; got {aggregation!r}",
                )
                continue
            label = _label(aggregation)
            location = aggregation.location or view.location
            dtype = self._output_dtype(aggregation, types, label, location, subject)
            if dtype is not None:
                dtype = self._stored_dtype(aggregation, view, dtype, label, location, subject)
            named: list[tuple[str, WindowSpec | None]] = []
            if not aggregation.windowed:
                if aggregation.windows:
                    self.report(
                        location,
                        subject,
                        f"{label} takes no window (it is the newest value however old); "
                        f"for the newest value inside a window use Last({aggregation.column!r}, windows=[...])",
                    )
                named.append((aggregation.name or str(aggregation.column), None))
            elif not aggregation.windows:
                self.report(location, subject, f"{label} has no windows; give windows=[...] to it or to @feature_view")
            for window in aggregation.windows if aggregation.windowed else ():
                spec = self._window(window, subject)
                if spec is None:
                    continue
                prefix = aggregation.name or (
                    f"{aggregation.kind}_{aggregation.column}" if aggregation.column else aggregation.kind
                )
                named.append((f"{prefix}_{spec.label}", spec))
            for name, spec in named:
                if dtype is None:
                    continue
                if name in origin:
                    self.report(
                        location,
                        subject,
                        f"duplicate feature name `{name}` (from {origin[name]} and {label})",
                    )
                    continue
                if name in (view.entity.key, AS_OF):
                    self.report(location, subject, f"feature name `{name}` is taken by the changelog; give name=")
                    continue
                if not _FEATURE_NAME.match(name):
                    # `view:a,b` lists split on commas, and names are columns and JSON keys.
                    self.report(
                        location,
                        subject,
                        f"feature name `{name}` must be letters, digits and _ (starting with a letter); give name=",
                    )
                    continue
                origin[name] = label
                features.append(FeatureSpec(name, aggregation.kind, aggregation.column, spec, dtype))
        return features

    def _stored_dtype(
        self, aggregation: Aggregation, view: FeatureView, dtype: str, label: str, location: Any, subject: str
    ) -> str | None:
        """float32 storage where the aggregation's `dtype=` (or the view's
        `float_dtype=`) asks for it; only float features can be narrowed."""
        for asked, where in ((aggregation.dtype, f"{label}: dtype="), (view.float_dtype, "float_dtype=")):
            if asked is not None and asked not in _FLOAT_STORAGE:
                self.report(location, subject, f"{where}{asked!r} is not a float width; use 'float32' or 'float64'")
                return None
        if aggregation.dtype is not None:
            if dtype not in _FLOAT_STORAGE:
                self.report(
                    location,
                    subject,
                    f"{label}: dtype={aggregation.dtype!r} applies to float features; this one is {dtype}",
                )
                return None
            return aggregation.dtype
        if view.float_dtype is not None and dtype in _FLOAT_STORAGE:
            return view.float_dtype
        return dtype

    def _output_dtype(
        self, aggregation: Aggregation, types: dict[str, pa.DataType], label: str, location: Any, subject: str
    ) -> str | None:
        column = aggregation.column
        if column is not None and not isinstance(column, str):
            self.report(location, subject, f"{label}: the column must be given by its name, got {column!r}")
            return None
        if column is None:
            if aggregation.kind == "count":
                return "int64"
            self.report(location, subject, f"{label} needs a column")
            return None
        if column not in types:
            self.report(location, subject, f"{label}: unknown column `{column}`{_suggest(column, list(types))}")
            return None
        dtype = types[column]
        if aggregation.kind == "count":
            return "int64"
        if aggregation.kind in _NUMERIC_ONLY and not is_numeric(dtype):
            self.report(
                location,
                subject,
                f"{label}: column `{column}` is {dtype_name(dtype)}; {aggregation.kind} needs a numeric column",
            )
            return None
        if aggregation.kind in ("mean", "std"):
            return "float64"
        if aggregation.kind == "sum":
            return "int64" if pa.types.is_integer(dtype) else "float64"
        return dtype_name(dtype)

    def _window(self, window: Window, subject: str) -> WindowSpec | None:
        try:
            length = parse_duration(window.length)
        except ValueError as error:
            self.report(window.location, subject, f"window length: {error}")
            return None
        try:
            every = parse_duration(window.every) if window.every is not None else default_granularity(length)
        except ValueError as error:
            self.report(window.location, subject, f"window every=: {error}")
            return None
        if length > MAX_WINDOW:
            self.report(
                window.location,
                subject,
                f"window {format_duration(length)} is longer than {format_duration(MAX_WINDOW)}; "
                "for the newest value however old, use Latest(column)",
            )
            return None
        if length % every:
            self.report(
                window.location,
                subject,
                f"window {format_duration(length)} is not a multiple of every={format_duration(every)}",
            )
            return None
        return WindowSpec(length, every)

    def _ttl(self, view: FeatureView, subject: str) -> int | None:
        if view.ttl is None:
            return None
        try:
            return parse_duration(view.ttl)
        except ValueError as error:
            self.report(view.location, subject, f"ttl: {error}")
            return None

    def unique_views(self, views: list[FeatureView]) -> None:
        first: dict[str, FeatureView] = {}
        for view in views:
            if not isinstance(view, FeatureView):
                continue
            if view.name in first:
                self.problems.append(duplicate_view(view.name, first[view.name].location, view.location))
            else:
                first[view.name] = view


def _sample_events(schema: EventSchema) -> Any:
    """Two plausible rows of the schema, as the engines hand them to transforms."""
    by_type: dict[str, list[Any]] = {
        "string": ["a", "b"],
        "int64": [1, 2],
        "int32": [1, 2],
        "float64": [1.0, 2.5],
        "float32": [1.0, 2.5],
        "bool": [True, False],
        "timestamp[us, UTC]": [
            datetime(2026, 1, 1, tzinfo=UTC),
            datetime(2026, 1, 1, 0, 5, tzinfo=UTC),
        ],
    }
    columns = {f.name: by_type.get(dtype_name(f.dtype), [None, None]) for f in schema.fields}
    return pa.table(columns, schema=schema.arrow_schema()).to_pandas()


def _supported(dtype: pa.DataType) -> bool:
    try:
        dtype_name(dtype)
    except SchemaError:
        return False
    return True


def _label(aggregation: Aggregation) -> str:
    return f"{type(aggregation).__name__}({aggregation.column or ''})"


def _names(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return f"{hint} (known: {', '.join(known)})"
