"""A lean HTTP/1.1 and WebSocket server for ASGI 3 apps: one asyncio Protocol per connection.

``rtinfer serve --http-server rtinfer`` runs :class:`~rtinfer.http.InferenceApp` under
it instead of uvicorn. It is written to the ASGI spec (``http``, ``websocket`` and
``lifespan`` scopes), so any small ASGI app runs on it, but it does only what a model
server needs, with as little work per request as it can:

- ``httptools.HttpRequestParser`` fed straight from ``data_received``; one scope dict
  per request; the app is called once the whole body is in (at most
  ``max_body_bytes``: past it 413 and the connection closes, before more is buffered),
  so its first ``receive()`` returns the body at once;
- the usual one-body response leaves in ONE ``transport.write`` (status line from a
  table built at import, headers, body); ``more_body`` streams it chunked;
- no per-request logging, timers or tasks beyond the app's own: a sweep once a second
  closes keep-alive connections idle for ``keep_alive_s`` and refreshes the ``Date``
  header;
- keep-alive, HTTP/1.0, pipelining (answered in order; reading pauses past
  :data:`MAX_PIPELINED` queued requests), ``Expect: 100-continue``, chunked request
  bodies (httptools dechunks), malformed requests (400 and close), oversized heads
  (431), a client gone mid-request (``receive()`` then returns ``http.disconnect``
  and the response is dropped), and write flow control (``send`` waits while the
  transport's buffer is over its high-water mark);
- WebSocket upgrades through ``websockets``' sans-I/O ``ServerProtocol`` (messages
  bounded by ``max_body_bytes``: past it the connection closes with 1009; no
  compression; ping answered by the protocol, none sent);
- lifespan startup before the socket is bound, shutdown after the last connection;
  :meth:`HttpServer.stop` stops accepting, closes idle connections, lets requests in
  flight finish for ``grace_s``, then cancels what is left.

:func:`run` is what ``rtinfer serve`` calls: one process, or N worker processes that
each bind the port with ``SO_REUSEPORT`` (the kernel spreads connections over their
accept queues), SIGTERM passed on to every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from types import FrameType
from typing import Any

import httptools
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

__all__ = [
    "KEEP_ALIVE_S",
    "MAX_HEAD_BYTES",
    "MAX_PIPELINED",
    "ASGIApp",
    "ClientDisconnected",
    "HttpServer",
    "LifespanFailed",
    "run",
    "serve",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("rtinfer.http.server")

#: Seconds an idle keep-alive connection is kept (checked once a second: up to 1 s more).
KEEP_ALIVE_S = 5.0
#: Requests queued on one connection (pipelined) before it is no longer read.
MAX_PIPELINED = 8
#: The request line and headers of one request, at most (past it: 431 and close).
MAX_HEAD_BYTES = 64 * 1024
#: WebSocket messages queued for the app before the socket is no longer read.
MAX_WS_QUEUED = 16

_ASGI = {"version": "3.0", "spec_version": "2.4"}
_STATUS = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH")}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE = b"connection: close\r\n"
_KEEP_ALIVE = b"connection: keep-alive\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n"
_NO_BODY = frozenset({204, 304})


def _status_line(status: int) -> bytes:
    return _STATUS.get(status) or b"HTTP/1.1 %d \r\n" % status


def _date() -> bytes:
    return b"date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"


class ClientDisconnected(OSError):
    """``send`` on a WebSocket whose client is gone (ASGI: an ``OSError``)."""


class LifespanFailed(RuntimeError):
    """The app answered ``lifespan.startup.failed`` (or failed during the shutdown)."""


class _TooLarge(Exception):
    """Raised in a parser callback: the body (or its declared length) is over the limit."""


class _Shared:
    """What every connection of one server reads: the app, the limits, the live set."""

    __slots__ = (
        "app",
        "connections",
        "cycles",
        "date",
        "idle",
        "keep_alive_ticks",
        "loop",
        "max_body_bytes",
        "state",
        "stopping",
    )

    def __init__(self, app: ASGIApp, max_body_bytes: int, keep_alive_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.keep_alive_ticks = max(1, round(keep_alive_s))
        self.loop = asyncio.get_running_loop()
        self.connections: set[_HttpConnection | _WebSocket] = set()
        self.cycles: set[_Cycle] = set()  # requests whose app call has not returned
        self.date = _date()
        self.state: dict[str, Any] = {}  # the lifespan's state, copied into each scope
        self.stopping = False
        self.idle: asyncio.Event | None = None  # set once nothing is left, while stopping

    def check_idle(self) -> None:
        if self.idle is not None and not self.connections and not self.cycles:
            self.idle.set()


class _Flow(asyncio.Protocol):
    """Write flow control: ``drain`` waits while the transport's buffer is too full."""

    transport: asyncio.Transport
    write_paused: bool
    drained: asyncio.Future[None] | None
    lost: bool

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drained is not None:
            if not self.drained.done():
                self.drained.set_result(None)
            self.drained = None

    async def drain(self) -> None:
        if self.write_paused and not self.lost:
            if self.drained is None:
                self.drained = asyncio.get_running_loop().create_future()
            await self.drained


