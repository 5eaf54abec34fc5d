"""The ASGI application: Open Inference Protocol REST routes over a ModelServer.

A plain ASGI callable (no framework): one ``match`` on the path's parts picks
the handler; bodies are read with a size limit before anything is parsed;
every error becomes ``{"error": "..."}`` with its status (see
:mod:`rtinfer.http.errors`). The ASGI lifespan starts the models (loaded and
warmed) and closes them after the last request, so ``uvicorn`` runs it as is.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..repository import ModelManager
from ..resilience import Priority, parse_priority
from ..serving import Admission, Inference, ModelNotFound, ModelServer, ServedModel
from .auth import BearerAuth
from .errors import HttpError, from_exception
from .manage import MANAGEMENT_ROUTES, Management, match_management
from .oip import HEADER_LENGTH, OFFLOAD_BYTES, decode_infer, encode, encode_infer, to_array
from .openapi import openapi_spec
from .stats import HttpMetrics
from .websocket import serve_websocket

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ROUTES", "InferenceApp"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
TIMEOUT_HEADER = b"x-request-timeout-ms"
ROUTING_HEADER = b"x-routing-key"  # a canary's sticky key
PRIORITY_HEADER = b"x-priority"
JSON = b"application/json"
#: Infer paths ``early_answer`` keeps parsed (those whose model it found).
EARLY_PATHS = 1024

#: Every route: (method, path template, needs the API key when one is set).
ROUTES: tuple[tuple[str, str, bool], ...] = (
    ("GET", "/v2/health/live", False),
    ("GET", "/v2/health/ready", False),
    ("GET", "/v2", True),
    ("GET", "/v2/models/{name}", True),
    ("GET", "/v2/models/{name}/versions/{version}", True),
    ("GET", "/v2/models/{name}/ready", True),
    ("GET", "/v2/models/{name}/versions/{version}/ready", True),
    ("POST", "/v2/models/{name}/infer", True),
    ("POST", "/v2/models/{name}/versions/{version}/infer", True),
    ("POST", "/models/{name}/score", True),
    ("POST", "/models/{name}/versions/{version}/score", True),
    ("POST", "/pipelines/{name}/score", True),
    ("GET", "/metrics", True),
    ("GET", "/openapi.json", False),
    ("GET", "/docs", False),
)
_PROTECTED = {template: protected for _, template, protected in ROUTES}
_METHOD = {template: method for method, template, _ in ROUTES}
_METHOD.update({template: method for method, template in MANAGEMENT_ROUTES})


class Response:
    """An answer: status, body, content type and extra headers."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        body: bytes,
        status: int = 200,
        content_type: bytes = JSON,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.body = body
        self.status = status
        self.content_type = content_type
        self.headers = headers or []


def _match(parts: list[str]) -> tuple[str, dict[str, str]] | None:
    """The route template of a path's parts, and the values of its placeholders."""
    match parts:
        case ["v2", "health", ("live" | "ready") as what]:
            return f"/v2/health/{what}", {}
        case ["v2"]:
            return "/v2", {}
        case ["v2", "models", name]:
            return "/v2/models/{name}", {"name": name}
        case ["v2", "models", name, "versions", version]:
            return "/v2/models/{name}/versions/{version}", {"name": name, "version": version}
        case ["v2", "models", name, ("ready" | "infer") as what]:
            return f"/v2/models/{{name}}/{what}", {"name": name}
        case ["v2", "models", name, "versions", version, ("ready" | "infer") as what]:
            template = f"/v2/models/{{name}}/versions/{{version}}/{what}"
            return template, {"name": name, "version": version}
        case ["models", name, "score"]:
            return "/models/{name}/score", {"name": name}
        case ["models", name, "versions", version, "score"]:
            return "/models/{name}/versions/{version}/score", {"name": name, "version": version}
        case ["pipelines", name, "score"]:
            return "/pipelines/{name}/score", {"name": name}
        case ["metrics"]:
            return "/metrics", {}
        case ["openapi.json"]:
            return "/openapi.json", {}
        case ["docs"]:
            return "/docs", {}
        case ["v2", "repository", *rest]:
            return match_management(rest)
    return None


#: Stops what ``on_started`` started.
Stopper = Callable[[], Awaitable[None]]


