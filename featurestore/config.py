"""Settings: one `tenx.yaml` plus environment overrides, read once at process entry.

Library code never reads the environment; `load_settings` is called by entry points
(the CLI, app factories) and the resulting frozen Settings are passed down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from featurestore.errors import ConfigError

CONFIG_FILE = "tenx.yaml"

# Every environment variable tenx reads, and what it overrides.
ENVIRONMENT = {
    "TENX_CONFIG": "path of tenx.yaml (default: ./tenx.yaml)",
    "TENX_REDIS_URL": "online_store.redis_url: use Redis instead of the embedded store",
    "TENX_KAFKA_BOOTSTRAP": "kafka.bootstrap: Kafka bootstrap servers, host:port[,host:port]",
    "TENX_REGISTRY": "registry: folder of the plan registry",
    "TENX_OFFLINE_PATH": "offline_store.path: folder of the Delta tables",
    "TENX_ONLINE_PATH": "online_store.path: file of the embedded online store",
    "TENX_API_TOKEN": "tenx serve: bearer token required by the feature API",
}

_KEYS: dict[str, Any] = {
    "project": None,
    "features": {"modules": None, "path": None},
    "registry": None,
    "offline_store": {"path": None},
    "online_store": {"path": None, "redis_url": None},
    "kafka": {"bootstrap": None},
}


@dataclass(frozen=True)
class Settings:
    """Everything configurable, resolved to absolute paths."""

    project: str
    repo_dir: Path  # folder holding tenx.yaml; relative paths are resolved from it
    modules: tuple[str, ...] | None  # explicit module list, or None: every module under features_path
    features_path: Path
    registry_dir: Path
    offline_dir: Path
    online_path: Path
    redis_url: str | None
    kafka_bootstrap: str | None
    config_file: Path | None


def load_settings(
    config_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Read tenx.yaml (from `config_file`, $TENX_CONFIG or ./tenx.yaml) and apply the
    environment overrides listed in ENVIRONMENT."""
    env = os.environ if environ is None else environ
    here = (cwd or Path.cwd()).resolve()
    path = config_file or (Path(env["TENX_CONFIG"]) if env.get("TENX_CONFIG") else here / CONFIG_FILE)
    path = path if path.is_absolute() else here / path
    if not path.exists():
        raise ConfigError(
            f"no {CONFIG_FILE} at {path}; run `tenx init NAME` to create a feature repo, cd into one, or pass --config"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    _check_keys(data, _KEYS, path, "")
    repo_dir = path.parent

    def section(name: str) -> dict[str, Any]:
        value = data.get(name) or {}
        return value if isinstance(value, dict) else {}

    def resolve(value: str | None, default: str) -> Path:
        candidate = Path(value or default).expanduser()
        return candidate if candidate.is_absolute() else (repo_dir / candidate).resolve()

    features = section("features")
    modules = features.get("modules")
    if modules is not None and (not isinstance(modules, list) or not all(isinstance(m, str) for m in modules)):
        raise ConfigError(f"{path}: features.modules must be a list of module names, got {modules!r}")
    project = data.get("project")
    if not isinstance(project, str) or not project:
        raise ConfigError(f"{path}: `project` must be a non-empty string, got {project!r}")
    return Settings(
        project=project,
        repo_dir=repo_dir,
        modules=tuple(modules) if modules is not None else None,
        features_path=resolve(features.get("path"), "."),
        registry_dir=resolve(env.get("TENX_REGISTRY") or data.get("registry"), ".tenx/registry"),
        offline_dir=resolve(env.get("TENX_OFFLINE_PATH") or section("offline_store").get("path"), "data/offline"),
        online_path=resolve(env.get("TENX_ONLINE_PATH") or section("online_store").get("path"), "data/online.sqlite"),
        redis_url=env.get("TENX_REDIS_URL") or section("online_store").get("redis_url"),
        kafka_bootstrap=env.get("TENX_KAFKA_BOOTSTRAP") or section("kafka").get("bootstrap"),
        config_file=path,
    )


def _check_keys(data: Mapping[str, Any], allowed: Mapping[str, Any], path: Path, prefix: str) -> None:
    for key, value in data.items():
        if key not in allowed:
            known = ", ".join(prefix + k for k in allowed)
            raise ConfigError(f"{path}: unknown key `{prefix}{key}`; known keys: {known}")
        nested = allowed[key]
        if isinstance(nested, dict) and value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: `{prefix}{key}` must be a mapping, got {value!r}")
            _check_keys(value, nested, path, f"{prefix}{key}.")
