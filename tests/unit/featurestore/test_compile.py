"""Compiling feature repos: every mistake reported at once, verbatim, with file:line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from featurestore import Count, Entity, Last, Latest, Mean, Source, Sum, Window, feature_view
from featurestore.errors import CompileError
from featurestore.plan import compile_definitions, compile_repo
from schemas import TRANSACTIONS

BAD_REPO = """\
import pyarrow as pa

from featurestore import Count, Entity, Source, Sum, Window, feature_view
from schemas import TRANSACTIONS, EventSchema, Field

price = Entity("price", key="amount", dtype="float64")
user = Entity("user", key="user_id", dtype="int64")

local_events = EventSchema(
    "local_events",
    [Field("user_id", "int64"), Field("event_time", pa.timestamp("us", tz="Europe/Paris"))],
    event_time="event_time",
)
local = Source("local", local_events)
transactions = Source("transactions", TRANSACTIONS)


@feature_view(
    entity=user,
    source=transactions,
    columns={"amount_eur": "float64"},
    aggregations=[
        Sum("amount_eur", windows=[Window("7m")]),
        Sum("amnt", windows=["1h"]),
        Count(windows=["1h"]),
        Count(windows=["1h"]),
    ],
)
def spend(tx):
    return tx.assign(amount_eur=tx["amount"], bonus=1.0)[["amount_eur", "bonus"]]


@feature_view(entity=price, source=transactions, aggregations=[Count(windows=["1h"])])
def by_price(tx):
    return tx[[]]


@feature_view(entity=user, source=local, aggregations=[Count(windows=["1h"])])
def local_count(tx):
    return tx[[]]
