"""What the model server holds per served model and what travels through it: a route
(its lane and the versions loaded warm), a queued request's work, the answer, and the
failure a fallback step answers from."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from featurestore.errors import TransientError
from featurestore.models import Canary, Deployment, ModelCard
from serving.models.admission import Lane
from serving.models.batcher import Priority
from serving.models.canary import CanaryJudge
from serving.models.policies import runtime_dependency
from serving.models.runtime import Runtime
from serving.models.vectors import FeatureAssembler, Vectors

if TYPE_CHECKING:
    from serving.models.server import ModelServer


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

    @property
    def precision(self) -> str:
        return self.runtime.precision.value


@dataclass(frozen=True)
class Answer:
    served_by: str  # "buys@3", "cache:buys@3" or "rule:<function>"
    scores: list[float | None]
    status: list[str]
    as_of_ms: list[int | None]
    read_at_ms: int | None  # when the batch read the online store: age = read_at_ms - as_of_ms
    queued_s: float
    loaded: Loaded | None = None  # the model that scored (or whose cache answered); None for a rule
    degraded: bool = False  # a fallback answered because the step before it could not
    reason: str | None = None  # why, when degraded: "buys: circuit open", ...


class ScoringFailed(TransientError):
    """A batch's lookup or inference failed for one request; carries what the fallback
    steps can use (the vectors, when the lookup had succeeded)."""

    def __init__(
        self, message: str, *, loaded: Loaded | None, vectors: np.ndarray | None, rows: Vectors | None
    ) -> None:
        super().__init__(message)
        self.loaded = loaded
        self.matrix = vectors
        self.vectors = rows


@dataclass
class Route:
    """One served model: its lane (queue, admission, batch limit) and what is loaded."""

    name: str
    lane: Lane
    loaded: Loaded | None = None
    problem: str | None = None  # why it cannot serve (skew, a failed load); None when fine
    failed: tuple[Deployment, str] | None = None  # the (deployment, plan) whose load failed last
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    slots: asyncio.Semaphore | None = None
    cache_ttl_s: float | None = None  # set when a route caches this model's answers
    canary: Loaded | None = None  # a canary version, warm, beside `loaded`
    canary_spec: Canary | None = None
    canary_plan: str | None = None  # the plan `canary_spec` was last loaded (or tried) under
    judge: CanaryJudge | None = None

    @property
    def queue(self) -> Any:
        return self.lane.queue

    def splits(self) -> bool:
        """Whether some requests go to the canary now (not in shadow mode)."""
        return self.canary is not None and self.canary_spec is not None and not self.canary_spec.shadow


@dataclass(frozen=True)
class Counted:
    """The metric children of one model version (`labels()` costs as much as an update)."""

    lookup: Any
    batch_rows: Any
    predictions: Any
    queue_wait: Any
    entities: tuple[Any, ...]  # by status code


@dataclass(frozen=True)
class Work:
    """A queued request as its batch sees it (the queue's `Pending.payload`)."""

    entities: Sequence[Any]
    future: asyncio.Future[Answer]
    route: str = ""  # the route the client asked for (cost attribution); the model's name when empty
    tenant: str = "default"  # as metrics name it (Tenants.label)
    canary: bool = False  # sticky by its first entity: the canary version scores it
    request_id: str | None = None  # for the logs of the batch that scores it
    # The request's class as cost metrics name it: the queue's item may say otherwise (the
    # no-shedding baseline queues every class as one).
    priority: Priority = Priority.DEFAULT


@dataclass(frozen=True)
class PredictRequest:
    """A request as routing functions and rules see it (featurestore.RouteRequest)."""

    route: str
    entities: Sequence[Any]
    priority_class: Priority
    tenant: str
    tier: str
    context: Mapping[str, Any]
    server: ModelServer

    @property
    def priority(self) -> str:
        return self.priority_class.name.lower()

    def queued_rows(self, model: str) -> int:
        served = self.server.routes.get(model)
        return served.lane.queue.rows() if served is not None else 0

    def circuit_open(self, model: str) -> bool:
        return not self.server.guard_open(runtime_dependency(model))


def fail_future(future: asyncio.Future[Any], error: Exception) -> None:
    """Answer a request's future with `error`, unless it was answered already."""
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
            # runs on the event loop: quick CPU runs cost less there than the hand-off to the model's thread
            batches={"run": loaded.runtime.batches, "inline": loaded.runtime.inline_batches},
            queued_rows=route.queue.rows(),
            admission=route.lane.snapshot(),
        )
    spec = route.canary_spec
    if spec is not None:
        data["canary"] = {
            "version": spec.version,
            "percent": spec.percent,
            "shadow": spec.shadow,
            "limits": spec.limits.__dict__,
            "comparison": route.judge.comparison() if route.judge is not None else "judged",
        }
    return data
