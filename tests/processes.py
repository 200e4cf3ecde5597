"""Helpers for tests that run tenx as a user does, in processes of its own."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator


def clean_environment(*also: str, **extra: str) -> dict[str, str]:
    """This process's environment without any TENX_* setting (nor the names in `also`),
    plus `extra`: a command then sees only what the test gives it."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TENX_") and k not in also}
    environment.update(extra)
    return environment


def free_port() -> int:
    """A port nothing listens on (right now) on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_serving(url: str, process: subprocess.Popen[str] | subprocess.Popen[bytes], cap_s: float = 60) -> None:
    """Poll `url` until it answers; fail if the process ends or the cap passes first."""
    deadline = time.monotonic() + cap_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert process.poll() is None, f"the server ended (exit {process.returncode}) before answering {url}"
            assert time.monotonic() < deadline, f"{url} did not answer within {cap_s:.0f} s"
            time.sleep(0.2)


@contextlib.contextmanager
def serving(
    command: list[str], *, cwd: str | os.PathLike[str], env: dict[str, str], ready_path: str = "/health"
) -> Iterator[str]:
    """`command` (a server taking `--port`) on a free port, until `ready_path` answers
    200; yields its URL, terminates it after."""
    port = free_port()
    process = subprocess.Popen([*command, "--port", str(port)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}{ready_path}", process)  # a 503 (still loading) is waited through
        yield url
    finally:
        process.terminate()
        process.communicate(timeout=30)
