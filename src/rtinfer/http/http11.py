"""The HTTP/1.1 side of the server: one :class:`HttpConnection` per TCP connection,
one :class:`Cycle` (the ASGI ``receive``/``send`` of one request) per request.

See :mod:`rtinfer.http.server` for what it does and does not do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections import deque
from http import HTTPStatus
from typing import Any

import httptools

from .connection import ASGI_VERSION, Flow, Message, Scope, Shared
from .wsconnection import WebSocketConnection

__all__ = ["KEEP_ALIVE_S", "MAX_HEAD_BYTES", "MAX_PIPELINED", "Cycle", "HttpConnection"]

log = logging.getLogger("rtinfer.http.server")

#: Seconds an idle keep-alive connection is kept (checked once a second: up to 1 s more).
KEEP_ALIVE_S = 5.0
#: Requests queued on one connection (pipelined) before it is no longer read.
MAX_PIPELINED = 8
#: The request line and headers of one request, at most (past it: 431 and close).
MAX_HEAD_BYTES = 64 * 1024
_STATUS = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH")}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE = b"connection: close\r\n"
_KEEP_ALIVE = b"connection: keep-alive\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n"
_NO_BODY = frozenset({204, 304})


def _status_line(status: int) -> bytes:
    return _STATUS.get(status) or b"HTTP/1.1 %d \r\n" % status


def error_response(status: int, message: str, date: bytes) -> bytes:
    """A whole response the server answers itself (malformed request, body over the
    limit, a failed app), closing the connection: ``{"error": "..."}`` as JSON, the form
    the Open Inference Protocol gives its errors."""
    body = json.dumps({"error": message}).encode()
    return b"".join(
        (
            _status_line(status),
            date,
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            _CLOSE,
            b"\r\n",
            body,
        )
    )


#: Sweeps (about a second each) a refused connection is still read after its answer.
LINGER_TICKS = 2


class _TooLarge(Exception):
    """Raised in a parser callback: the body (or its declared length) is over the limit."""


class HttpConnection(Flow):
    """One HTTP/1.1 connection: parses requests, runs them one at a time, in order."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Cycle] = deque()  # parsed or being parsed; the head answers
        self.running = False  # the head's app call has started and its response is not done
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.expect = False
        self.length = -1  # the declared Content-Length, -1: none
        self.in_head = False
        self.head_bytes = 0
        self.upgrade: Scope | None = None  # a WebSocket upgrade being parsed
        self.early: tuple[int, bytes] | None = None  # the app's answer from the head alone
        self.refused: tuple[int, str] | None = None  # answered after the queue, then close
        self.lingering = False  # the refusal is written; reading on until the client closes
        self.read_paused = False
        self.write_paused = False
        self.drained = None
        self.lost = False
        self.ticks = 0  # sweeps since data last came in while nothing ran
        self.server_addr: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None

    # -- transport events ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.server_addr = _address(transport.get_extra_info("sockname"))
        self.client = _address(transport.get_extra_info("peername"))
        shared = self.shared
        if shared.stopping:
            transport.close()
            return
        shared.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        for cycle in self.queue:
            cycle.disconnect()
        self.queue.clear()
        self.resume_writing()  # wakes a send waiting to drain: its response is dropped
        shared = self.shared
        shared.connections.discard(self)
        shared.check_idle()

    def data_received(self, data: bytes) -> None:
        if self.refused is not None:
            return
        self.ticks = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade(data[upgrade.args[0] :])
            return
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _TooLarge):
                limit = self.shared.max_body_bytes
                size = f"{self.length} bytes" if self.length >= 0 else f"more than {limit} bytes"
                self._refuse(413, f"the body has {size}; the limit is {limit}")
            else:
                self._refuse(400, f"malformed request: {exc.__context__ or exc}")
            return
        except (httptools.HttpParserError, UnicodeDecodeError) as exc:
            self._refuse(400, f"malformed request: {exc}")
            return
        if self.in_head:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"the request head is over {MAX_HEAD_BYTES} bytes")

    def eof_received(self) -> bool | None:
        return None  # the client is gone (as uvicorn has it): the transport closes

    # -- parser callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.expect = False
        self.length = -1
        self.in_head = True
        self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.headers.append((name, value))
        if name == b"content-length":
            self.length = int(value)  # llhttp has checked it is a number
        elif name == b"expect":
            self.expect = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        method = parser.get_method()
        url = self.url
        if url[:1] == b"/":
            raw_path, _, query = url.partition(b"?")
        else:  # the absolute form (a proxy's), or "*"
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path or b"/", parsed.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        version = parser.get_http_version()
        scope: Scope = {
            "type": "http",
            "asgi": ASGI_VERSION,
            "http_version": version,
            "server": self.server_addr,
            "client": self.client,
            "scheme": "http",
            "method": _METHODS.get(method) or method.decode("ascii"),
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
        }
        if self.shared.state:
            scope["state"] = self.shared.state.copy()
        keep_alive = parser.should_keep_alive()
        if parser.should_upgrade():
            if _is_websocket(self.headers):
                self.upgrade = scope
                return
            keep_alive = False  # another protocol (h2c...): answered in HTTP/1.1, then closed
        if self.length > self.shared.max_body_bytes:
            raise _TooLarge
        early = self.shared.early
        if (
            early is not None
            and keep_alive
            and version == "1.1"
            and not self.expect
            and not self.queue
            and not self.running
            and not self.shared.stopping
        ):
            # Nothing before it on this connection: answered once its body has gone by.
            self.early = early(scope)
            if self.early is not None:
                return
        self.body = []
        self.size = 0
        cycle = Cycle(self, scope, keep_alive, self.expect)
        queue = self.queue
        queue.append(cycle)
        if len(queue) == 1 and self.expect and self.length != 0:
            self.transport.write(_CONTINUE)
            cycle.expect = False

    def on_body(self, body: bytes) -> None:
        if self.upgrade is not None or self.early is not None:
            return
        self.size += len(body)
        if self.size > self.shared.max_body_bytes:
            raise _TooLarge
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.upgrade is not None:
            return
        if self.early is not None:
            status, rest = self.early
            self.early = None
            self.transport.write(b"".join((_status_line(status), self.shared.date, rest)))
            return
        cycle = self.queue[-1]
        body = self.body
        cycle.body = body[0] if len(body) == 1 else b"".join(body)
        cycle.complete = True
        queue = self.queue
        if len(queue) == 1 and not self.running:
            self._start(cycle)
        elif len(queue) > MAX_PIPELINED and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    # -- requests -----------------------------------------------------------------

    def _start(self, cycle: Cycle) -> None:
        self.running = True
        shared = self.shared
        shared.cycles.add(cycle)
        cycle.task = shared.loop.create_task(cycle.run())

    def response_done(self, cycle: Cycle) -> None:
        """The head's response is written (or dropped): close, or start the next request."""
        self.running = False
        queue = self.queue
        if queue and queue[0] is cycle:
            queue.popleft()
        if self.lost:
            return
        if not cycle.keep_alive or self.shared.stopping:
            self.transport.close()
            return
        if queue:
            head = queue[0]
            if head.complete:
                self._start(head)
            elif head.expect:
                head.expect = False
                self.transport.write(_CONTINUE)
        elif self.refused is not None:
            self._write_error(*self.refused)
            return
        if self.read_paused and len(queue) <= MAX_PIPELINED // 2:
            self.read_paused = False
            self.transport.resume_reading()

    def _refuse(self, status: int, message: str) -> None:
        """Stop reading; answer ``status`` once the requests before it are answered; close."""
        self.refused = (status, message)
        queue = self.queue
        if queue and not queue[-1].complete:
            queue.pop()  # the request being read is the one refused
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        if not queue and not self.running:
            self._write_error(status, message)

    def _write_error(self, status: int, message: str) -> None:
        """Answer ``status`` and end the connection, lingering: closing with the rest of a
        refused body unread would reset it, and the client, perhaps still sending, would
        see the reset instead of the answer. So the server half-closes and reads on,
        discarding, until the client closes or :data:`LINGER_TICKS` sweeps pass."""
        transport = self.transport
        transport.write(error_response(status, message, self.shared.date))
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.lingering = True
        self.ticks = 0
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()  # what comes is dropped: data_received returns

    def _upgrade(self, rest: bytes) -> None:
        """Hand the connection to a WebSocket once the upgrade request is parsed."""
        scope, self.upgrade = self.upgrade, None
        if scope is None:  # an upgrade to another protocol: it was answered over HTTP
            return
        if self.queue or self.running or self.shared.stopping:
            self._refuse(400, "a WebSocket upgrade must not follow pipelined requests")
            return
        shared = self.shared
        shared.connections.discard(self)
        ws = WebSocketConnection(shared, self.transport, scope, self.url, rest)
        self.transport.set_protocol(ws)
        ws.start()

    def tick(self) -> None:
        """The sweep, once a second: close the connection once idle for long enough."""
        if self.lingering:
            self.ticks += 1
            if self.ticks >= LINGER_TICKS:
                self.transport.close()
            return
        if self.running:
            return
        self.ticks += 1
        if self.ticks >= self.shared.keep_alive_ticks and not self.transport.is_closing():
            self.transport.close()

    def shutdown(self) -> None:
        """The server stops: close now when idle, else after the response in progress."""
        if not self.running:
            self.transport.close()


