"""uvicorn's HTTP/1.1 protocol (httptools) with one shortcut for the model server: a
`/predict` request the server sheds from its headers alone is answered 503 as soon as
its headers are parsed, before any ASGI work (scope completion, request cycle, task,
the two `send` calls) is spent on it.

At 3x load most requests are sheddable ones the server refuses, and every refusal
spends CPU on the one event loop the admitted critical requests need; through ASGI a
refusal cost about a quarter of a whole prediction (175 of 770 us of server CPU,
measured with `tenx loadtest` traffic). Here it is the header parse and one write.

Every other `/predict` answer goes out in one write (head and body together, `_OneWrite`)
instead of uvicorn's two.

The keep-alive timeout is kept lazily: uvicorn arms a timer after every answer and
cancels it on the next read, two timer operations and a GC-tracked handle per request
(4-6% of the server's CPU at 10x load in py-spy, and the allocation that most often set
off a collection). Here a connection keeps at most one timer, armed when it first falls
idle; when it fires it closes the connection if it has been idle the whole timeout, and
else re-arms for what is left of it.

The shortcut is taken only where it cannot change an answer: POST to exactly
`/predict` on a keep-alive HTTP/1.1 connection with no earlier request still being
answered (pipelining keeps its order through uvicorn's queue), and only when the
server's own early check (`PredictEndpoint.screen`: auth first, then the class's gate)
refuses. Any other request goes through uvicorn unchanged, carrying in its scope
whether it was screened already, so the gate is asked once per request.

    uvicorn.run(app, http=PredictProtocol, loop="uvloop")
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from serving.http import BoundedHeadProtocol
from serving.models.admission import Rejected

SCREENED = "tenx.screened"  # scope key: the protocol asked the gate already (bool: it let a sheddable one in)


class _NoEvent:
    def set(self) -> None:
        pass


class _Answered:
    """Stands in for uvicorn's request cycle once a request is answered here: its body,
    when it arrives, is dropped (uvicorn skips the body of a complete response), and a
    connection lost after it wakes nobody (uvicorn sets the cycle's event)."""

    response_complete = True
    message_event = _NoEvent()


_ANSWERED = _Answered()


class PredictProtocol(BoundedHeadProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._endpoint = _predict_endpoint(self.app)
        self._idle_since: float | None = None  # loop time of the last answer while nothing is in progress

    # The keep-alive timeout, lazily (see the module docstring). uvicorn calls
    # `_unset_keepalive_if_required` on every read and answer, and arms its timer in
    # `on_response_complete`; `timeout_keep_alive_task` is this connection's one timer.

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None

    def _arm_keep_alive(self) -> None:
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            handler = self.timeout_keep_alive_handler
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, handler)

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        idle_since = self._idle_since
        if idle_since is None or self.transport.is_closing():
            return  # busy: the next answer arms it again
        left = idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self.timeout_keep_alive_handler)
        else:
            self.transport.close()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # A request answered before its body had all arrived (refused from its head): the
        # body's reads marked the connection busy after the answer armed the timer, and
        # only an answer re-arms it, so the idle connection was never closed.
        if self.cycle is not None and self.cycle.response_complete and not self.pipeline:
            self._arm_keep_alive()

    def on_response_complete(self) -> None:
        # uvicorn's, with the lazy timer: count, send a held last answer, resume reading, start a
        # pipelined request or fall idle.
        self.server_state.total_requests += 1
        if self.transport.is_closing() or self.answer_held():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._arm_keep_alive()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    def on_headers_complete(self) -> None:
        endpoint = self._endpoint
        if (
            endpoint is not None
            and self.url == b"/predict"
            and (self.cycle is None or self.cycle.response_complete)
            and self.parser.get_method() == b"POST"
            and self.parser.get_http_version() == "1.1"
            and self.parser.should_keep_alive()
            and not self.parser.should_upgrade()
        ):
            headers = dict(self.headers)
            outcome = endpoint.screen(headers)
            if isinstance(outcome, Rejected):
                self.head_complete()
                head, payload = endpoint.refusal(headers, outcome)
                content = [STATUS_LINE[503]]
                for name, value in (*self.server_state.default_headers, *head):
                    content.extend((name, b": ", value, b"\r\n"))
                content.extend((b"\r\n", payload))
                self.cycle = _ANSWERED  # type: ignore[assignment]
                self.transport.write(b"".join(content))
                self.on_response_complete()
                return
            self.scope[SCREENED] = outcome  # type: ignore[literal-required]
            super().on_headers_complete()
            if self.cycle is not None and self.cycle.transport is self.transport:
                self.cycle.transport = _OneWrite(self.transport)  # type: ignore[assignment]
            return
        super().on_headers_complete()


class _OneWrite:
    """The transport as a /predict answer sees it: the status line and headers (one
    write ending in a blank line) wait for the body, and both go out in one write, one
    system call and one TCP segment instead of two. Anything else goes straight
    through, a held head first; closing sends a held head."""

    __slots__ = ("_head", "_transport")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._head = b""

    def write(self, data: bytes) -> None:
        if not self._head and data.startswith(b"HTTP/1.1 1"):  # an interim answer (100 Continue) goes out now
            self._transport.write(data)
            return
        if not self._head and data.endswith(b"\r\n\r\n"):
            self._head = bytes(data)
            return
        if self._head:
            data, self._head = self._head + data, b""
        self._transport.write(data)

    def close(self) -> None:
        if self._head:
            self._transport.write(self._head)
            self._head = b""
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _predict_endpoint(app: Any) -> Any:
    """The model server's PredictEndpoint behind uvicorn's wrappers, or None (another app)."""
    for _ in range(8):
        endpoint = getattr(app, "predict", None)
        if endpoint is not None and hasattr(endpoint, "screen"):
            return endpoint
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None
