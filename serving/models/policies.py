"""Where the overload and resilience policies plug into the model server.

The server asks a Guard before each call to a dependency and tells it how the call went;
`serving.models.breaker.Breakers` (a circuit breaker per dependency) is the one the app
uses, `AllowAll` lets everything through. Routing is declared in the feature repo
(`featurestore.route`), admission lives in `serving.models.admission`.
"""

from __future__ import annotations

from typing import Protocol

ONLINE_STORE = "online_store"


def runtime_dependency(model: str) -> str:
    return f"model:{model}"


class Guard(Protocol):
    """Asked before each call to a dependency (the online store, a model's runtime) and
    told how it went: a circuit breaker is one."""

    def allow(self, dependency: str) -> bool: ...

    def record(self, dependency: str, *, ok: bool, seconds: float) -> None: ...

    def release(self, dependency: str) -> None:
        """A call `allow` let through ended without a verdict on the dependency (neither
        `record`ed ok nor failed): a probe permit it held is free again."""


class AllowAll:
    """Every call goes through; nothing is recorded."""

    def allow(self, dependency: str) -> bool:
        return True

    def record(self, dependency: str, *, ok: bool, seconds: float) -> None:
        return None

    def release(self, dependency: str) -> None:
        return None
