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
- an app may answer from a request's head alone (``early_answer``, this server's one
  extension to ASGI; :class:`~rtinfer.http.InferenceApp` refuses there what its model's
  limiter would refuse): the answer leaves once the body has gone by, unkept, with no
  task made and no ASGI call, keep-alive kept; it is asked only when nothing is queued
  before the request on its connection;
- no per-request logging, timers or tasks beyond the app's own: a sweep once a second
  closes keep-alive connections idle for ``keep_alive_s`` and refreshes the ``Date``
  header;
- keep-alive, HTTP/1.0, pipelining (answered in order; reading pauses past
  :data:`MAX_PIPELINED` queued requests), ``Expect: 100-continue``, chunked request
  bodies (httptools dechunks), malformed requests (400 and close), oversized heads
  (431) and bodies (413) (what the server answers itself is ``{"error": "..."}`` JSON,
  and the connection lingers, read and discarded, so that a client still sending reads
  the answer rather than a reset), a client gone mid-request (``receive()`` then
  returns ``http.disconnect`` and the response is dropped), and write flow control
  (``send`` waits while the transport's buffer is over its high-water mark);
- WebSocket upgrades through ``websockets``' sans-I/O ``ServerProtocol`` (messages
  bounded by ``max_body_bytes``: past it the connection closes with 1009; no
  compression; pings answered by the protocol; a client silent for ``ping_s`` is
  pinged, and closed with 1011 if it stays silent as long again);
- lifespan startup before the socket is bound, shutdown after the last connection;
  :meth:`HttpServer.stop` stops accepting, closes idle connections, lets requests in
  flight finish for ``grace_s``, then cancels what is left (answered 503 when nothing
  of its answer went out).

:func:`run` is what ``rtinfer serve`` calls: one process, or N worker processes that
each bind the port with ``SO_REUSEPORT`` (the kernel spreads connections over their
accept queues), SIGTERM passed on to every worker, a worker that dies replaced.

The modules: :mod:`~rtinfer.http.connection` (what connections share),
:mod:`~rtinfer.http.http11` (an HTTP/1.1 connection and its requests),
:mod:`~rtinfer.http.wsconnection` (a WebSocket connection) and this one (the server,
the lifespan, the worker processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from .connection import ASGI_VERSION, ASGIApp, Message, Receive, Scope, Send, Shared, http_date
from .http11 import KEEP_ALIVE_S, MAX_HEAD_BYTES, MAX_PIPELINED, HttpConnection
from .wsconnection import PING_S, ClientDisconnected, WebSocketConnection

__all__ = [
    "KEEP_ALIVE_S",
    "MAX_HEAD_BYTES",
    "MAX_PIPELINED",
    "PING_S",
    "ASGIApp",
    "ClientDisconnected",
    "HttpServer",
    "LifespanFailed",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "run",
    "serve",
]

log = logging.getLogger("rtinfer.http.server")

#: Seconds a worker process must have run for its death to be taken as an accident
#: (it is replaced); one that dies sooner is taken as unable to start (the server stops).
STEADY_S = 10.0


class LifespanFailed(RuntimeError):
    """The app answered ``lifespan.startup.failed`` (or failed during the shutdown)."""


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
        scope = {"type": "lifespan", "asgi": ASGI_VERSION, "state": self.state}
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
    after about this long. ``ping_s``: a WebSocket client silent this long is pinged,
    and closed (1011) if silent as long again (``None``: never). ``lifespan``: run the
    app's lifespan (an app without one is served all the same).
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
        ping_s: float | None = PING_S,
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
        self.ping_s = ping_s
        self.backlog = backlog
        self.lifespan = lifespan
        self._shared: Shared | None = None
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
        shared = self._shared = Shared(
            self.app, self.max_body_bytes, self.keep_alive_s, self.ping_s
        )
        if self.lifespan:
            self._lifespan = _Lifespan(self.app, shared.state)
            await self._lifespan.startup()
        loop = shared.loop
        try:
            if self.sock is not None:
                server = await loop.create_server(
                    lambda: HttpConnection(shared), sock=self.sock, backlog=self.backlog
                )
            else:
                server = await loop.create_server(
                    lambda: HttpConnection(shared),
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
        shared.date = http_date()
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
            cancelled = [c.task for c in shared.cycles if c.task is not None]
            for task in cancelled:
                task.cancel()
            if cancelled:  # each answers 503 as it ends, if nothing of its answer went out
                await asyncio.wait(cancelled, timeout=1.0)
            for conn in list(shared.connections):
                if isinstance(conn, WebSocketConnection) and conn.task is not None:
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
    A worker that dies on its own (killed, out of memory) after running for
    :data:`STEADY_S` is replaced by a new one; one that dies sooner (it could not load
    its models, say) stops the others, and this raises ``RuntimeError``.
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

        def start(i: int) -> Any:
            process = context.Process(
                target=_worker,
                args=(factory, host, port, True, max_body_bytes, grace_s, log_level),
                name=f"rtinfer-worker-{i}",
            )
            process.start()
            return process

        processes: list[Any] = []
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
            processes += [start(i) for i in range(workers)]
            log.info("%d worker processes sharing port %d (SO_REUSEPORT)", workers, port)
            failed = _supervise(processes, start, stopping)
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


def _supervise(
    processes: list[Any], start: Callable[[int], Any], stopping: list[int]
) -> str | None:
    """Wait for every worker to exit, replacing one that dies on its own after running
    for :data:`STEADY_S` (``processes`` is updated in place). One that dies sooner stops
    the others; its name is returned."""
    failed = None
    started = {process.name: time.monotonic() for process in processes}
    running = list(processes)
    while running:
        ready = multiprocessing.connection.wait([p.sentinel for p in running])
        for process in [p for p in running if p.sentinel in ready]:
            process.join()
            running.remove(process)
            if stopping or failed is not None:
                continue
            ran = time.monotonic() - started[process.name]
            if ran >= STEADY_S:
                log.warning(
                    "worker %s exited with %s after %.0f s; starting another in its place",
                    process.name,
                    process.exitcode,
                    ran,
                )
                index = processes.index(process)
                replacement = start(int(process.name.rpartition("-")[2]))
                if stopping:  # told to stop while it started: it missed the signal
                    os.kill(replacement.pid, signal.SIGTERM)
                processes[index] = replacement
                started[replacement.name] = time.monotonic()
                running.append(replacement)
                continue
            log.error(
                "worker %s exited with %s %.1f s after it started; stopping the others",
                process.name,
                process.exitcode,
                ran,
            )
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
