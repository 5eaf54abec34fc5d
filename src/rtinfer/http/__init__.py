"""The HTTP front: Open Inference Protocol (KServe V2) REST over a ModelServer.

:class:`InferenceApp` is a plain ASGI application; :mod:`rtinfer.serve` builds
the server from a model file or repository and runs it under uvicorn.
"""

from __future__ import annotations

from .app import DEFAULT_MAX_BODY_BYTES, ROUTES, InferenceApp
from .errors import HttpError

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ROUTES", "HttpError", "InferenceApp"]
