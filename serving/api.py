"""The HTTP feature API (Starlette on uvicorn, orjson bodies, no pydantic on the hot path).

    POST /features        {"view": "user_spend", "entities": [1, 2], "features": ["count_1h"]}
                          or {"features": ["user_spend:count_1h"], "entities": [1, 2]}
    GET  /health/live     the process answers
    GET  /health/ready    the online store answers and a plan is loaded (200, else 503)
    GET  /health          the same as /health/ready
    GET  /metrics         Prometheus: latency histogram, requests, errors, entities served
    GET  /openapi.json    this API's description (with a token set, for token holders)

Entities are JSON integers (within int64) or strings. A view keyed by int64 also takes
strings of digits ("42", read as 42; answered as sent); a view keyed by strings also
takes integers (1 and "1" are the same key). A malformed body is a 400, an unknown view
or feature a 404 with close matches, a request for more than `max_values` values
(entities x features, repeated names counted once) a 413 that says the limit. An online
store that is down, too slow, or has no connection free within its pool timeout is a 503
with Retry-After. Anything unexpected is a 500 with a request id (logged with its
traceback), counted as a 500.

Settings are read by the caller (`tenx serve`) and passed to `create_app`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import Counter as Counter_
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from featurestore.errors import TransientError
from featurestore.plan.model import EntitySpec, Plan
from featurestore.stores.online import OnlineStore, follow_project
from schemas.timestamps import from_micros
from serving.client import INT64_MAX as INT64_MAX
from serving.client import INT64_MIN as INT64_MIN
from serving.client import INT64_RANGE, AsyncFeatureClient, FeatureResult, int64_from_digits, split_references
from serving.errors import FeatureReferenceError, UnknownFeatureError
from serving.logs import REQUEST_ID, new_request_id

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_ENTITIES = 10_000
MAX_VALUES = 250_000  # entities x features in one answer (about 5 MB of JSON)
OFF_LOOP_VALUES = 20_000  # answers larger than this are encoded on a worker thread
RETRY_AFTER_S = 1  # told to clients when the online store fails transiently (a 503)
log = logging.getLogger("tenx.api")


PLAN_CHECK_S = 1.0  # how often the API looks for a newly applied plan


@dataclass(frozen=True)
class ApiSettings:
    token: str | None = None  # bearer token; None: no auth
    max_body_bytes: int = MAX_BODY_BYTES
    max_entities: int = MAX_ENTITIES
    max_values: int = MAX_VALUES


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "tenx_api_request_seconds",
            "Feature API request latency.",
            ["route"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.requests = Counter("tenx_api_requests_total", "Requests.", ["route", "code"], registry=self.registry)
        self.errors = Counter("tenx_api_errors_total", "Failed requests.", ["route", "kind"], registry=self.registry)
        self.entities = Counter(
            "tenx_api_entities_total", "Entities served, by status.", ["view", "status"], registry=self.registry
        )


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _problem(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def _internal_error(route: str) -> Response:
    """A clean 500 for what no one expected: the client gets a request id, the log gets
    the traceback under it."""
    request_id = REQUEST_ID.get() or new_request_id()
    log.exception("internal error on %s (request id %s)", route, request_id)
    response = _json({"error": f"internal error (request id {request_id}); the server log has the details"}, 500)
    response.headers["X-Request-Id"] = request_id
    return response


def _encode(result: FeatureResult) -> bytes:
    return orjson.dumps(render(result))


def _iso(as_of_us: int | None) -> str | None:
    if as_of_us is None:
        return None
    return from_micros(as_of_us).isoformat().replace("+00:00", "Z")


def render(result: FeatureResult) -> dict[str, Any]:
    rows = []
    for index, entity in enumerate(result.entities):
        values = result.values[index]
        rows.append(
            {
                "entity": entity,
                "status": result.statuses[index].value,
                "as_of": _iso(result.as_of_us[index]),
                "age_s": result.age_seconds(index),
                "values": list(values) if values is not None else None,
            }
        )
    return {"view": result.view, "entity_key": result.entity_key, "features": list(result.names), "results": rows}


def _parse(body: bytes, settings: ApiSettings) -> tuple[str, list[str] | None, list[Any]]:
    """(view, features or None, entities) from a request body; ValueError says what is wrong."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ValueError(
            'the body must be JSON, e.g. {"view": "user_spend", "entities": [1, 2]} with Content-Type '
            f"application/json; it is not valid JSON ({error})"
        ) from error
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object with `entities` and `view` and/or `features`")
    unknown = set(data) - {"view", "features", "entities"}
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}; expected view, features, entities")
    entities = data.get("entities")
    if not isinstance(entities, list) or not entities:
        raise ValueError("`entities` must be a non-empty list of entity keys")
    if len(entities) > settings.max_entities:
        raise ValueError(f"{len(entities)} entities asked; at most {settings.max_entities} per request")
    for index, entity in enumerate(entities):
        if isinstance(entity, bool) or not isinstance(entity, int | str):
            raise ValueError(_not_a_key(body, index, entity))
        if isinstance(entity, int) and not INT64_MIN <= entity <= INT64_MAX:
            raise ValueError(_out_of_range(entity, index))
    features = data.get("features")
    if features is not None and (not isinstance(features, list) or not all(isinstance(f, str) for f in features)):
        raise ValueError("`features` must be a list of feature names")
    if features:
        features = list(dict.fromkeys(features))  # a name asked twice is answered once
    view = data.get("view")
    if view is None:
        if not features:
            raise ValueError("give `view`, or `features` as `view:feature` names")
        view, features = split_references(features)
    elif not isinstance(view, str):
        raise ValueError("`view` must be a string")
    elif features is not None:
        if not features:
            raise ValueError("`features` is empty: omit it for every feature of the view")
        if any(":" in f for f in features):
            # `f` and `view:f` are one feature: asked both ways it is answered (and counted) once
            features = list(dict.fromkeys(_within(view, f) for f in features))
    return view, features, entities


