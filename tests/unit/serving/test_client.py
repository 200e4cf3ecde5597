"""The feature client and HTTP API over the embedded store: statuses, order, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pytest
from starlette.testclient import TestClient

from featurestore import Count, Entity, Last, Mean, Source, Sum, feature_view
from featurestore.plan import AS_OF, Plan, compile_definitions
from featurestore.stores.online import SqliteOnlineStore
from schemas import TRANSACTIONS
from serving import AsyncFeatureClient, FeatureClient, FeatureReferenceError, Status, UnknownFeatureError
from serving.api import ApiSettings, create_app

USER = Entity("user", key="user_id")
COUNTRY = Entity("country", key="country", dtype="string")
TX = Source("transactions", TRANSACTIONS)
NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


@feature_view(
    entity=USER,
    source=TX,
    aggregations=[Count(), Sum("amount"), Mean("amount"), Last("currency")],
    windows=["1h"],
    ttl="1h",
)
def spend(tx: Any) -> Any:
    return tx[[]]


@feature_view(entity=COUNTRY, source=TX, aggregations=[Count()], windows=["1h"])
def by_country(tx: Any) -> Any:
    return tx[[]]


PLAN: Plan = compile_definitions("serving", views=[spend, by_country])
VIEW = PLAN.view("spend")


def micros(moment: datetime) -> int:
    return int((moment - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteOnlineStore]:
    opened = SqliteOnlineStore(tmp_path / "online.sqlite")
    rows = {
        "user_id": [1, 2],
        AS_OF: [NOW - timedelta(minutes=5), NOW - timedelta(hours=2)],
        "count_1h": [3, 1],
        "sum_amount_1h": [30.0, 5.0],
        "mean_amount_1h": [10.0, None],
        "last_currency_1h": ["EUR", None],
    }
    opened.write(VIEW, pa.table(rows, schema=VIEW.changelog_schema()))
    countries = PLAN.view("by_country")
    by_key = {"country": ["DE", "1"], AS_OF: [NOW, NOW], "count_1h": [7, 2]}
    opened.write(countries, pa.table(by_key, schema=countries.changelog_schema()))
    yield opened
    opened.close()


def clock() -> float:
    return micros(NOW) / 1e6


def test_statuses_values_and_order(store: SqliteOnlineStore) -> None:
    result = FeatureClient(store, PLAN, clock=clock).get("spend", [2, 3, 1])
    assert result.statuses == (Status.STALE, Status.MISSING, Status.FOUND)
    assert result.values == ((1, 5.0, None, None), None, (3, 30.0, 10.0, "EUR"))
    assert result.age_seconds(2) == 300.0
    assert result.as_of(0) == NOW - timedelta(hours=2)


def test_feature_subset_in_the_order_asked(store: SqliteOnlineStore) -> None:
    client = FeatureClient(store, PLAN, clock=clock)
    result = client.get_features(["spend:mean_amount_1h", "spend:count_1h"], [1, 3])
    assert result.names == ("mean_amount_1h", "count_1h")
    assert result.to_dicts()[0] == {
        "user_id": 1,
        "status": "found",
        "as_of": NOW - timedelta(minutes=5),
        "age_s": 300.0,
        "mean_amount_1h": 10.0,
        "count_1h": 3,
    }
    matrix = result.to_numpy()
    assert matrix[0].tolist() == [10.0, 3.0]
    assert np.isnan(matrix[1]).all()
    assert list(result.to_pandas().columns) == ["user_id", "status", "as_of", "age_s", "mean_amount_1h", "count_1h"]
    assert result.to_polars().height == 2


def test_unknown_names_suggest_close_matches(store: SqliteOnlineStore) -> None:
    client = FeatureClient(store, PLAN)
    with pytest.raises(UnknownFeatureError) as raised:
        client.get("spnd", [1])
    assert str(raised.value) == "unknown feature view `spnd`; did you mean `spend`? (known: by_country, spend)"
    with pytest.raises(UnknownFeatureError) as raised:
        client.get("spend", [1], features=["count_1d"])
    assert str(raised.value) == (
        "unknown feature `count_1d` in view `spend`; did you mean `count_1h`? "
        "(known: count_1h, sum_amount_1h, mean_amount_1h, last_currency_1h)"
    )


def test_malformed_references_are_value_errors(store: SqliteOnlineStore) -> None:
    client = FeatureClient(store, PLAN)
    with pytest.raises(FeatureReferenceError) as raised:
        client.get_features(["count_1h"], [1])
    assert isinstance(raised.value, ValueError)
    assert str(raised.value) == "feature reference 'count_1h' must look like `view:feature`"
    with pytest.raises(FeatureReferenceError) as raised:
        client.get_features(["spend:count_1h", "by_country:count_1h"], [1])
    assert str(raised.value) == "feature references name 2 views (by_country, spend); ask one view per call"


def test_async_client_gives_the_same_result(store: SqliteOnlineStore) -> None:
    async def run() -> Any:
        return await AsyncFeatureClient(store, PLAN, clock=clock).get("spend", [2, 3, 1])

    assert asyncio.run(run()) == FeatureClient(store, PLAN, clock=clock).get("spend", [2, 3, 1])


INT_KEYS_OF_USER_1 = [1, "1", "001", 1.0, np.float64(1.0), np.int64(1), np.int32(1), pd.Series([1, None])[0]]


def test_keys_are_read_by_the_http_apis_rule_and_answered_as_given(store: SqliteOnlineStore) -> None:
    """Every spelling of user 1 the API takes (or that a numpy array or a pandas column
    with a null holds) finds it; they came back MISSING, silently."""
    result = FeatureClient(store, PLAN, clock=clock).get("spend", INT_KEYS_OF_USER_1, features=["count_1h"])
    assert result.statuses == (Status.FOUND,) * len(INT_KEYS_OF_USER_1)
    assert result.values == ((3,),) * len(INT_KEYS_OF_USER_1)
    assert result.entities == tuple(INT_KEYS_OF_USER_1)
    array = FeatureClient(store, PLAN, clock=clock).get("spend", np.array([1, 2, 3]), features=["count_1h"])
    assert array.statuses == (Status.FOUND, Status.STALE, Status.MISSING)
    countries = FeatureClient(store, PLAN, clock=clock).get("by_country", [np.str_("DE"), 1, np.int64(1), "1"])
    assert countries.values == ((7,), (2,), (2,), (2,))

    async def run() -> Any:
        return await AsyncFeatureClient(store, PLAN, clock=clock).get("spend", INT_KEYS_OF_USER_1)

    assert asyncio.run(run()).statuses == (Status.FOUND,) * len(INT_KEYS_OF_USER_1)


@pytest.mark.parametrize(
    ("view", "entity", "message"),
    [
        ("spend", True, "entity True (entities[1]) is not an int64 `user_id`: view `spend` takes integers, "
         "strings of digits or whole floats up to 2**53"),
        ("spend", None, "entity None (entities[1]) is not an int64 `user_id`: view `spend` takes integers, "
         "strings of digits or whole floats up to 2**53"),
        ("spend", 9.5, "entity 9.5 (entities[1]) is not an int64 `user_id`: view `spend` takes integers, "
         "strings of digits or whole floats up to 2**53"),
        ("spend", 2.0**60, "entity 1.152921504606847e+18 (entities[1]) is not an int64 `user_id`: view `spend` "
         "takes integers, strings of digits or whole floats up to 2**53"),
        ("spend", "9a", "entity '9a' (entities[1]) is not an int64 `user_id`: view `spend` takes integers or "
         "strings of digits"),
        ("spend", 1 << 63, "entity 9223372036854775808 (entities[1]) is out of the int64 range "
         "[-9223372036854775808, 9223372036854775807] of `user_id`"),
        ("by_country", 1.0, "entity 1.0 (entities[1]) is not a string `country`: view `by_country` takes strings "
         "or integers"),
        ("by_country", False, "entity False (entities[1]) is not a string `country`: view `by_country` takes "
         "strings or integers"),
    ],
)  # fmt: skip
def test_a_key_that_cannot_be_the_views_key_type_is_a_value_error(
    store: SqliteOnlineStore, view: str, entity: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=r"\(entities\[1\]\)") as raised:
        FeatureClient(store, PLAN, clock=clock).get(view, [1, entity])
    assert str(raised.value) == message

    async def run() -> Any:
        return await AsyncFeatureClient(store, PLAN, clock=clock).get(view, [1, entity])

    with pytest.raises(ValueError, match="entities\\[1\\]"):
        asyncio.run(run())


# -- HTTP API ------------------------------------------------------------------------------


def post(api: TestClient, body: Any, **headers: str) -> Any:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return api.post("/features", content=content, headers=headers)


def test_api_returns_values_statuses_and_metrics(store: SqliteOnlineStore) -> None:
    api = TestClient(create_app(store, PLAN))
    response = post(api, {"view": "spend", "entities": [1, 3], "features": ["count_1h", "last_currency_1h"]})
    assert response.status_code == 200
    body = response.json()
    assert body["features"] == ["count_1h", "last_currency_1h"]
    assert [r["status"] for r in body["results"]] == ["stale", "missing"]  # NOW is in the past of the real clock
    assert body["results"][0]["values"] == [3, "EUR"]
    assert body["results"][0]["as_of"] == "2026-03-01T11:55:00Z"
    by_reference = post(api, {"features": ["spend:count_1h"], "entities": [2]})
    assert by_reference.json()["results"][0]["values"] == [1]
    metrics = api.get("/metrics").text
    assert 'tenx_api_requests_total{code="200",route="features"} 2.0' in metrics
    assert 'tenx_api_entities_total{status="missing",view="spend"} 1.0' in metrics
    assert api.get("/health/live").json() == {"status": "ok"}
    assert api.get("/health/ready").json() == {"status": "ok", "plan": PLAN.version}
    assert api.get("/health").json() == {"status": "ok", "plan": PLAN.version}
    assert "/health" in api.get("/openapi.json").json()["paths"]
    assert api.get("/openapi.json").json()["paths"]["/features"]["post"]["summary"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, 'the body must be JSON, e.g. {"view": "user_spend", "entities": [1, 2]}'),
        (b"view=spend&entities=1", 400, "the body must be JSON"),
        ([1, 2], 400, "body must be a JSON object"),
        ({"view": "spend"}, 400, "`entities` must be a non-empty list of entity keys"),
        ({"view": "spend", "entities": [True]}, 400, "`entities` must hold integers or strings"),
        ({"view": "spend", "entities": [1], "extra": 1}, 400, "unknown field(s) extra"),
        ({"entities": [1]}, 400, "give `view`, or `features` as `view:feature` names"),
        ({"view": "nope", "entities": [1]}, 404, "unknown feature view `nope`"),
    ],
)
def test_api_explains_bad_requests(store: SqliteOnlineStore, body: Any, status: int, message: str) -> None:
    response = post(TestClient(create_app(store, PLAN)), body)
    assert response.status_code == status
    assert response.json()["error"].startswith(message)


INT64 = "[-9223372036854775808, 9223372036854775807]"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"view": "spend", "entities": [1, "abc"]},
            400,
            "entity 'abc' (entities[1]) is not an int64 `user_id`: view `spend` takes integers or strings of digits",
        ),
        (
            {"view": "spend", "entities": ["1.5"]},
            400,
            "entity '1.5' (entities[0]) is not an int64 `user_id`: view `spend` takes integers or strings of digits",
        ),
        (
            {"view": "spend", "entities": ["99999999999999999999999"]},
            400,
            f"entity '99999999999999999999999' (entities[0]) is out of the int64 range {INT64} of `user_id`",
        ),
        (
            b'{"view": "spend", "entities": [99999999999999999999999]}',
            400,
            f"entity 99999999999999999999999 (entities[0]) is out of the int64 range {INT64}; "
            "send string keys as JSON strings",
        ),
        (
            b'{"view": "by_country", "entities": [1, 9223372036854775808]}',
            400,
            f"entity 9223372036854775808 (entities[1]) is out of the int64 range {INT64}; "
            "send string keys as JSON strings",
        ),
        (
            b'{"view": "spend", "entities": [-9223372036854775809]}',
            400,
            f"entity -9223372036854775809 (entities[0]) is out of the int64 range {INT64}; "
            "send string keys as JSON strings",
        ),
        (
            b'{"view": "spend", "entities": [1e23]}',
            400,
            "`entities` must hold integers or strings; entities[0] is 1e+23",
        ),
        (
            {"view": "spend", "entities": [1, {"id": 2}]},
            400,
            '`entities` must hold integers or strings; entities[1] is {"id":2}',
        ),
        (
            {"features": ["count_1h"], "entities": [1]},
            400,
            "feature reference 'count_1h' must look like `view:feature`",
        ),
        (
            {"features": ["spend:count_1h", "by_country:count_1h"], "entities": [1]},
            400,
            "feature references name 2 views (by_country, spend); ask one view per call",
        ),
        (
            {"view": "spend", "features": ["by_country:count_1h"], "entities": [1]},
            400,
            "feature reference `by_country:count_1h` names view `by_country`, not `spend`; ask one view per call",
        ),
        (
            {"view": "spend", "entities": [1], "features": []},
            400,
            "`features` is empty: omit it for every feature of the view",
        ),
        (
            {"view": "spend", "entities": [1], "features": ["nope"]},
            404,
            "unknown feature `nope` in view `spend` (known: count_1h, sum_amount_1h, mean_amount_1h, last_currency_1h)",
        ),
        (
            {"features": ["spend:count_1d"], "entities": [1]},
            404,
            "unknown feature `count_1d` in view `spend`; did you mean `count_1h`? "
            "(known: count_1h, sum_amount_1h, mean_amount_1h, last_currency_1h)",
        ),
    ],
)
def test_api_error_messages(store: SqliteOnlineStore, body: Any, status: int, message: str) -> None:
    response = post(TestClient(create_app(store, PLAN)), body)
    assert (response.status_code, response.json()) == (status, {"error": message})


def test_api_reads_strings_of_digits_as_int64_keys_and_echoes_them(store: SqliteOnlineStore) -> None:
    response = post(TestClient(create_app(store, PLAN)), {"view": "spend", "entities": ["1", "001", 1, "-5"]})
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["entity"] for r in results] == ["1", "001", 1, "-5"]
    assert [r["values"] for r in results] == [[3, 30.0, 10.0, "EUR"]] * 3 + [None]


def test_api_takes_integers_for_string_keys(store: SqliteOnlineStore) -> None:
    response = post(TestClient(create_app(store, PLAN)), {"view": "by_country", "entities": ["DE", 1, "1", "FR"]})
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["entity"] for r in results] == ["DE", 1, "1", "FR"]
    assert [r["values"] for r in results] == [[7], [2], [2], None]


def test_api_limits_and_auth(store: SqliteOnlineStore) -> None:
    api = TestClient(create_app(store, PLAN, ApiSettings(token="s3cret", max_body_bytes=200, max_entities=5)))
    assert post(api, {"view": "spend", "entities": [1]}).status_code == 401
    assert post(api, {"view": "spend", "entities": [1]}, authorization="Bearer wrong").status_code == 401
    assert post(api, {"view": "spend", "entities": [1]}, authorization="Bearer s3cret").status_code == 200
    # The API's description names every view and feature: for token holders only.
    assert api.get("/openapi.json").status_code == 401
    assert "/features" in api.get("/openapi.json", headers={"authorization": "Bearer s3cret"}).json()["paths"]
    assert api.get("/health/ready").status_code == 200  # probes need no token
    too_many = post(api, {"view": "spend", "entities": list(range(6))}, authorization="Bearer s3cret")
    assert too_many.status_code == 400
    assert too_many.json()["error"] == "6 entities asked; at most 5 per request"
    huge = post(api, {"view": "spend", "entities": ["x" * 300]}, authorization="Bearer s3cret")
    assert huge.status_code == 413


def test_api_is_not_ready_without_a_plan(store: SqliteOnlineStore) -> None:
    api = TestClient(create_app(store, None))
    assert api.get("/health/ready").status_code == 503
    assert api.get("/health").json() == {"status": "unavailable", "problems": ["no plan loaded"]}
    assert post(api, {"view": "spend", "entities": [1]}).status_code == 503


def test_api_follows_a_newly_applied_plan(store: SqliteOnlineStore, tmp_path: Path) -> None:
    """After `tenx apply` changed a view's version the stream writes the new version's
    keys: an API that kept its first plan served the old keys' frozen values."""
    from featurestore.registry import FileRegistry

    @feature_view(entity=USER, source=TX, aggregations=[Count(), Sum("amount")], windows=["2h"], ttl="1h")
    def spend(tx: Any) -> Any:  # the same view, another window: another version
        return tx[[]]

    changed = compile_definitions("serving", views=[spend, by_country])
    view = changed.view("spend")
    assert view.version != VIEW.version
    rows = {"user_id": [1], AS_OF: [NOW], "count_2h": [9], "sum_amount_2h": [90.0]}
    store.write(view, pa.table(rows, schema=view.changelog_schema()))
    registry = FileRegistry(tmp_path / "registry")
    registry.apply(PLAN)
    api = TestClient(create_app(store, registry.current(), registry=registry, plan_check_s=0.0))
    assert post(api, {"view": "spend", "entities": [1]}).json()["features"] == [
        "count_1h", "sum_amount_1h", "mean_amount_1h", "last_currency_1h"
    ]  # fmt: skip
    registry.apply(changed)
    answer = post(api, {"view": "spend", "entities": [1]}).json()
    assert answer["features"] == ["count_2h", "sum_amount_2h"]
    assert answer["results"][0]["values"] == [9, 90.0]
    assert api.get("/health/ready").json() == {"status": "ok", "plan": changed.version}