"""

EXPECTED = [
    "entity `price` (features.py:6): key dtype must be int64 or string, got float64",
    "source `local` (features.py:14): schema `local_events`: event-time column `event_time` must be "
    "timestamp[us, UTC], got timestamp[us, tz=Europe/Paris]; declare it as "
    "Field('event_time', 'timestamp[us, UTC]')",
    "feature view `spend` (features.py:18): row transform returned undeclared column(s) `bonus`; "
    "declare them in columns={name: type}",
    "feature view `spend` (features.py:23): window 7m is not a multiple of every=5m",
    "feature view `spend` (features.py:24): Sum(amnt): unknown column `amnt`; did you mean `amount`? "
    "(known: transaction_id, user_id, merchant_id, amount, currency, category, country, event_time, "
    "amount_eur)",
    "feature view `spend` (features.py:26): duplicate feature name `count_1h` (from Count() and Count())",
]


def write_repo(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_bad_repo_reports_every_problem_once_with_its_line(tmp_path: Path) -> None:
    write_repo(tmp_path, {"features.py": BAD_REPO})
    with pytest.raises(CompileError) as raised:
        compile_repo(tmp_path, project="bad", modules=["features"])
    assert [str(p) for p in raised.value.problems] == EXPECTED


def test_key_dtype_must_match_the_source_field(tmp_path: Path) -> None:
    write_repo(
        tmp_path,
        {
            "features.py": """\
            from featurestore import Count, Entity, Source, feature_view
            from schemas import TRANSACTIONS

            user = Entity("user", key="user_id", dtype="string")
            tx = Source("tx", TRANSACTIONS)

            @feature_view(entity=user, source=tx, aggregations=[Count(windows=["1h"])])
            def counts(tx):
                return tx[[]]
            """
        },
    )
    with pytest.raises(CompileError) as raised:
        compile_repo(tmp_path, project="p", modules=["features"])
    assert [str(p) for p in raised.value.problems] == [
        "feature view `counts` (features.py:7): entity `user` has key dtype string but field `user_id` "
        "of source `tx` is int64"
    ]


def test_a_transform_that_works_live_but_not_as_shipped_is_refused_at_compile(tmp_path: Path) -> None:
    # A default argument naming a module constant is evaluated where the plan is loaded,
    # and the constant is not shipped: compile ran the live function, and every engine
    # then failed with a NameError.
    write_repo(
        tmp_path,
        {
            "features.py": """\
            from featurestore import Entity, Source, Sum, feature_view
            from schemas import TRANSACTIONS

            RATE = 1.1
            user = Entity("user", key="user_id")
            tx = Source("tx", TRANSACTIONS)

            @feature_view(entity=user, source=tx, columns={"d": float}, aggregations=[Sum("d", windows=["1h"])])
            def scaled(tx, rate=RATE):
                return tx.assign(d=tx["amount"] * rate)[["d"]]
            """,
        },
    )
    with pytest.raises(CompileError) as raised:
        compile_repo(tmp_path, project="p", modules=["features"])
    assert [str(p) for p in raised.value.problems] == [
        "feature view `scaled` (features.py:8): its code cannot be rebuilt from the plan as the engines run it "
        "(NameError: name 'RATE' is not defined); a name it uses, default arguments included, must be an import "
        "or a module constant that is a plain literal (number, string, list, dict)"
    ]


def test_transform_using_a_repo_helper_cannot_be_shipped(tmp_path: Path) -> None:
    write_repo(
        tmp_path,
        {
            "helpers.py": "def double(s):\n    return s * 2\n",
            "features.py": """\
            from featurestore import Entity, Source, Sum, feature_view
            from helpers import double
            from schemas import TRANSACTIONS

            user = Entity("user", key="user_id")
            tx = Source("tx", TRANSACTIONS)

            @feature_view(entity=user, source=tx, columns={"d": float}, aggregations=[Sum("d", windows=["1h"])])
            def doubled(tx):
                return tx.assign(d=double(tx["amount"]))[["d"]]
            """,
        },
    )
    with pytest.raises(CompileError) as raised:
        compile_repo(tmp_path, project="p", modules=["features"])
    assert [str(p) for p in raised.value.problems] == [
        "feature view `doubled` (features.py:8): row transform cannot be shipped in the plan: it uses "
        "`double` from the feature repo (helpers.py); engines do not import repo modules, so define "
        "`double` inside the function or in an installed package"
    ]


def test_import_errors_are_reported_with_their_line(tmp_path: Path) -> None:
    write_repo(tmp_path, {"features.py": "x = 1\ny = undefined_name\n"})
    with pytest.raises(CompileError) as raised:
        compile_repo(tmp_path, project="p", modules=["features", "missing_module"])
    assert [str(p) for p in raised.value.problems] == [
        f"module `missing_module`: not found in {tmp_path.resolve()}; check `features.modules` in tenx.yaml",
        "module `features` (features.py:2): import failed: NameError: name 'undefined_name' is not defined",
    ]


def test_a_syntax_error_points_at_the_users_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # From inside the repo, as `tenx plan` runs: importlib's `<frozen ...>` frames looked like repo files.
    monkeypatch.chdir(tmp_path)
    write_repo(tmp_path, {"features.py": "x = 1\ndef broken(tx)\n    return tx\n"})
    with pytest.raises(CompileError) as raised:
        compile_repo(tmp_path, project="p", modules=["features"])
    assert [str(p) for p in raised.value.problems] == [
        "module `features` (features.py:2): import failed: SyntaxError: expected ':'"
    ]


def test_an_import_error_points_at_the_innermost_line_in_the_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_repo(
        tmp_path,
        {
            "helpers.py": "import json\n\nRATES = json.loads('{broken')\n",
            "features.py": "import helpers\n",
            "indented.py": "if True:\nx = 1\n",
        },
    )
    with pytest.raises(CompileError) as raised:
        compile_repo(tmp_path, project="p", modules=["features", "indented"])
    assert [str(p) for p in raised.value.problems] == [
        "module `features` (helpers.py:3): import failed: JSONDecodeError: Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1)",
        "module `indented` (indented.py:2): import failed: IndentationError: expected an indented block after "
        "'if' statement on line 1",
    ]


REDEFINED = """\
from featurestore import Count, Entity, Source, feature_view
from featurestore import feature_view as view
from schemas import TRANSACTIONS

user = Entity("user", key="user_id")
tx = Source("tx", TRANSACTIONS)


@feature_view(entity=user, source=tx, aggregations=[Count(windows=["1h"])])
def user_spend(tx):
    return tx[[]]


@view(entity=user, source=tx, aggregations=[Count(windows=["1d"])])
def user_spend(tx):
    return tx[[]]


@feature_view(entity=user, source=tx, aggregations=[Count(windows=["1h"])], name="first")
def renamed(tx):
    return tx[[]]


@feature_view(entity=user, source=tx, aggregations=[Count(windows=["1h"])], name="second")
def renamed(tx):
    return tx[[]]
