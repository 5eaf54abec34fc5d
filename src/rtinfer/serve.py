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
``max_queue_rows`` and ``intra_op_threads``, and the model's protections (see
:class:`~rtinfer.serving.ModelPolicy`): ``priority``, ``max_concurrency``, ``breaker``,
``cache``, ``deterministic`` and ``fallback`` (``model``, ``rules``, ``default``).

:func:`run_server` runs the :class:`~rtinfer.http.InferenceApp` under rtinfer's own
HTTP/1.1 and WebSocket server (:mod:`rtinfer.http.server`, the default: about a
fifth less work per request) or uvicorn (``http_server="uvicorn"``), in
``workers`` processes sharing the port, each loading the models once. The settings
reach the workers through ``RTINFER_SERVE_*`` environment variables (and
``RTINFER_API_KEY``), read by :func:`app_from_env`, the factory each worker calls. On
exit (SIGINT or SIGTERM: the server finishes the requests in flight, then the models
drain their queues) every worker leaves a snapshot of its request metrics, and the
summary of all of them is returned and written to ``summary_json``. With
``model_process`` (``--model-process``), a model file's, a repository's or a pipeline's
models are loaded once, in a process of their own that every worker calls
(:mod:`rtinfer.models.host`).

SIGTERM drains first: readiness turns false at once, new requests are refused (503
with ``Retry-After``, gRPC ``UNAVAILABLE``), the requests in flight finish (at most
``drain_s`` seconds), and only then does the server stop accepting and exit. SIGINT
(and a second SIGTERM) stops at once, still finishing the requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import math
import os
import re
import signal
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import yaml

from .batching import MicroBatcher
from .exceptions import ConfigError, MissingDependency
from .http.app import DEFAULT_MAX_BODY_BYTES, InferenceApp, Stopper
from .http.control import ControlHub, ControlMember
from .http.stats import summarize
from .loop import LOOP_SCHEDULES, freeze_heap, schedule_loop
from .models import load_model
from .models.host import HostProcess, hosted_loader
from .resilience import ClientQuota, MemoryStore, PredictionCache, Priority, RedisStore
from .resilience import parse_priority as _parse_priority
from .serving import ModelPolicy, ModelServer
from .types import Loader, Model

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
_ENV_POLICY = "RTINFER_SERVE_POLICY"  # JSON: the protections' server-wide settings
_ENV_WATCH = "RTINFER_SERVE_WATCH"  # seconds between polls of a repository TARGET
_ENV_LOOP_SCHED = "RTINFER_SERVE_LOOP_SCHED"  # batch or normal: the event loop's scheduling
_ENV_MODEL_HOST = "RTINFER_SERVE_MODEL_HOST"  # the model host's socket, with --model-process
_ENV_MODEL_HOST_KEY = "RTINFER_SERVE_MODEL_HOST_KEY"  # its key, in hex
_ENV_CONTROL = "RTINFER_SERVE_CONTROL"  # the management hub's socket, with --workers N
_ENV_CONTROL_KEY = "RTINFER_SERVE_CONTROL_KEY"  # its key, in hex

log = logging.getLogger("rtinfer.serve")

DEFAULT_DRAIN_S = 10.0

_MODEL_FILES = ("model.onnx", "model.txt")
_CONFIG_KEYS = {"max_batch_size", "max_delay_ms", "max_in_flight", "max_queue_rows"}
_ONNX_KEYS = {"intra_op_threads"}
_POLICY_KEYS = {"priority", "max_concurrency", "breaker", "cache", "deterministic", "fallback"}
_REPOSITORY_KEYS = {"auto_promote"}  # checked by rtinfer.repository
_ALL_KEYS = _CONFIG_KEYS | _ONNX_KEYS | _POLICY_KEYS | _REPOSITORY_KEYS
_FALLBACK_KEYS = {"model", "rules", "default"}
_BREAKER_KEYS = {"consecutive_failures", "open_s", "open_seconds"}  # the last two: one


