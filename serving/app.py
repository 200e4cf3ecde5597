"""Process entry for the API under uvicorn: settings are read here, once per process."""

from __future__ import annotations

import os

from starlette.applications import Starlette

from featurestore.config import load_settings
from featurestore.registry import FileRegistry
from featurestore.stores.online import open_online_store
from serving.api import MAX_VALUES, ApiSettings, create_app
from serving.logs import configure_logging


def app_from_environment() -> Starlette:
    """The app for `tenx serve` (uvicorn factory): tenx.yaml from $TENX_CONFIG; logs as
    $TENX_LOG_FORMAT says (text or json, with request ids)."""
    configure_logging(os.environ.get("TENX_LOG_FORMAT") or "text")
    settings = load_settings()
    registry = FileRegistry(settings.registry_dir)
    plan = registry.current()
    project = plan.project if plan is not None else settings.project  # the applied plan's keys
    store = open_online_store(
        redis_url=settings.redis_url,
        sqlite_path=settings.online_path,
        project=project,
        pool_size=settings.redis_pool_size,
        pool_timeout_s=settings.redis_pool_timeout_s,
    )
    settings_api = ApiSettings(
        token=os.environ.get("TENX_API_TOKEN") or None,
        max_values=int(os.environ.get("TENX_API_MAX_VALUES") or MAX_VALUES),
    )
    return create_app(store, plan, settings_api, registry=registry)  # follows `tenx apply`
