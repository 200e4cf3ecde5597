"""The model server's engine: deployments, their queues and batch loops, lookups and
inference. The ASGI app (`serving.models.app`) only parses, enqueues and answers.

One route per served model name: a bounded per-class queue (`BatchQueue`), a batch
loop that takes up to `max_batch_rows` rows (critical first, then by deadline; expired
requests are answered 504 before any work), reads every view the model needs for the
whole batch in one round trip, assembles the vectors and runs them on the model's
runtime thread. Two batches may be in flight per route, so the next batch's lookup
overlaps this batch's inference. Per-request work is parsing and enqueueing; the rest is
done once per batch.

A watcher re-reads the registry every `reload_interval_s`: a new deployment (or a new
applied plan) is loaded and warmed on a worker thread, then swapped in; batches already
running finish on the session they started with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.errors import TenxError, TransientError
from featurestore.models import Deployment, ModelCard, ModelRegistry, SkewError, check_views
from featurestore.plan.model import Plan
from featurestore.registry import FileRegistry
from serving.errors import DeadlineExceeded, ModelUnavailable, Overloaded, UnknownModelError
from serving.models.batcher import Batch, BatchQueue, Pending, Priority, QueueFull
from serving.models.metrics import ModelMetrics
from serving.models.policies import ONLINE_STORE, AllowAll, ByName, Guard, Router, runtime_dependency
from serving.models.runtime import Runtime, place
from serving.models.vectors import STATUS_NAMES, FeatureAssembler, Vectors

log = logging.getLogger("tenx.models")


@dataclass(frozen=True)
class ModelServerSettings:
    registry_dir: Path
    models: tuple[str, ...] = ()  # empty: every deployed model (and ones deployed later)
    max_batch_rows: int = 1024  # a batch only grows this big under load; at low load it is one request
    max_wait_ms: float = 0.0  # 0: a batch goes as soon as the runtime is free (it fills under load)
    queue_rows: int = 8192  # per priority class
    default_deadline_ms: float = 1000.0
    reload_interval_s: float = 1.0
    prefer_gpu: bool = True
    intra_op_threads: int = 1
    batches_in_flight: int = 2


@dataclass(frozen=True)
class Loaded:
    """A deployed model version, warm and ready to score."""

    card: ModelCard
    deployment: Deployment
    runtime: Runtime
    assembler: FeatureAssembler
    plan_version: str

    @property
    def served_by(self) -> str:
        return self.card.ref


@dataclass(frozen=True)
class Answer:
    loaded: Loaded
    scores: list[float | None]
    status: list[str]
    as_of_ms: list[int | None]
    read_at_ms: int  # when the batch read the online store: age = read_at_ms - as_of_ms
    queued_s: float


@dataclass
class Route:
    name: str
    queue: BatchQueue
    loaded: Loaded | None = None
    problem: str | None = None  # why it cannot serve (skew, a failed load); None when fine
    failed: tuple[Deployment, str] | None = None  # the (deployment, plan) whose load failed last
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    slots: asyncio.Semaphore | None = None


@dataclass(frozen=True)
class _Counted:
    lookup: Any
    batch_rows: Any
    predictions: Any
    queue_wait: Any
    entities: tuple[Any, ...]  # by status code


@dataclass(frozen=True)
class _Work:
    entities: Sequence[Any]
    future: asyncio.Future[Answer]


class ModelServer:
    def __init__(
        self,
        settings: ModelServerSettings,
        store: Any,
        *,
        metrics: ModelMetrics | None = None,
        router: Router | None = None,
        guard: Guard | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics or ModelMetrics()
        self.router: Router = router or ByName()
        self.guard: Guard = guard or AllowAll()
        self.models = ModelRegistry(settings.registry_dir / "models")
        self.plans = FileRegistry(settings.registry_dir)
        self.routes: dict[str, Route] = {}
        self.plan: Plan | None = None
        self._clock = clock
        self._wall = wall
        self._tasks: set[asyncio.Task[Any]] = set()
        self._children: dict[tuple[str, int], _Counted] = {}
        self._providers: list[str] = []
        self.started = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load and warm every served model, then start the batch loops and the watcher."""
        import onnxruntime as ort

        self._providers = list(ort.get_available_providers())
        await self.refresh()
        self._spawn(self._watch())
        self.started = True

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for route in self.routes.values():
            if route.loaded is not None:
                route.loaded.runtime.close()

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _route(self, name: str) -> Route:
        route = self.routes.get(name)
        if route is None:
            bounds = dict.fromkeys(Priority, self.settings.queue_rows)
            route = self.routes[name] = Route(
                name,
                BatchQueue(bounds=bounds, clock=self._clock),
                slots=asyncio.Semaphore(self.settings.batches_in_flight),
            )
            self._spawn(self._batch_loop(route))
        return route

    async def refresh(self) -> None:
        """Load what the registry now says to serve (new deployments, a new plan)."""
        plan_version = await asyncio.to_thread(self.plans.current_version)
        if self.plan is None or self.plan.version != plan_version:
            self.plan = await asyncio.to_thread(self.plans.current) if plan_version else None
        deployments = await asyncio.to_thread(self.models.deployments)
        names = self.settings.models or tuple(sorted(deployments))
        for name in names:
            route = self._route(name)
            deployment = deployments.get(name)
            if deployment is None:
                route.problem = f"model `{name}` is not deployed: `tenx models deploy {name}`"
                self._set_loaded(route, None)
                continue
            current = route.loaded
            plan_version = self.plan.version if self.plan else ""
            if (
                current is not None
                and current.deployment == deployment
                and current.plan_version == plan_version
                and route.problem is None
            ):
                continue
            if route.problem is not None and route.failed == (deployment, plan_version):
                continue  # the same load failed already; wait for the registry to change
            try:
                loaded = await asyncio.to_thread(self._load, name, deployment, self.plan)
            except SkewError as error:
                route.problem = str(error)
                route.failed = (deployment, plan_version)
                self._set_loaded(route, None)  # never serve features the model was not trained on
                log.error("%s", error)
                continue
            except (TenxError, OSError, ValueError, RuntimeError) as error:
                # Anything else that failed (a corrupt file, a session ONNX Runtime refuses):
                # the version being served, if any, stays.
                route.problem = f"could not load {name}@{deployment.version}: {error}"
                route.failed = (deployment, plan_version)
                log.error("%s", route.problem)
                continue
            route.problem = None
            route.failed = None
            self._set_loaded(route, loaded)
            log.info("serving %s (%s on %s)", loaded.served_by, loaded.runtime.precision.value, loaded.runtime.device)

    def _set_loaded(self, route: Route, loaded: Loaded | None) -> None:
        route.loaded = loaded
        self.metrics.ready.labels(route.name).set(1 if loaded is not None else 0)

    def _load(self, name: str, deployment: Deployment, plan: Plan | None) -> Loaded:
        card = self.models.card(name, deployment.version)
        check_views(card, plan)
        assert plan is not None  # check_views raised otherwise
        variants = self.models.variants(name, deployment.version)
        placement = place(
            self._providers, requested=deployment.precision, variants=variants, prefer_gpu=self.settings.prefer_gpu
        )
        path = self.models.model_path(name, deployment.version, placement.precision)
        runtime = Runtime(card, path, placement, intra_op_threads=self.settings.intra_op_threads)
        runtime.warm(self.settings.max_batch_rows)
        return Loaded(card, deployment, runtime, FeatureAssembler(card, plan), plan.version)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("reading the model registry failed; serving what is loaded")

    # -- requests ----------------------------------------------------------------------------

    def known(self) -> list[str]:
        return sorted(self.routes)

    def route_for(self, model: str) -> Route:
        route = self.routes.get(model)
        if route is None:
            known = ", ".join(self.known()) or "none deployed"
            raise UnknownModelError(f"unknown model `{model}` (served: {known})")
        return route

    def submit(
        self, route: Route, entities: Sequence[Any], *, priority: Priority, deadline_s: float
    ) -> asyncio.Future[Answer]:
        """Queue one request; the future resolves when its batch is scored."""
        if route.loaded is None:
            if route.problem and "trained on" in route.problem:
                raise SkewError(route.problem)
            raise ModelUnavailable(route.problem or f"model `{route.name}` is loading; retry shortly")
        now = self._clock()
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        try:
            route.queue.offer(
                Pending(
                    deadline=now + deadline_s,
                    rows=len(entities),
                    priority=priority,
                    enqueued=now,
                    payload=_Work(entities, future),
                )
            )
        except QueueFull as full:
            raise Overloaded(f"model `{route.name}` is overloaded: {full}; retry later") from None
        route.wake.set()
        return future

    async def _batch_loop(self, route: Route) -> None:
        settings = self.settings
        assert route.slots is not None
        while True:
            await route.wake.wait()
            if settings.max_wait_ms > 0 and route.queue.rows() < settings.max_batch_rows:
                oldest = route.queue.oldest_enqueued()
                if oldest is not None:
                    delay = oldest + settings.max_wait_ms / 1000 - self._clock()
                    if delay > 0:
                        await asyncio.sleep(delay)
            await route.slots.acquire()
            batch = route.queue.take(settings.max_batch_rows)
            if not len(route.queue):
                route.wake.clear()
            for item in batch.expired:
                self.metrics.requests.labels(route.name, "deadline").inc()
                _fail(item.payload.future, DeadlineExceeded("deadline passed while queued; the request was dropped"))
            if not batch.items:
                route.slots.release()
                continue
            self._spawn(self._process(route, batch))

    async def _process(self, route: Route, batch: Batch) -> None:
        assert route.slots is not None
        try:
            loaded = route.loaded
            if loaded is None:
                error: Exception = ModelUnavailable(route.problem or f"model `{route.name}` is not loaded")
                for item in batch.items:
                    _fail(item.payload.future, error)
                return
            await self._score(route, loaded, batch)
        finally:
            route.slots.release()

    async def _score(self, route: Route, loaded: Loaded, batch: Batch) -> None:
        items = batch.items
        entities: list[Any] = []
        for item in items:
            entities.extend(item.payload.entities)
        started = self._clock()
        try:
            requests = loaded.assembler.requests(entities)
            raws = await self._read(requests)
            looked_up = self._clock()
            read_at = int(self._wall() * 1_000_000)
            vectors = loaded.assembler.assemble(raws, read_at)
            scores = await self._infer(loaded, vectors)
        except Exception as error:
            for item in items:
                _fail(item.payload.future, error)
            if not isinstance(error, TransientError):
                log.exception("batch of %s failed", route.name)
            return
        counted = self._counted(route.name, loaded.card.version)
        counted.lookup.observe(looked_up - started)
        counted.batch_rows.observe(len(entities))
        counted.predictions.inc(int(vectors.scored.sum()))
        score_list = scores.tolist()
        by_status = np.bincount(vectors.status, minlength=len(STATUS_NAMES)).tolist()
        for code, count in enumerate(by_status):
            if count:
                counted.entities[code].inc(count)
        if by_status[0] == len(entities):  # all found, the common case: no lookup per row
            status_list = [STATUS_NAMES[0]] * len(entities)
        else:
            status_list = [STATUS_NAMES[s] for s in vectors.status.tolist()]
        as_of_list = _as_of_ms(vectors.as_of_us)
        read_at_ms = read_at // 1000
        offset = 0
        for item in items:
            end = offset + item.rows
            counted.queue_wait.observe(started - item.enqueued)
            future = item.payload.future
            if not future.done():
                future.set_result(
                    Answer(
                        loaded,
                        score_list[offset:end],
                        status_list[offset:end],
                        as_of_list[offset:end],
                        read_at_ms,
                        started - item.enqueued,
                    )
                )
            offset = end

    def _counted(self, name: str, version: int) -> _Counted:
        """The metric children of one model version (`labels()` costs as much as an update)."""
        key = (name, version)
        counted = self._children.get(key)
        if counted is None:
            metrics = self.metrics
            counted = self._children[key] = _Counted(
                lookup=metrics.lookup_seconds.labels(name),
                batch_rows=metrics.batch_rows.labels(name),
                predictions=metrics.predictions.labels(name, str(version)),
                queue_wait=metrics.queue_wait.labels(name),
                entities=tuple(metrics.entities.labels(name, status) for status in STATUS_NAMES),
            )
        return counted

    async def _read(self, requests: list[tuple[Any, Sequence[Any]]]) -> Any:
        """Every view's values for a batch, in one round trip, past the guard."""
        if not self.guard.allow(ONLINE_STORE):
            raise ModelUnavailable("the online store's circuit is open; retry shortly")
        began = self._clock()
        try:
            if hasattr(self.store, "aread_many"):
                raws = await self.store.aread_many(requests)
            else:
                raws = await asyncio.to_thread(self.store.read_many, requests)
        except Exception:
            self.guard.record(ONLINE_STORE, ok=False, seconds=self._clock() - began)
            raise
        self.guard.record(ONLINE_STORE, ok=True, seconds=self._clock() - began)
        return raws

    async def _infer(self, loaded: Loaded, vectors: Vectors) -> np.ndarray:
        scored = vectors.scored
        every = bool(scored.all())
        matrix = vectors.matrix if every else vectors.matrix[scored]
        result = np.full(len(scored), np.nan)
        if len(matrix):
            dependency = runtime_dependency(loaded.card.name)
            if not self.guard.allow(dependency):
                raise ModelUnavailable(f"model `{loaded.card.name}`'s circuit is open; retry shortly")
            began = self._clock()
            try:
                scores, spent = await asyncio.wrap_future(loaded.runtime.submit(matrix))
            except Exception:
                self.guard.record(dependency, ok=False, seconds=self._clock() - began)
                raise
            self.guard.record(dependency, ok=True, seconds=self._clock() - began)
            device = loaded.runtime.device
            self.metrics.inference_seconds.labels(loaded.card.name, device).observe(spent)
            self.metrics.device_seconds.labels(loaded.card.name, str(loaded.card.version), device).inc(spent)
            if every:
                return np.asarray(scores, dtype=np.float64)
            result[scored] = scores
        return result

    # -- health ------------------------------------------------------------------------------

    def problems(self) -> list[str]:
        found = []
        if not self.started:
            found.append("loading models")
        if not self.routes and self.started:
            found.append("no model deployed: `tenx train` and `tenx models deploy` one")
        for route in self.routes.values():
            if route.loaded is None:
                found.append(route.problem or f"model `{route.name}` is loading")
        return found


def _as_of_ms(as_of_us: np.ndarray) -> list[int | None]:
    """as_of in ms per row, None where a view had no value: once per batch in numpy."""
    as_of_ms: list[int | None] = (as_of_us // 1000).tolist()
    missing = as_of_us < 0
    if missing.any():
        for row in np.flatnonzero(missing).tolist():
            as_of_ms[row] = None
    return as_of_ms


def _fail(future: asyncio.Future[Any], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


def describe(route: Route) -> dict[str, Any]:
    loaded = route.loaded
    data: dict[str, Any] = {"model": route.name, "ready": loaded is not None, "problem": route.problem}
    if loaded is not None:
        data.update(
            version=loaded.card.version,
            precision=loaded.runtime.precision.value,
            device=loaded.runtime.device,
            features=loaded.card.feature_references,
            queued_rows=route.queue.rows(),
        )
    return data


__all__ = ["Answer", "Loaded", "ModelServer", "ModelServerSettings", "Priority", "Route", "describe"]