def build_server(
    target: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    stream: bool = False,
    max_concurrency: int = 1000,
    latency_target_s: float | None = None,
    default_priority: Priority | str = Priority.CRITICAL,
    quota: str | None = None,
    cache_size: int = 0,
    cache_ttl_s: float = 60.0,
    cache_redis: str | None = None,
    load: Loader = load_model,
    **batching: Any,
) -> ModelServer:
    """A ModelServer (not started) for a model file, a pipeline file or a model repository.

    Requests never wait for company by default (``max_delay=0``): batches form while the
    model is busy, so a lone request is answered at once and a crowd is batched. A
    model's ``config.yaml`` (``max_delay_ms``) or ``batching`` here can set a delay; a
    pipeline's batching is its own ``model.batching``.

    The server-wide protections (``rtinfer serve`` options of the same names):
    ``max_concurrency``, the ceiling of each model's adaptive limiter (0: none), which never
    shrinks for calls faster than ``latency_target_s`` (``rtinfer serve``: a third of
    ``--slo-ms``); ``default_priority`` of requests that send none; ``quota``
    ``"RATE[/BURST]"`` calls per second per client (429 past it); a prediction cache of
    ``cache_size`` rows in memory, or in Redis at ``cache_redis``, each kept ``cache_ttl_s``
    seconds.

    ``load``: how each model file is built (:func:`~rtinfer.models.load_model`'s
    signature; ``rtinfer serve --model-process`` passes each worker a
    :func:`~rtinfer.models.host.hosted_loader`, whose models run in the model process).
    """
    path = Path(target)
    server = ModelServer(
        batching={"max_delay": 0.0, **batching},
        max_concurrency=max_concurrency,
        latency_target=latency_target_s,
        default_priority=(
            default_priority
            if isinstance(default_priority, Priority)
            else _parse_priority(default_priority)
        ),
    )
    if quota is not None:
        rate, burst = parse_quota(quota)
        server.quota = ClientQuota(rate, burst=burst, metrics=server.metrics)
    if cache_redis:
        server.cache = PredictionCache(
            RedisStore(cache_redis, ttl_seconds=cache_ttl_s), metrics=server.metrics
        )
    elif cache_size > 0:
        server.cache = PredictionCache(
            MemoryStore(max_entries=cache_size, ttl_seconds=cache_ttl_s), metrics=server.metrics
        )
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from .build import load_pipeline
        from .scoring import PipelineScorer

        pipeline = load_pipeline(path, metrics=server.metrics, load=load)
        server.add_pipeline(PipelineScorer(pipeline, stream=stream))
    elif path.is_dir():
        _add_repository(server, path, load)
    elif path.is_file():
        server.add(load(path, allow_pickle=allow_pickle))
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


def _add_repository(server: ModelServer, repo: Path, load: Loader) -> None:
    folders = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = {folder.name for folder in folders}
    for folder in folders:
        config = _read_config(folder / "config.yaml")
        policy = _policy(config, folder / "config.yaml", names - {folder.name})
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
            model = load(files[0], name=folder.name, version=version.name, **onnx)
            batcher = _batcher(server, model, batching) if batching else None
            server.add(model, batcher=batcher, policy=policy)


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
        if key not in _ALL_KEYS:
            known = ", ".join(sorted(_ALL_KEYS))
            raise ConfigError(f"unknown setting; use one of {known}", file=str(path), key=key)
        if key in _POLICY_KEYS or key in _REPOSITORY_KEYS:
            continue  # checked by _policy
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(
                f"must be a number, 0 or more; got {value!r}", file=str(path), key=key
            )
        if key != "max_delay_ms" and not isinstance(value, int):
            raise ConfigError(f"must be a whole number; got {value!r}", file=str(path), key=key)
    return dict(config)


