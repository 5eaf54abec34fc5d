"""The WebSocket side of the server: a connection upgraded from HTTP/1.1, driven by
``websockets``' sans-I/O :class:`~websockets.server.ServerProtocol`."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from http import HTTPStatus
from typing import Any

from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from .connection import Flow, Message, Scope, Shared

__all__ = ["MAX_WS_QUEUED", "PING_S", "ClientDisconnected", "WebSocketConnection"]

log = logging.getLogger("rtinfer.http.server")

#: WebSocket messages queued for the app before the socket is no longer read.
MAX_WS_QUEUED = 16
#: Seconds a WebSocket client may stay silent before it is pinged; silent as long again
#: (no pong), the connection is closed with 1011 (a peer gone without a FIN).
PING_S = 20.0


class ClientDisconnected(OSError):
    """``send`` on a WebSocket whose client is gone (ASGI: an ``OSError``)."""


class WebSocketConnection(Flow):
    """One WebSocket connection: ``websockets``' sans-I/O protocol driving the ASGI app."""

    def __init__(
        self, shared: Shared, transport: asyncio.Transport, scope: Scope, url: bytes, rest: bytes
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
        self.silent = 0  # sweeps since the client last sent anything (a pong included)

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
        self.silent = 0
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
        """The sweep, once a second. WebSockets are long-lived: it ends a closing handshake
        left unanswered (about ``keep_alive_s``), and pings a client silent for
        ``ping_s``, closing the connection (1011) if it stays silent as long again."""
        protocol = self.protocol
        if self.closed or protocol.state is State.CLOSING:
            self.ticks += 1
            if self.ticks >= self.shared.keep_alive_ticks:
                self.transport.abort()
            return
        ping = self.shared.ping_ticks
        if not ping or not self.accepted or protocol.state is not State.OPEN:
            return
        self.silent += 1
        if self.silent == ping:
            protocol.send_ping(b"rtinfer")
            self._flush()
        elif self.silent >= 2 * ping:
            log.info("closing WebSocket %s: no answer to a ping", self.scope["path"])
            self.closed = True
            protocol.fail(1011, "keepalive ping timeout")
            self._flush()
            self._left()

    def shutdown(self) -> None:
        """The server stops: close with 1001 (going away); the app hears the disconnect."""
        if self.accepted and not self.closed and self.protocol.state is State.OPEN:
            self.closed = True
            self.protocol.send_close(1001, "the server is shutting down")
            self._flush()
