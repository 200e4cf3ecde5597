"""The model server's HTTP API (Starlette on uvicorn; `/predict` is a bare ASGI endpoint:
per-request work is parsing, enqueueing and writing the answer, nothing else).

    POST /predict       {"model": "buys", "entities": [1, 2], "priority": "critical",
                         "tenant": "shop-1", "deadline_ms": 250}
                        -> {"model": "buys", "version": 3, "served_by": "buys@3", "precision": "fp32",
                            "device": "cpu", "degraded": false, "scores": [0.12, null],
                            "status": ["found", "missing"], "as_of_ms": [1765000000000, null],
                            "read_at_ms": 1765000002500}
    GET  /models        what is served: version, precision, device, features, queue
    GET  /health/live   the process answers
    GET  /health/ready  every served model is loaded and warm, and the online store answers
    GET  /metrics       Prometheus (merged over worker processes)

`priority`, `tenant` and `deadline_ms` may come as headers instead (X-Priority,
X-Tenant, X-Deadline-Ms). A score is null when the card's policy refuses the entity's
features (`missing` or `stale`); `status` says which. Errors are JSON `{"error": ...}`:
400 a malformed body (saying what to send), 401 a wrong token, 404 an unknown model
(naming the served ones), 409 a model trained on other feature view versions than the
applied plan's (saying what to re-run), 413 too large, 503 overloaded or loading (with
Retry-After), 504 the deadline passed before scoring.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from featurestore.definitions.route import Route as RouteSpec
from featurestore.errors import TransientError
from serving.api import INT64_MAX, INT64_MIN, _entity_keys, _not_a_key
from serving.errors import DeadlineExceeded, Overloaded, SkewError, UnknownModelError
from serving.logs import REQUEST_ID, configure_logging, new_request_id
from serving.models.admission import Rejected, TenantPolicy, Tenants
from serving.models.batcher import Priority
from serving.models.breaker import Breakers, BreakerSettings, BreakerState
from serving.models.cost import CostRates
from serving.models.metrics import ModelMetrics, exposition
from serving.models.policies import Guard
from serving.models.protocol import SCREENED
from serving.models.served import Answer, describe
from serving.models.served import Route as ModelRoute
from serving.models.server import ModelServer, ModelServerSettings

MAX_BODY_BYTES = 1 << 20
UNAUTHORIZED = "missing or wrong bearer token (Authorization: Bearer <token>)"
MAX_ENTITIES = 10_000
MAX_DEADLINE_MS = 600_000
RETRY_AFTER_S = 1
_RETRY_AFTER = str(RETRY_AFTER_S).encode()
_FIELDS = frozenset({"model", "entities", "priority", "tenant", "deadline_ms", "context"})
_JSON = [(b"content-type", b"application/json")]
log = logging.getLogger("tenx.models")


@dataclass(frozen=True)
class PredictRequest:
    model: str
    entities: list[Any]
    priority: Priority | None  # None: the tenant's default class (tenx.yaml), else default
    tenant: str
    deadline_ms: float
    context: dict[str, Any]


class BadRequest(ValueError):
    pass


def parse_predict(body: bytes, headers: dict[bytes, bytes], *, default_deadline_ms: float) -> PredictRequest:
    """The request from a body (and headers); BadRequest says what to send."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadRequest(
            f'the body must be JSON, e.g. {{"model": "buys", "entities": [1, 2]}}; it is not valid JSON ({error})'
        ) from None
    if type(data) is not dict:
        raise BadRequest('the body must be a JSON object, e.g. {"model": "buys", "entities": [1, 2]}')
    if not data.keys() <= _FIELDS:
        unknown = ", ".join(sorted(set(data) - _FIELDS))
        raise BadRequest(
            f"unknown field(s) {unknown}; expected model, entities, priority, tenant, deadline_ms, context"
        )
    model = data.get("model")
    if type(model) is not str or not model:
        raise BadRequest('`model` must name a served model, e.g. "model": "buys" (GET /models lists them)')
    entities = data.get("entities")
    if type(entities) is not list or not entities:
        raise BadRequest("`entities` must be a non-empty list of entity keys (integers or strings)")
    if len(entities) > MAX_ENTITIES:
        raise BadRequest(f"{len(entities)} entities asked; at most {MAX_ENTITIES} per request")
    for index, entity in enumerate(entities):
        kind = type(entity)
        if kind is int:
            if not INT64_MIN <= entity <= INT64_MAX:
                raise BadRequest(f"entity {entity} (entities[{index}]) is out of the int64 range")
        elif kind is not str and kind is not dict:
            raise BadRequest(_not_a_key(body, index, entity))
    priority_text = data.get("priority") or (headers[b"x-priority"].decode() if b"x-priority" in headers else None)
    priority = None
    if priority_text is not None:
        try:
            priority = Priority.parse(priority_text if isinstance(priority_text, str) else repr(priority_text))
        except ValueError as error:
            raise BadRequest(f"`priority`: {error}") from None
    tenant = data.get("tenant") or headers.get(b"x-tenant", b"default").decode()
    if not isinstance(tenant, str):
        raise BadRequest("`tenant` must be a string")
    deadline: Any = data.get("deadline_ms")
    if deadline is None:
        header = headers.get(b"x-deadline-ms")
        try:
            deadline = float(header) if header is not None else default_deadline_ms
        except ValueError:
            raise BadRequest(f"X-Deadline-Ms header {header!r} is not a number of milliseconds") from None
    if isinstance(deadline, bool) or not isinstance(deadline, int | float) or not 0 < deadline <= MAX_DEADLINE_MS:
        raise BadRequest(f"`deadline_ms` must be a number of milliseconds in (0, {MAX_DEADLINE_MS}]; got {deadline!r}")
    context = data.get("context") or {}
    if type(context) is not dict:
        raise BadRequest('`context` must be an object of fields for routing rules, e.g. "context": {"amount": 12.5}')
    return PredictRequest(model, entities, priority, tenant, float(deadline), context)


