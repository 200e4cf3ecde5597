"""Where the offline store lives: a local folder or an S3 prefix (any S3-compatible
server), with the clients each library needs to reach it.

Credentials and the endpoint come from the standard variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION,
AWS_ENDPOINT_URL), read when a client is made, so Dask workers on other hosts use their
own environment; non-secret settings may also come from `offline_store.storage_options`
in tenx.yaml. Nothing here prints a secret.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurestore.errors import ConfigError

SCHEMES = ("file", "s3")
# Settings a tenx.yaml may give (never keys or tokens: those come from the environment).
PUBLIC_OPTIONS = ("endpoint_url", "region", "allow_http")
_SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@dataclass(frozen=True)
class Location:
    """A folder of the offline store: `path` is absolute for a local folder, or
    `bucket/key` for S3 (`uri` gives the scheme back)."""

    scheme: str
    path: str
    options: tuple[tuple[str, str], ...] = field(default=())  # PUBLIC_OPTIONS given in tenx.yaml

    @classmethod
    def parse(cls, value: str | Path, *, options: Mapping[str, Any] | None = None, name: str = "location") -> Location:
        """A local path, a `file://` URI or an `s3://bucket/prefix` URI; other schemes
        are refused naming `name` (the setting they came from)."""
        given = dict(options or {})
        unknown = sorted(set(given) - set(PUBLIC_OPTIONS))
        if unknown:
            raise ConfigError(
                f"{name}: unknown storage option(s) {', '.join(unknown)}; allowed: {', '.join(PUBLIC_OPTIONS)} "
                "(credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, never from tenx.yaml)"
            )
        pairs = tuple(sorted((k, str(v)) for k, v in given.items()))
        text = str(value)
        scheme, separator, rest = text.partition("://")
        if not separator:
            return cls("file", str(Path(text).expanduser().absolute()), pairs)
        scheme = scheme.lower()
        if scheme == "file":
            return cls("file", file_uri_path(text, name), pairs)
        if scheme != "s3":
            raise ConfigError(
                f"{name}: {text!r} has scheme {scheme}://; the offline store lives in a local folder, a file:// "
                "URI or an s3://bucket/prefix (any S3-compatible server, endpoint in AWS_ENDPOINT_URL)"
            )
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise ConfigError(f"{name}: {text!r} names no bucket; expected s3://bucket/prefix")
        if not _S3_SAFE.fullmatch(rest.rstrip("/")):
            # delta-rs percent-encodes keys, pyarrow does not: a space or `%` would put
            # the data files and the table's log under two different names.
            raise ConfigError(f"{name}: {text!r}: use only letters, digits and . _ - / in an s3:// prefix")
        return cls("s3", rest.rstrip("/"), pairs)

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def uri(self) -> str:
        """What delta-rs takes: a local path, or `s3://bucket/key`."""
        return self.path if self.is_local else f"s3://{self.path}"

    def __str__(self) -> str:
        return self.uri

    def join(self, *parts: str) -> Location:
        path = self.path
        for part in parts:
            path = f"{path.rstrip('/')}/{part}"
        return Location(self.scheme, path, self.options)

    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local folder")
        return Path(self.path)

    # -- clients ------------------------------------------------------------------------

    def _option(self, name: str, variable: str | None = None) -> str | None:
        given = dict(self.options).get(name)
        return given if given is not None else (os.environ.get(variable) if variable else None)

    def _endpoint(self) -> str | None:
        return self._option("endpoint_url", "AWS_ENDPOINT_URL")

    def _region(self) -> str | None:
        return self._option("region", "AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")

    def _allow_http(self) -> bool:
        endpoint = self._endpoint() or ""
        flag = self._option("allow_http", "AWS_ALLOW_HTTP")
        return endpoint.startswith("http://") or (flag or "").lower() in ("1", "true", "yes")

    def storage_options(self) -> dict[str, str] | None:
        """delta-rs (object_store) options; None for a local folder."""
        if self.is_local:
            return None
        options = {k: v for k in _SECRET_VARIABLES if (v := os.environ.get(k))}
        if endpoint := self._endpoint():
            options["AWS_ENDPOINT_URL"] = endpoint
        if region := self._region():
            options["AWS_REGION"] = region
        if self._allow_http():
            options["AWS_ALLOW_HTTP"] = "true"
        return options

    def filesystem(self) -> Any:
        """A pyarrow filesystem on which `path` (and paths under it) are valid."""
        import pyarrow.fs as pafs

        if self.is_local:
            return pafs.LocalFileSystem()
        endpoint = self._endpoint()
        # Explicit timeouts: a server that stops answering fails a call, never hangs it
        # (pyarrow's default gave up on a busy server's multipart upload after 3 s).
        arguments: dict[str, Any] = {
            "region": self._region() or "us-east-1",
            "connect_timeout": 10,
            "request_timeout": 120,
        }
        if endpoint:
            parsed = urllib.parse.urlparse(endpoint)
            arguments["endpoint_override"] = parsed.netloc or parsed.path
            arguments["scheme"] = parsed.scheme or "https"
        for argument, variable in (
            ("access_key", "AWS_ACCESS_KEY_ID"),
            ("secret_key", "AWS_SECRET_ACCESS_KEY"),
            ("session_token", "AWS_SESSION_TOKEN"),
        ):
            if os.environ.get(variable):
                arguments[argument] = os.environ[variable]
        return pafs.S3FileSystem(**arguments)

    def file_path(self, uri: str) -> str:
        """A file URI of this store (as delta-rs lists them) as a `filesystem()` path."""
        if self.is_local:
            return urllib.parse.unquote(uri.removeprefix("file://"))
        return uri.removeprefix("s3://")

    def check(self) -> None:
        """Fail in one line when the location cannot be reached (a bucket that does not
        exist, wrong credentials, no endpoint), instead of a traceback from a writer."""
        if self.is_local:
            return
        import pyarrow.fs as pafs

        bucket = self.path.split("/", 1)[0]
        try:
            info = self.filesystem().get_file_info(bucket)
        except OSError as error:
            raise ConfigError(
                f"offline store {self.uri}: cannot reach the bucket ({_first_line(error)}); check AWS_ENDPOINT_URL "
                "and the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY credentials"
            ) from error
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"offline store {self.uri}: bucket `{bucket}` does not exist; create it first")


_S3_SAFE = re.compile(r"[A-Za-z0-9._\-/]+")


def file_uri_path(uri: str, name: str) -> str:
    """The local path of a `file://` URI: `file:///srv/x` and `file://localhost/srv/x`
    are /srv/x (percent-decoded); a relative or remote-host one is refused.

    >>> file_uri_path("file://localhost/srv/tenx%20data", "x")
    '/srv/tenx data'
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise ConfigError(f"{name}: {uri!r} is not a local absolute file:// URI; expected file:///absolute/path")
    return urllib.parse.unquote(parsed.path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
