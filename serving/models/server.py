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
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from featurestore.definitions.route import CACHE, rule_name
from featurestore.definitions.route import Route as RouteSpec
from featurestore.errors import TenxError, TransientError
from featurestore.models import Canary, Deployment, ModelRegistry, SkewError, check_views
from featurestore.plan.model import Plan
from featurestore.registry import FileRegistry
from featurestore.stores.online import follow_project
from serving.errors import DeadlineExceeded, ModelUnavailable, UnknownModelError
from serving.logs import REQUEST_ID
from serving.models.admission import (
    DEADLINE,
    EVICTED,
    OVERLOAD,
    AdmissionSettings,
    Lane,
    LoopPressure,
    Rejected,
    Tenants,
)
from serving.models.batcher import Batch, Pending, Priority
from serving.models.cache import PredictionCache
from serving.models.canary import CanaryJudge, takes
from serving.models.cost import CostMeter, CostRates
from serving.models.gpu import GpuMonitor, NoNvml
from serving.models.metrics import ModelMetrics
from serving.models.policies import ONLINE_STORE, AllowAll, Guard, runtime_dependency
from serving.models.runtime import Runtime, ThreadDemand, on_thread, place
from serving.models.served import Answer, Counted, Loaded, PredictRequest, Route, ScoringFailed, Work, fail_future
from serving.models.vectors import STATUS_NAMES, FeatureAssembler, Vectors, as_of_ms, slice_rows

log = logging.getLogger("tenx.models")


@dataclass(frozen=True)
class ModelServerSettings:
    registry_dir: Path
    models: tuple[str, ...] = ()  # empty: every deployed model (and ones deployed later)
    max_batch_rows: int = 1024  # the adaptive batch limit's ceiling; at low load a batch is one request
    max_wait_ms: float = 0.0  # 0: a batch goes as soon as the runtime is free (it fills under load)
    queue_rows: int = 8192  # hard bound on queued rows per model; the adaptive bound stays below it
    min_batch_rows: int = 64  # the adaptive batch limit's floor
    latency_tolerance: float = 1.5  # a batch may take this many times a one-row batch's time
    queue_delay_ms: float = 50.0  # the queue admits the rows the model serves in this long
    shedding: bool = True  # False: one FIFO queue, fixed bound and batch size (the overload baseline)
    default_deadline_ms: float = 1000.0
    inference_timeout_ms: float = 250.0  # a model run longer than this fails (its circuit counts it)
    loop_lag_target_ms: float = 1.0  # past this event-loop lag, lower classes lose headroom (LoopPressure)
    loop_busy_target: float = 0.8  # ... and past this share of the loop thread's time spent working
    reload_interval_s: float = 1.0
    prefer_gpu: bool = True
    intra_op_threads: int = 1
    inline_run_us: float = 200.0  # a CPU model whose recent runs each took under this runs on the loop (0: never)
    batches_in_flight: int = 2
    fault_file: Path | None = None  # models named in it (one per line) fail every batch: `tenx loadtest --fault model`

    def admission(self) -> AdmissionSettings:
        return AdmissionSettings(
            queue_rows=self.queue_rows,
            max_batch_rows=self.max_batch_rows,
            min_batch_rows=min(self.min_batch_rows, self.max_batch_rows),
            latency_tolerance=self.latency_tolerance,
            queue_delay_ms=self.queue_delay_ms,
            shedding=self.shedding,
        )