def entity_keys(route: ModelRoute, entities: list[Any]) -> list[Any]:
    """The lookup keys: scalars for a model with one entity key (an int64 key also takes
    strings of digits), mappings key -> value when its views have several."""
    model = route.name
    loaded = route.loaded
    if loaded is None:
        return entities
    assembler = loaded.assembler
    keys = assembler.entity_keys
    if len(keys) == 1:
        view = assembler.views[0]
        if any(type(e) is dict for e in entities):
            entities = [e[keys[0]] if type(e) is dict and keys[0] in e else _missing_key(e, keys) for e in entities]
        return _entity_keys(view.name, view.entity, entities)
    checked = []
    for index, entity in enumerate(entities):
        if type(entity) is not dict or not all(key in entity for key in keys):
            raise BadRequest(
                f"model `{model}` reads views keyed by {', '.join(keys)}: each entity must be an object with "
                f"those keys, e.g. {{{', '.join(f'{k!r}: ...' for k in keys)}}}; entities[{index}] is {entity!r}"
            )
        converted = {key: entity[key] for key in keys}  # the keys alone: other fields must not move its canary side
        for view in assembler.views:
            converted[view.entity_key] = _entity_keys(view.name, view.entity, [entity[view.entity_key]])[0]
        checked.append(converted)
    return checked


def _missing_key(entity: Any, keys: tuple[str, ...]) -> Any:
    raise BadRequest(f"entity {entity!r} has no `{keys[0]}`; send the key's value, or an object with `{keys[0]}`")


def render(route: str, answer: Answer) -> bytes:
    loaded = answer.loaded
    body: dict[str, Any] = {"route": route, "served_by": answer.served_by, "degraded": answer.degraded}
    if answer.degraded:
        body["reason"] = answer.reason
    if loaded is not None:
        body.update(
            model=loaded.card.name,
            version=loaded.card.version,
            precision=loaded.runtime.precision.value,
            device=loaded.runtime.device,
        )
    else:
        body.update(model=None, version=None, precision=None, device=None)
    body.update(scores=answer.scores, status=answer.status, as_of_ms=answer.as_of_ms, read_at_ms=answer.read_at_ms)
    return orjson.dumps(body)