class _HttpConnection(_Flow):
    """One HTTP/1.1 connection: parses requests, runs them one at a time, in order."""

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[_Cycle] = deque()  # parsed or being parsed; the head answers
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
        self.refused: tuple[int, str] | None = None  # answered after the queue, then close
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
                self._refuse(413, f"the body is over the limit of {limit} bytes")
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
            "asgi": _ASGI,
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
        self.body = []
        self.size = 0
        cycle = _Cycle(self, scope, keep_alive, self.expect)
        queue = self.queue
        queue.append(cycle)
        if len(queue) == 1 and self.expect and self.length != 0:
            self.transport.write(_CONTINUE)
            cycle.expect = False

    def on_body(self, body: bytes) -> None:
        if self.upgrade is not None:
            return
        self.size += len(body)
        if self.size > self.shared.max_body_bytes:
            raise _TooLarge
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.upgrade is not None:
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

    def _start(self, cycle: _Cycle) -> None:
        self.running = True
        shared = self.shared
        shared.cycles.add(cycle)
        cycle.task = shared.loop.create_task(cycle.run())

    def response_done(self, cycle: _Cycle) -> None:
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
        body = message.encode()
        self.transport.write(
            b"".join(
                (
                    _status_line(status),
                    self.shared.date,
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: %d\r\n" % len(body),
                    _CLOSE,
                    b"\r\n",
                    body,
                )
            )
        )
        self.transport.close()

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
        ws = _WebSocket(shared, self.transport, scope, self.url, rest)
        self.transport.set_protocol(ws)
        ws.start()

    def tick(self) -> None:
        """The sweep, once a second: close the connection once idle for long enough."""
        if self.running:
            return
        self.ticks += 1
        if self.ticks >= self.shared.keep_alive_ticks and not self.transport.is_closing():
            self.transport.close()

    def shutdown(self) -> None:
        """The server stops: close now when idle, else after the response in progress."""
        if not self.running:
            self.transport.close()


class _Cycle:
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

    def __init__(self, conn: _HttpConnection, scope: Scope, keep_alive: bool, expect: bool) -> None:
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
            self._fail()
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

    def _fail(self) -> None:
        """An app that failed or left its response unfinished: 500 if nothing went out."""
        if self.done:
            return
        self.done = True
        conn = self.conn
        if not self.disconnected and not conn.lost:
            if self.head is None or self.head:  # nothing written yet
                body = b"Internal Server Error"
                conn.transport.write(
                    b"".join(
                        (
                            _status_line(500),
                            conn.shared.date,
                            b"content-type: text/plain; charset=utf-8\r\n",
                            b"content-length: %d\r\n" % len(body),
                            _CLOSE,
                            b"\r\n",
                            body,
                        )
                    )
                )
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


# --------------------------------------------------------------------------- WebSocket


