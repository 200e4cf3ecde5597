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
        return [shlex.split(part) for part in re.split(r"&&|;", command[2]) if part.strip()]
    return [command]


TENX_COMMANDS = sorted(
    {(name, " ".join(c)) for name, s in SERVICES.items() for c in commands(s) if c and c[0] == "tenx"}
)


def test_the_stack_has_the_services_users_expect() -> None:
    assert {"kafka", "redis", "dask-scheduler", "dask-worker", "setup", "stream", "feature-api"} <= set(SERVICES)
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    for name in ("kafka", "redis", "dask-scheduler", "stream", "feature-api"):
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
    assert "6379:6379" in SERVICES["redis"]["ports"]
    host, port = environment["TENX_KAFKA_BOOTSTRAP"].split(":")
    assert host == "kafka"
    assert f"PLAINTEXT://kafka:{port}" == SERVICES["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    api = SERVICES["feature-api"]["command"]
    api_port = api[api.index("--port") + 1]
    assert f"{api_port}:{api_port}" in SERVICES["feature-api"]["ports"]
    assert f"localhost:{api_port}/health/ready" in " ".join(SERVICES["feature-api"]["healthcheck"]["test"])
    stream = SERVICES["stream"]["command"]
    metrics = stream[stream.index("--metrics-port") + 1]
    assert f"{metrics}:{metrics}" in SERVICES["stream"]["ports"]
    assert f"localhost:{metrics}/metrics" in " ".join(SERVICES["stream"]["healthcheck"]["test"])
    worker = SERVICES["dask-worker"]["command"]
    assert "tcp://dask-scheduler:8786" in worker
    assert "--scheduler tcp://dask-scheduler:8786" in " ".join(SERVICES["setup"]["command"])