def test_api_follows_a_plan_that_renames_the_project(tmp_path: Path) -> None:
    """Keys start `tenx:<project>`; after `tenx apply` renamed the project (the diff says
    to re-run materialize) the API answered the new plan from the old project's keys."""
    from dataclasses import replace

    from featurestore.registry import FileRegistry
    from featurestore.stores.online import open_online_store

    renamed = replace(PLAN, project="renamed")
    online = open_online_store(redis_url=None, sqlite_path=tmp_path / "online.db", project=PLAN.project)
    assert isinstance(online, SqliteOnlineStore)
    schema = VIEW.changelog_schema()
    old = {"user_id": [1], AS_OF: [NOW], "count_1h": [1], "sum_amount_1h": [1.0], "mean_amount_1h": [1.0]}
    online.write(VIEW, pa.table({**old, "last_currency_1h": ["EUR"]}, schema=schema))
    materialized = open_online_store(redis_url=None, sqlite_path=tmp_path / "online.db", project="renamed")
    new = {"user_id": [1], AS_OF: [NOW], "count_1h": [42], "sum_amount_1h": [1.0], "mean_amount_1h": [1.0]}
    materialized.write(VIEW, pa.table({**new, "last_currency_1h": ["EUR"]}, schema=schema))
    registry = FileRegistry(tmp_path / "registry")
    registry.apply(PLAN)
    api = TestClient(create_app(online, registry.current(), registry=registry, plan_check_s=0.0))
    assert post(api, {"view": "spend", "entities": [1]}).json()["results"][0]["values"][0] == 1
    registry.apply(renamed)
    assert post(api, {"view": "spend", "entities": [1]}).json()["results"][0]["values"][0] == 42
    assert api.get("/health/ready").json() == {"status": "ok", "plan": renamed.version}