class _WebSocket(_Flow):
    """One WebSocket connection: ``websockets``' sans-I/O protocol driving the ASGI app."""

    def __init__(
        self, shared: _Shared, transport: asyncio.Transport, scope: Scope, url: bytes, rest: bytes
    ) -> None:
        self.shared = shared
        self.transport = transport
        self.write_paused = False
        self.drained = None
        self.lost = False
        self.read_paused = False
        self.protocol = ServerProtocol(max_size=shared.max_body_bytes)
        headers = scope["headers"]
        subprotocols: list[str] = []
        for name, value in headers:
            if name == b"sec-websocket-protocol":
                subprotocols += [p.strip() for p in value.decode("latin-1").split(",")]
        scope = dict(scope)
        scope["type"] = "websocket"
        scope["scheme"] = "ws"
        scope["subprotocols"] = subprotocols
        del scope["method"]
        self.scope = scope
        # The protocol parses the handshake itself: the request as it came in.
        head = [b"GET ", url, b" HTTP/1.1\r\n"]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        self.raw = b"".join(head) + rest
        self.response: Response | None = None  # the 101, until the app accepts
        self.accepted = False
        self.closed = False  # the app sent a close, or the handshake was refused
        self.connected = False  # websocket.connect was delivered
        self.inbox: deque[Message] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.fragments: list[bytes] = []
        self.text = False
        self.gone: Message | None = None  # the websocket.disconnect, once the client left
        self.task: asyncio.Task[None] | None = None
        self.ticks = 0  # sweeps since the closing handshake began

    def start(self) -> None:
        shared = self.shared
        shared.connections.add(self)
        protocol = self.protocol
        protocol.receive_data(self.raw)
        events = protocol.events_received()
        request = events[0] if events else None
        if not isinstance(request, Request):
            self._flush()
            self.transport.close()
            return
        response = protocol.accept(request)
        if response.status_code != 101:
            protocol.send_response(response)
            self._flush()
            self.transport.close()
            return
        self.response = response
        self._events(events[1:])
        self.task = shared.loop.create_task(self.run())

    # -- transport events ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        self._events(protocol.events_received())
        self._flush()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._events(self.protocol.events_received())
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._left()
        self.resume_writing()
        shared = self.shared
        if self.task is None or self.task.done():
            shared.connections.discard(self)
            shared.check_idle()

    def _left(self) -> None:
        if self.gone is None:
            protocol = self.protocol
            self.gone = {
                "type": "websocket.disconnect",
                "code": protocol.close_code or 1006,
                "reason": protocol.close_reason or "",
            }
            self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _events(self, events: list[Any]) -> None:
        for event in events:
            if not isinstance(event, Frame):
                continue
            opcode = event.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                self.text = opcode is Opcode.TEXT
                data = bytes(event.data)  # bytes already: no copy
                if not event.fin:
                    self.fragments = [data]
                    continue
            elif opcode is Opcode.CONT:
                self.fragments.append(bytes(event.data))
                if not event.fin:
                    continue
                data, self.fragments = b"".join(self.fragments), []
            elif opcode is Opcode.CLOSE:
                self._left()
                continue
            else:
                continue  # ping (answered by the protocol), pong
            if self.text:
                try:
                    message: Message = {"type": "websocket.receive", "text": data.decode()}
                except UnicodeDecodeError:
                    self.protocol.fail(1007, "invalid UTF-8 in a text message")
                    self._left()
                    return
            else:
                message = {"type": "websocket.receive", "bytes": data}
            self.inbox.append(message)
            if len(self.inbox) >= MAX_WS_QUEUED and not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()
        if self.inbox:
            self._wake()
        if self.protocol.state is State.CLOSED:
            self._left()

    def _flush(self) -> None:
        transport = self.transport
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif not transport.is_closing():
                transport.close()  # the protocol's EOF: the server closes the TCP connection

    # -- the app ------------------------------------------------------------------

    async def run(self) -> None:
        shared = self.shared
        try:
            await shared.app(self.scope, self.receive, self.send)
        except Exception:
            log.exception("the ASGI app failed on WebSocket %s", self.scope["path"])
            self._end(1011)
        except asyncio.CancelledError:
            self._end(1001)
            raise
        else:
            self._end(1000)
        finally:
            if self.lost:
                shared.connections.discard(self)
                shared.check_idle()

    def _end(self, code: int) -> None:
        """The app returned: refuse the handshake (500) or close the connection."""
        if self.lost or self.closed:
            return
        if not self.accepted:
            self._refuse(500 if code == 1011 else 403)
        elif self.protocol.state is State.OPEN:
            self.closed = True
            self.protocol.send_close(code)
            self._flush()

    def _refuse(self, status: int) -> None:
        self.closed = True
        protocol = self.protocol
        protocol.send_response(protocol.reject(status, HTTPStatus(status).phrase + "\n"))
        self._flush()
        if not self.transport.is_closing():
            self.transport.close()

    async def receive(self) -> Message:
        if not self.connected:
            self.connected = True
            return {"type": "websocket.connect"}
        inbox = self.inbox
        while not inbox:
            if self.gone is not None:
                return self.gone
            self.waiter = self.shared.loop.create_future()
            await self.waiter
        message = inbox.popleft()
        if self.read_paused and len(inbox) <= MAX_WS_QUEUED // 4 and not self.lost:
            self.read_paused = False
            self.transport.resume_reading()
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.lost or (self.closed and kind != "websocket.close"):
            raise ClientDisconnected(f"{kind!r} on a closed WebSocket")
        protocol = self.protocol
        if kind == "websocket.send":
            if not self.accepted:
                raise RuntimeError("websocket.send before websocket.accept")
            if protocol.state is not State.OPEN:
                raise ClientDisconnected("the WebSocket is closing")
            text = message.get("text")
            if text is not None:
                protocol.send_text(text.encode())
            else:
                protocol.send_binary(message.get("bytes") or b"")
            self._flush()
            if self.write_paused:
                await self.drain()
        elif kind == "websocket.accept":
            response = self.response
            if response is None or self.accepted:
                raise RuntimeError("websocket.accept sent twice")
            subprotocol = message.get("subprotocol")
            if subprotocol is not None:
                response.headers["Sec-WebSocket-Protocol"] = subprotocol
            for name, value in message.get("headers") or ():
                response.headers[name.decode("latin-1")] = value.decode("latin-1")
            self.accepted = True
            self.response = None
            protocol.send_response(response)
            self._flush()
        elif kind == "websocket.close":
            if self.closed:
                return
            if not self.accepted:
                self._refuse(403)
                return
            self.closed = True
            if protocol.state is State.OPEN:
                protocol.send_close(message.get("code") or 1000, message.get("reason") or "")
                self._flush()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on a WebSocket")

    def tick(self) -> None:
        """WebSockets are long-lived: the sweep only ends a closing handshake left
        unanswered (about ``keep_alive_s``)."""
        if self.closed or self.protocol.state is State.CLOSING:
            self.ticks += 1
            if self.ticks >= self.shared.keep_alive_ticks:
                self.transport.abort()

    def shutdown(self) -> None:
        """The server stops: close with 1001 (going away); the app hears the disconnect."""
        if self.accepted and not self.closed and self.protocol.state is State.OPEN:
            self.closed = True
            self.protocol.send_close(1001, "the server is shutting down")
            self._flush()


