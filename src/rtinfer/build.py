"""Build a runnable :class:`~rtinfer.pipeline.Pipeline` from a checked :class:`PipelineConfig`.

The Python API builds the same objects directly; this module is only the
mapping from the file's keys to them.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import msgspec

from .batching import MicroBatcher
from .broker import Broker
from .config import (
    DecisionConfig,
    DecodeConfig,
    FallbackStepConfig,
    FileSinkConfig,
    FileSourceConfig,
    KafkaSinkConfig,
    KafkaSourceConfig,
    MemorySinkConfig,
    MemorySourceConfig,
    ModelConfig,
    MqttSinkConfig,
    MqttSourceConfig,
    NatsSinkConfig,
    NatsSourceConfig,
    PipelineConfig,
    PythonStageConfig,
    RedisSinkConfig,
    RedisSourceConfig,
    SinkConfig,
    SourceConfig,
    StageConfig,
    StdoutSinkConfig,
    VectorizeStageConfig,
    import_object,
    load_config,
)
from .exceptions import ConfigError, ModelLoadError
from .models import load_model
from .observability.metrics import Metrics
from .pipeline import Pipeline, SinkResilience
from .resilience import CircuitBreaker, Priority, Step
from .sinks import BrokerSink, JsonLinesSink, StdoutSink
from .sources import BrokerSource, JsonLinesSource
from .stages import Decide, Decode, Outputs, Predict, Stage, Vectorize
from .stages.predict import model_failure
from .types import Loader, Model, Sink, Source

__all__ = ["build_model", "build_pipeline", "load_pipeline", "model_files"]

_FIELD_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool, "any": Any}


def load_pipeline(
    path: str | os.PathLike[str],
    *,
    broker: Broker | None = None,
    metrics: Metrics | None = None,
    load: Loader = load_model,
) -> Pipeline:
    """Read a pipeline file and build the pipeline it describes."""
    return build_pipeline(
        load_config(path), broker=broker, metrics=metrics, file=str(path), load=load
    )


def build_pipeline(
    config: PipelineConfig,
    *,
    broker: Broker | None = None,
    metrics: Metrics | None = None,
    file: str | None = None,
    load: Loader = load_model,
) -> Pipeline:
    """Build a pipeline; ``broker`` is the in-process broker that ``memory`` sources use.

    ``load``: how the model files the config names by ``path`` are built
    (:func:`~rtinfer.models.load_model`'s signature; ``rtinfer serve --model-process``
    passes a :func:`~rtinfer.models.host.hosted_loader`). A ``factory``'s model is built
    here whatever ``load`` is.
    """
    broker = broker or Broker()
    metrics = metrics or Metrics()
    m = config.model
    model = build_model(m, file=file, load=load)
    batcher = _batcher(model, m, metrics)
    decode = _decode(config.decode, file)
    stages: list[Stage] = [decode]
    stages += [_stage(s, i, file, metrics) for i, s in enumerate(config.stages)]
    fallback = [
        _fallback_step(s, i, config.decision, metrics, file, load) for i, s in enumerate(m.fallback)
    ]
    if config.slo.expired == "fallback" and not fallback:
        raise ConfigError(
            "expired: fallback gives late events the answer of the model's fallback steps, "
            "but model.fallback is empty; add steps (rules, default) or choose dead_letter "
            "or late",
            key="slo.expired",
            file=file,
        )
    breaker = None
    if m.breaker is not None:
        k = m.breaker
        breaker = CircuitBreaker(
            f"model:{model.name}",
            consecutive_failures=k.consecutive_failures,
            failure_rate=k.failure_rate,
            window=k.window,
            min_calls=k.min_calls,
            open_seconds=k.open_s,
            probes=k.probes,
            slow_call_seconds=k.slow_call_ms / 1e3 if k.slow_call_ms is not None else None,
            is_failure=model_failure,
            metrics=metrics,
        )
    try:
        predict = Predict(
            batcher,
            allow_nan=m.allow_nan,
            fallback=fallback,
            breaker=breaker,
            expired=config.slo.expired,
            required_outputs=[config.decision.output] if config.decision is not None else None,
            priority=Priority(config.runtime.priority),
            metrics=metrics,
        )
    except ValueError as exc:  # two steps with one name
        raise ConfigError(str(exc), key="model.fallback", file=file) from None
    stages.append(predict)
    if config.decision is not None:
        d = config.decision
        schema = decode.schema
        if isinstance(schema, type) and issubclass(schema, msgspec.Struct):
            known = schema.__struct_fields__
            missing = [f for f in d.include if f not in known]
            if missing:
                raise ConfigError(
                    f"the events have no field {missing[0]!r} to include; their fields are "
                    f"{list(known)}",
                    key="decision.include",
                    file=file,
                )
        stages.append(
            Decide(
                output=d.output,
                column=d.column,
                thresholds=d.thresholds,
                default=d.default,
                include=d.include,
            )
        )
    else:
        stages.append(Outputs())
    r = config.runtime
    sr = r.sink_retry
    source_config = config.source
    if isinstance(source_config, KafkaSourceConfig) and source_config.careful_events is None:
        # Where a crashed worker's culprit may be: past what the pipeline holds in flight
        # (written batches wait up to flush_interval for their acknowledgement, beside them).
        careful = 4 * r.read_size * r.max_in_flight
        source_config = msgspec.structs.replace(source_config, careful_events=careful)
    source = _source(source_config, broker)
    shed_ranges = config.slo.shed and config.slo.shed_by == "range"
    if shed_ranges and getattr(source, "skip", None) is None:
        raise ConfigError(
            f"slo.shed_by: range needs a source that can move past a range of entries "
            f"unread (redis, kafka, memory); {source.name} cannot: use shed_by: event"
        )
    if (
        shed_ranges
        and isinstance(source_config, KafkaSourceConfig)
        and source_config.max_deliveries is not None
    ):
        raise ConfigError(
            "slo.shed_by: range cannot go with the Kafka source's max_deliveries, whose "
            "delivery counts follow every offset: use shed_by: event"
        )
    sinks = [_sink(s, broker) for s in config.sinks]
    dead_letters = _sink(config.dead_letters, broker) if config.dead_letters else None
    _link_transactions(source, sinks, dead_letters, file)
    return Pipeline(
        source,
        stages,
        sinks,
        dead_letters=dead_letters,
        name=config.name,
        read_size=r.read_size,
        max_in_flight=r.max_in_flight,
        flush_interval=r.flush_interval_ms / 1e3,
        slo=config.slo.deadline_ms / 1e3 if config.slo.deadline_ms is not None else None,
        shed_expired=config.slo.shed,
        shed_ranges=shed_ranges,
        sink_resilience=SinkResilience(
            attempts=sr.attempts,
            backoff=sr.backoff_ms / 1e3,
            max_backoff=sr.max_backoff_ms / 1e3,
            budget=sr.budget,
            consecutive_failures=sr.consecutive_failures,
            open_seconds=sr.open_s,
        ),
        metrics=metrics,
    )


def model_files(config: PipelineConfig) -> list[tuple[str, bool]]:
    """The model files ``config`` names by ``path`` (its model's and its fallback
    models'), each absolute as written, with its ``allow_pickle``: what a model process
    loads for the pipeline (a ``factory``'s model is built where the pipeline runs)."""
    m = config.model
    named = [(m.path, m.allow_pickle)] + [(s.path, s.allow_pickle) for s in m.fallback]
    return [(os.path.abspath(path), pickle) for path, pickle in named if path is not None]


def _batcher(
    model: Model, config: ModelConfig | FallbackStepConfig, metrics: Metrics
) -> MicroBatcher:
    b = config.batching
    return MicroBatcher(
        model,
        max_batch_size=b.max_batch_size,
        max_delay=b.max_delay_ms / 1e3,
        max_in_flight=b.max_in_flight,
        max_queue_rows=b.max_queue_rows,
        metrics=metrics,
    )


def _fallback_step(
    config: FallbackStepConfig,
    index: int,
    decision: DecisionConfig | None,
    metrics: Metrics,
    file: str | None,
    load: Loader,
) -> Step | MicroBatcher:
    """One ``model.fallback`` entry: a lighter model's batcher, rules, or a default."""
    key = f"model.fallback.{index}"
    if config.rules is not None:
        rules = import_object(config.rules, key=f"{key}.rules", file=file)
        if not callable(rules):
            raise ConfigError(
                f"{config.rules!r} is a {type(rules).__name__}; rules are a function taking "
                "the model's inputs (a dict of arrays) and returning its outputs",
                key=f"{key}.rules",
                file=file,
            )
        return Step.rules(config.name or "rules", rules)
    if config.default is not None:
        if decision is not None and decision.output not in config.default:
            raise ConfigError(
                f"the default gives outputs {sorted(config.default)}, but the decision reads "
                f"{decision.output!r}; add it, e.g. {{{decision.output}: [1.0, 0.0]}}",
                key=f"{key}.default",
                file=file,
            )
        try:
            return Step.default(config.name or "default", config.default)
        except ValueError as exc:
            raise ConfigError(str(exc), key=f"{key}.default", file=file) from None
    model = build_model(
        ModelConfig(
            path=config.path,
            factory=config.factory,
            name=config.name,
            version=config.version,
            allow_pickle=config.allow_pickle,
        ),
        file=file,
        key=key,
        load=load,
    )
    return _batcher(model, config, metrics)


def _link_transactions(
    source: Source, sinks: list[Sink], dead_letters: Sink | None, file: str | None
) -> None:
    """Exactly once: the Kafka source commits its offsets in the transactional sink's
    transactions. Only one sink can be transactional, and only with a Kafka source."""
    transactional = [s for s in sinks if getattr(s, "transactional", False)]
    if dead_letters is not None and getattr(dead_letters, "transactional", False):
        raise ConfigError(
            "the dead-letter sink cannot be transactional: dead letters are written at least "
            "once; leave out its transactional_id",
            key="dead_letters.transactional_id",
            file=file,
        )
    if not transactional:
        return
    from .sinks.kafka import KafkaSink
    from .sources.kafka import KafkaSource

    if len(transactional) > 1:
        raise ConfigError(
            "only one sink can be transactional: the source's offsets commit in one "
            "transaction; give the other sinks no transactional_id",
            key="sinks",
            file=file,
        )
    if not isinstance(source, KafkaSource):
        raise ConfigError(
            f"a transactional Kafka sink needs a Kafka source (exactly once is Kafka → Kafka: "
            f"the source's offsets commit inside the sink's transaction); the source is "
            f"{source.name}",
            key="sinks",
            file=file,
        )
    (sink,) = transactional
    assert isinstance(sink, KafkaSink)
    source.commit_with(sink)


def build_model(
    config: ModelConfig, *, file: str | None = None, key: str = "model", load: Loader = load_model
) -> Model:
    """The model a ``model:`` section names (not loaded yet: the batcher loads it off the loop).

    ``key``: where the section is in the file (``model.fallback.1`` for a fallback model).
    ``load`` builds a model named by ``path``; a ``factory``'s is built in this process.
    """
    options: dict[str, Any] = {
        "intra_op_threads": config.intra_op_threads,
        "inter_op_threads": config.inter_op_threads,
        "providers": config.providers,
    }
    if config.path is not None:
        if not Path(config.path).is_file():  # found now, by `rtinfer check`, not at start-up
            where = f" in {file}" if file is not None else ""
            raise ModelLoadError(
                f"model file {config.path!r} does not exist (relative paths start from the "
                f"current directory, {Path.cwd()}); check {key}.path{where}"
            )
        return load(
            config.path,
            name=config.name,
            version=config.version,
            allow_pickle=config.allow_pickle,
            **options,
        )
    assert config.factory is not None
    factory = import_object(config.factory, key=f"{key}.factory", file=file)
    made = factory()
    if isinstance(made, str | os.PathLike):
        return load_model(
            Path(made),
            name=config.name,
            version=config.version,
            allow_pickle=config.allow_pickle,
            **options,
        )
    if isinstance(made, Model):
        return made
    raise ConfigError(
        f"factory {config.factory!r} returned {type(made).__name__}; it must return a model "
        f"file path or a model (load, warmup, predict)",
        key=f"{key}.factory",
        file=file,
    )


def _decode(config: DecodeConfig, file: str | None) -> Decode:
    schema: Any = None
    if config.schema is not None:
        schema = import_object(config.schema, key="decode.schema", file=file)
    elif config.fields is not None:
        schema = msgspec.defstruct(
            "Event", [(name, _FIELD_TYPES[kind]) for name, kind in config.fields.items()]
        )
    try:
        return Decode(
            schema,
            codec=config.codec,
            id_field=config.id_field,
            event_time_field=config.event_time_field,
            event_time_unit=config.event_time_unit,
        )
    except TypeError as exc:  # msgspec cannot decode into what the schema names
        raise ConfigError(
            f"{config.schema!r} is not a type msgspec can decode into ({exc}); name a "
            f"msgspec.Struct",
            key="decode.schema",
            file=file,
        ) from None


def _stage(
    config: StageConfig, index: int, file: str | None, metrics: Metrics | None = None
) -> Stage:
    if isinstance(config, VectorizeStageConfig):
        try:
            return Vectorize(config.fields, input=config.input, dtype=config.dtype)
        except TypeError as exc:  # numpy does not know the dtype
            raise ConfigError(
                f"{exc}; use a numpy dtype such as float32", key=f"stages.{index}.dtype", file=file
            ) from None
    assert isinstance(config, PythonStageConfig)
    key = f"stages.{index}.use"
    used = import_object(config.use, key=key, file=file)
    if inspect.isclass(used) or config.args:  # a class, or a factory given its arguments
        args = dict(config.args)
        if metrics is not None and "metrics" not in args and _takes(used, "metrics"):
            args["metrics"] = metrics  # its metrics (breakers, look-ups) join the pipeline's
        try:
            stage = used(**args)
        except TypeError as exc:
            raise ConfigError(
                f"cannot build {config.use!r} with args {config.args}: {exc}", key=key, file=file
            ) from exc
    else:  # a plain function is the stage itself
        stage = used
    if not callable(stage):
        raise ConfigError(
            f"{config.use!r} gives a {type(stage).__name__}, which is not a stage: a stage is "
            f"a callable taking a Batch and returning it",
            key=key,
            file=file,
        )
    return stage  # type: ignore[no-any-return]


def _takes(factory: Any, name: str) -> bool:
    """Whether ``factory`` accepts a keyword argument ``name``."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin)
        return False
    return name in parameters


def _source(config: SourceConfig, broker: Broker) -> Source:
    if isinstance(config, MemorySourceConfig):
        return BrokerSource(broker, config.topic, group=config.group)
    if isinstance(config, FileSourceConfig):
        return JsonLinesSource(config.path, checkpoint=config.checkpoint, follow=config.follow)
    if isinstance(config, RedisSourceConfig):
        from .sources.redis import RedisStreamSource

        return RedisStreamSource(**msgspec.structs.asdict(config))
    if isinstance(config, NatsSourceConfig):
        from .sources.nats import NatsSource

        return NatsSource(**msgspec.structs.asdict(config))
    if isinstance(config, KafkaSourceConfig):
        from .sources.kafka import KafkaSource

        return KafkaSource(**msgspec.structs.asdict(config))  # careful_events set above
    assert isinstance(config, MqttSourceConfig)
    from .sources.mqtt import MqttSource

    return MqttSource(**msgspec.structs.asdict(config))


def _sink(config: SinkConfig, broker: Broker) -> Sink:
    if isinstance(config, MemorySinkConfig):
        return BrokerSink(broker, config.topic)
    if isinstance(config, FileSinkConfig):
        return JsonLinesSink(config.path, fsync=config.fsync)
    if isinstance(config, RedisSinkConfig):
        from .sinks.redis import RedisStreamSink

        return RedisStreamSink(**msgspec.structs.asdict(config))
    if isinstance(config, NatsSinkConfig):
        from .sinks.nats import NatsSink

        return NatsSink(**msgspec.structs.asdict(config))
    if isinstance(config, KafkaSinkConfig):
        from .sinks.kafka import KafkaSink

        return KafkaSink(**msgspec.structs.asdict(config))
    if isinstance(config, MqttSinkConfig):
        from .sinks.mqtt import MqttSink

        return MqttSink(**msgspec.structs.asdict(config))
    assert isinstance(config, StdoutSinkConfig)
    return StdoutSink()