"""


def test_a_view_function_defined_twice_in_a_module_is_reported_not_dropped(tmp_path: Path) -> None:
    write_repo(tmp_path, {"features.py": REDEFINED})
    with pytest.raises(CompileError) as raised:
        compile_repo(tmp_path, project="p", modules=["features"])
    assert [str(p) for p in raised.value.problems] == [
        "duplicate feature view `user_spend` (features.py:9 and features.py:14): a feature view name must be "
        "unique in the repo; rename one of them (its function, or name=...)",
        "feature view `first` (features.py:19): lost: `def renamed` at features.py:24 (feature view `second`) "
        "replaces it; give the two functions different names",
    ]


def test_a_view_kept_under_another_name_before_a_redefinition_is_not_lost(tmp_path: Path) -> None:
    write_repo(
        tmp_path,
        {
            "features.py": """\
            from featurestore import Count, Entity, Source, feature_view
            from schemas import TRANSACTIONS

            user = Entity("user", key="user_id")
            tx = Source("tx", TRANSACTIONS)


            @feature_view(entity=user, source=tx, aggregations=[Count(windows=["1h"])], name="spend_v1")
            def spend(tx):
                return tx[[]]


            spend_v1 = spend


            @feature_view(entity=user, source=tx, aggregations=[Count(windows=["1d"])], name="spend_v2")
            def spend(tx):
                return tx[[]]
            """
        },
    )
    plan = compile_repo(tmp_path, project="p", modules=["features"])
    assert sorted(v.name for v in plan.views) == ["spend_v1", "spend_v2"]


def test_redefining_a_function_that_is_no_view_is_not_a_problem(tmp_path: Path) -> None:
    write_repo(
        tmp_path,
        {
            "features.py": """\
            import functools

            from featurestore import Count, Entity, Source, feature_view
            from schemas import TRANSACTIONS

            user = Entity("user", key="user_id")
            tx = Source("tx", TRANSACTIONS)


            @functools.cache
            def rate():
                return 1.0


            @feature_view(entity=user, source=tx, aggregations=[Count(windows=["1h"])])
            def rate(tx):
                return tx[[]]
            """
        },
    )
    assert [v.name for v in compile_repo(tmp_path, project="p", modules=["features"]).views] == ["rate"]


def test_one_view_name_in_two_modules_is_a_duplicate(tmp_path: Path) -> None:
    write_repo(
        tmp_path,
        {
            "features.py": """\
            from featurestore import Count, Entity, Source, feature_view
            from schemas import TRANSACTIONS

            user = Entity("user", key="user_id")
            tx = Source("tx", TRANSACTIONS)

            @feature_view(entity=user, source=tx, aggregations=[Count(windows=["1h"])])
            def user_spend(tx):
                return tx[[]]
            """,
            "more.py": """\
            from features import tx, user
            from featurestore import Count, feature_view

            @feature_view(entity=user, source=tx, aggregations=[Count(windows=["1d"])])
            def user_spend(tx):
                return tx[[]]
            """,
        },
    )
    with pytest.raises(CompileError) as raised:
        compile_repo(tmp_path, project="p", modules=["features", "more"])
    assert [str(p) for p in raised.value.problems] == [
        "duplicate feature view `user_spend` (features.py:7 and more.py:4): a feature view name must be "
        "unique in the repo; rename one of them (its function, or name=...)"
    ]


def test_path_mode_compiles_every_module_and_dedupes_shared_definitions(tmp_path: Path) -> None:
    (tmp_path / "views").mkdir()
    write_repo(
        tmp_path,
        {
            "entities.py": """\
            from featurestore import Entity, Source
            from schemas import TRANSACTIONS

            user = Entity("user", key="user_id")
            tx = Source("tx", TRANSACTIONS)
            """,
            "views/spend.py": """\
            from entities import tx, user
            from featurestore import Count, feature_view

            @feature_view(entity=user, source=tx, aggregations=[Count(windows=["1d"])])
            def spend(tx):
                return tx[[]]
            """,
        },
    )
    plan = compile_repo(tmp_path, project="p")
    assert [v.name for v in plan.views] == ["spend"]
    assert [e.name for e in plan.entities] == ["user"]
    assert plan.views[0].features[0].window.every == 3_600_000_000


def test_modules_are_forgotten_after_compiling(tmp_path: Path) -> None:
    import sys

    write_repo(tmp_path, {"only_here.py": "X = 1\n"})
    compile_repo(tmp_path, project="p", modules=["only_here"])
    assert "only_here" not in sys.modules
    assert str(tmp_path.resolve()) not in sys.path


USER = Entity("user", key="user_id")
TX = Source("transactions", TRANSACTIONS)


def test_view_checks_reported_together() -> None:
    @feature_view(
        entity=USER,
        source=TX,
        columns={"amount": "float64", "x": "decimal"},
        aggregations=[Sum("currency"), Count(windows=[Window("1h", every="7m"), Window("soon")])],
        where=lambda tx: tx["amount"] > 0,
        ttl="forever",
    )
    def Bad(tx: pd.DataFrame) -> pd.DataFrame:
        return tx[[]]

    with pytest.raises(CompileError) as raised:
        compile_definitions("p", views=[Bad])
    messages = [p.message for p in raised.value.problems]
    assert messages == [
        "name must match [a-z][a-z0-9_]*",
        "derived column `amount` is already a field of source `transactions`",
        "derived column `x`: unknown type 'decimal'; expected one of string, int64, int32, float64, "
        "float32, bool, timestamp[us, UTC]",
        "ttl: expected a duration like '30s', '5m', '1h' or '7d' (units us, ms, s, m, h, d), got 'forever'",
        "Sum(currency): column `currency` is string; sum needs a numeric column",
        "Sum(currency) has no windows; give windows=[...] to it or to @feature_view",
        "window 1h is not a multiple of every=7m",
        "window length: expected a duration like '30s', '5m', '1h' or '7d' (units us, ms, s, m, h, d), got 'soon'",
    ]


def test_duplicate_view_names_across_modules() -> None:
    def make() -> object:
        @feature_view(entity=USER, source=TX, aggregations=[Count(windows=["1h"])])
        def twin(tx: pd.DataFrame) -> pd.DataFrame:
            return tx[[]]

        return twin

    with pytest.raises(CompileError) as raised:
        compile_definitions("p", views=[make(), make()])  # type: ignore[list-item]
    line = f"{Path(__file__).name}:{make.__code__.co_firstlineno + 1}"
    assert [str(p) for p in raised.value.problems] == [
        f"duplicate feature view `twin` ({line} and {line}): a feature view name must be unique in the repo; "
        "rename one of them (its function, or name=...)"
    ]


def test_a_good_view_compiles_to_normalised_specs() -> None:
    @feature_view(
        entity=USER,
        source=TX,
        columns={"amount_cents": "int64"},
        aggregations=[Count(), Sum("amount_cents", name="spend_cents")],
        windows=["1h", Window("7d", every="1d")],
        ttl="2d",
    )
    def spend(tx: pd.DataFrame) -> pd.DataFrame:
        """Docstrings do not change the version."""
        return tx.assign(amount_cents=(tx["amount"] * 100).round().astype("int64"))[["amount_cents"]]

    view = compile_definitions("p", views=[spend]).views[0]
    assert view.feature_names == ("count_1h", "count_7d", "spend_cents_1h", "spend_cents_7d")
    assert [(f.window.length, f.window.every) for f in view.features[:2]] == [
        (3_600_000_000, 300_000_000),
        (604_800_000_000, 86_400_000_000),
    ]
    assert [f.dtype for f in view.features] == ["int64", "int64", "int64", "int64"]
    assert view.ttl == 172_800_000_000
    assert view.transform.source == (
        "def spend(tx):\n"
        "    return tx.assign(amount_cents=(tx['amount'] * 100).round().astype('int64'))[['amount_cents']]"
    )
    assert view.changelog_schema().names == ["user_id", "as_of", *view.feature_names]


def test_latest_features_are_named_as_their_columns_and_have_no_window() -> None:
    @feature_view(
        entity=USER,
        source=TX,
        aggregations=[Latest("amount"), Latest("country", name="home_country"), Sum("amount")],
        windows=["1d"],  # applies to Sum only
        ttl="2d",
    )
    def profile(tx: pd.DataFrame) -> pd.DataFrame:
        return tx[[]]

    plan = compile_definitions("p", views=[profile])
    view = plan.views[0]
    assert view.feature_names == ("amount", "home_country", "sum_amount_1d")
    assert [f.window for f in view.latest] == [None, None]
    assert [f.dtype for f in view.features] == ["float64", "string", "float64"]
    assert view.reach is None  # all history: the newest value however old
    assert view.windows[0].label == "1d"
    # the plan round-trips through JSON with its window-less features
    assert type(plan).from_json(plan.to_json()) == plan


def test_float32_storage_is_declared_per_feature_or_per_view() -> None:
    @feature_view(
        entity=USER,
        source=TX,
        aggregations=[Latest("amount"), Mean("amount", dtype="float64"), Sum("amount"), Count(), Last("country")],
        windows=["1h"],
        float_dtype="float32",
    )
    def narrow(tx: pd.DataFrame) -> pd.DataFrame:
        return tx[[]]

    @feature_view(entity=USER, source=TX, aggregations=[Sum("amount", dtype="float32")], windows=["1h"])
    def one(tx: pd.DataFrame) -> pd.DataFrame:
        return tx[[]]

    narrow_view, one_view = compile_definitions("p", views=[narrow, one]).views
    assert [f.dtype for f in narrow_view.features] == ["float32", "float64", "float32", "int64", "string"]
    assert [f.dtype for f in one_view.features] == ["float32"]
    assert narrow_view.changelog_schema().field("amount").type == pa.float32()


def test_latest_and_storage_mistakes_are_reported_together() -> None:
    @feature_view(
        entity=USER,
        source=TX,
        aggregations=[
            Latest("amount", name="user_id"),
            Last("country", dtype="float32"),
        ],
        windows=["1h"],
    )
    def wrong(tx: pd.DataFrame) -> pd.DataFrame:
        return tx[[]]

    @feature_view(entity=USER, source=TX, aggregations=[Latest("amount")], float_dtype="float16")
    def odd(tx: pd.DataFrame) -> pd.DataFrame:
        return tx[[]]

    latest = Latest("amount")
    object.__setattr__(latest, "windows", (Window("1d"),))  # as a hand-built definition could

    @feature_view(entity=USER, source=TX, aggregations=[latest])
    def windowed(tx: pd.DataFrame) -> pd.DataFrame:
        return tx[[]]

    with pytest.raises(CompileError) as raised:
        compile_definitions("p", views=[wrong, odd, windowed])
    assert [p.message for p in raised.value.problems] == [
        "feature name `user_id` is taken by the changelog; give name=",
        "Last(country): dtype='float32' applies to float features; this one is string",
        "float_dtype='float16' is not a float width; use 'float32' or 'float64'",
        "Latest(amount) takes no window (it is the newest value however old); "
        "for the newest value inside a window use Last('amount', windows=[...])",
    ]


def test_two_sources_on_one_topic_or_table_are_refused() -> None:
    """Each source reads all of its topic and table: a second source over the same one
    counted every event the two schemas both accept in both sources' views, and
    dead-lettered the rest under the other's schema."""
    views = []
    for source in (TX, Source("refunds", TRANSACTIONS, topic="transactions", table="refunds"),
                   Source("chargebacks", TRANSACTIONS, topic="chargebacks", table="transactions")):  # fmt: skip

        @feature_view(entity=USER, source=source, aggregations=[Count(windows=["1h"])], name=f"{source.name}_count")
        def counted(tx: pd.DataFrame) -> pd.DataFrame:
            return tx[[]]

        views.append(counted)
    with pytest.raises(CompileError) as raised:
        compile_definitions("p", views=views)
    assert [(p.subject, p.message) for p in raised.value.problems] == [
        (
            "source `refunds`",
            "topic `transactions` is source `transactions`'s too: each source reads all of its topic, so an event "
            "would count in both sources' views or be dead-lettered by the other's schema. Define one source and "
            "several views over it, or give each source its own topic",
        ),
        (
            "source `chargebacks`",
            "table `transactions` is source `transactions`'s too: each source reads all of its table, so an event "
            "would count in both sources' views or be dead-lettered by the other's schema. Define one source and "
            "several views over it, or give each source its own table",
        ),
    ]
    # Each on its own topic and table compiles.
    separate = Source("refunds", TRANSACTIONS)

    @feature_view(entity=USER, source=separate, aggregations=[Count(windows=["1h"])])
    def refund_count(tx: pd.DataFrame) -> pd.DataFrame:
        return tx[[]]

    assert len(compile_definitions("p", views=[views[0], refund_count]).sources) == 2


