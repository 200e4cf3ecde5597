"""The feature API under hostile or huge requests: bounded answers, names asked twice
answered once, nesting that breaks JSON encoders refused as a 400, anything unexpected a
clean 500 with a request id (counted as a 500), and a large answer that does not stall
the other requests."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from featurestore.stores.online import SqliteOnlineStore
from serving import api as api_module
from serving.api import ApiSettings, create_app
from tests.unit.serving.test_client import PLAN, post, store  # noqa: F401 (the fixture)


def test_a_name_asked_many_times_is_answered_once(store: SqliteOnlineStore) -> None:  # noqa: F811
    api = TestClient(create_app(store, PLAN))
    response = post(api, {"view": "spend", "entities": [1, 2], "features": ["count_1h"] * 6000 + ["sum_amount_1h"]})
    assert response.status_code == 200
    assert response.json()["features"] == ["count_1h", "sum_amount_1h"]
    assert [len(row["values"]) for row in response.json()["results"]] == [2, 2]
    # Plain and as `view:feature`: one feature, answered and counted once.
    both = post(api, {"view": "spend", "entities": [1], "features": ["count_1h", "spend:count_1h"]})
    assert both.json()["features"] == ["count_1h"]


def test_every_answer_carries_a_request_id_the_clients_when_it_sends_one(store: SqliteOnlineStore) -> None:  # noqa: F811
    api = TestClient(create_app(store, PLAN))
    fresh = post(api, {"view": "spend", "entities": [1]})
    assert len(fresh.headers["x-request-id"]) == 16
    given = api.post("/features", json={"view": "spend", "entities": [1]}, headers={"x-request-id": "trace-7"})
    assert given.headers["x-request-id"] == "trace-7"
    refused = api.post("/features", content=b"{", headers={"x-request-id": "not a token"})
    assert refused.status_code == 400
    assert refused.headers["x-request-id"] != "not a token"  # not a sane token: a new one


def test_too_many_values_is_a_413_that_says_the_limit(store: SqliteOnlineStore) -> None:  # noqa: F811
    api = TestClient(create_app(store, PLAN, ApiSettings(max_values=1_000)))
    response = post(api, {"view": "spend", "entities": list(range(300))})  # 300 x 4 features
    assert response.status_code == 413
    assert response.json()["error"] == (
        "300 entities x 4 features = 1,200 values asked; at most 1,000 per request (`tenx serve --max-values`): "
        "split the request"
    )
    assert post(api, {"view": "spend", "entities": list(range(250))}).status_code == 200
    metrics = api.get("/metrics").text
    assert 'tenx_api_requests_total{code="413",route="features"} 1.0' in metrics


def test_an_entity_nested_too_deep_to_encode_is_a_400(store: SqliteOnlineStore) -> None:  # noqa: F811
    api = TestClient(create_app(store, PLAN))
    body = b'{"view": "spend", "entities": [' + b"[" * 300 + b"1" + b"]" * 300 + b"]}"  # 300 levels deep
    response = post(api, body)
    assert response.status_code == 400
    assert response.json()["error"] == (
        "`entities` must hold integers or strings; entities[0] is a list nested too deep to show"
    )
    assert 'tenx_api_requests_total{code="400",route="features"} 1.0' in api.get("/metrics").text


class BrokenStore(SqliteOnlineStore):
    """A store with a bug: reads raise something nobody expected."""

    def read(self, view: Any, entities: Any) -> Any:
        raise RuntimeError("a bug")

    async def aread(self, view: Any, entities: Any) -> Any:
        raise RuntimeError("a bug")


def test_an_unexpected_error_is_a_clean_500_with_a_request_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    api = TestClient(create_app(BrokenStore(tmp_path / "online.sqlite"), PLAN), raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="tenx.api"):
        response = post(api, {"view": "spend", "entities": [1]})
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    assert response.json() == {"error": f"internal error (request id {request_id}); the server log has the details"}
    assert f"request id {request_id}" in caplog.text
    assert "RuntimeError: a bug" in caplog.text  # the traceback, server side only
    metrics = api.get("/metrics").text
    assert 'tenx_api_requests_total{code="500",route="features"} 1.0' in metrics
    assert 'tenx_api_requests_total{code="200",route="features"}' not in metrics


def test_a_large_answer_does_not_stall_other_requests(
    store: SqliteOnlineStore,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 10,000 entities x 4 features are encoded on a worker thread: /health/live, sent
    # while that answer is being encoded (made slow here, so the order is certain), is
    # answered before it. Encoded on the event loop, the live request would wait.
    encode = api_module._encode
    encoding = threading.Event()

    def slow_encode(result: Any) -> bytes:
        encoding.set()
        time.sleep(0.3)  # blocks whichever thread runs it
        return encode(result)

    monkeypatch.setattr(api_module, "_encode", slow_encode)
    app = create_app(store, PLAN)
    finished: list[str] = []

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:

            async def large() -> None:
                response = await client.post("/features", json={"view": "spend", "entities": list(range(10_000))})
                assert response.status_code == 200
                finished.append("large")

            async def live() -> None:
                while not encoding.is_set():
                    await asyncio.sleep(0.001)
                response = await client.get("/health/live")
                assert response.status_code == 200
                finished.append("live")

            await asyncio.gather(large(), live())

    asyncio.run(scenario())
    order = [entry.split()[0] for entry in finished]
    assert order.index("live") < order.index("large"), finished
