"""scripts/fetch-go (the Dockerfile's Go stage): a toolchain zip from a module proxy is
unpacked only when its SHA-256 is the one given, and only inside its own folder."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fetch-go"
VERSION = "v0.0.1-go1.22.12.linux-amd64"


def toolchain_zip(entries: dict[str, bytes], modes: dict[str, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = ((modes or {}).get(name, 0o644)) << 16
            archive.writestr(info, content)
    return buffer.getvalue()


@contextlib.contextmanager
def proxy(files: dict[str, bytes]) -> Iterator[str]:
    """A module proxy on loopback serving `files` by path."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def fetch(url: str, sha256: str, destination: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GOPROXY_URL": url}
    return subprocess.run(
        [sys.executable, str(SCRIPT), VERSION, sha256, str(destination)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


PATH = f"/golang.org/toolchain/@v/{VERSION}.zip"
PREFIX = f"golang.org/toolchain@{VERSION}/"


def test_a_toolchain_with_the_given_sha256_is_unpacked_with_its_modes(tmp_path: Path) -> None:
    data = toolchain_zip({PREFIX + "bin/go": b"#!/bin/sh\n", PREFIX + "VERSION": b"go1.22.12\n"},
                         modes={PREFIX + "bin/go": 0o755})  # fmt: skip
    with proxy({PATH: data}) as url:
        done = fetch(url, hashlib.sha256(data).hexdigest(), tmp_path / "go")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "go" / "VERSION").read_bytes() == b"go1.22.12\n"
    assert os.access(tmp_path / "go" / "bin" / "go", os.X_OK)
    assert "2 files" in done.stdout


def test_a_toolchain_with_another_sha256_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    data = toolchain_zip({PREFIX + "bin/go": b"tampered"})
    with proxy({PATH: data}) as url:
        done = fetch(url, "0" * 64, tmp_path / "go")
    assert done.returncode != 0
    assert "expected " + "0" * 64 in done.stderr
    assert not (tmp_path / "go").exists()


@pytest.mark.parametrize("name", ["../escape", "bin/../../escape"])
def test_an_entry_outside_the_toolchain_folder_is_refused(tmp_path: Path, name: str) -> None:
    data = toolchain_zip({PREFIX + name: b"x"})
    with proxy({PATH: data}) as url:
        done = fetch(url, hashlib.sha256(data).hexdigest(), tmp_path / "go")
    assert done.returncode != 0
    assert "outside its folder" in done.stderr
    assert not (tmp_path / "escape").exists()