# --------------------------------------------------------------------------- lifespan


class _Lifespan:
    """The ASGI lifespan: startup before the socket is bound, shutdown after the last request."""

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.answers: asyncio.Queue[Message] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.supported = True

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": _ASGI, "state": self.state}
        try:
            await self.app(scope, self.inbox.get, self._send)
        except Exception as exc:
            if self.supported and self.answers.empty():
                log.info("the app does not support the lifespan scope (%r); going on", exc)
                self.supported = False
            else:
                log.exception("the ASGI lifespan failed")
        await self.answers.put({"type": "lifespan.ended"})

    async def _send(self, message: Message) -> None:
        await self.answers.put(message)

    async def _ask(self, kind: str) -> Message:
        await self.inbox.put({"type": kind})
        return await self.answers.get()

    async def startup(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._main())
        answer = await self._ask("lifespan.startup")
        if answer["type"] == "lifespan.startup.failed":
            raise LifespanFailed(answer.get("message") or "the app's startup failed")
        if answer["type"] == "lifespan.ended" and self.supported:
            self.supported = False  # returned without answering: no lifespan

    async def shutdown(self) -> None:
        if not self.supported or self.task is None or self.task.done():
            return
        answer = await self._ask("lifespan.shutdown")
        if answer["type"] == "lifespan.shutdown.failed":
            raise LifespanFailed(answer.get("message") or "the app's shutdown failed")
        await self.task


# --------------------------------------------------------------------------- the server


