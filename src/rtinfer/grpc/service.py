"""The Open Inference Protocol's ``inference.GRPCInferenceService`` over a ModelServer.

Every call is answered from the shared :class:`~rtinfer.serving.ModelServer`, so
gRPC requests are batched with HTTP requests and stream pipelines on the same
model. Errors become status codes::

    cause                                  status
    -------------------------------------  ------------------
    missing or wrong API key               UNAUTHENTICATED
    unknown model or version               NOT_FOUND
    bad input name, datatype, shape, size  INVALID_ARGUMENT
    bad x-priority metadata                INVALID_ARGUMENT
    client over quota (QuotaExceeded)      RESOURCE_EXHAUSTED  (+ retry-after trailer)
    limiter, queue full, breaker open      UNAVAILABLE         (+ retry-after trailer)
    gRPC deadline passed before the run    DEADLINE_EXCEEDED
    model not ready, server draining       UNAVAILABLE

HTTP's 503 and 429 map as Google's API guidelines (AIP-193) map them: shed load is
``UNAVAILABLE``, which gRPC's retry policies and clients retry with backoff, perhaps on
another replica; a spent quota is the client's own ``RESOURCE_EXHAUSTED``.
    the model itself failed                INTERNAL

``ServerLive`` and ``ServerReady`` answer without a key (health probes carry none);
``ServerReady`` turns false as soon as the server starts draining. The metadata
``x-priority: critical|best_effort`` picks the call's traffic class; the quota counts
calls per peer address. For a model with a fallback chain the response's
``parameters["rtinfer_step"]`` names the step that answered.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc import aio

from .. import __version__
from ..exceptions import (
    Closed,
    DeadlineExceeded,
    ModelError,
    ModelInputError,
    Overloaded,
    QuotaExceeded,
)
from ..resilience import Priority, parse_priority
from ..serving import ModelNotFound, ModelServer, ServedModel
from . import inference_pb2 as pb
from .codec import decode_inputs, encode_outputs

__all__ = [
    "SERVICE_NAME",
    "InferenceServicer",
    "create_grpc_server",
    "generic_handler",
    "serve_grpc",
]

#: The fully qualified gRPC service name, as clients call it.
SERVICE_NAME = "inference.GRPCInferenceService"

logger = logging.getLogger(__name__)

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
Context = aio.ServicerContext[Any, Any]


class InferenceServicer:
    """Implements each RPC of ``inference.GRPCInferenceService`` over one ModelServer.

    The methods bear the protocol's names (``ServerLive``, ``ModelInfer``), as gRPC calls them.

    ``api_key``: when set, every RPC but ``ServerLive`` and ``ServerReady`` needs the
    metadata ``authorization: Bearer <api_key>``. ``default_timeout_s``: the deadline of
    an inference call whose client set none (``None``: none), as on the HTTP front.
    """

    __slots__ = ("_expected", "default_timeout_s", "server")

    def __init__(
        self,
        server: ModelServer,
        *,
        api_key: str | None = None,
        default_timeout_s: float | None = None,
    ) -> None:
        if api_key is not None and not api_key.strip():
            raise ValueError("the API key is empty; pass a non-empty key or none at all")
        self.server = server
        self.default_timeout_s = default_timeout_s
        self._expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def _authorize(self, context: Context) -> None:
        if self._expected is None:
            return
        given = b""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                break
        # compare_digest takes the same time whatever the first differing byte is.
        if not hmac.compare_digest(given, self._expected):
            what = "wrong" if given else "missing"
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"API key {what}; send the metadata 'authorization: Bearer <key>'",
            )

    async def _model(
        self, context: Context, name: str, version: str, *, route: bool = False
    ) -> ServedModel:
        try:
            if route:  # an inference: the default version, or a canary's share
                key = dict(context.invocation_metadata() or ()).get("x-routing-key")
                return self.server.route(name, version or None, key=key)
            return self.server.get(name, version or None)
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    async def _ready_model(
        self, context: Context, name: str, version: str, *, route: bool = False
    ) -> ServedModel:
        served = await self._model(context, name, version, route=route)
        if not served.ready:  # an unloaded model knows neither its version nor its tensors
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"model {served.name!r} is not loaded yet; retry"
            )
        return served

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        """The process answers: always live."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        """Every model is loaded, warmed up and taking requests."""
        return pb.ServerReadyResponse(ready=self.server.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        """The model (a version of it) takes requests; NOT_FOUND when it is not served."""
        await self._authorize(context)
        served = await self._model(context, request.name, request.version)
        ready = self.server.started and not self.server.draining and served.ready
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        """The server's name and version (no protocol extensions)."""
        await self._authorize(context)
        return pb.ServerMetadataResponse(name="rtinfer", version=__version__, extensions=[])

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        """The model's versions, platform and input and output tensors."""
        await self._authorize(context)
        served = await self._ready_model(context, request.name, request.version)
        meta = served.metadata()
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        """Check and decode the inputs, run them in a batch, answer as the request was sent."""
        await self._authorize(context)
        served = await self._ready_model(
            context, request.model_name, request.model_version, route=True
        )
        outputs_known = {spec.name for spec in served.model.outputs}
        requested = [output.name for output in request.outputs]
        unknown = [name for name in requested if name not in outputs_known]
        try:
            if unknown:
                raise ModelInputError(
                    f"model {served.name!r} has no output {unknown[0]!r}; "
                    f"its outputs are {sorted(outputs_known)}"
                )
            inputs = decode_inputs(served, request)
            priority = _priority(context)
        except ModelInputError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        client = _peer(context) if self.server.quota is not None else None
        remaining: float | None = context.time_remaining()
        if remaining is None:
            remaining = self.default_timeout_s
        deadline = None if remaining is None else time.time() + remaining
        try:
            # No timer here: the micro-batcher fails the call when its deadline passes,
            # queued or running (as an HTTP request's), and gRPC cancels the call when
            # its client's deadline passes.
            answer = await self.server.infer(
                served.name,
                inputs,
                version=served.version,
                deadline=deadline,
                priority=priority,
                client=client,
            )
        except Exception as exc:
            code, details, trailers = _status(exc)
            if code is grpc.StatusCode.INTERNAL:
                logger.exception("model %r failed on a gRPC request", served.name)
            await context.abort(code, details, trailers)
        response = pb.ModelInferResponse(
            model_name=served.name, model_version=served.version, id=request.id
        )
        raw = bool(request.raw_input_contents)
        encode_outputs(answer.outputs, requested, raw=raw, response=response)
        if answer.step is not None:
            response.parameters["rtinfer_step"].string_param = answer.step
        return response


