"""The gRPC front: the Open Inference Protocol's ``inference.GRPCInferenceService``.

Needs the ``grpc`` extra (``pip install 'rtinfer[grpc]'``). ``inference_pb2`` and
``inference_pb2_grpc`` are generated from ``inference.proto`` (see its header).
"""

from __future__ import annotations

from ..exceptions import MissingDependency

try:
    from .service import (
        SERVICE_NAME,
        InferenceServicer,
        create_grpc_server,
        generic_handler,
        serve_grpc,
    )
except ImportError as exc:  # grpcio or protobuf is not installed
    if exc.name not in {"grpc", "google", "google.protobuf"}:
        raise
    raise MissingDependency("the gRPC front (rtinfer.grpc)", "grpc") from exc

__all__ = [
    "SERVICE_NAME",
    "InferenceServicer",
    "create_grpc_server",
    "generic_handler",
    "serve_grpc",
]
