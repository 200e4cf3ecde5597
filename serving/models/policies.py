"""Where the overload and resilience policies plug into the model server.

Two small Protocols the server calls on every request and every batch; the defaults
here route by model name and let every call through. Circuit breakers, routing rules,
fallbacks and quotas (issue #17) implement them as plain classes with an injected
clock, and the server does not change.
"""

from __future__ import annotations

from typing import Protocol

from serving.models.batcher import Priority

ONLINE_STORE = "online_store"


def runtime_dependency(model: str) -> str:
    return f"model:{model}"


class Router(Protocol):
    """Which served model answers a request."""

    def route(self, model: str, *, entities: int, priority: Priority, tenant: str) -> str: ...


class ByName:
    """The model the request names."""

    def route(self, model: str, *, entities: int, priority: Priority, tenant: str) -> str:
        return model


class Guard(Protocol):
    """Asked before each call to a dependency (the online store, a model's runtime) and
    told how it went: a circuit breaker is one."""

    def allow(self, dependency: str) -> bool: ...

    def record(self, dependency: str, *, ok: bool, seconds: float) -> None: ...


class AllowAll:
    """Every call goes through; nothing is recorded."""

    def allow(self, dependency: str) -> bool:
        return True

    def record(self, dependency: str, *, ok: bool, seconds: float) -> None:
        return None