def _within(view: str, feature: str) -> str:
    """A feature of `view`, given plain or as `view:feature`."""
    named, sep, name = feature.partition(":")
    if not sep:
        return feature
    if named != view:
        raise FeatureReferenceError(
            f"feature reference `{feature}` names view `{named}`, not `{view}`; ask one view per call"
        )
    return name


def _out_of_range(entity: int, index: int) -> str:
    return (
        f"entity {entity} (entities[{index}]) is out of the int64 range {INT64_RANGE}; send string keys as JSON strings"
    )


def _not_a_key(body: bytes, index: int, entity: Any) -> str:
    """Why entities[index] is no key. orjson reads an integer beyond 64 bits as a float:
    the standard parser, run only on this error path, tells it from a literal float."""
    if isinstance(entity, float):
        try:
            exact = json.loads(body)["entities"][index]
        except (ValueError, RecursionError):  # beyond int's digit limit, or deeper than the stack
            exact = entity
        if isinstance(exact, int):
            return _out_of_range(exact, index)
    try:
        shown = orjson.dumps(entity).decode()
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (255 levels)
        shown = f"a {type(entity).__name__} nested too deep to show"
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"`entities` must hold integers or strings; entities[{index}] is {shown}"


def _entity_keys(view: str, entity: EntitySpec, entities: list[Any]) -> list[Any]:
    """The keys to look up: an int64 view reads strings of digits as integers ("007" is
    7), a string view takes integers as they are (1 and "1" make the same online key).
    The model server's rule for decoded JSON; the feature clients read Python values by
    the same rule (`serving.client.lookup_keys`), the feature API through them."""
    if entity.dtype != "int64" or not any(isinstance(e, str) for e in entities):
        return entities
    return [
        int64_from_digits(view, entity, index, key) if isinstance(key, str) else key
        for index, key in enumerate(entities)
    ]


