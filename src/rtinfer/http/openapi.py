"""The OpenAPI 3.1 document of the HTTP front, served at ``GET /openapi.json``.

Built from the same route table the app dispatches on
(:data:`rtinfer.http.app.ROUTES` is checked against it by a test), with the
request and response schemas of the Open Inference Protocol and every error
status each route can answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

__all__ = ["openapi_spec"]

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Malformed body, or inputs that do not match the model (name, shape, datatype, "
        "values that do not fit, NaN or infinity).",
        401: "Missing or wrong API key (only when the server has one).",
        404: "Unknown model or version.",
        413: "The body is larger than the server's --max-body-bytes.",
        429: "This client is over its quota (--quota); retry after Retry-After seconds.",
        503: "The model is at its concurrency limit or its queue is full (retry after "
        "Retry-After seconds), its circuit breaker is open, or the server is not ready or "
        "draining before it stops.",
        504: "The request's deadline (X-Request-Timeout-Ms or the server's default) passed.",
    }
    out: dict[str, Any] = {}
    for code in codes:
        response = _json(_ERROR, text[code])
        if code in (429, 503):
            response["headers"] = {
                "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
            }
        out[str(code)] = response
    return out


_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
_TIMEOUT = {
    "name": "X-Request-Timeout-Ms",
    "in": "header",
    "required": False,
    "description": "Answer within this many milliseconds or get 504 (0: the caller's time "
    "is spent, 504 at once without reading the body).",
    "schema": {"type": "number", "minimum": 0},
}
_PRIORITY = {
    "name": "X-Priority",
    "in": "header",
    "required": False,
    "description": "The request's traffic class: critical (the default unless the server "
    "or model says otherwise) or best_effort, shed first under load.",
    "schema": {"type": "string", "enum": ["critical", "best_effort"]},
}
_HEADER_LENGTH = {
    "name": "Inference-Header-Content-Length",
    "in": "header",
    "required": False,
    "description": "Binary tensor data extension: the JSON header's length in bytes; "
    "the raw tensors follow it.",
    "schema": {"type": "integer", "minimum": 0},
}

_TENSOR_DATA = {
    "description": "Row-major values, flat or nested.",
    "type": "array",
    "items": {},
}
_DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "Parameters": {"type": "object", "additionalProperties": True},
    "RequestInput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {
                "type": "string",
                "enum": _DATATYPES,
            },
            "data": _TENSOR_DATA,
            "parameters": {
                "type": "object",
                "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                "additionalProperties": True,
            },
        },
    },
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "parameters": {
                "type": "object",
                "properties": {"binary_data": {"type": "boolean"}},
                "additionalProperties": True,
            },
        },
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestInput"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestOutput"}},
            "parameters": {
                "type": "object",
                "properties": {"binary_data_output": {"type": "boolean"}},
                "additionalProperties": True,
            },
        },
    },
    "ResponseOutput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "data": _TENSOR_DATA,
            "parameters": {"$ref": "#/components/schemas/Parameters"},
        },
    },
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/ResponseOutput"}},
            "parameters": {
                "type": "object",
                "description": "rtinfer_step: the fallback step that answered (model, "
                "model:<name>, rules, default), when the model has a fallback chain.",
                "properties": {"rtinfer_step": {"type": "string"}},
            },
        },
    },
    "TensorMetadata": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
        },
    },
    "ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Ready": {
        "type": "object",
        "required": ["ready"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "ready": {"type": "boolean"},
        },
    },
    "ScoreRequest": {
        "oneOf": [
            {
                "type": "object",
                "required": ["instances"],
                "properties": {"instances": {"type": "array", "minItems": 1}},
            },
            {"type": "array", "description": "One row (one instance)."},
        ]
    },
    "ScoreResponse": {
        "type": "object",
        "required": ["model_name", "model_version", "predictions"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "predictions": {"type": "array"},
            "rtinfer_step": {
                "type": "string",
                "description": "The fallback step that answered, when the model has a chain.",
            },
        },
    },
}


def _pipeline_path(
    name: str, schema: Any, secured: dict[str, Any], schemas: dict[str, Any]
) -> dict[str, Any]:
    """The score route of one pipeline; its event schema joins ``schemas``."""
    if isinstance(schema, type) and issubclass(schema, msgspec.Struct):
        (event,), components = msgspec.json.schema_components(
            [schema], ref_template="#/components/schemas/{name}"
        )
        schemas.update(components)
    else:
        event = {"type": "object"}
    body = {"oneOf": [event, {"type": "object", "required": ["instances"], "properties": {
        "instances": {"type": "array", "minItems": 1, "items": event}}}]}  # fmt: skip
    results = {
        "type": "object",
        "required": ["pipeline", "results"],
        "properties": {
            "pipeline": {"type": "string"},
            "results": {"type": "array", "items": {"type": "object"}},
        },
    }
    return {
        "post": {
            "summary": f"Pipeline {name!r}: one event, or instances, in; one result each out.",
            **secured,
            "parameters": [_TIMEOUT, _PRIORITY],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {
                "200": _json(results, "One result per event, in order."),
                **_errors(400, 401, 404, 413, 429, 503, 504),
            },
        }
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _model_paths(suffix: str, op: dict[str, Any], method: str) -> dict[str, Any]:
    plain = {method: {**op, "parameters": [_NAME, *op.get("parameters", [])]}}
    versioned = {method: {**op, "parameters": [_NAME, _VERSION, *op.get("parameters", [])]}}
    return {
        f"/v2/models/{{name}}{suffix}": plain,
        f"/v2/models/{{name}}/versions/{{version}}{suffix}": versioned,
    }


def _management_paths() -> dict[str, Any]:
    """The model-management routes (documented only when the server has them on)."""
    secured: dict[str, Any] = {"security": [{"management": []}]}
    entry = {
        "type": "object",
        "required": ["name", "version", "state", "reason"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "state": {"type": "string", "enum": ["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]},
            "reason": {"type": "string"},
            "default": {"type": "boolean"},
            "canary_percent": {"type": "number"},
            "shadow": {"type": "object", "additionalProperties": True},
        },
    }
    model = {
        "type": "object",
        "required": ["name", "versions"],
        "properties": {"name": {"type": "string"}, "versions": {"type": "array", "items": entry}},
    }
    text = {
        401: "Missing or wrong management key (the inference API key does not open it).",
        404: "Unknown model or version.",
        409: "Not in the current state (unloading the default without force, promoting a "
        "version that is not loaded, ...).",
        422: "The repository's files could not be loaded.",
    }
    fields: dict[str, dict[str, Any]] = {
        "load": {"version": {"type": "string"}, "promote": {"type": "boolean"}},
        "unload": {"version": {"type": "string"}, "force": {"type": "boolean"}},
        "promote": {"version": {"type": "string"}, "keep_previous": {"type": "boolean"}},
        "canary": {
            "version": {"type": ["string", "null"]},
            "percent": {"type": "number", "minimum": 0, "exclusiveMaximum": 100},
        },
        "shadow": {"version": {"type": ["string", "null"]}, "tolerance": {"type": "number"}},
    }
    summaries = {
        "load": "Load and warm up a version beside those served.",
        "unload": "Take a version out of routing; it drains, then closes.",
        "promote": "Make a loaded version the default, at once.",
        "canary": "Send a share of the requests naming no version to a loaded version.",
        "shadow": "Give a loaded version a copy of the default's requests; compare answers.",
    }

    def op(summary: str, body: dict[str, Any], ok: dict[str, Any], *codes: int) -> dict[str, Any]:
        errors = {str(c): _json(_ERROR, text[c]) for c in codes}
        named = 404 in codes  # the per-model routes
        return {
            "post": {
                "summary": summary,
                **secured,
                **({"parameters": [_NAME]} if named else {}),
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": body}},
                },
                "responses": {"200": ok, **errors, **_errors(400)},
            }
        }

    paths = {
        "/v2/repository/index": op(
            "Every version: served, loading, unloading, or only in the repository.",
            {"type": "object", "properties": {"ready": {"type": "boolean"}}},
            _json({"type": "array", "items": entry}, "The versions."),
            401,
        )
    }
    for action, properties in fields.items():
        body = {"type": "object", "properties": properties, "additionalProperties": False}
        if action == "promote":
            body["required"] = ["version"]
        paths[f"/v2/repository/models/{{name}}/{action}"] = op(
            summaries[action], body, _json(model, "The model's versions now."), 401, 404, 409, 422
        )
    return paths


def openapi_spec(
    *, auth: bool, pipelines: Mapping[str, Any] | None = None, management: bool = False
) -> dict[str, Any]:
    """The OpenAPI document; ``auth`` adds the bearer scheme to the routes that need it.

    ``pipelines`` maps each served pipeline's name to its events' schema (a
    ``msgspec.Struct`` type, or ``None`` for any JSON object): each gets its
    ``/pipelines/<name>/score`` route, its request body described by that schema.
    ``management``: the model-management routes are on (they need their own key).
    """
    secured: dict[str, Any] = {"security": [{"bearer": []}]} if auth else {}
    infer_body = {
        "required": True,
        "content": {
            "application/json": {"schema": _ref("InferenceRequest")},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "Binary tensor data extension: JSON header, then raw tensors.",
            },
        },
    }
    infer_ok = {
        "description": "The outputs (binary ones after the JSON header when asked for).",
        "content": {
            "application/json": {"schema": _ref("InferenceResponse")},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
        "headers": {"Inference-Header-Content-Length": {"schema": {"type": "integer"}}},
    }
    paths: dict[str, Any] = {
        "/v2/health/live": {
            "get": {
                "summary": "The server process is up.",
                "responses": {"200": _json({"type": "object"}, "Live.")},
            }
        },
        "/v2/health/ready": {
            "get": {
                "summary": "Every model is loaded and warmed up.",
                "responses": {
                    "200": _json(_ref("Ready"), "Ready."),
                    "503": _json(_ref("Ready"), "Not ready yet, or shutting down."),
                },
            }
        },
        "/v2": {
            "get": {
                "summary": "Server metadata.",
                **secured,
                "responses": {
                    "200": _json(_ref("ServerMetadata"), "Server metadata."),
                    **_errors(401),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics.",
                **secured,
                "responses": {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(401),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document.",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
            }
        },
        "/docs": {
            "get": {
                "summary": "This document in Swagger UI (the page loads it from a CDN).",
                "responses": {
                    "200": {
                        "description": "An HTML page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    paths.update(
        _model_paths(
            "",
            {
                "summary": "Model metadata: inputs and outputs with datatypes and shapes.",
                **secured,
                "responses": {
                    "200": _json(_ref("ModelMetadata"), "Model metadata."),
                    **_errors(401, 404),
                },
            },
            "get",
        )
    )
    paths.update(
        _model_paths(
            "/ready",
            {
                "summary": "The model is loaded and warmed up.",
                **secured,
                "responses": {
                    "200": _json(_ref("Ready"), "Ready."),
                    "503": _json(_ref("Ready"), "Not ready."),
                    **_errors(401, 404),
                },
            },
            "get",
        )
    )
    paths.update(
        _model_paths(
            "/infer",
            {
                "summary": "Open Inference Protocol inference (JSON or binary tensors).",
                **secured,
                "parameters": [_TIMEOUT, _PRIORITY, _HEADER_LENGTH],
                "requestBody": infer_body,
                "responses": {"200": infer_ok, **_errors(400, 401, 404, 413, 429, 503, 504)},
            },
            "post",
        )
    )
    score: dict[str, Any] = {
        "summary": "Plain JSON: one prediction per instance (row).",
        **secured,
        "parameters": [_TIMEOUT, _PRIORITY],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("ScoreRequest")}},
        },
        "responses": {
            "200": _json(_ref("ScoreResponse"), "Predictions."),
            **_errors(400, 401, 404, 413, 429, 503, 504),
        },
    }
    paths["/models/{name}/score"] = {"post": {**score, "parameters": [_NAME, _TIMEOUT, _PRIORITY]}}
    paths["/models/{name}/versions/{version}/score"] = {
        "post": {**score, "parameters": [_NAME, _VERSION, _TIMEOUT, _PRIORITY]}
    }
    schemas = dict(_SCHEMAS)
    for name, schema in (pipelines or {}).items():
        paths[f"/pipelines/{name}/score"] = _pipeline_path(name, schema, secured, schemas)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "rtinfer",
            "version": "2",
            "description": (
                "Open Inference Protocol (KServe V2) REST, and plain JSON scoring. Streaming "
                "inference (not described here: OpenAPI cannot describe WebSockets): "
                "WebSocket /v2/models/{name}[/versions/{version}]/infer/stream takes one "
                "JSON inference request with an id per text frame and answers each with its "
                "id as it completes; see docs/serving.md."
            ),
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    if management:
        paths.update(_management_paths())
        schemes = document["components"].setdefault("securitySchemes", {})
        schemes["management"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "The management key (rtinfer serve --management-key), not the API key.",
        }
    return document
