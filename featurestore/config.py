"""Settings: one `tenx.yaml` plus environment overrides, read once at process entry.

Library code never reads the environment; `load_settings` is called by entry points
(the CLI, app factories) and the resulting frozen Settings are passed down.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from featurestore.errors import ConfigError
from featurestore.redact import redact_url
from featurestore.stores.location import Location, file_uri_path

CONFIG_FILE = "tenx.yaml"

# Every environment variable tenx reads, and what it overrides.
ENVIRONMENT = {
    "TENX_CONFIG": "path of tenx.yaml (default: the nearest one in this folder or above)",
    "TENX_REDIS_URL": "online_store.redis_url: use Redis instead of the embedded store",
    "TENX_KAFKA_BOOTSTRAP": "kafka.bootstrap: Kafka bootstrap servers, host:port[,host:port]",
    "TENX_KAFKA_OPTIONS": "kafka.options: librdkafka settings, name=value[,name=value] (e.g. security.protocol)",
    "TENX_KAFKA_PASSWORD": "the Kafka SASL password (sasl.password); never in tenx.yaml",
    "TENX_REGISTRY": "registry: folder of the plan registry",
    "TENX_OFFLINE_PATH": "offline_store.path: folder (or s3://bucket/prefix) of the Delta tables",
    "TENX_ONLINE_PATH": "online_store.path: file of the embedded online store",
    "TENX_REDIS_POOL_SIZE": "online_store.pool_size: most connections each Redis client holds (per node on a cluster)",
    "TENX_REDIS_POOL_TIMEOUT": "online_store.pool_timeout: seconds a lookup waits for a free Redis connection",
    "TENX_API_TOKEN": "tenx serve: bearer token required by the feature API",
    "TENX_API_TOKEN_FILE": "tenx serve: a file holding that token (kept out of `ps` and shell history)",
    "TENX_API_MAX_VALUES": "tenx serve: most values (entities x features) one request may ask for",
    "TENX_LOG_FORMAT": "tenx serve, tenx serve-models: server logs as text or json (one object a line, request ids)",
}

# A project name prefixes every online key (tenx:<project>:...); `tenx init` checks the same rule.
# Permissive enough for every name that loaded before the rule existed in practice
# (acme.fraud, 2fa-risk); no spaces, no ':' (the key separator).
PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PROJECT_RULE = "must start with a letter or digit and hold only letters, digits, '_', '-' or '.'"
# URL schemes redis-py accepts.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# The Redis connection pool of each client (sync and async, per process): a lookup past
# `pool_size` at once waits up to `pool_timeout` seconds for a connection, then fails
# with a TransientError (a 503 from `tenx serve`), so overload is shed by the API, not
# refused at random by the pool.
REDIS_POOL_SIZE = 64
REDIS_POOL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class _Value:
    """A leaf of tenx.yaml: the Python type it must have and how to describe it."""

    kind: type | tuple[type, ...]
    expected: str
    path: bool = False  # a path: an unquoted number (a folder named 2024) only needs quotes


_FOLDER = _Value(str, "a string (a folder path)", path=True)

# Every key of tenx.yaml; null means "use the default" everywhere.
_KEYS: dict[str, Any] = {
    "project": _Value(str, "a string"),
    "features": {"modules": _Value(list, "a list of module names"), "path": _FOLDER},
    "registry": _FOLDER,
    "offline_store": {
        "path": _Value(str, "a string (a folder, file:// or s3://bucket/prefix)", path=True),
        "storage_options": _Value(dict, "a mapping (endpoint_url, region, allow_http; never credentials)"),
    },
    "online_store": {
        "path": _Value(str, "a string (a file path)", path=True),
        "redis_url": _Value(str, "a string like redis://host:6379"),
        "pool_size": _Value(int, "a whole number of connections, at least 1"),
        "pool_timeout": _Value((int, float), "a number of seconds above 0"),
    },
    "model_server": {
        "tenants": _Value(dict, "a mapping tenant -> {rate, burst, weight, priority, tier} ('*': every other)"),
        "breaker": _Value(dict, "a mapping of circuit breaker settings (window, minimum_calls, failure_rate, ...)"),
        "costs": _Value(dict, "a mapping of prices in USD: cpu_hour, gpu_hour, lookups_per_million"),
    },
    "kafka": {
        "bootstrap": _Value(str, "a string like host:port[,host:port]"),
        "options": _Value(dict, "a mapping of librdkafka settings (security.protocol: SASL_SSL, ...)"),
    },
}
# Settings that are secrets: never accepted from tenx.yaml (it is committed with the repo).
_SECRET_OPTION = re.compile(r"password|secret|token|credential|\.key$|\.pem$", re.IGNORECASE)


@dataclass(frozen=True)
class Settings:
    """Everything configurable, resolved to absolute paths."""

    project: str
    repo_dir: Path  # folder holding tenx.yaml; relative paths are resolved from it
    modules: tuple[str, ...] | None  # explicit module list, or None: every module under features_path
    features_path: Path
    registry_dir: Path
    offline_location: Location  # a local folder or an s3:// prefix
    online_path: Path
    redis_url: str | None
    kafka_bootstrap: str | None
    config_file: Path | None
    kafka_options: Mapping[str, str] = field(default_factory=dict)  # librdkafka settings (SASL, TLS)
    redis_pool_size: int = REDIS_POOL_SIZE  # connections per Redis client (per node on a cluster)
    redis_pool_timeout_s: float = REDIS_POOL_TIMEOUT_S  # wait for a free connection, then a TransientError
    model_server: Mapping[str, Any] = field(default_factory=dict)  # tenants and breaker (serving.models.config)

    @property
    def offline_dir(self) -> Path:
        """The offline store's folder, when it is local (see `offline_location`)."""
        return self.offline_location.local_path()