class Cycle:
    """One request: its scope, body, and the ``receive``/``send`` its app call gets."""

    __slots__ = (
        "body",
        "chunked",
        "complete",
        "conn",
        "disconnected",
        "done",
        "expect",
        "framed",
        "head",
        "keep_alive",
        "no_body",
        "scope",
        "task",
        "unread",
        "waiter",
    )

    def __init__(self, conn: HttpConnection, scope: Scope, keep_alive: bool, expect: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect = expect  # a 100 Continue is still owed when the request's turn comes
        self.body = b""
        self.complete = False  # the whole body is in
        self.unread = True
        self.head: list[bytes] | None = None  # the response head, once started
        self.no_body = False
        self.framed = False  # the app set Content-Length (or frames the body itself)
        self.chunked = False
        self.done = False  # the response is finished (or dropped)
        self.disconnected = False
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    def disconnect(self) -> None:
        self.disconnected = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def run(self) -> None:
        conn = self.conn
        try:
            await conn.shared.app(self.scope, self.receive, self.send)
        except Exception:
            log.exception("the ASGI app failed on %s %s", self.scope["method"], self.scope["path"])
            self._fail()
        except asyncio.CancelledError:  # the server stopped past its grace
            self._fail(503, "the server stopped before answering this request; retry")
            raise
        else:
            if not self.done:
                if self.head is None:
                    log.error("the ASGI app returned without answering %s", self.scope["path"])
                self._fail()
        finally:
            shared = conn.shared
            shared.cycles.discard(self)
            if shared.idle is not None:
                shared.check_idle()

    def _fail(self, status: int = 500, message: str = "internal server error") -> None:
        """An app that failed or left its response unfinished: ``status`` if nothing went
        out (500; 503 for a request the server gave up as it stopped)."""
        if self.done:
            return
        self.done = True
        conn = self.conn
        if not self.disconnected and not conn.lost:
            if self.head is None or self.head:  # nothing written yet
                conn.transport.write(error_response(status, message, conn.shared.date))
            conn.transport.close()  # a half-sent response cannot be finished
        self.keep_alive = False
        conn.response_done(self)

    async def receive(self) -> Message:
        if self.unread and not self.disconnected:
            self.unread = False
            return {"type": "http.request", "body": self.body, "more_body": False}
        if not self.disconnected and not self.done:
            # The body is read: what is left to hear about is the client leaving.
            if self.waiter is None:
                self.waiter = self.conn.shared.loop.create_future()
            await self.waiter
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            head = self.head
            if head is None or self.done:
                raise RuntimeError(f"{kind!r} before http.response.start or after the end")
            more = message.get("more_body", False)
            if self.disconnected:
                if not more:
                    self.done = True
                return
            conn = self.conn
            body = message.get("body", b"")
            if head:  # the first body message carries the head: one write
                self.head = []
                if not self.framed:
                    if not more:
                        head.append(b"content-length: %d\r\n" % len(body))
                    elif self.scope["http_version"] == "1.1":
                        self.chunked = True
                        head.append(_CHUNKED)
                    else:  # HTTP/1.0 has no chunks: the end of the body is the close
                        self.keep_alive = False
                if not self.keep_alive or conn.shared.stopping:
                    self.keep_alive = False
                    head.append(_CLOSE)
                elif self.scope["http_version"] == "1.0":
                    head.append(_KEEP_ALIVE)
                head.append(b"\r\n")
            if self.no_body:
                body = b""
            elif self.chunked:
                body = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
                if not more:
                    body += b"0\r\n\r\n"
            if head:
                head.append(body)
                conn.transport.write(b"".join(head))
            elif body:
                conn.transport.write(body)
            if conn.write_paused:
                await conn.drain()
            if not more:
                self.done = True
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result(None)
                conn.response_done(self)
        elif kind == "http.response.start":
            if self.head is not None:
                raise RuntimeError("http.response.start sent twice")
            status = message["status"]
            head = [_status_line(status), self.conn.shared.date]
            framed = False
            lines = 0
            for name, value in message.get("headers", ()):
                head += (name, b": ", value, b"\r\n")
                lines += 1
                if name == b"content-length" or name == b"transfer-encoding":
                    framed = True  # the app frames its body itself
                elif name == b"connection" and value.lower() == b"close":
                    self.keep_alive = False
            if lines:
                block = b"".join(head[2:])
                if block.count(b"\n") != lines or block.count(b"\r") != lines:
                    raise RuntimeError("a response header name or value holds a line break")
            bodiless = status in _NO_BODY or status < 200
            self.no_body = bodiless or self.scope["method"] == "HEAD"
            self.framed = framed or bodiless  # HEAD: the length of the body not sent
            self.head = head
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on an http connection")


def _address(value: Any) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return None


def _is_websocket(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"upgrade":
            return value.lower() == b"websocket"
    return False