def _no_columns(tx: pd.DataFrame) -> pd.DataFrame:
    return tx[[]]


def _first_row_only(tx: pd.DataFrame) -> pd.DataFrame:
    return tx.assign(c=tx["amount"])[["c"]].head(1)


def _time_as_t(tx: pd.DataFrame) -> pd.DataFrame:
    return tx.assign(t=tx["event_time"])[["t"]]


def _amount_times_one(tx: pd.DataFrame) -> pd.Series:
    return tx["amount"] * 1.0


@pytest.mark.parametrize(
    ("options", "transform", "message"),
    [
        (
            {"where": _amount_times_one, "aggregations": [Count()]},
            _no_columns,
            "on a sample batch: where= must return a boolean Series, got float64",
        ),
        (
            {"columns": {"c": "float64"}, "aggregations": [Sum("c")]},
            _first_row_only,
            "on a sample batch: the row transform returned 1 rows for 2 events; it must return one row per event",
        ),
        (
            {"columns": {"t": "timestamp[us, UTC]"}, "aggregations": [Count()]},
            _time_as_t,
            "derived column `t`: a timestamp cannot be derived (no aggregation reads one); derive a number",
        ),
    ],
)
def test_what_the_engines_refuse_on_a_sample_batch_is_refused_at_compile(
    options: dict[str, object], transform: object, message: str
) -> None:
    """These compiled, then failed the backfill and the stream job (the timestamp column
    with a bare KeyError): the compiler checked names and shapes, not what
    `prepare_events` requires of the values."""
    view = feature_view(entity=USER, source=TX, windows=["1h"], name="odd", **options)(transform)  # type: ignore[arg-type]
    with pytest.raises(CompileError) as raised:
        compile_definitions("p", views=[view])
    assert raised.value.problems[0].message.startswith(message), raised.value.problems