def load_settings(
    config_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Read tenx.yaml (from `config_file`, $TENX_CONFIG, or the nearest tenx.yaml in the
    working folder or a folder above it, as git finds its repo; a folder means the
    tenx.yaml inside it) and apply the environment overrides listed in ENVIRONMENT."""
    env = os.environ if environ is None else environ
    here = (cwd or Path.cwd()).resolve()
    given = config_file or (Path(env["TENX_CONFIG"]) if env.get("TENX_CONFIG") else None)
    if given is None:
        candidates = (folder / CONFIG_FILE for folder in (here, *here.parents))
        found = next((candidate for candidate in candidates if candidate.is_file()), None)
        if found is None:
            raise ConfigError(
                f"no {CONFIG_FILE} in {here} or any folder above it; run `tenx init NAME` to create a feature "
                "repo, cd into one, or pass --config"
            )
        path = found
    else:
        path = given if given.is_absolute() else here / given
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.exists():
        raise ConfigError(
            f"no {CONFIG_FILE} at {path}; run `tenx init NAME` to create a feature repo, cd into one, or pass --config"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    _check_keys(data, _KEYS, path, "")
    repo_dir = path.parent

    def section(name: str) -> dict[str, Any]:
        value = data.get(name) or {}
        return value if isinstance(value, dict) else {}

    def resolve(value: str | None, default: str, name: str = "") -> Path:
        candidate = Path(local_location(value or default, name)).expanduser()
        return candidate if candidate.is_absolute() else (repo_dir / candidate).resolve()

    features = section("features")
    modules = features.get("modules")
    if modules is not None and not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"{path}: features.modules must be a list of module names, got {modules!r}")
    project = data.get("project")
    if not isinstance(project, str) or not project:
        raise ConfigError(f"{path}: `project` must be a non-empty string, got {project!r}")
    if not PROJECT_NAME.match(project):
        raise ConfigError(f"{path}: `project` {project!r} {_PROJECT_RULE} (it prefixes every online key)")
    redis_url = env.get("TENX_REDIS_URL") or None
    if redis_url is not None:
        check_redis_url(redis_url, "TENX_REDIS_URL")
    else:
        redis_url = section("online_store").get("redis_url") or None  # "" means the embedded store
        if redis_url is not None:
            check_redis_url(redis_url, f"{path}: `online_store.redis_url`")
    pool_size, pool_timeout_s = _redis_pool(env, section("online_store"), where=f"{path}: ")
    return Settings(
        project=project,
        repo_dir=repo_dir,
        modules=tuple(modules) if modules is not None else None,
        features_path=resolve(features.get("path"), "."),
        registry_dir=resolve(
            env.get("TENX_REGISTRY") or data.get("registry"),
            ".tenx/registry",
            "TENX_REGISTRY" if env.get("TENX_REGISTRY") else f"{path}: `registry`",
        ),
        offline_location=_offline_location(
            env.get("TENX_OFFLINE_PATH") or section("offline_store").get("path"),
            section("offline_store").get("storage_options") or {},
            name="TENX_OFFLINE_PATH" if env.get("TENX_OFFLINE_PATH") else f"{path}: `offline_store.path`",
            resolve=lambda value: resolve(value, "data/offline"),
        ),
        online_path=resolve(
            env.get("TENX_ONLINE_PATH") or section("online_store").get("path"),
            "data/online.sqlite",
            "TENX_ONLINE_PATH" if env.get("TENX_ONLINE_PATH") else f"{path}: `online_store.path`",
        ),
        redis_url=redis_url,
        kafka_bootstrap=env.get("TENX_KAFKA_BOOTSTRAP") or section("kafka").get("bootstrap"),
        config_file=path,
        kafka_options=kafka_options(env, section("kafka").get("options") or {}, where=f"{path}: `kafka.options`"),
        redis_pool_size=pool_size,
        redis_pool_timeout_s=pool_timeout_s,
        model_server=section("model_server"),
    )


def _offline_location(
    value: str | None, options: Mapping[str, Any], *, name: str, resolve: Callable[[str | None], Path]
) -> Location:
    """The offline store: a folder (relative to the repo), a file:// URI or s3://."""
    if value and "://" in value and not value.lower().startswith("file://"):
        return Location.parse(value, options=options, name=name)  # s3://, or a scheme refused in one line
    return Location.parse(resolve(value), options=options, name=name)


def local_location(value: str, name: str) -> str:
    """A folder setting as a local path: a plain path or a `file://` URI. Any other
    scheme (`s3://bucket/tenx` went through Path and became a local folder named `s3:`,
    every write landing on local disk with no word said) is refused in one line.

    >>> local_location("file:///srv/tenx%20data", "x")
    '/srv/tenx data'
    """
    scheme, separator, _ = value.partition("://")
    if not separator or "/" in scheme or not scheme.replace("+", "").isalnum():
        return value
    if scheme.lower() == "file":
        return file_uri_path(value, name)
    raise ConfigError(
        f"{name}: {value!r} is a {scheme}:// location; this setting is a local file or folder: give a path or a "
        "file:// URI (only the offline store, `offline_store.path`, may live on s3://)"
    )


def _redis_pool(environ: Mapping[str, str], configured: Mapping[str, Any], *, where: str = "") -> tuple[int, float]:
    """(pool size, pool timeout in seconds): `online_store.pool_size` and
    `online_store.pool_timeout` from tenx.yaml (`where` names the file in messages),
    overridden by TENX_REDIS_POOL_SIZE and TENX_REDIS_POOL_TIMEOUT.

    >>> _redis_pool({"TENX_REDIS_POOL_SIZE": "16"}, {"pool_timeout": 0.5})
    (16, 0.5)
    """
    size: Any = configured.get("pool_size")
    size_from = f"{where}`online_store.pool_size`"
    if environ.get("TENX_REDIS_POOL_SIZE"):
        size, size_from = _number(environ["TENX_REDIS_POOL_SIZE"], int), "TENX_REDIS_POOL_SIZE"
    timeout: Any = configured.get("pool_timeout")
    timeout_from = f"{where}`online_store.pool_timeout`"
    if environ.get("TENX_REDIS_POOL_TIMEOUT"):
        timeout, timeout_from = _number(environ["TENX_REDIS_POOL_TIMEOUT"], float), "TENX_REDIS_POOL_TIMEOUT"
    if size is None:
        size = REDIS_POOL_SIZE
    elif isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(
            f"{size_from} must be a whole number of connections, at least 1; got {size!r} (default {REDIS_POOL_SIZE})"
        )
    if timeout is None:
        timeout = REDIS_POOL_TIMEOUT_S
    elif isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
        # 0 would refuse instead of waiting and infinity would wait forever: neither bounds the wait.
        raise ConfigError(
            f"{timeout_from} must be a number of seconds above 0 and finite (how long a lookup waits for a free "
            f"Redis connection); got {timeout!r} (default {REDIS_POOL_TIMEOUT_S:g})"
        )
    return size, float(timeout)


def _number(text: str, kind: type[int] | type[float]) -> Any:
    """`text` as an int or a float, or the text itself when it is not one (the caller
    then names what was expected)."""
    try:
        return kind(text.strip())
    except ValueError:
        return text


def kafka_options(
    environ: Mapping[str, str], configured: Mapping[str, Any] | None = None, *, where: str = "kafka.options"
) -> dict[str, str]:
    """The librdkafka settings every Kafka client of tenx gets: `kafka.options` from
    tenx.yaml, then TENX_KAFKA_OPTIONS (name=value,...), then TENX_KAFKA_PASSWORD as
    `sasl.password`. Secrets are refused from tenx.yaml (it is committed with the repo).

    >>> kafka_options({"TENX_KAFKA_OPTIONS": "security.protocol=SASL_SSL", "TENX_KAFKA_PASSWORD": "pw"})
    {'security.protocol': 'SASL_SSL', 'sasl.password': 'pw'}
    """
    options: dict[str, str] = {}
    for name, value in (configured or {}).items():
        if _SECRET_OPTION.search(str(name)):
            raise ConfigError(
                f"{where}: `{name}` is a secret and tenx.yaml is committed with the repo; "
                "set TENX_KAFKA_PASSWORD (for sasl.password) or TENX_KAFKA_OPTIONS instead"
            )
        options[str(name)] = str(value).lower() if isinstance(value, bool) else str(value)
    for number, item in enumerate((environ.get("TENX_KAFKA_OPTIONS") or "").split(","), start=1):
        if not item.strip():
            continue
        name, equals, value = item.partition("=")
        if not equals or not name.strip():  # the item is not shown: it may hold a secret
            raise ConfigError(f"TENX_KAFKA_OPTIONS: item {number} is not name=value; expected name=value[,name=value]")
        options[name.strip()] = value.strip()
    if environ.get("TENX_KAFKA_PASSWORD"):
        options["sasl.password"] = environ["TENX_KAFKA_PASSWORD"]
    return options


def check_project_name(name: str) -> None:
    """Raise ConfigError unless `name` can name a project (what `tenx init` accepts)."""
    if not PROJECT_NAME.match(name):
        raise ConfigError(f"project name {name!r} {_PROJECT_RULE}")


def check_redis_url(url: str, what: str) -> None:
    """Raise ConfigError unless `url` is one redis-py can open; `what` names where it came from.

    >>> check_redis_url("redis://localhost:6379/0", "TENX_REDIS_URL")
    """
    if not url.lower().startswith(REDIS_SCHEMES):
        hint = f"; did you mean '{redact_url('redis://' + url)}'?" if "://" not in url and not url.isdigit() else ""
        raise ConfigError(
            f"{what} must look like redis://host:port (or rediss://, unix://); got {redact_url(url)!r}{hint}"
        )
    # What redis-py would refuse later with a bare ValueError, or read as database 0 (`/7x`).
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError as error:
        raise ConfigError(f"{what}: {redact_url(url)!r} has no valid port ({error})") from None
    databases = parse_qs(parts.query).get("db", [])
    if not parts.scheme.lower().startswith("unix") and parts.path.strip("/"):
        databases.append(parts.path.strip("/"))
    for database in databases:
        if not database.isdigit():
            raise ConfigError(
                f"{what}: database {database!r} in {redact_url(url)!r} must be a number, e.g. redis://host:6379/0"
            )


def _check_keys(data: Mapping[str, Any], allowed: Mapping[str, Any], path: Path, prefix: str) -> None:
    for key, value in data.items():
        if key not in allowed:
            known = ", ".join(prefix + k for k in allowed)
            raise ConfigError(f"{path}: unknown key `{prefix}{key}`; known keys: {known}")
        if value is None:
            continue
        expected = allowed[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: `{prefix}{key}` must be a mapping, got {value!r}")
            _check_keys(value, expected, path, f"{prefix}{key}.")
        elif not isinstance(value, expected.kind):
            quote = "; put it in quotes" if expected.path and not isinstance(value, dict | list) else ""
            raise ConfigError(
                f"{path}: `{prefix}{key}` must be {expected.expected}, got {value!r} ({type(value).__name__}){quote}"
            )
