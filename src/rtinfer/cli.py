"""The ``rtinfer`` command: thin wrappers over the Python API.

::

    rtinfer run PIPELINE.yaml [--workers N] [--summary-json PATH] [--metrics-port PORT]
    rtinfer check PIPELINE.yaml
    rtinfer demo [--events N] [--rate EVENTS_PER_S] [--summary-json PATH] [--metrics-port PORT]
    rtinfer demo generate --events N --out FILE.jsonl
    rtinfer demo train
    rtinfer features backfill DEFINITION.yaml --input EVENTS --output FEATURES
    rtinfer serve TARGET [--host H] [--port P] [--grpc-port P] [--api-key KEY | --insecure]
                  [--workers N]
                  [--max-body-bytes SIZE] [--timeout-ms MS] [--summary-json PATH]
                  [--management-key KEY] [--watch [--watch-interval-s S]]
    rtinfer models list|load|unload|promote|canary|shadow [NAME [VERSION]] --url URL --key KEY

Exit status: 0 on success (a run stopped by one SIGINT/SIGTERM included), 2
for a configuration or usage error, 1 for any other failure, 130 after a
second signal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .exceptions import ConfigError, RtinferError
from .loop import run as _run

__all__ = ["main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtinfer",
        description="Real-time AI: models on live streams, answered in milliseconds.",
    )
    parser.add_argument("--version", action="version", version=f"rtinfer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a pipeline file until its source ends or a signal")
    run.add_argument("pipeline", type=Path, help="the pipeline YAML file")
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="processes in one consumer group (a broker source only); default 1",
    )
    _add_run_options(run)

    check = commands.add_parser("check", help="check a pipeline file without running it")
    check.add_argument("pipeline", type=Path)

    demo = commands.add_parser("demo", help="live fraud scoring on the embedded broker")
    demo.add_argument("--events", type=_positive_int, default=200_000, help="default 200,000")
    demo.add_argument(
        "--rate",
        type=_positive_float,
        default=None,
        help="events/s, open-loop arrivals (default: as fast as possible)",
    )
    demo.add_argument("--seed", type=int, default=7, help="the stream's random seed")
    _add_run_options(demo)
    demo_commands = demo.add_subparsers(dest="demo_command", metavar="SUBCOMMAND")
    generate = demo_commands.add_parser("generate", help="write the demo's events as JSON Lines")
    generate.add_argument("--events", type=_positive_int, required=True)
    generate.add_argument("--out", type=Path, required=True)
    generate.add_argument("--seed", type=int, default=7)
    demo_commands.add_parser("train", help="train (or find) the demo's model; print its path")

    features = commands.add_parser("features", help="feature definitions, offline")
    features_commands = features.add_subparsers(
        dest="features_command", required=True, metavar="SUBCOMMAND"
    )
    backfill = features_commands.add_parser(
        "backfill", help="compute a definition's features over historical events (training data)"
    )
    backfill.add_argument("definition", type=Path, help="the feature definition (YAML)")
    backfill.add_argument(
        "--input", type=Path, required=True, help="the events: .parquet, .csv or .jsonl"
    )
    backfill.add_argument(
        "--output", type=Path, required=True, help="the features: .parquet, .csv or .jsonl"
    )

    serve = commands.add_parser("serve", help="serve models over HTTP (Open Inference Protocol)")
    from .serve import add_serve_arguments

    add_serve_arguments(serve)

    models = commands.add_parser(
        "models", help="list, load, unload, promote, canary or shadow a served model's versions"
    )
    from .http.manage import add_models_arguments

    add_models_arguments(models)
    return parser


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--summary-json", type=Path, help="write the run's summary here")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    parser.add_argument(
        "--no-live", dest="live", action="store_false", help="no live view on stderr"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run" and args.workers > 1:
            from .workers import run_workers

            code, merged = run_workers(args.pipeline, args.workers, metrics_port=args.metrics_port)
            if merged is not None:
                _report(merged, args.summary_json)
            return code
        if args.command == "run":
            summary = _run(_run_pipeline(args.pipeline, args.metrics_port, args.live))
            _report(summary, args.summary_json)
        elif args.command == "check":
            from .build import load_pipeline

            pipeline = load_pipeline(args.pipeline)
            print(f"{args.pipeline}: ok ({len(pipeline.stages)} stages)")
        elif args.command == "demo":
            return _demo(args)
        elif args.command == "features":
            from .features.backfill import main as backfill_main

            return backfill_main(args.definition, args.input, args.output)
        elif args.command == "serve":
            from .serve import serve_command

            return serve_command(args)
        elif args.command == "models":
            from .http.manage import models_command

            return models_command(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RtinferError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a client library's own error (redis, nats, kafka, ...)
        if os.environ.get("RTINFER_DEBUG"):
            raise
        print(
            f"error: {type(exc).__module__}.{type(exc).__name__}: {exc} "
            f"(set RTINFER_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.demo_command == "generate":
        from .demo.generator import write_jsonl

        write_jsonl(args.out, args.events, seed=args.seed)
        print(f"wrote {args.events:,} events to {args.out}", file=sys.stderr)
        return 0
    if args.demo_command == "train":
        from .demo.training import ensure_model

        print(ensure_model())
        return 0
    from .demo.run import run_demo

    summary = _run(
        run_demo(
            events=args.events,
            rate=args.rate,
            metrics_port=args.metrics_port,
            live=args.live,
            seed=args.seed,
        )
    )
    _report(summary, args.summary_json)
    return 0


async def _run_pipeline(path: Path, metrics_port: int | None, live: bool) -> dict[str, Any]:
    from .build import load_pipeline
    from .loop import freeze_heap
    from .observability.live import LiveView
    from .signals import handle_signals

    pipeline = load_pipeline(path)
    freeze_heap()  # everything is imported and configured: keep it out of the GC's walks
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr="127.0.0.1", registry=pipeline.metrics.registry)
    remove = handle_signals(pipeline.stop)
    view = asyncio.create_task(LiveView(pipeline, title=pipeline.name).run()) if live else None
    try:
        summary = await pipeline.run()
    finally:
        remove()
        if view is not None:
            view.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await view
    return summary.as_dict()


def _report(summary: dict[str, Any], path: Path | None) -> None:
    text = json.dumps(summary, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
