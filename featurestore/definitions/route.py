"""Model routes, declared in the feature repo beside the views they read.

A route is the name clients ask the model server for. It names its primary model, a
chain of fallbacks tried in order when the one before cannot answer (another model, the
exact prediction cache, a rule), and optionally a routing function that picks the model
for each request:

    from tenx import route

    def fraud_rule(features, request):
        # features: one dict per entity (None when the online store is down)
        return [0.9 if request.context.get("amount", 0) > 5000 else 0.1 for _ in request.entities]

    @route("fraud", primary="fraud_mlp", fallbacks=["fraud_logistic", "cache", fraud_rule])
    def pick(request):
        if request.priority == "sheddable" or request.context.get("amount", 0) < 20:
            return "fraud_logistic"            # the cheap CPU model takes the easy traffic
        if request.queued_rows("fraud_mlp") > 2000 or request.circuit_open("fraud_mlp"):
            return "fraud_logistic"
        return None                            # the primary

`route(...)` may also be called without decorating anything. Every answer names the
model (or `cache:<model>@<version>`, `rule:<function>`) that served it, and says
`degraded` when a fallback answered because the step before it failed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

CACHE = "cache"  # the fallback step that answers from the exact prediction cache
DEFAULT_CACHE_TTL_S = 60.0


class RouteRequest(Protocol):
    """What a routing function and a rule see of a request."""

    @property
    def route(self) -> str: ...

    @property
    def entities(self) -> Sequence[Any]: ...

    @property
    def priority(self) -> str:
        """ "critical", "default" or "sheddable"."""

    @property
    def tenant(self) -> str: ...

    @property
    def tier(self) -> str:
        """The tenant's tier from tenx.yaml (model_server.tenants), "standard" by default."""

    @property
    def context(self) -> Mapping[str, Any]:
        """The request's `context` object: fields for rules (an amount, a country)."""

    def queued_rows(self, model: str) -> int: ...

    def circuit_open(self, model: str) -> bool: ...


Rule = Callable[[list[dict[str, float | None]] | None, RouteRequest], Any]
Choose = Callable[[RouteRequest], "str | None"]


@dataclass(frozen=True)
class Route:
    name: str
    primary: str
    fallbacks: tuple[str | Rule, ...] = ()
    choose: Choose | None = field(default=None, compare=False)
    cache_ttl_s: float = DEFAULT_CACHE_TTL_S  # capped by the shortest ttl of the views the model reads

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"route name must be a non-empty string, got {self.name!r}")
        if not self.primary or not isinstance(self.primary, str):
            raise ValueError(f"route `{self.name}`: primary must name a deployed model, got {self.primary!r}")
        for step in self.fallbacks:
            if not (isinstance(step, str) and step) and not callable(step):
                raise ValueError(
                    f"route `{self.name}`: a fallback is a model name, {CACHE!r} or a function "
                    f"(features, request) -> scores; got {step!r}"
                )
        if not self.cache_ttl_s > 0:
            raise ValueError(f"route `{self.name}`: cache_ttl_s must be above 0, got {self.cache_ttl_s}")

    @property
    def models(self) -> list[str]:
        """Every model the route may call."""
        return [self.primary, *(step for step in self.fallbacks if isinstance(step, str) and step != CACHE)]


class _Declared(Route):
    """What `@route(...)` returns before it decorates a function."""

    def __call__(self, choose: Choose) -> Route:
        if not callable(choose):
            raise TypeError(f"@route({self.name!r}, ...) decorates a function (request) -> model name or None")
        return Route(self.name, self.primary, self.fallbacks, choose, self.cache_ttl_s)


def route(
    name: str,
    *,
    primary: str,
    fallbacks: Sequence[str | Rule] = (),
    cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
) -> Route:
    """Declare a route; use it bare (`fraud = route(...)`) or as a decorator on the
    function that picks a model per request (return a model name, or None for the
    primary)."""
    return _Declared(name, primary, tuple(fallbacks), None, cache_ttl_s)


def rule_name(rule: Rule) -> str:
    return getattr(rule, "__name__", type(rule).__name__)