class ModelServer:
    def __init__(
        self,
        settings: ModelServerSettings,
        store: Any,
        *,
        metrics: ModelMetrics | None = None,
        guard: Guard | None = None,
        routes: Mapping[str, RouteSpec] | None = None,
        tenants: Tenants | None = None,
        costs: CostRates | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics or ModelMetrics()
        self.guard: Guard = guard or AllowAll()
        self.specs: dict[str, RouteSpec] = dict(routes or {})
        self.tenants = tenants or Tenants(clock=clock)
        self.cache = PredictionCache(clock=clock)
        self.cost = CostMeter(self.metrics, costs or CostRates())
        self._shed_children: dict[tuple[str, str, Priority, str], Any] = {}
        self.pressure = LoopPressure(target_s=settings.loop_lag_target_ms / 1000, busy_target=settings.loop_busy_target)
        self.gpus = GpuMonitor() if settings.prefer_gpu else GpuMonitor(nvml=NoNvml())
        self.models = ModelRegistry(settings.registry_dir / "models")
        self.plans = FileRegistry(settings.registry_dir)
        self.routes: dict[str, Route] = {}
        self.plan: Plan | None = None
        self._clock = clock
        self._wall = wall
        self._tasks: set[asyncio.Task[Any]] = set()
        self._children: dict[tuple[str, int], Counted] = {}
        self._providers: list[str] = []
        self.started = False
        self.faulted: frozenset[str] = frozenset()  # models failing by the fault file's order

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load and warm every served model, then start the batch loops and the watcher."""
        import onnxruntime as ort

        self._providers = list(ort.get_available_providers())
        await self.refresh()
        self._spawn(self._watch())
        if self.settings.shedding:
            self._spawn(self._watch_loop())
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
            route = self.routes[name] = Route(
                name,
                Lane(self.settings.admission(), clock=self._clock, tenants=self.tenants),
                slots=asyncio.Semaphore(self.settings.batches_in_flight),
            )
            self._spawn(self._batch_loop(route))
        return route

    async def refresh(self) -> None:
        """Load what the registry now says to serve (new deployments, a new plan)."""
        plan_version = await asyncio.to_thread(self.plans.current_version)
        if self.plan is None or self.plan.version != plan_version:
            before = self.plan.project if self.plan is not None else None
            self.plan = await asyncio.to_thread(self.plans.current) if plan_version else None
            if follow_project(self.store, before, self.plan.project if self.plan is not None else None):
                # View versions do not name the project: the models stay loaded and read
                # the renamed project's keys (they read the old ones, frozen since the apply).
                log.info("model server: now reading the keys of %s", self.store.prefix)
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
        canaries = await asyncio.to_thread(self.models.canaries)
        for name in names:
            if name in self.routes:
                await self._refresh_canary(self.routes[name], canaries.get(name))

    async def _refresh_canary(self, route: Route, spec: Canary | None) -> None:
        """Load a new canary warm beside the deployed version, or drop an ended one; a
        canary loaded under an older plan is loaded again (its keys name the old view
        versions, and the skew check must see the new plan), as the deployed one is."""
        plan_version = self.plan.version if self.plan else ""
        if spec == route.canary_spec and route.canary_plan == plan_version:
            return
        if spec is None:
            if route.canary_spec is not None:
                log.info("canary %s@%d ended", route.name, route.canary_spec.version)
            route.canary, route.canary_spec, route.judge, route.canary_plan = None, None, None, None
            return
        if route.loaded is None or self.plan is None:
            return
        deployment = Deployment(route.name, spec.version, None, spec.started_at, spec.started_by)
        try:
            canary = await asyncio.to_thread(self._load, route.name, deployment, self.plan)
        except (TenxError, OSError, ValueError, RuntimeError) as error:
            log.error("canary %s@%d not loaded (the deployed version keeps all traffic): %s", route.name,
                      spec.version, error)  # fmt: skip
            route.canary, route.canary_spec, route.judge = None, spec, None  # and an older canary serves none
            route.canary_plan = plan_version
            return
        route.canary, route.canary_spec, route.judge = canary, spec, CanaryJudge(spec)
        route.canary_plan = plan_version
        mode = "shadow copy of" if spec.shadow else "sticky"
        log.info("canary %s: %s %g%% of traffic", canary.served_by, mode, spec.percent)

    def judge_canaries(self) -> None:
        """Roll back every canary its judge condemns (a registry write: every worker follows)."""
        for route in self.routes.values():
            judge, spec = route.judge, route.canary_spec
            if judge is None or spec is None:
                continue
            reason = judge.verdict()
            if reason is None:
                continue
            route.judge = None  # judged once
            try:
                self.models.rollback(
                    route.name, by="tenx model server (automatic)", reason=reason, version=spec.version
                )
            except TenxError as error:  # another worker rolled it back first, or it ended: not counted twice
                log.debug("canary %s@%d already ended: %s", route.name, spec.version, error)
                continue
            self.metrics.canary_decisions.labels(route.name, "rolled_back").inc()
            log.warning("canary %s@%d rolled back: %s %s", route.name, spec.version, reason, judge.comparison())

    def _set_loaded(self, route: Route, loaded: Loaded | None) -> None:
        route.loaded = loaded
        if loaded is not None:
            route.cache_ttl_s = self._cache_ttl(route.name, loaded)
        self.metrics.ready.labels(route.name).set(1 if loaded is not None else 0)

    def _load(self, name: str, deployment: Deployment, plan: Plan | None) -> Loaded:
        """A deployed version, loaded and warm; the canary's own session is reused when
        the canary is what was just deployed (a promotion: no reload, no cold start)."""
        route = self.routes.get(name)
        canary = route.canary if route is not None else None
        if (
            canary is not None
            and plan is not None
            and canary.card.version == deployment.version
            and canary.plan_version == plan.version
        ):
            return replace(canary, deployment=deployment)
        card = self.models.card(name, deployment.version)
        check_views(card, plan)
        assert plan is not None  # check_views raised otherwise
        variants = self.models.variants(name, deployment.version)
        placement = place(
            self._providers, requested=deployment.precision, variants=variants, prefer_gpu=self.settings.prefer_gpu
        )
        path = self.models.model_path(name, deployment.version, placement.precision)
        runtime = Runtime(
            card,
            path,
            placement,
            intra_op_threads=self.settings.intra_op_threads,
            inline_run_s=self.settings.inline_run_us / 1e6,
        )
        runtime.warm(self.settings.max_batch_rows)
        return Loaded(card, deployment, runtime, FeatureAssembler(card, plan), plan.version)

    def _cache_ttl(self, model: str, loaded: Loaded) -> float | None:
        """How long this model's answers are cached: the shortest `cache_ttl_s` of the
        routes with a cache step for it, capped by the shortest ttl of its views; None
        when no route caches it."""
        ttls = [spec.cache_ttl_s for spec in self.specs.values() if spec.primary == model and CACHE in spec.fallbacks]
        if not ttls:
            return None
        view_ttls = [view.ttl / 1e6 for view in loaded.assembler.views if view.ttl is not None]
        return min(ttls + view_ttls)

    async def _watch_loop(self, interval_s: float = 0.01) -> None:
        """Every `interval_s`, how late the loop woke this task and how much of the time
        since its thread spent working or waiting for a core with work to do
        (ThreadDemand: this task runs on the loop's thread): what LoopPressure turns
        into the lower classes' share of their headroom."""
        pressure = self.pressure
        metrics = self.metrics
        metrics.admit_share.set(1.0)
        metrics.sheddable_passing.set(1.0)
        demand = ThreadDemand()  # running or runnable: this task runs on the loop's thread
        try:
            for tick in itertools.count():
                began, worked = self._clock(), demand.seconds()
                await asyncio.sleep(interval_s)
                spent = self._clock() - began
                share = pressure.observe(spent - interval_s, (demand.seconds() - worked) / spent if spent > 0 else None)
                for route in self.routes.values():
                    route.lane.admit_share = share
                if tick % 10 == 0:  # every worker's own value, so /metrics in any of them merges them all
                    self.read_faults()  # a fault (tenx loadtest) takes effect within 100 ms, not the registry's second
                    metrics.admit_share.set(share)
                    metrics.sheddable_passing.set(pressure.passing)
                    metrics.loop_lag.set(pressure.lag_s)
                    metrics.loop_busy.set(pressure.busy)
        finally:
            demand.close()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            try:
                self.read_faults()
                self.judge_canaries()
                await self.refresh()
            except Exception:
                log.exception("reading the model registry failed; serving what is loaded")

    def read_faults(self) -> None:
        """The models the fault file names fail every batch (as a crashed model would:
        their circuits count it, their routes fall back) until it is gone. It is read
        with the registry; only a server started with a fault file has one."""
        path = self.settings.fault_file
        if path is None:
            return
        try:
            names = frozenset(line.strip() for line in path.read_text().splitlines() if line.strip())
        except FileNotFoundError:
            names = frozenset()
        if names != self.faulted:
            log.warning("fault file %s: failing %s", path, ", ".join(sorted(names)) or "nothing")
            self.faulted = names

    # -- requests ----------------------------------------------------------------------------

    def known(self) -> list[str]:
        return sorted(set(self.routes) | set(self.specs))

    def route_for(self, model: str) -> Route:
        route = self.routes.get(model)
        if route is None:
            known = ", ".join(self.known()) or "none deployed"
            raise UnknownModelError(f"unknown model `{model}` (served: {known})")
        return route

    def spec_for(self, name: str) -> RouteSpec:
        """The route a request names: a declared one, or a model served under its own name."""
        spec = self.specs.get(name)
        if spec is not None:
            return spec
        if not self.started:
            raise ModelUnavailable("the server is loading its models; retry shortly")
        self.route_for(name)  # UnknownModelError names what is served
        return RouteSpec(name, primary=name)

    def guard_open(self, dependency: str) -> bool:
        """Whether calls to `dependency` may go (without using up a half-open probe)."""
        state = getattr(self.guard, "state", None)
        if state is None:
            return True
        return str(getattr(state(dependency), "value", "closed")) != "open"

    async def predict(
        self,
        name: str,
        entities: Sequence[Any],
        *,
        priority: Priority,
        tenant: str,
        deadline_s: float,
        context: Mapping[str, Any] | None = None,
        keys: Callable[[Route, list[Any]], list[Any]] | None = None,
        screened: bool = False,
    ) -> Answer:
        """Answer one request along its route: the model its routing function picks (or
        the primary), then each fallback in turn while the step before cannot answer.
        Raises Rejected (quota, overload), DeadlineExceeded, or the last step's error.
        `screened`: `shed_early` already let this request through its class's gate."""
        spec = self.spec_for(name)
        began = self._clock()
        deadline = began + deadline_s
        rows = len(entities)
        label = self.tenants.label(tenant)
        gated = priority is Priority.SHEDDABLE and not screened and self.settings.shedding
        if gated and not self.pressure.let_through():
            self._shed(spec.name, OVERLOAD, priority, label)
            raise Rejected(
                f"overloaded: the server lets {self.pressure.passing:.0%} of sheddable requests in; retry later",
                reason=OVERLOAD,
            )
        try:
            self.tenants.charge(tenant, rows)
        except Rejected as refused:
            self._shed(spec.name, refused.reason, priority, label)
            raise
        request = PredictRequest(spec.name, entities, priority, tenant, self.tenants.policy(tenant).tier,
                                 context or {}, self)  # fmt: skip
        chosen = spec.choose(request) if spec.choose is not None else None
        first = chosen or spec.primary
        steps: list[Any] = [first, *(step for step in spec.fallbacks if step != first)]
        failures: list[str] = []
        scored: ScoringFailed | None = None  # the last failure that had the features in hand
        with_features: list[ScoringFailed] = []  # every such failure, in route order (the cache tries each)
        last_error: Exception | None = None
        overload: Rejected | None = None  # a model refused it for overload: only another model may answer
        for step in steps:
            if overload is not None and (callable(step) or step == CACHE):
                continue  # shedding stays shedding, never a rule's or the cache's answer
            degraded = bool(failures)
            reason = "; ".join(failures) if failures else None
            if callable(step):
                try:
                    answer = self._by_rule(step, scored, request, began, reason)
                except ModelUnavailable:  # the rule failed too: nothing was served, nothing is charged
                    self.tenants.refund(tenant, rows)
                    raise
                self._answered(spec.name, answer, priority, label)
                return answer
            if step == CACHE:
                # Only some models are cached (a route's primary): the cache is keyed by the
                # model that failed, so each failed model's vector is tried, not the last one's.
                found = (self._from_cache(failed, began, reason) for failed in with_features)
                answer_or_none = next((answer for answer in found if answer is not None), None)
                if answer_or_none is not None:
                    self._answered(spec.name, answer_or_none, priority, label)
                    return answer_or_none
                failures.append("cache: miss" if with_features else "cache: no features to key it")
                continue
            route = self.routes.get(step)
            if route is None or route.loaded is None:
                problem = route.problem if route is not None else None
                failures.append(f"{step}: {problem or 'not loaded'}")
                if route is not None and problem and "trained on" in problem and len(steps) == 1:
                    self.tenants.refund(tenant, rows)  # nothing was served, nothing is charged
                    raise SkewError(problem)
                last_error = ModelUnavailable(problem or f"model `{step}` is not loaded; retry shortly")
                continue
            if not self.guard_open(runtime_dependency(step)):
                failures.append(f"{step}: circuit open")
                last_error = ModelUnavailable(f"model `{step}`'s circuit is open; retry shortly")
                continue
            if not self.guard_open(ONLINE_STORE):
                failures.append("online store: circuit open")
                last_error = ModelUnavailable("the online store's circuit is open; retry shortly")
                continue
            try:
                lookup = keys(route, list(entities)) if keys is not None else entities
            except Exception:  # a key the view cannot take (400): nothing was served, nothing is charged
                self.tenants.refund(tenant, rows)
                raise
            try:
                future = self.submit(
                    route, lookup, priority=priority, deadline=deadline, tenant=tenant, route_name=spec.name
                )
            except Rejected as refused:
                failures.append(f"{step}: {refused.reason}")
                if any(isinstance(s, str) and s != CACHE and s in self.routes for s in steps[steps.index(step) + 1 :]):
                    last_error = overload = refused
                    continue  # another model may have room
                self.tenants.refund(tenant, rows)
                self._shed(spec.name, refused.reason, priority, label)
                raise
            try:
                answer = await asyncio.wait_for(future, max(0.0, deadline - self._clock()))
            except TimeoutError:
                self._shed(spec.name, DEADLINE, priority, label)
                raise DeadlineExceeded("the deadline passed before the request was scored") from None
            except DeadlineExceeded:
                self._shed(spec.name, DEADLINE, priority, label)
                raise
            except ScoringFailed as failed:
                failures.append(f"{step}: {failed}")
                if failed.matrix is not None:
                    scored = failed
                    with_features.append(failed)
                last_error = failed
                continue
            except Rejected as refused:  # evicted by critical work
                self.tenants.refund(tenant, rows)
                self._shed(spec.name, refused.reason, priority, label)
                raise
            if degraded:
                answer = replace(answer, degraded=True, reason=reason)
            self._answered(spec.name, answer, priority, label)
            return answer
        assert last_error is not None or failures
        message = f"route `{spec.name}` could not answer: " + "; ".join(failures)
        self.metrics.unanswered.labels(spec.name, request.priority, label).inc()
        self.tenants.refund(tenant, rows)  # nothing was served, nothing is charged
        if overload is not None:  # refused for overload, and no other model could take it
            self._shed(spec.name, overload.reason, priority, label)
            raise Rejected(message, reason=overload.reason, status=overload.status)
        raise ModelUnavailable(message)

    def shed_early(self, priority_header: bytes, tenant_header: bytes, *, passed: bool = False) -> Rejected | None:
        """A refusal decided from the X-Priority header alone, before the body is read:
        when every served model's queue is past that class's headroom, the request
        would be refused whatever model it names. Under 10x load most requests are
        refused; parsing their bodies first would spend the CPU critical work needs.
        `passed`: a sheddable request the front (tenx-front) let through its share of
        `passing` already; it is not drawn again."""
        if not self.settings.shedding or not self.routes:
            return None
        try:
            priority = Priority.parse(priority_header.decode())
        except (ValueError, UnicodeDecodeError):
            return None  # the body path says what is wrong
        if priority is Priority.CRITICAL:
            return None
        if priority is Priority.SHEDDABLE and not passed and not self.pressure.let_through():
            self._shed("*", OVERLOAD, priority, self.tenants.label(tenant_header.decode(errors="replace")))
            return Rejected(
                f"overloaded: the server lets {self.pressure.passing:.0%} of sheddable requests in; retry later",
                reason=OVERLOAD,
            )
        if self._room_for(priority):
            return None
        name = priority.name.lower()
        self._shed("*", OVERLOAD, priority, self.tenants.label(tenant_header.decode(errors="replace")))
        return Rejected(f"overloaded: every model's queue is past the {name} mark; retry later", reason=OVERLOAD)

    def gate_state(self) -> bytes:
        """What a front (tenx-front) needs to refuse as `shed_early` would, sent with every
        answer as X-Tenx-Gate: the share of sheddable requests let through, then whether
        some served model's queue is below the default mark, and the sheddable one."""
        if not self.settings.shedding or not self.routes:
            return b"1 1 1"
        default, sheddable = self._room_for(Priority.DEFAULT), self._room_for(Priority.SHEDDABLE)
        return b"%.4f %d %d" % (self.pressure.passing, default, sheddable)

    def _room_for(self, priority: Priority) -> bool:
        """Whether some served model's queue is below `priority`'s mark."""
        return any(
            route.loaded is not None and route.lane.queue.rows() < route.lane.threshold(priority)
            for route in self.routes.values()
        )

    def count_front_refusals(self, report: bytes) -> list[tuple[str, int]]:
        """Count the refusals a front made for this server as its own (`shed_early`'s):
        `report` is X-Tenx-Front-Shed, space-separated class/tenant/count with the tenant
        percent-encoded. Returns (class, count) per entry counted; a malformed one is skipped."""
        counted = []
        for part in report.split():
            bits = part.split(b"/")
            if len(bits) != 3 or not bits[2].isdigit():
                continue
            try:
                priority = Priority.parse(bits[0].decode())
                tenant = unquote(bits[1].decode(), errors="strict")
            except (ValueError, UnicodeDecodeError):
                continue
            count = int(bits[2])
            name = priority.name.lower()
            self.metrics.shed.labels("*", OVERLOAD, name, self.tenants.label(tenant)).inc(count)
            counted.append((name, count))
        return counted

    def _answered(self, route: str, answer: Answer, priority: Priority, tenant: str) -> None:
        labels = (route, _source(answer.served_by), priority.name.lower(), tenant)
        self.metrics.served.labels(*labels).inc()
        self.metrics.served_predictions.labels(*labels).inc(len(answer.scores))
        if answer.degraded:
            self.metrics.fallbacks.labels(route, _source(answer.served_by), priority.name.lower(), tenant).inc()

    def _shed(self, model: str, reason: str, priority: Priority, tenant: str) -> None:
        key = (model, reason, priority, tenant)
        child = self._shed_children.get(key)
        if child is None:  # `labels()` costs more than the increment, on every refusal
            if len(self._shed_children) > 10_000:
                self._shed_children.clear()
            child = self._shed_children[key] = self.metrics.shed.labels(model, reason, priority.name.lower(), tenant)
        child.inc()

    def _from_cache(self, failed: ScoringFailed | None, began: float, reason: str | None) -> Answer | None:
        if failed is None or failed.matrix is None or failed.vectors is None or failed.loaded is None:
            return None
        loaded = failed.loaded
        vectors = failed.vectors
        # Only the rows the card lets the model score: a refused row (missing or stale
        # under `refuse`) has no score from the model, so none from its cache either.
        scored = vectors.scored
        every = bool(scored.all())
        cached = self.cache.get(
            loaded.card.name, loaded.card.version, loaded.precision, failed.matrix if every else failed.matrix[scored]
        )
        if cached is None:
            return None
        scores: list[float | None]
        if every:
            scores = list(cached)
        else:
            scores = [math.nan] * len(scored)
            for index, score in zip(np.flatnonzero(scored).tolist(), cached, strict=True):
                scores[index] = score
        return Answer(
            f"cache:{loaded.served_by}",
            scores,
            [STATUS_NAMES[s] for s in vectors.status.tolist()],
            as_of_ms(vectors.as_of_us),
            None,
            self._clock() - began,
            loaded,
            degraded=True,
            reason=reason,
        )

    def _by_rule(
        self, rule: Any, failed: ScoringFailed | None, request: PredictRequest, began: float, reason: str | None
    ) -> Answer:
        """A route's rule: a plain function of the features (one dict per entity, None
        when they could not be read) and the request."""
        features = None
        if failed is not None and failed.matrix is not None and failed.loaded is not None:
            names = failed.loaded.card.feature_references
            values = failed.matrix.tolist()
            features = [{n: (None if v != v else v) for n, v in zip(names, row, strict=True)} for row in values]
        name = rule_name(rule)
        try:
            result = rule(features, request)
        except Exception as error:
            log.exception("rule %s failed", name)
            raise ModelUnavailable(f"every step failed ({reason}); the rule `{name}` raised {error!r}") from error
        rows = len(request.entities)
        scores = [float(result)] * rows if isinstance(result, int | float) else [float(v) for v in result]
        if len(scores) != rows:
            raise ModelUnavailable(f"the rule `{name}` returned {len(scores)} scores for {rows} entities")
        return Answer(
            f"rule:{name}", list(scores), ["rule"] * rows, [None] * rows, None, self._clock() - began,
            None, degraded=True, reason=reason or "routed to the rule",
        )  # fmt: skip

    def submit(
        self,
        route: Route,
        entities: Sequence[Any],
        *,
        priority: Priority,
        deadline: float,
        tenant: str = "default",
        route_name: str = "",
    ) -> asyncio.Future[Answer]:
        """Queue one request on a model's lane (admission may refuse it: Rejected); the
        future resolves when its batch is scored. `deadline` is a clock time."""
        if route.loaded is None:
            if route.problem and "trained on" in route.problem:
                raise SkewError(route.problem)
            raise ModelUnavailable(route.problem or f"model `{route.name}` is loading; retry shortly")
        now = self._clock()
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        evicted = route.lane.admit(
            Pending(
                deadline=deadline,
                rows=len(entities),
                priority=priority,
                enqueued=now,
                tenant=tenant,
                payload=Work(
                    entities,
                    future,
                    route_name or route.name,
                    self.tenants.label(tenant),
                    route.splits() and takes(entities[0], route.canary_spec.percent),  # type: ignore[union-attr]
                    REQUEST_ID.get(),
                    priority,
                ),
            )
        )
        for item in evicted:
            fail_future(
                item.payload.future,
                Rejected(f"shed to make room for critical work on `{route.name}`; retry later", reason=EVICTED),
            )
        route.wake.set()
        return future

    async def _batch_loop(self, route: Route) -> None:
        settings = self.settings
        assert route.slots is not None
        while True:
            await route.wake.wait()
            if settings.max_wait_ms > 0 and route.queue.rows() < route.lane.limit.rows:
                oldest = route.queue.oldest_enqueued()
                if oldest is not None:
                    delay = oldest + settings.max_wait_ms / 1000 - self._clock()
                    if delay > 0:
                        await asyncio.sleep(delay)
            await route.slots.acquire()
            batch = route.lane.take()
            if not len(route.queue):
                route.wake.clear()
            for item in batch.expired:
                fail_future(
                    item.payload.future, DeadlineExceeded("deadline passed while queued; the request was dropped")
                )
            if not batch.items:
                route.lane.finished(0, 0.0)
                route.slots.release()
                continue
            self._spawn(self._process(route, batch))

    async def _process(self, route: Route, batch: Batch) -> None:
        assert route.slots is not None
        began = self._clock()
        try:
            loaded = route.loaded
            if loaded is None:  # unloaded (or found skewed) while these waited: their routes' fallbacks answer
                problem = route.problem or f"model `{route.name}` is not loaded"
                for item in batch.items:
                    fail_future(item.payload.future, ScoringFailed(problem, loaded=None, vectors=None, rows=None))
                return
            canary = route.canary
            if canary is None:
                await self._score(route, loaded, batch.items)
                return
            baseline_items = [item for item in batch.items if not item.payload.canary]
            canary_items = [item for item in batch.items if item.payload.canary]
            if baseline_items:
                await self._score(route, loaded, baseline_items)
            if canary_items and not await self._score(route, canary, canary_items, fail=False):
                await self._score(route, loaded, canary_items)  # the canary failed them: the baseline answers
            spec = route.canary_spec
            if spec is not None and spec.shadow and baseline_items:
                copied = [item for item in baseline_items if takes(item.payload.entities[0], spec.percent)]
                if copied:
                    self._spawn(self._shadow(route, canary, copied))
        finally:
            route.lane.finished(batch.rows, self._clock() - began)
            route.slots.release()

    async def _shadow(self, route: Route, canary: Loaded, items: list[Pending]) -> None:
        """Score a copy of answered requests with the shadow canary: its errors, latency
        and scores go to the judge, the score differences to a histogram; nobody waits."""
        judge = route.judge
        entities = [entity for item in items for entity in item.payload.entities]
        began = self._clock()
        try:
            raws = await self._read(canary.assembler.requests(entities))
            vectors = canary.assembler.assemble(raws, int(self._wall() * 1_000_000))
            timeout = self.settings.inference_timeout_ms / 1000
            scores, _ = await self._infer(canary, vectors, timeout_s=timeout, canary=True)
        except Exception:  # noqa: BLE001 - a shadow failure is the judge's business, never the client's
            if judge is not None:
                for _ in items:
                    judge.record(True, ok=False, seconds=self._clock() - began)
            return
        seconds = self._clock() - began
        shadow = scores.tolist()
        diffs = self.metrics.shadow_diff.labels(route.name)
        offset = 0
        for item in items:
            end = offset + item.rows
            mine = shadow[offset:end]
            if judge is not None:
                judge.record(True, ok=True, seconds=seconds, scores=mine)
            future = item.payload.future
            if future.done() and not future.cancelled() and future.exception() is None:
                for served, copy in zip(future.result().scores, mine, strict=True):
                    if served is not None and copy == copy:
                        diffs.observe(abs(served - copy))
            offset = end

    async def _score(self, route: Route, loaded: Loaded, items: list[Pending], *, fail: bool = True) -> bool:
        """Score `items` with `loaded` and answer them; False when it failed (their
        futures are then failed, or left for the caller when `fail` is False)."""
        judge = route.judge
        side = loaded is route.canary
        entities: list[Any] = []
        for item in items:
            entities.extend(item.payload.entities)
        started = self._clock()
        vectors: Vectors | None = None
        try:
            requests = loaded.assembler.requests(entities)
            raws = await self._read(requests)
            self.cost.charge_lookups(loaded, items, len(requests))
            looked_up = self._clock()
            read_at = int(self._wall() * 1_000_000)
            vectors = loaded.assembler.assemble(raws, read_at)
            latest = max(item.deadline for item in items) - self._clock()
            if latest <= 0:
                # Every caller's deadline passed during the lookup: they were answered 504
                # already, and a run now would only take the model from live batches.
                for item in items:
                    fail_future(
                        item.payload.future, DeadlineExceeded("the deadline passed before the request was scored")
                    )
                self.metrics.dead_batches.labels(loaded.card.name).inc()
                return True
            timeout = min(latest, self.settings.inference_timeout_ms / 1000)
            scores, spent = await self._infer(loaded, vectors, timeout_s=timeout, canary=side)
        except Exception as error:
            if not isinstance(error, TransientError):
                ids = ", ".join(item.payload.request_id or "-" for item in items[:20])
                log.exception("batch of %s failed (requests %s)", loaded.served_by, ids)
            if judge is not None:
                for _ in items:
                    judge.record(side, ok=False, seconds=self._clock() - started)
                self.metrics.canary_requests.labels(route.name, _side(side), "error").inc(len(items))
            if not fail:
                return False
            offset = 0
            for item in items:
                end = offset + item.rows
                fail_future(
                    item.payload.future,
                    ScoringFailed(
                        str(error),
                        loaded=loaded,
                        vectors=vectors.matrix[offset:end] if vectors is not None else None,
                        rows=slice_rows(vectors, offset, end) if vectors is not None else None,
                    ),
                )
                offset = end
            return False
        self.cost.charge_device(loaded, items, spent)
        if route.cache_ttl_s is not None:
            card = loaded.card
            self.cache.put(card.name, card.version, loaded.precision, vectors.matrix, scores, route.cache_ttl_s)
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
        as_of_list = as_of_ms(vectors.as_of_us)
        read_at_ms = read_at // 1000
        served_by = loaded.served_by
        offset = 0
        for item in items:
            end = offset + item.rows
            counted.queue_wait.observe(started - item.enqueued)
            future = item.payload.future
            if not future.done():
                future.set_result(
                    Answer(
                        served_by,
                        score_list[offset:end],
                        status_list[offset:end],
                        as_of_list[offset:end],
                        read_at_ms,
                        started - item.enqueued,
                        loaded,
                    )
                )
            offset = end
        if judge is not None:
            seconds = self._clock() - started
            offset = 0
            for item in items:
                judge.record(side, ok=True, seconds=seconds, scores=score_list[offset : offset + item.rows])
                offset += item.rows
            self.metrics.canary_requests.labels(route.name, _side(side), "ok").inc(len(items))
        return True

    def _counted(self, name: str, version: int) -> Counted:
        """The metric children of one model version (`labels()` costs as much as an update)."""
        key = (name, version)
        counted = self._children.get(key)
        if counted is None:
            metrics = self.metrics
            counted = self._children[key] = Counted(
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
        except BaseException:  # a cancelled call too: a half-open probe must be recorded
            self.guard.record(ONLINE_STORE, ok=False, seconds=self._clock() - began)
            raise
        self.guard.record(ONLINE_STORE, ok=True, seconds=self._clock() - began)
        return raws

    async def _infer(
        self, loaded: Loaded, vectors: Vectors, *, timeout_s: float, canary: bool = False
    ) -> tuple[np.ndarray, float]:
        """The rows the policy lets through, on the model's runtime thread (or on the loop
        when the runtime says a run is quicker than the hand-off: `Runtime.quick`). A run that
        outlasts `timeout_s` (the inference timeout, or the batch's last deadline when
        sooner) fails the batch and counts against the model's circuit: a stalled model
        sends its requests down their fallbacks with time left, and soon opens. Unless
        the requests' deadline had left the model less than a quarter of its inference
        timeout: requests that spent their time queued under overload say nothing about
        the model (a FIFO server at 10x gave its batches a few milliseconds each, and
        those timeouts opened a healthy model's circuit, refusing everything for 5 s)."""
        scored = vectors.scored
        every = bool(scored.all())
        matrix = vectors.matrix if every else vectors.matrix[scored]
        result = np.full(len(scored), np.nan)
        spent = 0.0
        if len(matrix):
            # A canary has a circuit of its own: its failures must not open the baseline's.
            dependency = runtime_dependency(loaded.served_by if canary else loaded.card.name)
            if not self.guard.allow(dependency):
                raise ModelUnavailable(f"model `{loaded.card.name}`'s circuit is open; retry shortly")
            began = self._clock()
            runtime = loaded.runtime
            try:
                if loaded.card.name in self.faulted:
                    raise ModelUnavailable(f"model `{loaded.card.name}` failed: a fault injected by the fault file")
                if runtime.quick(len(matrix)):  # cheaper here than the hand-off (serving/models/runtime.py)
                    scores, spent = runtime.score_inline(matrix)
                else:
                    scores, spent = await on_thread(runtime.submit(matrix), timeout_s)
            except TimeoutError:
                if timeout_s >= self.settings.inference_timeout_ms / 4000:  # a fair chance: the model's doing
                    self.guard.record(dependency, ok=False, seconds=self._clock() - began)
                else:  # no verdict on the model; a half-open circuit's probe permit is free again
                    self.guard.release(dependency)
                raise ModelUnavailable(
                    f"model `{loaded.card.name}` did not answer within {timeout_s * 1000:.0f} ms"
                ) from None
            except BaseException:
                self.guard.record(dependency, ok=False, seconds=self._clock() - began)
                raise
            self.guard.record(dependency, ok=True, seconds=self._clock() - began)
            device = loaded.runtime.device
            self.metrics.inference_seconds.labels(loaded.card.name, device).observe(spent)
            self.metrics.device_seconds.labels(loaded.card.name, str(loaded.card.version), device).inc(spent)
            if every:
                return np.asarray(scores, dtype=np.float64), spent
            result[scored] = scores
        return result, spent

    # -- health ------------------------------------------------------------------------------

    def circuits(self) -> dict[str, str]:
        """Each dependency's circuit state, when the guard keeps them (Breakers)."""
        states = getattr(self.guard, "states", None)
        if states is None:
            return {}
        return {name: str(getattr(state, "value", state)) for name, state in sorted(states().items())}

    def export_gauges(self) -> None:
        """Gauges read at scrape time: each lane's limit, bound and queue, each circuit."""
        metrics = self.metrics
        for name, route in self.routes.items():
            lane = route.lane
            metrics.batch_limit.labels(name).set(lane.limit.rows)
            metrics.queue_bound.labels(name).set(lane.bound())
            for priority in Priority:
                metrics.queued.labels(name, priority.name.lower()).set(lane.queue.rows(priority))
        self.gpus.export(metrics)
        states = getattr(self.guard, "states", None)
        if states is not None:
            for dependency, state in states().items():
                metrics.breaker_state.labels(dependency).set(getattr(state, "code", 0))

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


def _side(canary: bool) -> str:
    return "canary" if canary else "baseline"


def _source(served_by: str) -> str:
    """A metrics label for what answered: the model, `cache:<model>` or `rule:<name>` (no version)."""
    return served_by.rsplit("@", 1)[0]


__all__ = ["ModelServer", "ModelServerSettings"]