class InferenceApp:
    """The ASGI app serving ``server``'s models over the Open Inference Protocol.

    ``api_key``: when set, every route but health and ``/openapi.json`` needs
    ``Authorization: Bearer <api_key>``. ``max_body_bytes``: larger bodies get
    413 before they are parsed. ``default_timeout_s``: the deadline of a request
    that sends no ``X-Request-Timeout-Ms`` header (``None``: none).
    ``on_started`` runs once the models are ready (it starts companions such as the
    gRPC front) and may return a coroutine function that stops them, called first at
    shutdown. ``on_shutdown`` runs after the models are closed (the run summary).
    """

    def __init__(
        self,
        server: ModelServer,
        *,
        api_key: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        default_timeout_s: float | None = 30.0,
        server_name: str = "rtinfer",
        on_started: Callable[[InferenceApp], Awaitable[Stopper | None]] | None = None,
        on_shutdown: Callable[[InferenceApp], None] | None = None,
        manager: ModelManager | None = None,
        management_key: str | None = None,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
        self.server = server
        self.auth = BearerAuth(api_key)
        self.max_body_bytes = max_body_bytes
        self.default_timeout_s = default_timeout_s
        self.server_name = server_name
        self.on_started = on_started
        self.on_shutdown = on_shutdown
        self._stop_companions: Stopper | None = None
        self.stats = HttpMetrics(server.metrics)
        self._refusals: dict[tuple[str, str, bool, float], bytes] = {}
        # The infer paths early_answer met whose model was found: route, name, version
        # (at most EARLY_PATHS of them, so that made-up paths cannot grow it).
        self._infer_paths: dict[str, tuple[str, str, str | None]] = {}
        pipelines = {
            name: getattr(scorer.pipeline.stages[0], "schema", None)
            for name, scorer in server.pipelines.items()
        }
        self.manager, self.management = _management(server, manager, management_key, api_key)
        self._openapi = encode(
            openapi_spec(
                auth=self.auth.enabled, pipelines=pipelines, management=self.management is not None
            )
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await serve_websocket(self, scope, receive, send)

    def early_answer(self, scope: Scope) -> tuple[int, bytes] | None:
        """A request to infer that the model's limiter refuses, refused from its head.

        rtinfer's HTTP server calls this once a request's head is read (see
        :data:`~rtinfer.http.connection.EarlyAnswer`): the 503 then leaves without the
        body being kept, a task, the ASGI calls or an exception (docs/resilience.md has
        what it measured: under overload, more of the one core left to the model). What
        the head alone does not settle goes the usual way: a server with quotas (429 or
        503?), one draining, a model with a canary (its version may hang on the body), a
        wrong key (401), a bad ``X-Priority`` (400), an unknown model (404).
        """
        if scope["method"] != "POST":
            return None
        path = scope["path"]
        known = self._infer_paths.get(path)
        if known is None:
            if not path.endswith("/infer"):
                return None
            found = _match([p for p in path.split("/") if p])
            if found is None:
                return None
            route, params = found
            name, version = params["name"], params.get("version")
        else:
            route, name, version = known
        server = self.server
        if server.quota is not None or server.draining:
            return None
        if not version and name in server.canaries:
            return None
        raw_priority = authorization = None
        for header, value in scope["headers"]:
            if header == PRIORITY_HEADER:
                raw_priority = value
            elif header == b"authorization":
                authorization = value
        if not self.auth.allows(authorization):
            return None
        try:
            served = server.get(name, version)
            priority = parse_priority(raw_priority, served.priority)
        except (ModelNotFound, ValueError):
            return None
        if known is None and len(self._infer_paths) < EARLY_PATHS:
            self._infer_paths[path] = (route, name, version)
        limiter = served.limiter
        if limiter is None or not limiter.refuses_head(priority):
            return None
        self.stats.observe(route, 503, 0.0)
        key = (served.name, served.version, priority is Priority.CRITICAL, limiter.retry_after)
        refusal = self._refusals.get(key)
        if refusal is None:
            seconds = max(1, math.ceil(limiter.retry_after))
            body = encode(
                {
                    "error": f"model {served.name!r} is at its concurrency limit; "
                    f"{priority.value} call shed, retry after {seconds} s"
                }
            )
            head = b"content-type: application/json\r\ncontent-length: %d\r\nretry-after: %d\r\n"
            refusal = self._refusals[key] = head % (len(body), seconds) + b"\r\n" + body
        return 503, refusal

    # -- lifespan ---------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.server.start()
                    if self.manager is not None:
                        await self.manager.start()
                    if self.on_started is not None:
                        self._stop_companions = await self.on_started(self)
                except Exception as exc:
                    await self.server.aclose()  # what did load stops its threads
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    if self._stop_companions is not None:
                        await self._stop_companions()
                    if self.manager is not None:
                        await self.manager.aclose()
                finally:
                    await self.server.aclose()
                    if self.on_shutdown is not None:
                        self.on_shutdown(self)
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- http -------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers: dict[bytes, bytes] = dict(scope["headers"])
        found = _match([p for p in scope["path"].split("/") if p])
        route = found[0] if found else "other"
        try:
            response = await self._dispatch(scope, receive, headers, found)
        except Exception as exc:
            error = from_exception(exc, model=found[1].get("name", "") if found else "")
            response = Response(
                encode({"error": error.message}),
                error.status,
                headers=[(k.encode(), v.encode()) for k, v in error.headers.items()],
            )
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    (b"content-type", response.content_type),
                    (b"content-length", str(len(response.body)).encode()),
                    *response.headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": response.body})
        self.stats.observe(route, response.status, time.perf_counter() - started)

    async def _dispatch(
        self,
        scope: Scope,
        receive: Receive,
        headers: dict[bytes, bytes],
        found: tuple[str, dict[str, str]] | None,
    ) -> Response:
        if found is None:
            raise HttpError(404, f"no route {scope['path']!r}; GET /openapi.json lists them")
        route, params = found
        if route.startswith("/v2/repository/"):
            return await self._manage(scope, receive, headers, route, params)
        method = scope["method"]
        allowed = _METHOD[route]
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
            message = f"{route} takes {allowed}, not {method}"
            raise HttpError(405, message, headers={"allow": allowed})
        if _PROTECTED[route] and not self.auth.allows(headers.get(b"authorization")):
            raise HttpError(
                401,
                "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                headers={"www-authenticate": "Bearer"},
            )
        name, version = params.get("name"), params.get("version")
        if route.startswith("/v2/health/"):
            if route.endswith("live"):
                return Response(encode({"live": True}))
            ready = self.server.ready
            return Response(encode({"ready": ready}), 200 if ready else 503)
        if route == "/v2":
            return Response(encode(self._server_metadata()))
        if route == "/metrics":
            return Response(generate_latest(self.server.metrics.registry), 200, _PROMETHEUS)
        if route == "/openapi.json":
            return Response(self._openapi)
        if route == "/docs":
            return Response(_DOCS_PAGE, content_type=b"text/html; charset=utf-8")
        assert name is not None
        if route.startswith("/pipelines/"):
            self.server.pipeline(name)  # 404 before reading the body
            timeout = self.live_timeout(headers)
            body = await self._read_body(headers, receive)
            priority = self.request_priority(headers)
            client = _client(scope) if self.server.quota is not None else None
            if timeout is None:
                results = await self.server.score(name, body, priority=priority, client=client)
            else:
                async with asyncio.timeout(timeout):
                    results = await self.server.score(
                        name,
                        body,
                        deadline=time.time() + timeout,
                        priority=priority,
                        client=client,
                    )
            return Response(encode({"pipeline": name, "results": results}))
        served = self.server.get(name, version)
        if route.endswith("/ready"):
            ready = self.server.started and not self.server.draining and served.ready
            return Response(
                encode({"name": served.name, "version": served.version, "ready": ready}),
                200 if ready else 503,
            )
        if route.endswith("/infer"):
            # Admitted (or refused: 503/429, or 504 with its deadline spent) before the
            # body is read and decoded, so a refusal under overload costs as little as it can.
            timeout = self.live_timeout(headers)
            served = self._route(served, version, headers)
            priority = self.request_priority(headers)
            client = _client(scope) if self.server.quota is not None else None
            admission = self.server.admit(served, priority, client)
            try:
                body = await self._read_body(headers, receive)
                length = headers.get(HEADER_LENGTH.encode())
                header = None if length is None else length.decode("latin-1")
                if len(body) > OFFLOAD_BYTES:  # decoding it would hold the event loop up
                    request, inputs = await asyncio.to_thread(decode_infer, body, header, served)
                else:
                    request, inputs = decode_infer(body, header, served)
            except BaseException as exc:
                self.server.release(admission, exc)
                raise
            outputs, step = await self._infer(served, inputs, timeout, headers, scope, admission)
            if sum(a.nbytes for a in outputs.values()) > OFFLOAD_BYTES // 8:
                payload, header_length = await asyncio.to_thread(
                    encode_infer, request, served, outputs, step
                )
            else:
                payload, header_length = encode_infer(request, served, outputs, step)
            if header_length is None:
                return Response(payload)
            return Response(
                payload,
                content_type=b"application/octet-stream",
                headers=[(HEADER_LENGTH.encode(), str(header_length).encode())],
            )
        if route.endswith("/score"):
            timeout = self.live_timeout(headers)
            body = await self._read_body(headers, receive)
            served = self._route(served, version, headers, body)
            inputs = _decode_score(body, served)
            outputs, step = await self._infer(served, inputs, timeout, headers, scope)
            return Response(encode(_encode_score(served, outputs, step)))
        return Response(encode(served.metadata()))

    async def _manage(
        self,
        scope: Scope,
        receive: Receive,
        headers: dict[bytes, bytes],
        route: str,
        params: dict[str, str],
    ) -> Response:
        """A model-management route: 404 while management is off, else its own key."""
        management = self.management
        if management is None:
            raise HttpError(
                404,
                f"no route {scope['path']!r}: model management is off; start the server with "
                "--management-key (or RTINFER_MANAGEMENT_KEY) to turn it on",
            )
        if scope["method"] != _METHOD[route]:
            message = f"{route} takes {_METHOD[route]}, not {scope['method']}"
            raise HttpError(405, message, headers={"allow": _METHOD[route]})
        management.authorize(headers.get(b"authorization"))
        body = await self._read_body(headers, receive)
        status, answer = await management.handle(route, params, body)
        return Response(encode(answer), status)

    def _route(
        self,
        served: ServedModel,
        version: str | None,
        headers: dict[bytes, bytes],
        body: bytes | None = None,
    ) -> ServedModel:
        """Once the body is in, the version that answers a request naming none: the
        default now (it may have been promoted meanwhile), or a canary's candidate by the
        request's routing key (``X-Routing-Key``, or a plain-JSON body's ``key``)."""
        if version:
            return served
        key: bytes | str | None = headers.get(ROUTING_HEADER)
        if key is None and body is not None and served.name in self.server.canaries:
            key = _body_key(body)
        return self.server.route(served.name, key=key)

    def _server_metadata(self) -> dict[str, Any]:
        from .. import __version__

        return {
            "name": self.server_name,
            "version": __version__,
            "extensions": ["binary_tensor_data"],
        }

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        """The request body, refused with 413 as soon as it is known to pass the limit."""
        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HttpError(413, f"the body has {int(declared)} bytes; the limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, "the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"the body has more than {limit} bytes; the limit is {limit}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _infer(
        self,
        served: ServedModel,
        inputs: dict[str, Any],
        seconds: float | None,
        headers: dict[bytes, bytes],
        scope: Scope,
        admission: Admission | None = None,
    ) -> tuple[dict[str, Any], str | None]:
        """The outputs, and the fallback step that produced them (``None``: no chain);
        ``seconds``: the request's time (:meth:`live_timeout`)."""
        try:
            priority = self.request_priority(headers)
        except BaseException as exc:
            if admission is not None:
                self.server.release(admission, exc)
            raise
        client = _client(scope) if self.server.quota is not None else None
        # No timer of its own: the model's micro-batcher fails the request when its
        # deadline passes, queued or running (and a fallback chain moves on then).
        answer: Inference = await self.server.infer(
            served.name,
            inputs,
            version=served.version,
            deadline=None if seconds is None else time.time() + seconds,
            priority=priority,
            client=client,
            admission=admission,
        )
        return answer.outputs, answer.step

    def request_priority(self, headers: dict[bytes, bytes]) -> Priority | None:
        """The ``X-Priority`` header's traffic class (``None``: the model's default)."""
        raw = headers.get(PRIORITY_HEADER)
        if raw is None or not raw.strip():
            return None
        try:
            return parse_priority(raw)
        except ValueError as exc:
            raise HttpError(400, f"X-Priority: {exc}") from None

    def request_timeout(self, headers: dict[bytes, bytes]) -> float | None:
        """Seconds a request may take: its ``X-Request-Timeout-Ms`` header, else the default."""
        raw = headers.get(TIMEOUT_HEADER)
        if raw is None:
            return self.default_timeout_s
        try:
            ms = float(raw)
        except ValueError:
            ms = math.nan
        if not (math.isfinite(ms) and ms >= 0):
            raise HttpError(
                400, f"X-Request-Timeout-Ms must be a number of milliseconds, 0 or more; got "
                f"{raw.decode('latin-1')[:40]!r}",
            )  # fmt: skip
        return ms / 1e3

    def live_timeout(self, headers: dict[bytes, bytes]) -> float | None:
        """:meth:`request_timeout`, refusing at once (504) a request whose caller's time
        is already spent (``X-Request-Timeout-Ms: 0``): it waited in the caller's queue or
        a proxy's for all of it, and its body is then never read nor decoded. Under
        overload such requests are the backlog in front of the server; answering them
        at the cost of a refusal is what lets the fresh ones through."""
        timeout = self.request_timeout(headers)
        if timeout is not None and timeout <= 0:
            raise HttpError(
                504, "the request's deadline had passed when it arrived (X-Request-Timeout-Ms "
                "0); nothing was run",
            )  # fmt: skip
        return timeout


_PROMETHEUS = CONTENT_TYPE_LATEST.encode()

#: ``GET /docs``: Swagger UI (loaded by the browser from a CDN) on ``/openapi.json``.
_DOCS_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>rtinfer API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "openapi.json", dom_id: "#ui"});</script>
</body></html>
"""


def _management(
    server: ModelServer,
    manager: ModelManager | None,
    key: str | None,
    api_key: str | None,
) -> tuple[ModelManager | None, Management | None]:
    """The app's model manager, and its management routes when it has a key."""
    if key is None:
        return manager, None
    if key == api_key:
        raise ValueError("the management key must differ from the inference API key")
    manager = manager or ModelManager(server)
    return manager, Management(manager, key)