class PredictEndpoint:
    """POST /predict as a bare ASGI callable (no Request/Response objects per call)."""

    def __init__(
        self,
        server: ModelServer,
        *,
        token: str | None,
        max_body_bytes: int = MAX_BODY_BYTES,
        front_secret: str | None = None,
    ) -> None:
        self.server = server
        self.metrics = server.metrics
        self.max_body_bytes = max_body_bytes
        self.expected_auth = f"Bearer {token}".encode() if token else None
        # Behind tenx-front (`tenx serve-models --front`): its requests carry this secret,
        # and every answer carries the gate it refuses by (`gate`; front/main.go says how it uses it).
        self.front_secret = front_secret.encode() if front_secret else None
        self.default_deadline_ms = server.settings.default_deadline_ms
        self._children: dict[tuple[str, int, str], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        began = time.perf_counter()
        model, priority = "-", "-"
        status, payload, extra = 500, b"", []
        headers: dict[bytes, bytes] = dict(scope["headers"])
        request_id = new_request_id(headers.get(b"x-request-id"))
        REQUEST_ID.set(request_id)  # this task's logs carry it; so does the answer
        try:
            if scope["method"] != "POST":
                status, payload = 405, _error("use POST with a JSON body")
                extra = [(b"allow", b"POST")]
                return
            if not self._authorized(headers):
                status, payload = 401, _error(UNAUTHORIZED)
                return
            screened = scope.get(SCREENED)  # the protocol asked the gate already
            if screened is None:
                outcome = self.screen(headers)
                if isinstance(outcome, Rejected):  # shed before the body is read or parsed
                    priority = headers[b"x-priority"].decode(errors="replace").lower()
                    status, payload = 503, _error(str(outcome), outcome.reason)
                    extra = [(b"retry-after", _RETRY_AFTER)]
                    return
                screened = outcome
            body = b""
            more = True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body_bytes:
                    status, payload = 413, _error(f"body exceeds {self.max_body_bytes} bytes")
                    return
            status, payload, extra, model, priority = await self._predict(body, headers, screened=screened)
        except Exception:
            log.exception("internal error on /predict (request id %s)", request_id)
            status = 500
            payload = _error(f"internal error (request id {request_id}); the server log has the details")
        finally:
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        *_JSON,
                        (b"content-length", str(len(payload)).encode()),
                        (b"x-request-id", request_id.encode()),
                        *extra,
                        *self.gate(),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            self._count(model, status, priority, time.perf_counter() - began)

    def _authorized(self, headers: Mapping[bytes, bytes]) -> bool:
        return self.authorized(headers.get(b"authorization", b""))

    def authorized(self, authorization: bytes) -> bool:
        """Whether an Authorization header value carries the token (always, with none set)."""
        expected = self.expected_auth
        return expected is None or hmac.compare_digest(authorization, expected)

    def screen(self, headers: Mapping[bytes, bytes]) -> Rejected | bool:
        """The request judged from its headers alone, before its body is read: Rejected
        when the server sheds its X-Priority class now; else whether it passed the
        sheddable gate (the body path must not ask again: each ask spends the gate's
        credit). A request with no X-Priority, a critical one, or one failing auth is
        not judged here (False)."""
        passed = self.front_secret is not None and self.from_front(headers) and b"x-tenx-front-passed" in headers
        early = headers.get(b"x-priority")
        if early is None or early == b"critical" or not self._authorized(headers):
            return False
        refused = self.server.shed_early(early, headers.get(b"x-tenant", b"default"), passed=passed)
        if refused is not None:
            return refused
        return early.upper() == b"SHEDDABLE"

    def refusal(self, headers: Mapping[bytes, bytes], refused: Rejected) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The headers and body of the 503 for a request `screen` refused (counted as
        the ASGI path counts it)."""
        payload = _error(str(refused), refused.reason)
        request_id = new_request_id(headers.get(b"x-request-id"))
        self._count("-", 503, headers[b"x-priority"].decode(errors="replace").lower(), 0.0)
        return [
            *_JSON,
            (b"x-request-id", request_id.encode()),
            (b"content-length", str(len(payload)).encode()),
            (b"retry-after", _RETRY_AFTER),
            *self.gate(),
        ], payload

    def from_front(self, headers: Mapping[bytes, bytes]) -> bool:
        """Whether a request came through this server's tenx-front (its secret); the
        refusals the front reports with it are counted here, as this server's own."""
        secret = self.front_secret
        given = headers.get(b"x-tenx-front")
        if secret is None or given is None or not hmac.compare_digest(given, secret):
            return False
        report = headers.get(b"x-tenx-front-shed")
        if report:
            for priority, count in self.server.count_front_refusals(report):
                self.metrics.requests.labels("-", _OUTCOMES[503], priority).inc(count)
        return True

    def gate(self) -> list[tuple[bytes, bytes]]:
        """The X-Tenx-Gate header for an answer, behind a front; none otherwise."""
        if self.front_secret is None:
            return []
        return [(b"x-tenx-gate", self.server.gate_state())]

    def _count(self, model: str, status: int, priority: str, seconds: float) -> None:
        # Metric children cached per label set: `labels()` costs as much as the increment.
        key = (model, status, priority)
        children = self._children.get(key)
        if children is None:
            if len(self._children) > 10_000:  # names of unknown models are not kept (404s count under "-")
                self._children.clear()
            outcome = _OUTCOMES.get(status, "error")
            children = self._children[key] = (
                self.metrics.requests.labels(model, outcome, priority),
                self.metrics.request_seconds.labels(model, priority),
            )
        children[0].inc()
        if status == 200:
            children[1].observe(seconds)

    async def _predict(
        self, body: bytes, headers: dict[bytes, bytes], *, screened: bool = False
    ) -> tuple[int, bytes, list[Any], str, str]:
        """(status, body, extra headers, the route's name, the class's name) for metrics.
        `screened`: an X-Priority: sheddable request already passed `shed_early`'s gate."""
        server = self.server
        model, name = "-", "-"
        try:
            request = parse_predict(body, headers, default_deadline_ms=self.default_deadline_ms)
            spec = server.spec_for(request.model)
            model = spec.name
            priority = request.priority
            if priority is None:  # not `or`: CRITICAL is 0
                priority = server.tenants.policy(request.tenant).priority
            if priority is None:
                priority = Priority.DEFAULT
            name = priority.name.lower()
            answer = await server.predict(
                request.model,
                request.entities,
                priority=priority,
                tenant=request.tenant,
                deadline_s=request.deadline_ms / 1000,
                context=request.context,
                keys=entity_keys,
                screened=screened and priority is Priority.SHEDDABLE,
            )
        except (BadRequest, ValueError) as error:
            return 400, _error(str(error)), [], model, name
        except UnknownModelError as error:
            return 404, _error(str(error)), [], "-", name
        except SkewError as error:
            return 409, _error(str(error)), [], model, name
        except Rejected as refused:  # shed (503) or over quota (429), before any work
            retry = str(max(1, math.ceil(refused.retry_after_s))).encode()
            return refused.status, _error(str(refused), refused.reason), [(b"retry-after", retry)], model, name
        except DeadlineExceeded as error:
            return 504, _error(str(error), "deadline"), [], model, name
        except (Overloaded, TransientError) as error:  # loading, the online store failed, every step failed
            again = [(b"retry-after", str(RETRY_AFTER_S).encode())]
            return 503, _error(str(error), "unavailable"), again, model, name
        return 200, render(model, answer), [], model, name


_OUTCOMES = {200: "ok", 400: "bad_request", 401: "unauthorized", 404: "unknown_model", 405: "bad_request",
             409: "skew", 413: "too_large", 429: "quota", 503: "unavailable", 504: "deadline"}  # fmt: skip


def _error(message: str, reason: str | None = None) -> bytes:
    return orjson.dumps({"error": message, "reason": reason} if reason else {"error": message})


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def create_model_app(
    settings: ModelServerSettings,
    store: Any,
    *,
    token: str | None = None,
    metrics: ModelMetrics | None = None,
    guard: Guard | None = None,
    routes: Mapping[str, RouteSpec] | None = None,
    tenants: Mapping[str, TenantPolicy] | None = None,
    breakers: BreakerSettings | None = None,
    costs: CostRates | None = None,
    front_secret: str | None = None,
) -> PredictFirst:
    """The ASGI app; models load and warm in its lifespan (`/health/ready` is 503 until then).
    `guard` defaults to a circuit breaker per dependency (`breakers`' settings).
    `front_secret`: the server runs behind tenx-front (`tenx serve-models --front`)."""
    metrics = metrics or ModelMetrics()
    if guard is None:
        guard = Breakers(breakers or BreakerSettings(), on_transition=_breaker_metrics(metrics))
    server = ModelServer(
        settings, store, metrics=metrics, guard=guard, routes=routes, tenants=Tenants(tenants, clock=time.monotonic),
        costs=costs,
    )  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await server.start()
        # Everything loaded so far (libraries, plan, sessions) lives as long as the
        # process: out of the collector's reach, a full collection no longer walks it
        # while requests wait (those pauses were the p99 tail).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await server.stop()
            closer = getattr(store, "aclose", None)
            if closer is not None:
                await closer()
            else:
                store.close()

    predict_endpoint = PredictEndpoint(server, token=token, front_secret=front_secret)

    def authorized(request: Request) -> bool:
        return predict_endpoint.authorized(request.headers.get("authorization", "").encode())

    async def live(request: Request) -> Response:
        return _json({"status": "ok"})

    async def ready(request: Request) -> Response:
        problems = server.problems()
        ping = getattr(store, "ping", None)
        if ping is not None:
            try:
                await asyncio.to_thread(ping)
            except TransientError as error:
                problems.append(str(error))
        circuits = server.circuits()
        problems += [f"the circuit of {name} is open" for name, state in circuits.items() if state == "open"]
        if problems:
            return _json({"status": "unavailable", "problems": problems, "circuits": circuits}, 503)
        if not authorized(request):  # a probe needs the status; the models are for token holders
            return _json({"status": "ok", "circuits": circuits})
        return _json({"status": "ok", "models": [describe(r) for r in server.routes.values()], "circuits": circuits})

    async def models(request: Request) -> Response:
        if not authorized(request):
            return Response(_error(UNAUTHORIZED), status_code=401, media_type="application/json")
        return _json({"models": [describe(r) for r in server.routes.values()]})

    async def prometheus(request: Request) -> Response:
        raw = dict(request.scope["headers"])
        if b"x-tenx-front-shed" in raw:  # a scrape through the front counts its refusals made until now
            predict_endpoint.from_front(raw)
        server.export_gauges()
        return Response(exposition(server.metrics), media_type="text/plain; version=0.0.4; charset=utf-8")

    app = Starlette(
        routes=[
            Route("/predict", predict_endpoint),
            Route("/models", models),
            Route("/health/live", live),
            Route("/health/ready", ready),
            Route("/health", ready),
            Route("/metrics", prometheus),
        ],
        lifespan=lifespan,
    )
    app.state.server = server
    return PredictFirst(app, predict_endpoint)


def _breaker_metrics(metrics: ModelMetrics) -> Any:
    def transition(dependency: str, before: BreakerState, after: BreakerState, reason: str) -> None:
        metrics.breaker_state.labels(dependency).set(after.code)
        metrics.breaker_transitions.labels(dependency, before.value, after.value).inc()
        if after is BreakerState.OPEN:
            log.warning("circuit of %s opened: %s", dependency, reason)
        else:
            log.info("circuit of %s is %s", dependency, after.value)

    return transition


class PredictFirst:
    """`/predict` straight to its endpoint; everything else (and the lifespan) through
    Starlette. Starlette's middleware and router cost about a tenth of a single-entity
    request (measured with py-spy), on the one path where that matters."""

    def __init__(self, app: Starlette, predict: PredictEndpoint) -> None:
        self.app = app
        self.predict = predict
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/predict":
            await self.predict(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def app_from_environment() -> PredictFirst:
    """The app for `tenx serve-models` (uvicorn factory, once per worker process):
    tenx.yaml from $TENX_CONFIG, server settings from $TENX_MODEL_SERVER (JSON)."""
    import json
    import os
    from pathlib import Path

    from featurestore.config import load_settings
    from featurestore.plan.collect import collect_routes
    from featurestore.registry import FileRegistry
    from featurestore.stores.online import open_online_store
    from serving.models.config import breaker_settings, cost_rates, tenant_policies

    configure_logging(os.environ.get("TENX_LOG_FORMAT") or "text")
    settings = load_settings()
    plan = FileRegistry(settings.registry_dir).current()
    store = open_online_store(
        redis_url=settings.redis_url,
        sqlite_path=settings.online_path,
        project=plan.project if plan is not None else settings.project,
        pool_size=settings.redis_pool_size,
        pool_timeout_s=settings.redis_pool_timeout_s,
    )
    options = json.loads(os.environ.get("TENX_MODEL_SERVER") or "{}")
    options["models"] = tuple(options.get("models") or ())
    fault_file = options.pop("fault_file", None)
    server_settings = ModelServerSettings(
        registry_dir=Path(settings.registry_dir), fault_file=Path(fault_file) if fault_file else None, **options
    )
    routes = collect_routes(settings.features_path, settings.modules) if settings.features_path.is_dir() else {}
    return create_model_app(
        server_settings,
        store,
        token=os.environ.get("TENX_API_TOKEN") or None,
        routes=routes,
        tenants=tenant_policies(settings.model_server),
        breakers=breaker_settings(settings.model_server),
        costs=cost_rates(settings.model_server),
        front_secret=os.environ.get("TENX_FRONT_SECRET") or None,
    )
