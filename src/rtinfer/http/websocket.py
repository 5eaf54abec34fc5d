"""Streaming inference over one WebSocket: many requests in, answers out as they complete.

Route: ``/v2/models/{name}[/versions/{version}]/infer/stream``. Each text frame
is an Open Inference Protocol JSON inference request with an ``id``; each answer
is the protocol's JSON response carrying that ``id``, or ``{"id": ..., "error":
"..."}`` for that request alone (the connection stays open). Answers come in
the order they complete, not the order sent: match them by ``id``.

Requests on one connection run concurrently, each through the model's
micro-batcher (so they batch with every other caller). At most
``max_in_flight`` run at once per connection; past it the socket is not read
until one finishes, so a fast client is slowed by TCP backpressure rather than
queued without bound here.

Connection-level answers: an unknown path is refused at the handshake (HTTP
403); a missing or wrong API key (``Authorization: Bearer <key>`` on the
upgrade request, when the server has one) is accepted then closed with 1008;
an unknown model or version gets one ``{"id": null, "error": "..."}`` and a
close with 4404. ``X-Request-Timeout-Ms`` on the upgrade request is the
deadline of each request (default: the server's ``--slo-ms``) and ``X-Priority`` its
traffic class; a malformed one gets one error message and a close with 1008. Each
request meets the model's protections like a REST request (quota, limiter, breaker,
cache, fallback: ``parameters.rtinfer_step`` in the answer), and while the server
drains each gets an error answer (its REST twin's 503).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import msgspec

from ..resilience import Priority
from .errors import HttpError, from_exception
from .oip import OFFLOAD_BYTES, InferRequest, decode_infer, encode, encode_infer

if TYPE_CHECKING:
    from ..serving import ServedModel
    from .app import InferenceApp, Receive, Scope, Send

__all__ = ["MAX_IN_FLIGHT", "STREAM_ROUTE", "serve_websocket"]

#: Requests one connection may have running at once before its socket is no longer read.
MAX_IN_FLIGHT = 64
#: The route's template (also its label in the HTTP metrics).
STREAM_ROUTE = "/v2/models/{name}[/versions/{version}]/infer/stream"

CLOSE_POLICY = 1008  # RFC 6455: policy violation (here: missing or wrong API key)
CLOSE_NOT_FOUND = 4404  # application-defined: unknown model or version

_BINARY = "binary frames are not supported; send each request as a text frame of JSON"


class _Tag(msgspec.Struct):
    """Only the ``id`` of a request, read first so that any error can carry it."""

    id: Any = None


_tag_decoder = msgspec.json.Decoder(_Tag)


def _match(path: str) -> tuple[str, str | None] | None:
    """The model name and version of a stream path, or ``None`` when it is not one."""
    match [p for p in path.split("/") if p]:
        case ["v2", "models", name, "infer", "stream"]:
            return name, None
        case ["v2", "models", name, "versions", version, "infer", "stream"]:
            return name, version
    return None


def _request_id(raw: bytes) -> str:
    """The request's ``id``, or HttpError for malformed JSON, a non-object or no string id."""
    try:
        tagged = _tag_decoder.decode(raw)
    except msgspec.ValidationError:
        raise HttpError(400, "a message must be a JSON object: an inference request") from None
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise HttpError(400, f"the message is not valid JSON: {exc}") from None
    if not isinstance(tagged.id, str):
        raise HttpError(
            400,
            f'each request needs an "id" string to match its answer; got {tagged.id!r}',
        )
    return tagged.id


def _wants_binary(request: InferRequest) -> bool:
    params = request.parameters or {}
    if params.get("binary_data_output"):
        return True
    return any((out.parameters or {}).get("binary_data") for out in request.outputs or [])


