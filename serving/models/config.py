"""The model server's part of tenx.yaml, checked:

    model_server:
      tenants:
        shop-1: {rate: 500, burst: 1000, priority: critical, tier: gold, weight: 2}
        "*": {rate: 100}          # every tenant not named
      breaker: {window: 20, minimum_calls: 5, failure_rate: 0.5, slow_call_s: 0.5, open_wait_s: 5}
      costs: {cpu_hour: 0.04, gpu_hour: 2.50, lookups_per_million: 0.02}   # USD, for cost attribution

`rate` is predictions (entities) per second, `burst` the bucket's size (default one
second of rate); `weight` the tenant's share of a queue under pressure; `priority` the
class of its requests that name none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

from featurestore.errors import ConfigError
from serving.models.admission import TenantPolicy
from serving.models.batcher import Priority
from serving.models.breaker import BreakerSettings
from serving.models.cost import CostRates

T = TypeVar("T")
_TENANT_KEYS = ("rate", "burst", "weight", "priority", "tier")


def tenant_policies(section: Mapping[str, Any]) -> dict[str, TenantPolicy]:
    tenants = section.get("tenants") or {}
    policies = {}
    for name, raw in tenants.items():
        where = f"model_server.tenants.{name}"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a mapping of {', '.join(_TENANT_KEYS)}; got {raw!r}")
        unknown = set(raw) - set(_TENANT_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(_TENANT_KEYS)}"
            )
        values = dict(raw)
        try:
            if values.get("priority") is not None:
                values["priority"] = Priority.parse(str(values["priority"]))
            policies[str(name)] = TenantPolicy(**values)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}: {error}") from None
    return policies


def breaker_settings(section: Mapping[str, Any]) -> BreakerSettings:
    return _settings(section, "breaker", BreakerSettings)


def cost_rates(section: Mapping[str, Any]) -> CostRates:
    for name, value in (section.get("costs") or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"model_server.costs.{name} must be a price in USD, 0 or more; got {value!r}")
    return _settings(section, "costs", CostRates)


def _settings(section: Mapping[str, Any], key: str, kind: type[T]) -> T:
    """`model_server.<key>` as a `kind` dataclass; unknown keys and bad values say so."""
    raw = section.get(key) or {}
    known = {f.name for f in fields(kind)}  # type: ignore[arg-type]
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(
            f"model_server.{key}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(known))}"
        )
    try:
        return kind(**raw)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model_server.{key}: {error}") from None