class HttpServer:
    """Serves ``app`` (ASGI 3) over HTTP/1.1 and WebSocket on one port.

    ``sock``: a bound socket to listen on (else ``host``/``port`` are bound, with
    ``SO_REUSEPORT`` when ``reuse_port``). ``max_body_bytes``: the largest request body
    and WebSocket message. ``keep_alive_s``: idle keep-alive connections are closed
    after about this long. ``lifespan``: run the app's lifespan (an app without one is
    served all the same).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
        max_body_bytes: int = 16 * 1024 * 1024,
        keep_alive_s: float = KEEP_ALIVE_S,
        backlog: int = 2048,
        lifespan: bool = True,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
        self.app = app
        self.host, self.port = host, port
        self.sock = sock
        self.reuse_port = reuse_port
        self.max_body_bytes = max_body_bytes
        self.keep_alive_s = keep_alive_s
        self.backlog = backlog
        self.lifespan = lifespan
        self._shared: _Shared | None = None
        self._server: asyncio.Server | None = None
        self._lifespan: _Lifespan | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._stopped = False
        self._hurried = False
        self._hurry: asyncio.Event | None = None

    @property
    def connections(self) -> int:
        """Open connections (HTTP and WebSocket)."""
        return 0 if self._shared is None else len(self._shared.connections)

    async def start(self) -> None:
        """Run the lifespan startup, then bind and listen (raises LifespanFailed)."""
        if self._shared is not None:
            raise RuntimeError("the server is already started")
        shared = self._shared = _Shared(self.app, self.max_body_bytes, self.keep_alive_s)
        if self.lifespan:
            self._lifespan = _Lifespan(self.app, shared.state)
            await self._lifespan.startup()
        loop = shared.loop
        try:
            if self.sock is not None:
                server = await loop.create_server(
                    lambda: _HttpConnection(shared), sock=self.sock, backlog=self.backlog
                )
            else:
                server = await loop.create_server(
                    lambda: _HttpConnection(shared),
                    host=self.host,
                    port=self.port,
                    reuse_port=self.reuse_port or None,
                    backlog=self.backlog,
                )
        except BaseException:
            if self._lifespan is not None:
                await self._lifespan.shutdown()
            raise
        self._server = server
        if server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        self._sweep = loop.call_later(1.0, self._tick)

    def _tick(self) -> None:
        shared = self._shared
        assert shared is not None
        shared.date = _date()
        for conn in list(shared.connections):
            conn.tick()
        self._sweep = shared.loop.call_later(1.0, self._tick)

    def hurry(self) -> None:
        """Cut the stop's grace short: what still runs is cancelled now (or at the stop)."""
        self._hurried = True
        if self._hurry is not None:
            self._hurry.set()

    async def stop(self, grace_s: float | None = 10.0) -> None:
        """Stop accepting, close idle connections, let requests in flight finish for at
        most ``grace_s`` seconds (``None``: no bound), cancel what is left, then run the
        lifespan shutdown."""
        shared = self._shared
        if shared is None or self._stopped:
            return
        self._stopped = True
        shared.stopping = True
        if self._server is not None:
            self._server.close()
        if self._sweep is not None:
            self._sweep.cancel()
        shared.idle = asyncio.Event()
        self._hurry = hurry = asyncio.Event()
        if self._hurried:
            hurry.set()
        for conn in list(shared.connections):
            conn.shutdown()
        shared.check_idle()
        waits = [asyncio.ensure_future(shared.idle.wait()), asyncio.ensure_future(hurry.wait())]
        await asyncio.wait(waits, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        if not shared.idle.is_set():
            log.warning(
                "%d request(s) still running %s; cancelling them",
                len(shared.cycles),
                "when told to hurry" if hurry.is_set() else f"{grace_s} s after the stop",
            )
            for cycle in list(shared.cycles):
                if cycle.task is not None:
                    cycle.task.cancel()
            for conn in list(shared.connections):
                if isinstance(conn, _WebSocket) and conn.task is not None:
                    conn.task.cancel()
                conn.transport.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(shared.idle.wait(), 5.0)
        if self._server is not None:
            await self._server.wait_closed()
        if self._lifespan is not None:
            await self._lifespan.shutdown()


# --------------------------------------------------------------------------- running it


async def serve(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    reuse_port: bool = False,
    max_body_bytes: int = 16 * 1024 * 1024,
    grace_s: float = 10.0,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then stop gracefully (``grace_s``).

    The signal handlers are Python-level (``signal.signal``) and installed before the
    lifespan startup, so an app can wrap SIGTERM with its own handler (as
    :func:`rtinfer.serve.drain_on_sigterm` does: drain first, then hand over). A second
    SIGINT while stopping cancels what is still running.
    """
    server = HttpServer(
        app, host=host, port=port, reuse_port=reuse_port, max_body_bytes=max_body_bytes
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signalled: list[int] = []

    def on_signal(sig: int, frame: FrameType | None) -> None:
        signalled.append(sig)
        if sig == signal.SIGINT and signalled.count(signal.SIGINT) > 1:
            loop.call_soon_threadsafe(server.hurry)  # a second Ctrl-C: no more grace
        loop.call_soon_threadsafe(stop.set)

    main = threading.current_thread() is threading.main_thread()
    previous = (
        {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    )
    try:
        await server.start()
        log.info("rtinfer HTTP server on http://%s:%d (pid %d)", host, server.port, os.getpid())
        if ready is not None:
            ready(server.port)
        await stop.wait()
        await server.stop(grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(
    factory: Callable[[], ASGIApp],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    max_body_bytes: int = 16 * 1024 * 1024,
    grace_s: float = 10.0,
    log_level: str = "info",
) -> None:
    """Serve the app ``factory()`` builds (in each worker) until SIGTERM or SIGINT.

    One worker runs here. With several, this process binds the port first (with
    ``SO_REUSEPORT``, not listening: it fails early if the port is taken, and fixes a
    port 0), then starts ``workers`` processes (``spawn``) that each build the app and
    bind the same port with ``SO_REUSEPORT``; SIGTERM or SIGINT here is passed on to
    every worker as SIGTERM (each drains and stops), and this returns once all exited.
    ``factory`` must be importable by name (a module-level function).
    """
    if workers <= 1:
        _worker(factory, host, port, False, max_body_bytes, grace_s, log_level)
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reserve = socket.socket(family, socket.SOCK_STREAM)
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserve.bind((host, port))
        port = reserve.getsockname()[1]
        context = multiprocessing.get_context("spawn")
        processes = [
            context.Process(
                target=_worker,
                args=(factory, host, port, True, max_body_bytes, grace_s, log_level),
                name=f"rtinfer-worker-{i}",
            )
            for i in range(workers)
        ]

        stopping: list[int] = []

        def forward(sig: int, frame: FrameType | None) -> None:
            stopping.append(sig)
            for process in processes:
                if process.pid is not None and process.exitcode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGTERM)

        main = threading.current_thread() is threading.main_thread()
        previous = (
            {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
        )
        try:
            for process in processes:
                process.start()
            log.info("%d worker processes sharing port %d (SO_REUSEPORT)", workers, port)
            failed = _supervise(processes, stopping)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for process in processes:
                if process.exitcode is None and process.pid is not None:
                    process.kill()
                    process.join()
    finally:
        reserve.close()
    if failed:
        raise RuntimeError(f"worker {failed} exited before it was told to stop; see its log")


def _supervise(processes: list[Any], stopping: list[int]) -> str | None:
    """Wait for every worker to exit. One that exits on its own (not after a signal)
    stops the others; its name is returned."""
    failed = None
    running = list(processes)
    while running:
        ready = multiprocessing.connection.wait([p.sentinel for p in running])
        for process in [p for p in running if p.sentinel in ready]:
            process.join()
            running.remove(process)
            if process.exitcode:
                log.warning("worker %s exited with %s", process.name, process.exitcode)
            if not stopping and failed is None:
                failed = process.name
                for other in running:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(other.pid, signal.SIGTERM)
    return failed


def _worker(
    factory: Callable[[], ASGIApp],
    host: str,
    port: int,
    reuse_port: bool,
    max_body_bytes: int,
    grace_s: float,
    log_level: str,
) -> None:
    from ..loop import run as run_loop

    if not logging.getLogger().handlers:
        logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = factory()
    run_loop(
        serve(
            app,
            host=host,
            port=port,
            reuse_port=reuse_port,
            max_body_bytes=max_body_bytes,
            grace_s=grace_s,
        )
    )