def test_a_derived_value_the_samples_made_up_values_cannot_cast_still_compiles() -> None:
    """The sample's strings are "a" and "b": a column of digits in a string field, or a
    lookup table of the field's real values, casts on real events but not on those, and
    such repos compiled before the sample went through `prepare_events`."""

    @feature_view(entity=USER, source=TX, windows=["1h"], columns={"c": "int64"}, aggregations=[Sum("c")])
    def digits(tx: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"c": tx["currency"]})

    @feature_view(entity=USER, source=TX, windows=["1h"], columns={"rank": "int64"}, aggregations=[Sum("rank")])
    def looked_up(tx: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"rank": tx["currency"].map({"EUR": 1, "USD": 2})})

    plan = compile_definitions("p", views=[digits, looked_up])
    assert [view.name for view in plan.views] == ["digits", "looked_up"]


def test_feature_names_are_identifiers() -> None:
    """`Count(name="n,events")` applied and backfilled, and then could not be exported:
    `--features spaced:n,events_1d` splits on the comma."""

    named = [Count(name="n,events"), Sum("amount", name="total spend"), Count(name="fine_1")]

    @feature_view(entity=USER, source=TX, windows=["1h"], aggregations=named)
    def spaced(tx: pd.DataFrame) -> pd.DataFrame:
        return tx[[]]

    with pytest.raises(CompileError) as raised:
        compile_definitions("p", views=[spaced])
    assert [p.message for p in raised.value.problems] == [
        "feature name `n,events_1h` must be letters, digits and _ (starting with a letter); give name=",
        "feature name `total spend_1h` must be letters, digits and _ (starting with a letter); give name=",
    ]