def _policy(config: Mapping[str, Any], path: Path, others: set[str]) -> ModelPolicy:
    """The model's protections from its ``config.yaml`` (``others``: the models beside it)."""
    file = str(path)
    options: dict[str, Any] = {}
    if "priority" in config:
        try:
            options["priority"] = _parse_priority(str(config["priority"]))
        except ValueError as exc:
            raise ConfigError(str(exc), file=file, key="priority") from None
    if "max_concurrency" in config:
        value = config["max_concurrency"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(
                f"must be a whole number, 0 (no limiter) or more; got {value!r}",
                file=file,
                key="max_concurrency",
            )
        options["max_concurrency"] = value
    for key in ("cache", "deterministic"):
        if key in config:
            if not isinstance(config[key], bool):
                raise ConfigError(f"must be true or false; got {config[key]!r}", file=file, key=key)
            options[key] = config[key]
    breaker = config.get("breaker", True)
    if isinstance(breaker, bool):
        options["breaker"] = breaker
    elif isinstance(breaker, dict):
        for key, value in breaker.items():
            where = f"breaker.{key}"
            if key not in _BREAKER_KEYS:
                known = ", ".join(sorted(_BREAKER_KEYS))
                raise ConfigError(f"unknown setting; use one of {known}", file=file, key=where)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"must be a number above 0; got {value!r}", file=file, key=where)
        if not isinstance(breaker.get("consecutive_failures", 1), int):
            raise ConfigError(
                "must be a whole number", file=file, key="breaker.consecutive_failures"
            )
        if "open_s" in breaker and "open_seconds" in breaker:
            raise ConfigError(
                "give open_s or open_seconds (the same), not both", file=file, key="breaker"
            )
        options["breaker_failures"] = breaker.get("consecutive_failures", 5)
        open_s = breaker["open_s"] if "open_s" in breaker else breaker.get("open_seconds", 5.0)
        options["breaker_open_s"] = float(open_s)
    else:
        raise ConfigError(
            f"must be true, false or a mapping of {', '.join(sorted(_BREAKER_KEYS))}; "
            f"got {breaker!r}",
            file=file,
            key="breaker",
        )
    fallback = config.get("fallback")
    if fallback is not None:
        options.update(_fallback(fallback, file, others))
    return ModelPolicy(**options)


def _fallback(fallback: Any, file: str, others: set[str]) -> dict[str, Any]:
    if not isinstance(fallback, dict) or not fallback:
        raise ConfigError(
            "must be a mapping of model (a model served beside it), rules "
            "('package.module:function') and/or default ({output: row})",
            file=file,
            key="fallback",
        )
    options: dict[str, Any] = {}
    for key, value in fallback.items():
        where = f"fallback.{key}"
        if key not in _FALLBACK_KEYS:
            known = ", ".join(sorted(_FALLBACK_KEYS))
            raise ConfigError(f"unknown setting; use one of {known}", file=file, key=where)
        if key == "model":
            if value not in others:
                have = ", ".join(sorted(others)) or "none"
                raise ConfigError(
                    f"no model {value!r} is served beside it; the repository has {have}",
                    file=file,
                    key=where,
                )
            options["fallback_model"] = value
        elif key == "rules":
            from .config import import_object

            if not isinstance(value, str):
                raise ConfigError(
                    f"must be an import path 'package.module:function'; got {value!r}",
                    file=file,
                    key=where,
                )
            rules = import_object(value, key=where, file=file)
            if not callable(rules):
                raise ConfigError(f"{value!r} is not callable", file=file, key=where)
            options["rules"] = rules
        else:
            if not isinstance(value, dict) or not value:
                raise ConfigError(
                    "must map each output name to its row, e.g. {probabilities: [1.0, 0.0]}",
                    file=file,
                    key=where,
                )
            default = {str(k): np.asarray(v) for k, v in value.items()}
            for name, array in default.items():
                if array.dtype.kind not in "biuf":
                    raise ConfigError(
                        f"output {name!r} must be a number or a list of numbers; got "
                        f"{value[name]!r}",
                        file=file,
                        key=where,
                    )
            options["default"] = default
    return options


def parse_quota(text: str) -> tuple[float, float | None]:
    """``"RATE[/BURST]"`` (calls per second, burst size) of ``--quota``; ValueError if bad."""
    rate_text, _, burst_text = text.partition("/")
    try:
        rate = float(rate_text)
        burst = float(burst_text) if burst_text else None
    except ValueError:
        rate, burst = math.nan, None
    if not (math.isfinite(rate) and rate > 0) or (burst is not None and not burst >= 1):
        raise ValueError(
            f"expected RATE[/BURST]: calls per second above 0, and a burst of at least 1 "
            f"call, e.g. 100/200; got {text!r}"
        )
    return rate, burst


def _policy_settings() -> dict[str, Any]:
    raw = os.environ.get(_ENV_POLICY)
    return dict(json.loads(raw)) if raw else {}


