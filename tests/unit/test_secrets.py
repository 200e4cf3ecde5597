"""A Redis password never leaves tenx: planted in TENX_REDIS_URL, it appears in no
command's output, no feature API body and no error, on every path that names the store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from featurestore.config import check_redis_url
from featurestore.errors import ConfigError
from featurestore.plan import compile_repo
from featurestore.redact import redact_text, redact_url
from featurestore.stores.online import RedisOnlineStore
from serving.api import create_app
from tests.processes import free_port, wait_until_serving

TENX = str(Path(sys.executable).parent / "tenx")
ROOT = Path(__file__).resolve().parents[2]
SECRET = "PLANTED-s3cret-9f2c"


def url(port: int) -> str:
    return f"redis://tenx:{SECRET}@127.0.0.1:{port}/0"


def test_urls_keep_everything_but_the_password() -> None:
    assert redact_url(url(6379)) == "redis://tenx:***@127.0.0.1:6379/0"
    assert redact_url(f"redis://:{SECRET}@cache/0") == "redis://:***@cache/0"
    assert redact_url("redis://only-user@cache/0") == "redis://only-user@cache/0"
    assert SECRET not in redact_url(f"rediss://cache:6380/0?password={SECRET}&db=1")
    assert redact_url(f"rediss://cache:6380/0?password={SECRET}&db=1").endswith("&db=1")
    assert redact_text(f"Error at {url(1)}; again {url(2)}") == (
        "Error at redis://tenx:***@127.0.0.1:1/0; again redis://tenx:***@127.0.0.1:2/0"
    )
    # Generated passwords hold `/`, `#` or `?`, which end urlsplit's netloc early: masked all the same.
    for odd in ("Pw/x9", "Pw#x9", "Pw?x9"):
        assert redact_url(f"redis://tenx:{odd}@cache:6379/0") == "redis://tenx:***@cache:6379/0"
        assert odd not in redact_text(f"Error connecting to redis://tenx:{odd}@cache:6379/0: refused")


def test_a_malformed_url_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigError) as refused:
        check_redis_url(f"http://tenx:{SECRET}@cache:6379", "TENX_REDIS_URL")
    assert SECRET not in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        check_redis_url(f"tenx:{SECRET}@cache:6379", "TENX_REDIS_URL")
    assert SECRET not in str(refused.value)
    assert "did you mean 'redis://tenx:***@cache:6379'" in str(refused.value)


def test_the_feature_api_never_answers_with_the_password() -> None:
    plan = compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])
    store = RedisOnlineStore(url(free_port()), prefix="tenx:demo", timeout_s=0.5)
    assert SECRET not in repr(store)
    api = TestClient(create_app(store, plan))
    for response in (
        api.get("/health"),
        api.get("/health/ready"),
        api.post("/features", json={"view": "user_spend", "entities": [1]}),
    ):
        assert response.status_code == 503
        assert "127.0.0.1" in response.text  # the message still says which server
        assert SECRET not in response.text


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    env = {k: v for k, v in os.environ.items() if k not in ("TENX_CONFIG", "TENX_REDIS_URL")}
    subprocess.run([TENX, "init", "demo"], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=60)
    subprocess.run([TENX, "apply"], cwd=tmp_path / "demo", env=env, check=True, capture_output=True, timeout=60)
    return tmp_path / "demo"


def test_no_command_prints_the_password(repo: Path) -> None:
    port = free_port()
    env = {**os.environ, "TENX_REDIS_URL": url(port), "COLUMNS": "200"}
    env.pop("TENX_CONFIG", None)
    env.pop("TENX_KAFKA_BOOTSTRAP", None)
    lines = repo / "tx.jsonl"
    subprocess.run(
        [TENX, "demo-data", str(lines), "--events", "50", "--users", "3", "--days", "1"],
        cwd=repo,
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    outputs = []
    for command in (["materialize"], ["verify"], ["stream", "--from-file", str(lines)], ["plan"]):
        done = subprocess.run([TENX, *command], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        outputs.append((command, done.stdout + done.stderr))
    for command, output in outputs:
        assert SECRET not in output, (command, output)
    assert any(f"tenx:***@127.0.0.1:{port}" in output for _, output in outputs)  # the store is still named

    # `tenx serve`: its startup line, and the 503 bodies of /health and /features.
    serve_port = free_port()
    server = subprocess.Popen(
        [TENX, "serve", "--port", str(serve_port)],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        bodies = []
        wait_until_serving(f"http://127.0.0.1:{serve_port}/health/live", server)
        for path, body in (("/health", None), ("/features", b'{"view": "user_spend", "entities": [1]}')):
            request = urllib.request.Request(f"http://127.0.0.1:{serve_port}{path}", data=body)
            with pytest.raises(urllib.error.HTTPError) as failed:
                urllib.request.urlopen(request, timeout=10)
            assert failed.value.code == 503
            bodies.append(failed.value.read().decode())
            failed.value.close()
    finally:
        server.send_signal(signal.SIGINT)
        output = server.communicate(timeout=30)[0]
    assert "tenx:***@127.0.0.1" in output
    for text in (output, *bodies):
        assert SECRET not in text, text


def test_kafka_settings_come_from_the_environment_and_secrets_never_from_tenx_yaml(tmp_path: Path) -> None:
    from featurestore.config import kafka_options, load_settings

    (tmp_path / "tenx.yaml").write_text(
        "project: demo\nkafka:\n  bootstrap: broker:9093\n  options:\n    security.protocol: SASL_SSL\n"
        "    sasl.mechanism: PLAIN\n    enable.ssl.certificate.verification: true\n"
    )
    settings = load_settings(
        tmp_path, environ={"TENX_KAFKA_OPTIONS": "sasl.username=tenx", "TENX_KAFKA_PASSWORD": SECRET}
    )
    assert dict(settings.kafka_options) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "enable.ssl.certificate.verification": "true",
        "sasl.username": "tenx",
        "sasl.password": SECRET,
    }
    (tmp_path / "tenx.yaml").write_text(f"project: demo\nkafka:\n  options:\n    sasl.password: {SECRET}\n")
    with pytest.raises(ConfigError, match=r"`sasl.password` is a secret and tenx.yaml is committed") as refused:
        load_settings(tmp_path, environ={})
    assert SECRET not in str(refused.value)
    with pytest.raises(ConfigError, match="TENX_KAFKA_OPTIONS: item 2 is not name=value") as refused:
        kafka_options({"TENX_KAFKA_OPTIONS": f"sasl.username=tenx,{SECRET}"})
    assert SECRET not in str(refused.value)


def test_kafka_errors_name_the_settings_and_never_the_password() -> None:
    from featurestore.errors import TransientError
    from pipelines.stream.dataflow import kafka_topics

    with pytest.raises(ConfigError) as wrong:
        kafka_topics("127.0.0.1:1", timeout_s=1, options={"no.such.property": "1"})
    assert str(wrong.value) == (
        'Kafka client settings (kafka.options / TENX_KAFKA_OPTIONS): No such configuration property: "no.such.property"'
    )
    sasl = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.username": "tenx"}
    with pytest.raises(TransientError) as unreachable:
        kafka_topics(f"127.0.0.1:{free_port()}", timeout_s=1, options={**sasl, "sasl.password": SECRET})
    assert "cannot reach Kafka at 127.0.0.1:" in str(unreachable.value)
    assert SECRET not in str(unreachable.value)