class _Keyed(msgspec.Struct):
    key: str | None = None


def _body_key(body: bytes) -> str | None:
    """A plain-JSON body's ``key`` field (a canary's routing key), if it has one."""
    try:
        return msgspec.json.decode(body, type=_Keyed).key
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None  # not an object with a string key: the decode says what is wrong


def _client(scope: Scope) -> str:
    """Who sent the request, for the per-client quota: the peer's address."""
    peer = scope.get("client")
    return str(peer[0]) if peer else "unknown"


def _decode_score(body: bytes, served: ServedModel) -> dict[str, Any]:
    """``{"instances": [...]}`` or one row (a bare list) as the model's named input arrays."""
    try:
        value = msgspec.json.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}") from None
    if isinstance(value, list):
        instances: Any = [value]
    elif isinstance(value, dict) and isinstance(value.get("instances"), list):
        instances = value["instances"]
    else:
        raise HttpError(400, 'send {"instances": [row, ...]} or one row as a JSON list of numbers')
    if not instances:
        raise HttpError(400, "instances is empty; send at least one row")
    specs = served.model.inputs
    if all(isinstance(i, dict) for i in instances):
        inputs = {}
        for spec in specs:
            try:
                column = [i[spec.name] for i in instances]
            except KeyError:
                raise HttpError(400, f"an instance has no value for input {spec.name!r}") from None
            inputs[spec.name] = to_array(column, spec.dtype, None, f"input {spec.name!r}")
        return inputs
    if len(specs) != 1:
        raise HttpError(
            400,
            f"model {served.name!r} has inputs {[s.name for s in specs]}; send each instance as "
            f"an object naming them",
        )
    spec = specs[0]
    return {spec.name: to_array(instances, spec.dtype, None, f"input {spec.name!r}")}


def _encode_score(
    served: ServedModel, outputs: dict[str, Any], step: str | None = None
) -> dict[str, Any]:
    """One prediction per instance: the output's row, or an object of rows by output name.

    ``rtinfer_step`` names the fallback step that answered, for a model with a chain.
    """
    if len(outputs) == 1:
        (array,) = outputs.values()
        predictions: list[Any] = array.tolist()
    else:
        columns = {name: array.tolist() for name, array in outputs.items()}
        rows = len(next(iter(columns.values()), []))
        predictions = [{name: col[i] for name, col in columns.items()} for i in range(rows)]
    answer = {
        "model_name": served.name,
        "model_version": served.version,
        "predictions": predictions,
    }
    if step is not None:
        answer["rtinfer_step"] = step
    return answer