@dataclass
class _Served:
    """The plan requests are answered from, and what is derived from it."""

    plan: Plan | None
    client: AsyncFeatureClient | None
    width_of: dict[str, int]
    next_check: float = 0.0  # monotonic time of the next look at the registry

    @classmethod
    def of(cls, store: OnlineStore, plan: Plan | None, next_check: float = 0.0) -> _Served:
        views = plan.views if plan is not None else ()
        return cls(
            plan,
            AsyncFeatureClient(store, plan) if plan is not None else None,
            {view.name: len(view.features) for view in views},
            next_check,
        )


def create_app(
    store: OnlineStore,
    plan: Plan | None,
    settings: ApiSettings | None = None,
    *,
    registry: Any = None,
    plan_check_s: float = PLAN_CHECK_S,
) -> Starlette:
    """The ASGI app. `plan` None means not ready (no plan applied). With `registry` (a
    FileRegistry) the app follows the applied plan: at most every `plan_check_s` a
    request looks at the registry's current version and, when it changed, answers from
    the new plan. Without it a `tenx apply` that changed a view's version left the API
    reading the old version's keys, which the stream no longer writes: frozen values,
    served as fresh. A store keyed by the plan's project follows a plan that renames it
    (`follow_project`)."""
    config = settings or ApiSettings()
    metrics = _Metrics()
    served = _Served.of(store, plan, time.monotonic() + plan_check_s)

    async def follow_the_plan() -> _Served:
        nonlocal served
        current = served
        if registry is None or time.monotonic() < current.next_check:
            return current
        current.next_check = time.monotonic() + plan_check_s  # one look per interval, whatever awaits below
        version = await asyncio.to_thread(registry.current_version)
        if version != (current.plan.version if current.plan is not None else None):
            newer = await asyncio.to_thread(registry.current) if version else None
            before = current.plan.project if current.plan is not None else None
            if follow_project(store, before, newer.project if newer is not None else None):
                log.info("feature API: now reading the keys of project %s", store.prefix)  # type: ignore[attr-defined]
            served = _Served.of(store, newer, current.next_check)
            log.info("feature API: now answering from plan %s", version)
        return served

    expected_auth = f"Bearer {config.token}".encode() if config.token else None

    def authorized(request: Request) -> bool:
        if expected_auth is None:
            return True
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, expected_auth)

    async def features(request: Request) -> Response:
        """POST /features, answered with its request id (the client's X-Request-Id, or a
        new one), which this request's log lines carry too."""
        request_id = new_request_id(request.headers.get("x-request-id", "").encode() or None)
        REQUEST_ID.set(request_id)
        response = await lookup(request)
        response.headers["X-Request-Id"] = request_id
        return response

    async def lookup(request: Request) -> Response:
        began = time.perf_counter()
        code = 200
        try:
            if not authorized(request):
                code = 401
                return _problem(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
            now = await follow_the_plan()
            client, width_of = now.client, now.width_of
            if client is None:
                code = 503
                return _problem(503, "no plan loaded; run `tenx apply`")
            length = request.headers.get("content-length")
            if length is not None and int(length) > config.max_body_bytes:
                code = 413
                return _problem(413, f"body of {length} bytes exceeds {config.max_body_bytes}")
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > config.max_body_bytes:
                    code = 413
                    return _problem(413, f"body exceeds {config.max_body_bytes} bytes")
            try:
                view, names, entities = _parse(body, config)
                width = len(names) if names is not None else width_of.get(view, 0)
                if len(entities) * width > config.max_values:
                    code = 413
                    return _problem(
                        413,
                        f"{len(entities):,} entities x {width:,} features = {len(entities) * width:,} values asked; "
                        f"at most {config.max_values:,} per request (`tenx serve --max-values`): split the request",
                    )
                # The client reads keys by the view's key type ("007" is 7) and answers each
                # entity as it was sent (`serving.client.lookup_keys`).
                result = await client.get(view, entities, features=names)
            except ValueError as error:
                code = 400
                return _problem(400, str(error))
            except UnknownFeatureError as error:
                code = 404
                return _problem(404, str(error))
            except TransientError as error:  # the store is away, slow, or its pool stayed full
                code = 503
                metrics.errors.labels("features", "store").inc()
                unavailable = _problem(503, str(error))
                unavailable.headers["Retry-After"] = str(RETRY_AFTER_S)
                return unavailable
            for status, count in Counter_(result.statuses).items():
                metrics.entities.labels(result.view, status.value).inc(count)
            # A large answer is encoded on a worker thread: other requests (and
            # /health/live) keep being served meanwhile.
            large = len(result.entities) * len(result.names) > OFF_LOOP_VALUES
            encoded = await asyncio.to_thread(_encode, result) if large else _encode(result)
            return Response(encoded, media_type="application/json")
        except Exception:  # noqa: BLE001 (an answer and a count for every request, whatever failed)
            code = 500
            return _internal_error("features")
        finally:
            metrics.requests.labels("features", str(code)).inc()
            if code >= 400:
                metrics.errors.labels("features", str(code)).inc()
            metrics.latency.labels("features").observe(time.perf_counter() - began)

    async def live(request: Request) -> Response:
        return _json({"status": "ok"})

    async def ready(request: Request) -> Response:
        problems = []
        plan = (await follow_the_plan()).plan
        if plan is None:
            problems.append("no plan loaded")
        try:
            ping = getattr(store, "ping", None)
            if ping is not None:
                await asyncio.to_thread(ping)  # never block the event loop on a slow store
        except TransientError as error:
            problems.append(str(error))
        except Exception:  # noqa: BLE001
            return _internal_error("health")
        if problems:
            return _json({"status": "unavailable", "problems": problems}, 503)
        return _json({"status": "ok", "plan": plan.version if plan else None})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        # It names every view and feature the plan serves: with a token set, for token holders only.
        if not authorized(request):
            return _problem(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        return _json(openapi_spec((await follow_the_plan()).plan))

    return Starlette(
        routes=[
            Route("/features", features, methods=["POST"]),
            Route("/health/live", live),
            Route("/health/ready", ready),
            Route("/health", ready),
            Route("/metrics", prometheus),
            Route("/openapi.json", openapi),
        ]
    )


def openapi_spec(plan: Plan | None) -> dict[str, Any]:
    views = [v.name for v in plan.views] if plan else []
    request_schema = {
        "type": "object",
        "required": ["entities"],
        "additionalProperties": False,
        "properties": {
            "view": {"type": "string", "enum": views} if views else {"type": "string"},
            "features": {"type": "array", "items": {"type": "string"}},
            "entities": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_ENTITIES,
                "items": {"type": ["integer", "string"]},
            },
        },
    }
    result_schema = {
        "type": "object",
        "properties": {
            "entity": {"type": ["integer", "string"]},
            "status": {"type": "string", "enum": ["found", "missing", "stale"]},
            "as_of": {"type": ["string", "null"], "format": "date-time"},
            "age_s": {"type": ["number", "null"]},
            "values": {"type": ["array", "null"]},
        },
    }
    error = {
        "content": {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}
    }
    readiness = {
        "get": {
            "summary": "Readiness: store reachable, plan loaded",
            "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "tenx feature API", "version": plan.version if plan else "none"},
        "paths": {
            "/features": {
                "post": {
                    "summary": "Look up precomputed feature vectors for many entities",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}},
                    "responses": {
                        "200": {
                            "description": "One result per entity, in the order asked",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "view": {"type": "string"},
                                            "entity_key": {"type": "string"},
                                            "features": {"type": "array", "items": {"type": "string"}},
                                            "results": {"type": "array", "items": result_schema},
                                        },
                                    }
                                }
                            },
                        },
                        "400": {"description": "Invalid body", **error},
                        "401": {"description": "Missing or wrong bearer token", **error},
                        "404": {"description": "Unknown view or feature", **error},
                        "413": {"description": "Body too large", **error},
                        "503": {"description": "Online store unavailable or no plan", **error},
                    },
                }
            },
            "/health/live": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
            "/health/ready": readiness,
            "/health": readiness,
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "metrics"}}}},
        },
    }
