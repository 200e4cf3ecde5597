"""docker-compose.yml stays true to the code: every tenx command it runs exists, every
environment variable it sets is one tenx reads, and ports agree across services."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from featurestore.config import ENVIRONMENT
from tenx.cli import main

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


def commands(service: dict[str, Any]) -> list[list[str]]:
    """The commands a service runs, `sh -c "a && b"` split into its parts."""
    command = service.get("command")
    if command is None:
        return []
    if isinstance(command, str):
        command = shlex.split(command)
    if command[:2] == ["sh", "-c"]:
        parts = [shlex.split(part) for part in re.split(r"&&|\|\||;", command[2]) if part.strip()]
        return [words[1:] if words[0] in ("then", "else", "do") else words for words in parts]
    return [command]


TENX_COMMANDS = sorted(
    {(name, " ".join(c)) for name, s in SERVICES.items() for c in commands(s) if c and c[0] == "tenx"}
)


def test_the_stack_has_the_services_users_expect() -> None:
    expected = {"kafka", "redis", "dask-scheduler", "dask-worker", "setup", "stream", "feature-api", "model-server"}
    assert expected <= set(SERVICES)
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    for name in ("kafka", "redis", "dask-scheduler", "stream", "feature-api", "model-server"):
        assert "healthcheck" in SERVICES[name], name


@pytest.mark.parametrize(("service", "command"), TENX_COMMANDS)
def test_every_tenx_command_exists(service: str, command: str) -> None:
    words = shlex.split(command)[1:]
    subcommand = words[0]
    result = CliRunner().invoke(main, [subcommand, "--help"])
    assert result.exit_code == 0, f"{service}: `tenx {subcommand}` does not exist"
    # Every option the compose file passes is one the command declares.
    options = {o for o in words[1:] if o.startswith("--")}
    assert options <= set(re.findall(r"--[a-z-]+", result.output)), f"{service}: {options}"


def test_every_environment_variable_is_read_by_tenx() -> None:
    for name, service in SERVICES.items():
        for variable in service.get("environment") or {}:
            if variable.startswith("TENX_"):
                assert variable in ENVIRONMENT, f"{name} sets {variable}, which tenx does not read"


def test_ports_agree() -> None:
    environment = SERVICES["feature-api"]["environment"]
    assert environment["TENX_REDIS_URL"] == "redis://redis:6379/0"
    assert "127.0.0.1:6379:6379" in SERVICES["redis"]["ports"]
    host, port = environment["TENX_KAFKA_BOOTSTRAP"].split(":")
    assert host == "kafka"
    assert f"PLAINTEXT://kafka:{port}" == SERVICES["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    api = SERVICES["feature-api"]["command"]
    api_port = api[api.index("--port") + 1]
    assert f"127.0.0.1:{api_port}:{api_port}" in SERVICES["feature-api"]["ports"]
    assert f"localhost:{api_port}/health/ready" in " ".join(SERVICES["feature-api"]["healthcheck"]["test"])
    stream = SERVICES["stream"]["command"]
    metrics = stream[stream.index("--metrics-port") + 1]
    assert f"127.0.0.1:{metrics}:{metrics}" in SERVICES["stream"]["ports"]
    assert f"localhost:{metrics}/metrics" in " ".join(SERVICES["stream"]["healthcheck"]["test"])
    worker = SERVICES["dask-worker"]["command"]
    assert "tcp://dask-scheduler:8786" in worker
    assert "--scheduler tcp://dask-scheduler:8786" in " ".join(SERVICES["setup"]["command"])


def test_every_port_is_published_on_loopback_only() -> None:
    # Nothing in the stack authenticates by default, and the Dask scheduler runs any
    # code a client submits: published on 127.0.0.1, never on every interface.
    for name, service in SERVICES.items():
        for port in service.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"


def test_one_service_builds_the_image_the_others_reuse() -> None:
    builders = [name for name, service in SERVICES.items() if "build" in service]
    assert builders == ["dask-scheduler"]
    tenx = [name for name, service in SERVICES.items() if service.get("image") == "tenx:local"]
    assert set(tenx) == {"dask-scheduler", "dask-worker", "setup", "stream", "feature-api", "model-server"}
    for name in set(tenx) - set(builders):
        assert SERVICES[name]["pull_policy"] == "never", name


def test_long_running_services_restart_and_kafka_keeps_its_log_on_a_volume() -> None:
    for name in ("kafka", "redis", "dask-scheduler", "dask-worker", "stream", "feature-api"):
        assert SERVICES[name]["restart"] == "unless-stopped", name
    assert SERVICES["setup"]["restart"] == "no"
    log_dir = SERVICES["kafka"]["environment"]["KAFKA_LOG_DIRS"]
    assert f"kafka-data:{log_dir}" in SERVICES["kafka"]["volumes"]
    assert "kafka-data" in COMPOSE["volumes"]
    # Online values outlive a `down` as the stream's recovery snapshots on tenx-data do.
    assert "redis-data:/data" in SERVICES["redis"]["volumes"]
    assert SERVICES["redis"]["command"][SERVICES["redis"]["command"].index("--appendonly") + 1] == "yes"


def test_setup_runs_once_per_data_volume() -> None:
    # A second `up` must not send the demo events to Kafka again (it doubled the topic).
    script = SERVICES["setup"]["command"][2]
    assert script.index("if [ -f /data/setup.done ]") < script.index("tenx apply")
    assert script.rstrip().endswith("touch /data/setup.done")
    sent = script.index("if [ ! -f /data/kafka.sent ]")
    assert sent < script.index("--to-kafka transactions") < script.index("touch /data/kafka.sent")


def test_the_feature_api_requires_a_token_that_setup_generates() -> None:
    api = SERVICES["feature-api"]["command"]
    token_file = api[api.index("--token-file") + 1]
    script = SERVICES["setup"]["command"][2]
    assert f"if [ ! -s {token_file} ]" in script
    assert script.index("/dev/urandom") < script.index("if [ -f /data/setup.done ]")  # also on old volumes


def test_the_model_server_uses_the_api_token_and_serves_what_setup_deployed() -> None:
    command = SERVICES["model-server"]["command"]
    assert command[command.index("--token-file") + 1] == "/data/api-token"
    script = SERVICES["setup"]["command"][2]
    assert script.index("tenx materialize") < script.index("tenx train") < script.index("tenx models deploy buys")
    assert script.index("tenx models deploy buys") < script.index("touch /data/setup.done")


def test_the_model_server_runs_behind_tenx_front_which_the_image_builds() -> None:
    # `--front` needs the tenx-front binary on PATH: the image builds it from front/ in a
    # Go stage and copies it beside the Python entry points.
    assert "--front" in SERVICES["model-server"]["command"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+(?: AS (\S+))?$", dockerfile, flags=re.MULTILINE)
    assert stages == ["go-build", ""], stages  # the Go stage, then the one image every service runs
    assert "go build -trimpath -o /out/tenx-front ." in dockerfile
    assert re.search(r"^COPY --from=go-build .*/out/tenx-front.* /usr/local/bin/$", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^COPY front /src/front$", dockerfile, flags=re.MULTILINE)
