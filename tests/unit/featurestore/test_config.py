"""Settings: tenx.yaml and environment overrides, every mistake named with its key and a fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from featurestore.config import check_project_name, load_settings
from featurestore.errors import ConfigError


def write_config(folder: Path, text: str) -> Path:
    path = folder / "tenx.yaml"
    path.write_text(text)
    return path


def test_a_minimal_config_gets_the_defaults(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, "project: demo\n"), environ={})
    assert settings.project == "demo"
    assert settings.registry_dir == tmp_path.resolve() / ".tenx" / "registry"
    assert settings.redis_url is None


def test_a_folder_means_the_tenx_yaml_inside_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, "project: demo\n")
    assert load_settings(tmp_path, environ={}).config_file == config
    assert load_settings(environ={"TENX_CONFIG": str(tmp_path)}).config_file == config


def test_a_folder_without_tenx_yaml_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(tmp_path, environ={})
    assert str(raised.value) == (
        f"no tenx.yaml at {tmp_path / 'tenx.yaml'}; run `tenx init NAME` to create a feature repo, cd into one, "
        "or pass --config"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "online_store: {redis_url: 6379}",
            "`online_store.redis_url` must be a string like redis://host:6379, got 6379 (int)",
        ),
        (
            "online_store: {path: 42}",
            "`online_store.path` must be a string (a file path), got 42 (int); put it in quotes",
        ),
        ("registry: [a, b]", "`registry` must be a string (a folder path), got ['a', 'b'] (list)"),
        (
            "features: {path: true}",
            "`features.path` must be a string (a folder path), got True (bool); put it in quotes",
        ),
        ("features: {modules: features}", "`features.modules` must be a list of module names, got 'features' (str)"),
        ("kafka: {bootstrap: 9092}", "`kafka.bootstrap` must be a string like host:port[,host:port], got 9092 (int)"),
        ("project: 7", "`project` must be a string, got 7 (int)"),
        ("offline_store: data", "`offline_store` must be a mapping, got 'data'"),
    ],
)
def test_a_value_of_the_wrong_type_names_its_key_and_the_expected_type(tmp_path: Path, text: str, message: str) -> None:
    config = write_config(tmp_path, "project: demo\n" * ("project" not in text) + text + "\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    assert str(raised.value) == f"{config}: {message}"


@pytest.mark.parametrize("name", ["my project", "tenx:demo", ".hidden", "_x", "démo"])
def test_the_project_name_follows_the_init_rule(tmp_path: Path, name: str) -> None:
    config = write_config(tmp_path, f"project: '{name}'\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    assert str(raised.value) == (
        f"{config}: `project` {name!r} must start with a letter or digit and hold only letters, digits, '_', '-' "
        "or '.' "
        "(it prefixes every online key)"
    )
    with pytest.raises(ConfigError, match="must start with a letter or digit"):
        check_project_name(name)


@pytest.mark.parametrize("name", ["demo", "Demo-2", "fraud_v2", "acme.fraud", "2fa-risk"])
def test_project_names_that_init_accepts_load(tmp_path: Path, name: str) -> None:
    assert load_settings(write_config(tmp_path, f"project: {name}\n"), environ={}).project == name
    check_project_name(name)


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("localhost:6379", "; did you mean 'redis://localhost:6379'?"),
        ("http://localhost:6379", ""),
        ("6379", ""),
    ],
)
def test_a_redis_url_without_a_redis_scheme_is_refused_at_load(tmp_path: Path, url: str, hint: str) -> None:
    config = write_config(tmp_path, "project: demo\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={"TENX_REDIS_URL": url})
    assert str(raised.value) == (
        f"TENX_REDIS_URL must look like redis://host:port (or rediss://, unix://); got {url!r}{hint}"
    )
    write_config(tmp_path, f"project: demo\nonline_store:\n  redis_url: '{url}'\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    assert str(raised.value) == (
        f"{config}: `online_store.redis_url` must look like redis://host:port (or rediss://, unix://); "
        f"got {url!r}{hint}"
    )


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://user:secret@cache:6380", "unix:///tmp/r.sock", "REDIS://cache:6379"]
)
def test_redis_urls_redis_py_opens_are_kept(tmp_path: Path, url: str) -> None:
    config = write_config(tmp_path, "project: demo\nonline_store:\n  redis_url: redis://from-yaml:6379\n")
    assert load_settings(config, environ={"TENX_REDIS_URL": url}).redis_url == url
    assert load_settings(config, environ={}).redis_url == "redis://from-yaml:6379"


def test_an_empty_redis_url_means_the_embedded_store(tmp_path: Path) -> None:
    config = write_config(tmp_path, "project: demo\nonline_store:\n  redis_url: ''\n")
    assert load_settings(config, environ={}).redis_url is None


def test_the_redis_pool_has_defaults_tenx_yaml_values_and_environment_overrides(tmp_path: Path) -> None:
    defaults = load_settings(write_config(tmp_path, "project: demo\n"), environ={})
    assert (defaults.redis_pool_size, defaults.redis_pool_timeout_s) == (64, 5.0)
    config = write_config(tmp_path, "project: demo\nonline_store:\n  pool_size: 16\n  pool_timeout: 2\n")
    configured = load_settings(config, environ={})
    assert (configured.redis_pool_size, configured.redis_pool_timeout_s) == (16, 2.0)
    overridden = load_settings(config, environ={"TENX_REDIS_POOL_SIZE": "200", "TENX_REDIS_POOL_TIMEOUT": "0.25"})
    assert (overridden.redis_pool_size, overridden.redis_pool_timeout_s) == (200, 0.25)


_POOL_SIZE = "must be a whole number of connections, at least 1; got {} (default 64)"
_POOL_TIMEOUT = (
    "must be a number of seconds above 0 and finite (how long a lookup waits for a free Redis connection); "
    "got {} (default 5)"
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pool_size: 0", "`online_store.pool_size` " + _POOL_SIZE.format(0)),
        ("pool_size: -3", "`online_store.pool_size` " + _POOL_SIZE.format(-3)),
        ("pool_size: true", "`online_store.pool_size` " + _POOL_SIZE.format(True)),
        (
            "pool_size: 2.5",
            "`online_store.pool_size` must be a whole number of connections, at least 1, got 2.5 (float)",
        ),
        ("pool_timeout: 0", "`online_store.pool_timeout` " + _POOL_TIMEOUT.format(0)),
        ("pool_timeout: -1.5", "`online_store.pool_timeout` " + _POOL_TIMEOUT.format(-1.5)),
        ("pool_timeout: .inf", "`online_store.pool_timeout` " + _POOL_TIMEOUT.format("inf")),
        ("pool_timeout: '5'", "`online_store.pool_timeout` must be a number of seconds above 0, got '5' (str)"),
    ],
)
def test_a_wrong_redis_pool_setting_in_tenx_yaml_is_named(tmp_path: Path, text: str, message: str) -> None:
    config = write_config(tmp_path, f"project: demo\nonline_store:\n  {text}\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    assert str(raised.value) == f"{config}: {message}"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TENX_REDIS_POOL_SIZE", "many", _POOL_SIZE.format("'many'")),
        ("TENX_REDIS_POOL_SIZE", "0", _POOL_SIZE.format(0)),
        ("TENX_REDIS_POOL_SIZE", "8.5", _POOL_SIZE.format("'8.5'")),
        ("TENX_REDIS_POOL_TIMEOUT", "soon", _POOL_TIMEOUT.format("'soon'")),
        ("TENX_REDIS_POOL_TIMEOUT", "0", _POOL_TIMEOUT.format(0.0)),
        ("TENX_REDIS_POOL_TIMEOUT", "nan", _POOL_TIMEOUT.format("nan")),
    ],
)
def test_a_wrong_redis_pool_override_is_named(tmp_path: Path, variable: str, value: str, message: str) -> None:
    # The environment wins over tenx.yaml, so its mistake is the one reported.
    config = write_config(tmp_path, "project: demo\nonline_store:\n  pool_size: 8\n  pool_timeout: 1\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={variable: value})
    assert str(raised.value) == f"{variable} {message}"


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        (
            "offline_store:\n  path: gs://bucket/tenx\n",
            {},
            r"`offline_store.path`: 'gs://bucket/tenx' has scheme gs://",
        ),
        ("", {"TENX_OFFLINE_PATH": "hdfs://x/y"}, r"TENX_OFFLINE_PATH: 'hdfs://x/y' has scheme hdfs://"),
        ("offline_store:\n  path: s3://\n", {}, r"'s3://' names no bucket"),
        (
            "offline_store:\n  path: s3://b/p\n  storage_options:\n    secret_access_key: x\n",
            {},
            r"unknown storage option\(s\) secret_access_key; .*credentials come from AWS_ACCESS_KEY_ID",
        ),
        ("registry: s3://bucket/registry\n", {}, r"`registry`: 's3://bucket/registry' is a s3:// location"),
        ("online_store:\n  path: http://host/o.sqlite\n", {}, r"`online_store.path`: 'http://host/o.sqlite' is a"),
    ],
)
def test_a_location_tenx_cannot_use_is_refused_not_written_locally(
    tmp_path: Path, text: str, environ: dict[str, str], message: str
) -> None:
    # s3://bucket/tenx went through pathlib: ingest "succeeded" into a local folder `s3:`.
    with pytest.raises(ConfigError, match=message):
        load_settings(write_config(tmp_path, "project: demo\n" + text), environ=environ)
    assert not any(p.name.endswith(":") for p in tmp_path.iterdir())


def test_the_offline_store_may_be_an_s3_prefix_with_public_options(tmp_path: Path) -> None:
    config = "project: demo\noffline_store:\n  path: s3://bucket/tenx/\n  storage_options:\n    region: eu-west-1\n"
    settings = load_settings(write_config(tmp_path, config), environ={})
    assert settings.offline_location.uri == "s3://bucket/tenx"
    assert dict(settings.offline_location.options) == {"region": "eu-west-1"}
    overridden = load_settings(write_config(tmp_path, "project: demo\n"), environ={"TENX_OFFLINE_PATH": "s3://b/p"})
    assert overridden.offline_location.uri == "s3://b/p"


def test_file_uris_and_plain_folders_are_local_locations(tmp_path: Path) -> None:
    where = tmp_path / "my data"
    settings = load_settings(
        write_config(tmp_path, f"project: demo\noffline_store:\n  path: file://{str(where).replace(' ', '%20')}\n"),
        environ={"TENX_ONLINE_PATH": "relative/online.sqlite"},
    )
    assert settings.offline_dir == where
    assert settings.online_path == tmp_path / "relative" / "online.sqlite"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("file://relative/folder", "is not a local absolute file:// URI"),
        ("file://otherhost/srv/x", "is not a local absolute file:// URI"),
        ("s3://bucket/my prefix", r"use only letters, digits and \. _ - / in an s3:// prefix"),
        ("s3://bucket/a%20b", r"use only letters, digits and \. _ - / in an s3:// prefix"),
    ],
)
def test_locations_tenx_would_misread_are_refused(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write_config(tmp_path, "project: demo\n"), environ={"TENX_OFFLINE_PATH": value})


def test_file_uris_on_localhost_are_local_paths(tmp_path: Path) -> None:
    settings = load_settings(
        write_config(tmp_path, "project: demo\n"), environ={"TENX_OFFLINE_PATH": f"file://localhost{tmp_path}/x"}
    )
    assert settings.offline_dir == tmp_path / "x"


def test_a_store_pickles_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stores and locations travel to Dask workers; the secret stays in the environment.
    import pickle

    from featurestore.stores.offline import DeltaOfflineStore

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDVALUE")
    store = DeltaOfflineStore("s3://bucket/prefix")
    assert b"s3cr3t-value" not in pickle.dumps(store)
    assert b"AKIDVALUE" not in pickle.dumps(store.location.join("features"))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://cache:abc/0", "has no valid port"),
        ("redis://cache:99999", "has no valid port"),
        ("redis://cache:6379/7x", "database '7x' in 'redis://cache:6379/7x' must be a number"),
        ("redis://cache:6379?db=zz", "database 'zz' in 'redis://cache:6379?db=zz' must be a number"),
        ("unix:///tmp/r.sock?db=x", "database 'x' in 'unix:/tmp/r.sock?db=x' must be a number"),
    ],
)
def test_a_redis_url_redis_py_cannot_open_or_would_misread_is_refused(tmp_path: Path, url: str, message: str) -> None:
    """A bad port ended in a bare ValueError traceback; `/7x` (a typo for database 7)
    quietly meant database 0."""
    config = write_config(tmp_path, "project: demo\n")
    with pytest.raises(ConfigError, match="^TENX_REDIS_URL: .*" + re.escape(message)):
        load_settings(config, environ={"TENX_REDIS_URL": url})


def test_a_config_that_is_not_utf8_is_named_not_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "tenx.yaml"
    config.write_bytes("project: demo\n# Jos\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"tenx\.yaml is not UTF-8 text .*; save it as UTF-8"):
        load_settings(config, environ={})
