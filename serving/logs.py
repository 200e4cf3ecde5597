"""Logs a machine can read: one JSON object per line, each with the request id of the
request it is about (or plain text with the id in brackets).

    configure_logging("json")             # once, at process entry
    token = REQUEST_ID.set("9f2c...")      # per request (the servers do this)
    log.warning("fallback answered")       # -> {"time": ..., "level": "WARNING", ..., "request_id": "9f2c..."}

The id is the client's X-Request-Id when it sends one (so a trace crosses services),
else a fresh one; every answer carries it back in X-Request-Id.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from random import getrandbits as _bits

REQUEST_ID: ContextVar[str | None] = ContextVar("tenx_request_id", default=None)
FORMATS = ("text", "json")


def new_request_id(given: bytes | None = None) -> str:
    """The client's id when it is a sane token (up to 64 printable ASCII characters), else a new one."""
    if given and len(given) <= 64 and given.isascii() and given.decode().isprintable() and b" " not in given:
        return given.decode()
    return f"{_bits(64):016x}"  # unique enough to trace by; a third of uuid4's cost, on every request


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(form: str = "text", level: str = "INFO") -> None:
    """tenx's loggers to stderr in `form` ("text" or "json"), with request ids."""
    if form not in FORMATS:
        raise ValueError(f"log format {form!r}: expected text or json")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if form == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    logger = logging.getLogger("tenx")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
