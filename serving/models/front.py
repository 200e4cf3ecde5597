"""tenx-front: the model server's admission front (front/main.go, built by `make front`).

`tenx serve-models --front` runs it on the public address and the Python server on a
private loopback port behind it. The front refuses, from their headers and on its own
threads, the default and sheddable requests the server's gate would refuse (the gate
rides on every answer as X-Tenx-Gate), and forwards everything else. Under 10x load
most requests are such refusals, and in the server each costs the event loop about a
sixth of a served request; in the front it costs that loop nothing (docs/design.md,
"The admission front").
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from featurestore.errors import ConfigError

BINARY = "tenx-front"
log = logging.getLogger("tenx.models")


def front_binary() -> Path:
    """The tenx-front executable: beside this Python's (where `make front` puts it), else on PATH."""
    beside = Path(sys.executable).parent / BINARY
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(BINARY)
    if found is None:
        raise ConfigError(
            f"--front needs the {BINARY} binary, which is built from front/ with Go: `make front` puts it beside "
            f"{Path(sys.executable).name} in {Path(sys.executable).parent} (or put one on PATH); or leave --front out"
        )
    return Path(found)


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nobody listens on now, for the server behind the front."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Front:
    """The front as a child process. When it exits on its own (it could not listen, or
    it crashed), this process is sent SIGTERM: a server nobody can reach must not go on
    looking healthy."""

    def __init__(self, binary: Path, *, host: str, port: int, upstream_port: int, secret: str) -> None:
        self.command = [
            str(binary),
            "--listen",
            address(host, port),
            "--upstream",
            address("127.0.0.1", upstream_port),
            "--parent-pid",  # it exits with this process, however this one ends
            str(os.getpid()),
        ]
        self.secret = secret
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = False

    def start(self) -> None:
        environment = {**os.environ, "TENX_FRONT_SECRET": self.secret}
        self._process = subprocess.Popen(self.command, env=environment)
        threading.Thread(target=self._watch, name="tenx-front-watch", daemon=True).start()

    def _watch(self) -> None:
        process = self._process
        assert process is not None
        code = process.wait()
        if not self._stopping:
            log.error("tenx-front exited (status %s); stopping the model server behind it", code)
            os.kill(os.getpid(), signal.SIGTERM)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
