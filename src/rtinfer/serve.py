"""``rtinfer serve``: build a ModelServer from a model file or repository and run it over HTTP.

A TARGET is one model file (``.onnx``, a LightGBM ``.txt``, or a
``.pkl``/``.joblib`` pickle with ``allow_pickle``; see
:func:`rtinfer.models.load_model`), served under its file name; a pipeline file
(``.yaml``/``.yml``), whose stages answer ``POST /pipelines/<name>/score`` with the
pipeline's results and whose model is served as well (with ``stream``, the
pipeline's own source → sinks run beside, sharing the model's batcher); or a model
repository::

    REPO/<model>/config.yaml           optional: batching and thread settings
    REPO/<model>/<version>/model.onnx  one folder per version; the highest answers by default

``config.yaml`` may set ``max_batch_size``, ``max_delay_ms``, ``max_in_flight``,
``max_queue_rows`` and ``intra_op_threads``.

:func:`run_server` runs the :class:`~rtinfer.http.InferenceApp` under uvicorn
(uvloop and httptools where installed), in ``workers`` processes sharing the
port, each loading the models once. The settings reach the workers through
``RTINFER_SERVE_*`` environment variables (and ``RTINFER_API_KEY``), read by
:func:`app_from_env`, the factory uvicorn calls. On exit (SIGINT or SIGTERM:
uvicorn finishes the requests in flight, then the models drain their queues)
every worker leaves a snapshot of its request metrics, and the summary of all
of them is returned and written to ``summary_json``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .batching import MicroBatcher
from .exceptions import ConfigError, MissingDependency
from .http.app import DEFAULT_MAX_BODY_BYTES, InferenceApp, Stopper
from .http.stats import summarize
from .models import load_model
from .serving import ModelServer
from .types import Model

__all__ = [
    "add_serve_arguments",
    "app_from_env",
    "build_server",
    "run_server",
    "serve_command",
]

_ENV_TARGET = "RTINFER_SERVE_TARGET"
_ENV_MAX_BODY = "RTINFER_SERVE_MAX_BODY_BYTES"
_ENV_TIMEOUT = "RTINFER_SERVE_TIMEOUT_S"
_ENV_PICKLE = "RTINFER_SERVE_ALLOW_PICKLE"
_ENV_SNAPSHOTS = "RTINFER_SERVE_SNAPSHOTS"
_ENV_GRPC = "RTINFER_SERVE_GRPC"  # host:port of the gRPC front, when there is one
_ENV_STREAM = "RTINFER_SERVE_STREAM"  # "1": a pipeline TARGET also runs its stream
_ENV_API_KEY = "RTINFER_API_KEY"

_MODEL_FILES = ("model.onnx", "model.txt")
_CONFIG_KEYS = {"max_batch_size", "max_delay_ms", "max_in_flight", "max_queue_rows"}
_ONNX_KEYS = {"intra_op_threads"}


def build_server(
    target: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    stream: bool = False,
    **batching: Any,
) -> ModelServer:
    """A ModelServer (not started) for a model file, a pipeline file or a model repository.

    Requests never wait for company by default (``max_delay=0``): batches form while the
    model is busy, so a lone request is answered at once and a crowd is batched. A
    model's ``config.yaml`` (``max_delay_ms``) or ``batching`` here can set a delay; a
    pipeline's batching is its own ``model.batching``.
    """
    path = Path(target)
    server = ModelServer(batching={"max_delay": 0.0, **batching})
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from .build import load_pipeline
        from .scoring import PipelineScorer

        pipeline = load_pipeline(path, metrics=server.metrics)
        server.add_pipeline(PipelineScorer(pipeline, stream=stream))
    elif path.is_dir():
        _add_repository(server, path)
    elif path.is_file():
        server.add(load_model(path, allow_pickle=allow_pickle))
    else:
        raise ConfigError(f"{str(path)!r} is neither a model file nor a model repository folder")
    if not server.all():
        raise ConfigError(
            f"model repository {str(path)!r} holds no model; lay it out as "
            f"<model>/<version>/model.onnx"
        )
    return server


def _version_key(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _add_repository(server: ModelServer, repo: Path) -> None:
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config = _read_config(folder / "config.yaml")
        batching = {k: v for k, v in config.items() if k in _CONFIG_KEYS}
        if "max_delay_ms" in batching:
            batching["max_delay"] = batching.pop("max_delay_ms") / 1e3
        onnx = {k: v for k, v in config.items() if k in _ONNX_KEYS}
        versions = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if not versions:
            raise ConfigError(
                f"model folder {str(folder)!r} has no version folder; put the model in "
                f"{folder.name}/1/model.onnx"
            )
        for version in sorted(versions, key=lambda p: _version_key(p.name)):
            files = [version / f for f in _MODEL_FILES if (version / f).is_file()]
            if not files:
                raise ConfigError(
                    f"version folder {str(version)!r} has no model file; expected one of "
                    f"{', '.join(_MODEL_FILES)}"
                )
            model = load_model(files[0], name=folder.name, version=version.name, **onnx)
            server.add(model, batcher=_batcher(server, model, batching) if batching else None)


def _batcher(server: ModelServer, model: Model, batching: dict[str, Any]) -> MicroBatcher:
    return MicroBatcher(model, metrics=server.metrics, **{**server.batching, **batching})


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", file=str(path)) from None
    if not isinstance(config, dict):
        raise ConfigError("must be a mapping of settings", file=str(path))
    for key, value in config.items():
        if key not in _CONFIG_KEYS | _ONNX_KEYS:
            known = ", ".join(sorted(_CONFIG_KEYS | _ONNX_KEYS))
            raise ConfigError(f"unknown setting; use one of {known}", file=str(path), key=key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(
                f"must be a number, 0 or more; got {value!r}", file=str(path), key=key
            )
        if key != "max_delay_ms" and not isinstance(value, int):
            raise ConfigError(f"must be a whole number; got {value!r}", file=str(path), key=key)
    return dict(config)


def app_from_env() -> InferenceApp:
    """The app of one worker process, from the ``RTINFER_SERVE_*`` environment (uvicorn factory)."""
    target = os.environ.get(_ENV_TARGET)
    if not target:
        raise ConfigError(f"{_ENV_TARGET} is not set; start the server with rtinfer serve")
    server = build_server(
        target,
        allow_pickle=os.environ.get(_ENV_PICKLE) == "1",
        stream=os.environ.get(_ENV_STREAM) == "1",
    )
    timeout = os.environ.get(_ENV_TIMEOUT, "30")
    snapshots = os.environ.get(_ENV_SNAPSHOTS)

    def write_snapshot(app: InferenceApp) -> None:
        if snapshots:
            Path(snapshots, f"{os.getpid()}.json").write_text(json.dumps(app.stats.snapshot()))

    api_key = os.environ.get(_ENV_API_KEY) or None
    grpc_address = os.environ.get(_ENV_GRPC)

    async def start_grpc(app: InferenceApp) -> Stopper | None:
        """The gRPC front on the same models (workers share its port: SO_REUSEPORT)."""
        if not grpc_address:
            return None
        from .grpc.service import serve_grpc

        host, _, port = grpc_address.rpartition(":")
        grpc_server = await serve_grpc(
            app.server,
            host,
            int(port),
            api_key,
            reuse_port=True,
            default_timeout_s=app.default_timeout_s,
        )

        async def stop() -> None:
            await grpc_server.stop(grace=5.0)

        return stop

    return InferenceApp(
        server,
        api_key=api_key,
        max_body_bytes=int(os.environ.get(_ENV_MAX_BODY, str(DEFAULT_MAX_BODY_BYTES))),
        default_timeout_s=float(timeout) if timeout else None,
        on_started=start_grpc,
        on_shutdown=write_snapshot,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(
    target: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    insecure: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    summary_json: str | os.PathLike[str] | None = None,
    workers: int = 1,
    timeout_s: float | None = 30.0,
    allow_pickle: bool = False,
    log_level: str = "info",
    grpc_port: int | None = None,
    stream: bool = False,
) -> dict[str, Any]:
    """Serve ``target`` over HTTP until SIGINT/SIGTERM; return (and write) the run summary.

    Binding anything but a loopback address needs an API key (``api_key`` or
    ``RTINFER_API_KEY``) unless ``insecure``.
    """
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingDependency("rtinfer serve", "serve") from exc
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    api_key = api_key or os.environ.get(_ENV_API_KEY) or None
    if not _is_loopback(host) and api_key is None and not insecure:
        raise ConfigError(
            f"binding {host} exposes the models beyond this machine; set an API key "
            f"(--api-key or {_ENV_API_KEY}) or pass --insecure"
        )
    build_server(target, allow_pickle=allow_pickle)  # fail here, not in every worker
    with tempfile.TemporaryDirectory(prefix="rtinfer-serve-") as snapshots:
        os.environ.update(
            {
                _ENV_TARGET: str(Path(target).resolve()),
                _ENV_MAX_BODY: str(max_body_bytes),
                _ENV_TIMEOUT: "" if timeout_s is None else str(timeout_s),
                _ENV_PICKLE: "1" if allow_pickle else "0",
                _ENV_STREAM: "1" if stream else "0",
                _ENV_SNAPSHOTS: snapshots,
                _ENV_GRPC: "" if grpc_port is None else f"{host}:{grpc_port}",
            }
        )
        if api_key is not None:
            os.environ[_ENV_API_KEY] = api_key
        uvicorn.run(
            "rtinfer.serve:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            lifespan="on",
            access_log=False,
            log_level=log_level,
            server_header=False,
            ws_max_size=max_body_bytes,  # WebSocket frames are bounded like bodies
        )
        summary = summarize(
            json.loads(p.read_text()) for p in sorted(Path(snapshots).glob("*.json"))
        )
    summary["workers"] = workers
    if summary_json is not None:
        out = Path(summary_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``rtinfer serve`` options, for the CLI's sub-parser."""
    parser.add_argument(
        "target", type=Path, help="a model file, a pipeline .yaml, or a model repository folder"
    )
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine)")
    parser.add_argument("--port", type=int, default=8000, help="default 8000")
    parser.add_argument(
        "--grpc-port",
        type=int,
        help="also serve the Open Inference Protocol over gRPC on this port (rtinfer[grpc])",
    )
    parser.add_argument(
        "--api-key", help=f"require 'Authorization: Bearer KEY' (or set {_ENV_API_KEY})"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback host with no API key"
    )
    parser.add_argument(
        "--max-body-bytes", type=_size, default=DEFAULT_MAX_BODY_BYTES, help="default 16MiB"
    )
    parser.add_argument(
        "--timeout-ms",
        type=float,
        default=30_000.0,
        help="deadline of requests that send no X-Request-Timeout-Ms (0: none); default 30000",
    )
    parser.add_argument("--workers", type=int, default=1, help="server processes; default 1")
    parser.add_argument("--summary-json", type=Path, help="write the run's summary here")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="load a local .pkl/.joblib model file"
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="with a pipeline TARGET, also run its source → sinks (sharing the model)",
    )


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B?|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 16MiB or 1000000, got {text!r}")
    unit = (match.group(2) or "B").upper().rstrip("B").rstrip("I")
    value = int(match.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit]
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1 byte")
    return value


def serve_command(args: argparse.Namespace) -> int:
    """Run ``rtinfer serve`` from parsed arguments; print the summary; return the exit status."""
    summary = run_server(
        args.target,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        insecure=args.insecure,
        max_body_bytes=args.max_body_bytes,
        summary_json=args.summary_json,
        workers=args.workers,
        timeout_s=args.timeout_ms / 1e3 if args.timeout_ms > 0 else None,
        allow_pickle=args.allow_pickle,
        grpc_port=args.grpc_port,
        stream=args.stream,
    )
    print(json.dumps(summary, indent=2))
    return 0