async def serve_websocket(
    app: InferenceApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    max_in_flight: int = MAX_IN_FLIGHT,
) -> None:
    """Serve one WebSocket connection of ``app`` (an ASGI ``websocket`` scope)."""
    if (await receive())["type"] != "websocket.connect":
        return
    found = _match(scope["path"])
    if found is None:
        await send({"type": "websocket.close", "code": CLOSE_POLICY})  # handshake refused: 403
        return
    headers: dict[bytes, bytes] = dict(scope["headers"])
    await send({"type": "websocket.accept"})
    if not app.auth.allows(headers.get(b"authorization")):
        reason = "missing or wrong API key; send the header 'Authorization: Bearer <key>'"
        await send({"type": "websocket.close", "code": CLOSE_POLICY, "reason": reason})
        return
    name, version = found
    try:
        served = app.server.get(name, version)
        timeout = app.request_timeout(headers)
        priority = app.request_priority(headers)
    except Exception as exc:
        error = from_exception(exc, model=name)
        await send(
            {
                "type": "websocket.send",
                "text": encode({"id": None, "error": error.message}).decode(),
            }
        )
        code = CLOSE_NOT_FOUND if error.status == 404 else CLOSE_POLICY
        await send({"type": "websocket.close", "code": code})
        return
    peer = scope.get("client")
    client = (str(peer[0]) if peer else "unknown") if app.server.quota is not None else None
    stream = _Stream(app, served, timeout, priority, client, send, max_in_flight)
    # The version is picked per request, as on the other routes: a promotion or a canary
    # reaches a connection opened before it.
    stream.version = version
    stream.key = headers.get(b"x-routing-key")
    await stream.run(receive)


class _Stream:
    """One accepted connection: reads requests, runs them concurrently, sends each answer."""

    __slots__ = (
        "app",
        "client",
        "in_flight",
        "key",
        "lock",
        "priority",
        "send",
        "served",
        "tasks",
        "timeout",
        "version",
    )

    def __init__(
        self,
        app: InferenceApp,
        served: ServedModel,
        timeout: float | None,
        priority: Priority | None,
        client: str | None,
        send: Send,
        max_in_flight: int,
    ) -> None:
        self.app = app
        self.served = served
        self.timeout = timeout
        self.priority = priority
        self.client = client
        self.send = send
        self.lock = asyncio.Lock()  # one frame at a time on the socket
        self.in_flight = asyncio.Semaphore(max_in_flight)
        self.tasks: set[asyncio.Task[None]] = set()
        self.version: str | None = served.version  # the one asked for (None: the default)
        self.key: bytes | None = None  # the connection's routing key, for a canary

    async def run(self, receive: Receive) -> None:
        try:
            while True:
                await self.in_flight.acquire()  # backpressure: no reading past the bound
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is None:
                    self.in_flight.release()
                    await self._reply(encode({"id": None, "error": _BINARY}))
                    continue
                raw = text.encode()
                if len(raw) > self.app.max_body_bytes:
                    self.in_flight.release()
                    limit = self.app.max_body_bytes
                    error = f"the frame has {len(raw)} bytes; the limit is {limit}"
                    await self._reply(encode({"id": None, "error": error}))
                    continue
                task = asyncio.create_task(self._answer(raw))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        finally:
            # The client is gone (or the server is stopping): nobody is left to answer.
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _answer(self, raw: bytes) -> None:
        try:
            await self._reply(await self._handle(raw))
        except OSError:
            pass  # the client disconnected (uvicorn's ClientDisconnected); the reader stops
        finally:
            self.in_flight.release()

    async def _handle(self, raw: bytes) -> bytes:
        started = time.perf_counter()
        served = self.served
        request_id: str | None = None
        status = 200
        try:
            request_id = _request_id(raw)
            served = self.app.server.route(served.name, self.version, key=self.key)
            if len(raw) > OFFLOAD_BYTES:  # decoding it would hold the event loop up
                request, inputs = await asyncio.to_thread(decode_infer, raw, None, served)
            else:
                request, inputs = decode_infer(raw, None, served)
            if _wants_binary(request):
                raise HttpError(400, "binary outputs are not supported over WebSocket; use JSON")
            outputs, step = await self._infer(served, inputs)
            payload, _ = encode_infer(request, served, outputs, step)
        except Exception as exc:
            error = from_exception(exc, model=served.name)
            status = error.status
            payload = encode({"id": request_id, "error": error.message})
        self.app.stats.observe(STREAM_ROUTE, status, time.perf_counter() - started)
        return payload

    async def _infer(
        self, served: ServedModel, inputs: dict[str, Any]
    ) -> tuple[dict[str, Any], str | None]:
        server = self.app.server
        if self.timeout is None:
            answer = await server.infer(
                served.name,
                inputs,
                version=served.version,
                priority=self.priority,
                client=self.client,
            )
            return answer.outputs, answer.step
        async with asyncio.timeout(self.timeout):
            answer = await server.infer(
                served.name,
                inputs,
                version=served.version,
                deadline=time.time() + self.timeout,
                priority=self.priority,
                client=self.client,
            )
        return answer.outputs, answer.step

    async def _reply(self, payload: bytes) -> None:
        async with self.lock:
            await self.send({"type": "websocket.send", "text": payload.decode()})