def test_a_name_where_an_object_belongs_is_a_compile_problem_not_a_traceback() -> None:
    """entity="user", source="transactions", Sum(5) and Source(..., "TRANSACTIONS") each
    ended `tenx plan` in an AttributeError or TypeError traceback."""

    def view(**options: object) -> object:
        def counted(tx: pd.DataFrame) -> pd.DataFrame:
            return tx[[]]

        settings: dict[str, object] = {"entity": USER, "source": TX, "aggregations": [Count()], **options}
        return feature_view(windows=["1h"], **settings)(counted)  # type: ignore[arg-type]

    cases = [
        ({"entity": "user"}, "entity= must be an Entity(...) object, got str 'user'"),
        ({"source": "transactions"}, "source= must be a Source(...) object, got str 'transactions'"),
        ({"aggregations": [Sum(5)]}, "Sum(5): the column must be given by its name, got 5"),  # type: ignore[arg-type]
        (
            {"source": Source("tx2", "TRANSACTIONS")},  # type: ignore[arg-type]
            "schema must be an EventSchema (e.g. schemas.TRANSACTIONS), got str 'TRANSACTIONS'",
        ),
    ]
    for options, message in cases:
        with pytest.raises(CompileError) as raised:
            compile_definitions("p", views=[view(**options)])  # type: ignore[list-item]
        assert [p.message for p in raised.value.problems] == [message]