def app_from_env() -> InferenceApp:
    """The app of one worker process, from the ``RTINFER_SERVE_*`` environment (uvicorn factory)."""
    target = os.environ.get(_ENV_TARGET)
    if not target:
        raise ConfigError(f"{_ENV_TARGET} is not set; start the server with rtinfer serve")
    settings = _policy_settings()
    drain_s = settings.pop("drain_s", DEFAULT_DRAIN_S)
    host = os.environ.get(_ENV_MODEL_HOST)
    load = (
        hosted_loader(host, bytes.fromhex(os.environ[_ENV_MODEL_HOST_KEY])) if host else load_model
    )
    server = build_server(
        target,
        allow_pickle=os.environ.get(_ENV_PICKLE) == "1",
        stream=os.environ.get(_ENV_STREAM) == "1",
        load=load,
        **settings,
    )
    timeout = os.environ.get(_ENV_TIMEOUT, "30")
    snapshots = os.environ.get(_ENV_SNAPSHOTS)

    def write_snapshot(app: InferenceApp) -> None:
        if snapshots:
            Path(snapshots, f"{os.getpid()}.json").write_text(json.dumps(app.stats.snapshot()))

    api_key = os.environ.get(_ENV_API_KEY) or None
    grpc_address = os.environ.get(_ENV_GRPC)

    control = os.environ.get(_ENV_CONTROL)

    async def started(app: InferenceApp) -> Stopper | None:
        """The management updates of the workers before this one (with several workers
        and a management key), the gRPC front on the same models (workers share its port:
        SO_REUSEPORT), and SIGTERM made to drain first."""
        member: ControlMember | None = None
        if control and app.management is not None:
            member = ControlMember(
                control, bytes.fromhex(os.environ[_ENV_CONTROL_KEY]), app.management
            )
            await member.join()  # the updates so far, before this worker turns ready
            app.management.control = member
        stop_grpc: Stopper | None = None
        if grpc_address:
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

            async def stop_grpc() -> None:
                await grpc_server.stop(grace=5.0)

        restore = drain_on_sigterm(app.server, drain_s)
        freeze_heap()  # the models are loaded: start-up's objects leave the GC's walks
        # After the model threads started: they keep the normal policy, the loop yields.
        schedule_loop(os.environ.get(_ENV_LOOP_SCHED) or "batch")

        async def stop() -> None:
            if restore is not None:
                restore()
            if member is not None:
                member.close()
            if stop_grpc is not None:
                await stop_grpc()

        return stop

    return InferenceApp(
        server,
        api_key=api_key,
        max_body_bytes=int(os.environ.get(_ENV_MAX_BODY, str(DEFAULT_MAX_BODY_BYTES))),
        default_timeout_s=float(timeout) if timeout else None,
        on_started=started,
        on_shutdown=write_snapshot,
        **_management_from_env(server, target, load),
    )


def _management_from_env(server: ModelServer, target: str, load: Loader) -> dict[str, Any]:
    """The app's model manager (a repository TARGET, watched with ``--watch``) and key."""
    from .repository import ModelManager, ModelRepository

    watch = os.environ.get(_ENV_WATCH)
    manager = None
    if Path(target).is_dir():
        repository = ModelRepository(
            target, allow_pickle=os.environ.get(_ENV_PICKLE) == "1", load=load
        )
        manager = ModelManager(server, repository, watch_s=float(watch) if watch else None)
    return {"manager": manager, "management_key": os.environ.get(_MANAGEMENT_KEY) or None}


Handler = Callable[[int, FrameType | None], Any]


