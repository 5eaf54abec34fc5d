"""What every connection of the HTTP server shares: the ASGI types, the server's state
(:class:`Shared`) and write flow control (:class:`Flow`)."""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .http11 import Cycle, HttpConnection
    from .wsconnection import WebSocketConnection

__all__ = [
    "ASGI_VERSION",
    "ASGIApp",
    "EarlyAnswer",
    "Flow",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "Shared",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: An app's ``early_answer`` (this server's one extension to ASGI): called with a
#: request's scope as soon as its head is read, it returns ``(status, rest)`` to answer
#: the request at once, without reading its body into memory or calling the app
#: (``rest``: the response's header lines, each ending in CRLF, a blank line and the
#: body; the server adds the status line and ``Date``), or ``None`` to go on as usual.
EarlyAnswer = Callable[[Scope], "tuple[int, bytes] | None"]

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}


def http_date() -> bytes:
    """The ``Date`` header line of a response sent now."""
    return b"date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"


class Shared:
    """What every connection of one server reads: the app, the limits, the live set."""

    __slots__ = (
        "app",
        "connections",
        "cycles",
        "date",
        "early",
        "idle",
        "keep_alive_ticks",
        "loop",
        "max_body_bytes",
        "ping_ticks",
        "state",
        "stopping",
    )

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, keep_alive_s: float, ping_s: float | None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.keep_alive_ticks = max(1, round(keep_alive_s))
        self.ping_ticks = 0 if not ping_s else max(1, round(ping_s))  # 0: no pings
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpConnection | WebSocketConnection] = set()
        self.cycles: set[Cycle] = set()  # requests whose app call has not returned
        self.date = http_date()
        self.early: EarlyAnswer | None = getattr(app, "early_answer", None)
        self.state: dict[str, Any] = {}  # the lifespan's state, copied into each scope
        self.stopping = False
        self.idle: asyncio.Event | None = None  # set once nothing is left, while stopping

    def check_idle(self) -> None:
        if self.idle is not None and not self.connections and not self.cycles:
            self.idle.set()


class Flow(asyncio.Protocol):
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