def _priority(context: Context) -> Priority | None:
    """The call's ``x-priority`` metadata (``None``: the model's default)."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-priority":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            if not text.strip():
                return None
            try:
                return parse_priority(text)
            except ValueError as exc:
                raise ModelInputError(f"x-priority metadata: {exc}") from None
    return None


def _peer(context: Context) -> str:
    """The caller's address without its port (``ipv4:10.0.0.7:51234`` → ``ipv4:10.0.0.7``)."""
    peer = context.peer() or "unknown"
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() and host not in ("ipv4", "ipv6") else peer


def _status(exc: Exception) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status code, details and trailing metadata that answer ``exc``."""
    if isinstance(exc, ModelInputError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), ()
    if isinstance(exc, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc), ()
    if isinstance(exc, Overloaded):
        seconds = str(max(1, math.ceil(exc.retry_after)))
        code = (
            grpc.StatusCode.RESOURCE_EXHAUSTED
            if isinstance(exc, QuotaExceeded)
            else grpc.StatusCode.UNAVAILABLE
        )
        return code, str(exc), (("retry-after", seconds),)
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), ()
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the answer", ()
    if isinstance(exc, Closed):
        return grpc.StatusCode.UNAVAILABLE, f"{exc}; retry on another replica", ()
    if isinstance(exc, ModelError):
        return grpc.StatusCode.INTERNAL, str(exc), ()
    # Its text may hold anything the model saw (paths, credentials): logged, never sent.
    logger.error("the model failed on a gRPC request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "the model failed; the server's log has the details", ()


def _handler(
    behavior: Callable[[_Req, Context], Awaitable[_Resp]],
    request_type: type[_Req],
) -> grpc.RpcMethodHandler[_Req, _Resp]:
    deserialize: Callable[[bytes], _Req] = request_type.FromString  # type: ignore[attr-defined]

    def serialize(response: _Resp) -> bytes:
        data: bytes = response.SerializeToString()  # type: ignore[attr-defined]
        return data

    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=deserialize, response_serializer=serialize
    )


def generic_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The servicer's methods as one handler to add to a ``grpc.aio.Server``."""
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "ServerLive": _handler(servicer.ServerLive, pb.ServerLiveRequest),
            "ServerReady": _handler(servicer.ServerReady, pb.ServerReadyRequest),
            "ModelReady": _handler(servicer.ModelReady, pb.ModelReadyRequest),
            "ServerMetadata": _handler(servicer.ServerMetadata, pb.ServerMetadataRequest),
            "ModelMetadata": _handler(servicer.ModelMetadata, pb.ModelMetadataRequest),
            "ModelInfer": _handler(servicer.ModelInfer, pb.ModelInferRequest),
        },
    )


def create_grpc_server(
    server: ModelServer,
    api_key: str | None = None,
    *,
    max_message_bytes: int = 64 * 1024 * 1024,
    reuse_port: bool = False,
    default_timeout_s: float | None = None,
) -> aio.Server:
    """A ``grpc.aio`` server answering ``inference.GRPCInferenceService``, not bound nor started.

    Bind it with ``add_insecure_port`` (or ``add_secure_port`` for TLS), which returns
    the port (useful with port 0), then ``await start()``. ``max_message_bytes`` bounds
    requests and responses (gRPC's default is 4 MiB). ``SO_REUSEPORT`` is off unless
    ``reuse_port`` (server worker processes sharing one port), so a second server on a
    port in use fails to bind instead of silently sharing its traffic.
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    grpc_server = aio.server(options=options)
    grpc_server.add_generic_rpc_handlers(
        [
            generic_handler(
                InferenceServicer(server, api_key=api_key, default_timeout_s=default_timeout_s)
            )
        ]
    )
    return grpc_server


async def serve_grpc(
    server: ModelServer,
    host: str = "127.0.0.1",
    port: int = 8001,
    api_key: str | None = None,
    *,
    max_message_bytes: int = 64 * 1024 * 1024,
    reuse_port: bool = False,
    default_timeout_s: float | None = None,
) -> aio.Server:
    """Start a ``grpc.aio`` server answering ``inference.GRPCInferenceService`` on host:port.

    The ModelServer is started (and closed) by the caller; ``ServerReady`` answers
    false until it is ready. Stop with ``await grpc_server.stop(grace)``. See
    :func:`create_grpc_server` for ``max_message_bytes`` and for TLS or port 0.
    """
    grpc_server = create_grpc_server(
        server,
        api_key,
        max_message_bytes=max_message_bytes,
        reuse_port=reuse_port,
        default_timeout_s=default_timeout_s,
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    grpc_server.add_insecure_port(address)
    await grpc_server.start()
    return grpc_server