def drain_on_sigterm(server: ModelServer, drain_s: float | None) -> Callable[[], None] | None:
    """Make SIGTERM drain ``server`` before the handler already installed (uvicorn's) runs.

    On the first SIGTERM the server turns not ready and refuses new requests at once,
    the requests in flight finish (at most ``drain_s`` seconds), then the previous
    handler is called, which stops uvicorn (it stops accepting, closes the idle
    connections and runs the lifespan shutdown). A second SIGTERM calls it at once.
    Returns what restores the previous handler, or ``None`` when signals cannot be
    handled here (not the main thread, or no Python handler to hand over to).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return None
    handover: Handler = previous
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    signalled: list[int] = []

    async def drain_then_stop() -> None:
        if not await server.drain(drain_s):
            log.warning(
                "%d request(s) still in flight after the %s s drain; stopping anyway",
                server.in_flight,
                drain_s,
            )
        handover(signal.SIGTERM, None)

    def start() -> None:
        tasks.append(loop.create_task(drain_then_stop()))

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        signalled.append(sig)
        if len(signalled) > 1:
            handover(sig, frame)  # a second SIGTERM: stop now
            return
        log.info("SIGTERM: draining (not ready, new requests refused) for up to %s s", drain_s)
        loop.call_soon_threadsafe(start)

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, handover)

    return restore


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
    max_concurrency: int = 1000,
    default_priority: str = "critical",
    quota: str | None = None,
    cache_size: int = 0,
    cache_ttl_s: float = 60.0,
    cache_redis: str | None = None,
    drain_s: float = DEFAULT_DRAIN_S,
    management_key: str | None = None,
    watch_s: float | None = None,
    http_server: str = "rtinfer",
    loop_sched: str = "batch",
    model_process: bool = False,
    model_threads: int = 1,
) -> dict[str, Any]:
    """Serve ``target`` over HTTP until SIGINT/SIGTERM; return (and write) the run summary.

    Binding anything but a loopback address needs an API key (``api_key`` or
    ``RTINFER_API_KEY``) unless ``insecure``. ``timeout_s`` is the SLO: the deadline of
    a request that sends none (``--slo-ms``). SIGTERM drains for up to ``drain_s``
    seconds first (see the module). The protections' settings are
    :func:`build_server`'s. ``http_server``: ``"rtinfer"`` for
    :mod:`rtinfer.http.server` (see :func:`_run_rtinfer`), or ``"uvicorn"``.
    ``loop_sched``: how each worker's event loop is scheduled once its models are loaded
    (:func:`rtinfer.loop.schedule_loop`: ``"batch"`` or ``"normal"``).

    ``model_process``: load a model file TARGET (or each model of a repository TARGET that
    the workers name, or the model files a pipeline TARGET names by path) once, in a
    process of its own (a
    :class:`~rtinfer.models.host.HostProcess`) that runs ``model_threads`` batches at once,
    and have every worker call it. The workers then only serve: size them for the
    requests (and the refusals), and the model's threads for its answers.
    """
    if http_server not in _HTTP_SERVERS:
        raise ConfigError(
            f"--http-server must be one of {', '.join(_HTTP_SERVERS)}; got {http_server!r}"
        )
    if loop_sched not in LOOP_SCHEDULES:
        raise ConfigError(
            f"--loop-sched must be one of {', '.join(LOOP_SCHEDULES)}; got {loop_sched!r}"
        )
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if model_threads < 1:
        raise ConfigError(f"--model-threads must be at least 1, got {model_threads}")
    if model_threads > 1 and not model_process:
        raise ConfigError("--model-threads sizes the model process: add --model-process")
    api_key = api_key or os.environ.get(_ENV_API_KEY) or None
    management_key = _check_management(target, api_key, management_key, watch_s)
    if not _is_loopback(host) and api_key is None and not insecure:
        raise ConfigError(
            f"binding {host} exposes the models beyond this machine; set an API key "
            f"(--api-key or {_ENV_API_KEY}) or pass --insecure"
        )
    policy: dict[str, Any] = {
        "max_concurrency": max_concurrency,
        # Calls faster than a third of the SLO are no reason for the limiter to shed: it
        # holds the median call there, and a micro-batched call's p99 is about twice its
        # median, which leaves a third of the SLO for the time outside the call.
        "latency_target_s": None if timeout_s is None else timeout_s / 3,
        "default_priority": default_priority,
        "quota": quota,
        "cache_size": cache_size,
        "cache_ttl_s": cache_ttl_s,
        "cache_redis": cache_redis,
    }
    build_server(target, allow_pickle=allow_pickle, **policy)  # fail here, not in every worker
    model_host = (
        HostProcess(target, allow_pickle=allow_pickle, threads=model_threads)
        if model_process
        else None
    )
    if model_host is not None:
        model_host.start()  # the model is loaded before a worker asks for it
    # Several workers, one management key: each update goes to every worker.
    control = ControlHub() if management_key is not None and workers > 1 else None
    if control is not None:
        control.start()
    try:
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
                    _ENV_POLICY: json.dumps({**policy, "drain_s": drain_s}),
                }
            )
            if api_key is not None:
                os.environ[_ENV_API_KEY] = api_key
            os.environ[_ENV_WATCH] = "" if watch_s is None else str(watch_s)
            os.environ[_ENV_LOOP_SCHED] = loop_sched
            if model_host is not None:
                os.environ[_ENV_MODEL_HOST] = model_host.address
                os.environ[_ENV_MODEL_HOST_KEY] = model_host.authkey.hex()
            else:  # a host of an earlier run in this process is gone
                os.environ.pop(_ENV_MODEL_HOST, None)
            if management_key is not None:
                os.environ[_MANAGEMENT_KEY] = management_key
            if control is not None:
                os.environ[_ENV_CONTROL] = control.address
                os.environ[_ENV_CONTROL_KEY] = control.authkey.hex()
            else:
                os.environ.pop(_ENV_CONTROL, None)
            # uvicorn raises the signal that stopped it again once it has finished, under the
            # handler found before it started: by default that kills this process before the
            # summary is written. A handler that only notes it lets the run end normally.
            main = threading.current_thread() is threading.main_thread()
            before = signal.signal(signal.SIGTERM, _stopped) if main else None
            try:
                if http_server == "rtinfer":
                    _run_rtinfer(host, port, workers, log_level, max_body_bytes, drain_s)
                else:
                    _run_uvicorn(host, port, workers, log_level, max_body_bytes, drain_s)
            finally:
                if main:
                    signal.signal(signal.SIGTERM, before)
            summary = summarize(
                json.loads(p.read_text()) for p in sorted(Path(snapshots).glob("*.json"))
            )
    finally:
        if model_host is not None:  # after the workers: they drained through it
            model_host.stop()
        if control is not None:
            control.stop()
    summary["workers"] = workers
    if model_host is not None:
        summary["model_process"] = {
            "threads": model_threads,
            "restarts": model_host.restarts,
            "model_calls": model_host.runs,
            "worker_calls": model_host.calls,
            "model_loads": model_host.loads,
            "model_unloads": model_host.unloads,
        }
    if summary_json is not None:
        out = Path(summary_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


_MANAGEMENT_KEY = "RTINFER_MANAGEMENT_KEY"


def _check_management(
    target: str | os.PathLike[str],
    api_key: str | None,
    management_key: str | None,
    watch_s: float | None,
) -> str | None:
    """The management key (argument or ``RTINFER_MANAGEMENT_KEY``), checked with ``--watch``."""
    management_key = management_key or os.environ.get(_MANAGEMENT_KEY) or None
    if watch_s is not None and not (Path(target).is_dir() and watch_s > 0):
        raise ConfigError(
            f"--watch follows a model repository folder; {str(target)!r} is not one (or the "
            f"interval {watch_s} is not above 0)"
        )
    if management_key is None:
        return None
    if not management_key.strip():
        raise ConfigError("the management key is empty; pass a non-empty key or none")
    if management_key == api_key:
        raise ConfigError("the management key must differ from the API key (--api-key)")
    return management_key


def _stopped(sig: int, frame: FrameType | None) -> None:
    """SIGTERM after uvicorn has stopped: the run is ending anyway."""


def _run_uvicorn(
    host: str, port: int, workers: int, log_level: str, max_body_bytes: int, drain_s: float
) -> None:
    """``--http-server uvicorn``: uvicorn runs ``app_from_env()`` in each worker."""
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingDependency("rtinfer serve --http-server uvicorn", "serve") from exc
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
        # No X-Forwarded-* rewriting: nothing here reads the client address from it, and
        # the middleware costs about a fifth of uvicorn's time per request (measured).
        proxy_headers=False,
        ws_max_size=max_body_bytes,  # WebSocket frames are bounded like bodies
        # After a drain, or on SIGINT: what is still running gets this long.
        timeout_graceful_shutdown=math.ceil(drain_s),  # whole seconds, as uvicorn types it
    )


#: ``--http-server``: what runs the InferenceApp (the default first).
_HTTP_SERVERS = ("rtinfer", "uvicorn")


def _run_rtinfer(
    host: str, port: int, workers: int, log_level: str, max_body_bytes: int, drain_s: float
) -> None:
    """``--http-server rtinfer`` (the default): :mod:`rtinfer.http.server` runs
    ``app_from_env()``.

    One worker runs in this process; with N, each worker process builds the app and
    binds the port with SO_REUSEPORT, and SIGTERM here reaches every worker. SIGTERM
    drains like under uvicorn (``drain_on_sigterm`` wraps the server's own handler,
    installed before the lifespan startup); then the server stops accepting, closes
    idle connections and gives what still runs ``drain_s`` more.
    """
    try:
        from .http.server import run as run_http
    except ImportError as exc:  # httptools and websockets come with uvicorn[standard]
        raise MissingDependency("rtinfer serve --http-server rtinfer", "serve") from exc
    run_http(
        app_from_env,
        host=host,
        port=port,
        workers=workers,
        max_body_bytes=max_body_bytes,
        grace_s=drain_s,
        log_level=log_level,
    )


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
        "--slo-ms",
        "--timeout-ms",  # its former name
        dest="slo_ms",
        type=float,
        default=30_000.0,
        help="the default deadline of a request that sends none (X-Request-Timeout-Ms, a "
        "gRPC deadline); 0: none; default 30000",
    )
    parser.add_argument(
        "--max-concurrency",
        type=_whole,
        default=1000,
        help="the most requests each model's adaptive concurrency limit may admit at once "
        "(past the limit: 503 with Retry-After); 0: no limiter; default 1000",
    )
    parser.add_argument(
        "--loop-sched",
        choices=LOOP_SCHEDULES,
        default="batch",
        help="batch (default, Linux): the event loop's wakeups wait for the model's time "
        "slice on a shared core and are handled together; normal: they preempt it",
    )
    parser.add_argument(
        "--default-priority",
        choices=["critical", "best_effort"],
        default="critical",
        help="traffic class of requests without X-Priority (best_effort is shed first); "
        "default critical",
    )
    parser.add_argument(
        "--quota",
        type=_quota,
        help="per-client quota, RATE[/BURST] requests per second (past it: 429); default none",
    )
    parser.add_argument(
        "--cache-size",
        type=_whole,
        default=0,
        help="cache this many predicted rows in memory (deterministic models); default 0: off",
    )
    parser.add_argument(
        "--cache-ttl-s", type=float, default=60.0, help="seconds a cached row is kept; default 60"
    )
    parser.add_argument(
        "--cache-redis",
        metavar="URL",
        help="cache predictions in Redis (shared by workers and replicas) instead of memory",
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=DEFAULT_DRAIN_S,
        help="on SIGTERM, answer not ready and finish the requests in flight for at most this "
        "many seconds before stopping; default 10",
    )
    parser.add_argument("--workers", type=int, default=1, help="server processes; default 1")
    parser.add_argument(
        "--model-process",
        action="store_true",
        help="load each model of TARGET (a model file, a repository's versions, a pipeline's "
        "model files) once, in a process of its own that every worker calls, so that the "
        "workers (the fronts) and the model's threads are sized apart",
    )
    parser.add_argument(
        "--model-threads",
        type=int,
        default=1,
        help="with --model-process: batches the model runs at once; default 1",
    )
    parser.add_argument(
        "--http-server",
        choices=_HTTP_SERVERS,
        default=_HTTP_SERVERS[0],
        help="what serves HTTP: rtinfer's own lean server (rtinfer.http.server; default) or "
        "uvicorn",
    )
    parser.add_argument(
        "--management-key",
        help=f"turn on the model-management routes (/v2/repository/...), which then need "
        f"'Authorization: Bearer KEY' (or set {_MANAGEMENT_KEY}); off by default",
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help="with a repository TARGET: load new version folders, promote the highest once "
        "warm (auto_promote in config.yaml), unload removed ones",
    )
    parser.add_argument(
        "--watch-interval-s",
        type=float,
        default=2.0,
        help="seconds between two looks at the repository with --watch; default 2",
    )
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


def _whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more; got {text!r}")
    return value


def _quota(text: str) -> str:
    try:
        parse_quota(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


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
        timeout_s=args.slo_ms / 1e3 if args.slo_ms > 0 else None,
        allow_pickle=args.allow_pickle,
        grpc_port=args.grpc_port,
        stream=args.stream,
        max_concurrency=args.max_concurrency,
        default_priority=args.default_priority,
        quota=args.quota,
        cache_size=args.cache_size,
        cache_ttl_s=args.cache_ttl_s,
        cache_redis=args.cache_redis,
        drain_s=args.drain_s,
        management_key=args.management_key,
        watch_s=args.watch_interval_s if args.watch else None,
        http_server=args.http_server,
        loop_sched=args.loop_sched,
        model_process=args.model_process,
        model_threads=args.model_threads,
    )
    print(json.dumps(summary, indent=2))
    return 0
