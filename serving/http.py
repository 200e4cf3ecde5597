"""uvicorn's httptools protocol with a bound on a request's head (request line and
headers), for both servers.

uvicorn bounds neither: `on_url` and `on_header` append whatever arrives, and llhttp
sets no limit, so one connection sending header lines without end grew the process by
200 MB for 25,000 lines of 8 KB, unauthenticated (the body bounds of the feature API and
the model server start only once the head is complete). Past `MAX_HEAD_BYTES` the
request is answered 431 and the connection closed, as nginx and Node answer one. One
header line that never ends reaches no callback at all (httptools buffers it), so the
bytes read while a head is incomplete are bounded too (`MAX_RAW_HEAD_BYTES`).

A connection's last answer (that 431, or uvicorn's 400 for a request it cannot parse)
waits for the answers of the requests pipelined before it: written at once, it reached
the client ahead of them and was read as the first one's answer.

    uvicorn.run(app, http=BoundedHeadProtocol, loop="uvloop")
"""

from __future__ import annotations

import collections
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # request line + header names and values; nginx's default is 4 x 8 KiB
# Bytes read while a head is still incomplete. httptools holds a header's name or value
# in its own buffer until the line ends, and calls `on_header` only then, so one line
# that never ends is bounded only here. Whole reads are counted (the last one may also
# carry an earlier request's body), hence the margin over MAX_HEAD_BYTES.
MAX_RAW_HEAD_BYTES = 1 << 20

_TOO_LARGE = b"request line and headers exceed 65536 bytes"
_ANSWER_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: " + str(len(_TOO_LARGE)).encode() + b"\r\nconnection: close\r\n\r\n" + _TOO_LARGE
)


class HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops parsing the connection's data."""


class BoundedHeadProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._raw_head_bytes = 0
        self._in_head = False
        self._refused = False
        self._last_answer = b""  # a closing answer held until earlier requests are answered

    def on_message_begin(self) -> None:
        self._head_bytes = self._raw_head_bytes = 0
        self._in_head = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.head_complete()
        super().on_headers_complete()

    def head_complete(self) -> None:
        """The head is parsed (a subclass that answers from the head calls this)."""
        self._in_head = False

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse()
            raise HeadTooLarge

    def _refuse(self) -> None:
        if not self._refused:
            self._refused = True
            self._answer_and_close(_ANSWER_431)

    def _answer_and_close(self, answer: bytes) -> None:
        """Write a connection's last answer now, or once every request pipelined before it
        is answered (`answer_held`); nothing more is read either way."""
        cycle = self.cycle
        pending = bool(self.pipeline) or (cycle is not None and not cycle.response_complete)
        if cycle is not None and cycle.more_body and not cycle.response_complete:
            # The answer is this request's own (its body could not be parsed): it is given
            # up as a lost connection would be (its app's receive() says disconnected),
            # and only requests before it are waited for. One still queued behind a running
            # request leaves the queue; one already running had nothing before it.
            queued = any(item is cycle for item, _ in self.pipeline)
            self.pipeline = collections.deque(item for item in self.pipeline if item[0] is not cycle)
            cycle.disconnected = True
            cycle.message_event.set()
            pending = queued
        if pending:
            self._last_answer = answer
            self._refused = True  # later reads are dropped
            self.flow.pause_reading()
            return
        self.transport.write(answer)
        self.transport.close()

    def answer_held(self) -> bool:
        """After an answer: the held last answer goes out once no earlier request is left;
        True when it did (the connection is closing)."""
        if not self._last_answer or self.pipeline or self.transport.is_closing():
            return False
        self.transport.write(self._last_answer)
        self._last_answer = b""
        self.transport.close()
        return True

    def on_response_complete(self) -> None:
        if self.answer_held():
            self.server_state.total_requests += 1
            return
        super().on_response_complete()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered 431; the connection is closing
        super().data_received(data)
        if self._in_head and not self._refused:
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > MAX_RAW_HEAD_BYTES:
                self._refuse()

    def send_400_response(self, msg: str) -> None:
        if self._refused:
            return  # the parser error is our HeadTooLarge: the 431 went out already
        content = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            content.extend((name, b": ", value, b"\r\n"))
        body = msg.encode("ascii", "replace")
        content.extend((b"content-type: text/plain; charset=utf-8\r\ncontent-length: ", str(len(body)).encode(),
                        b"\r\nconnection: close\r\n\r\n", body))  # fmt: skip
        self._refused = True
        self._answer_and_close(b"".join(content))
