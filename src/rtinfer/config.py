"""The pipeline file: YAML, with ``${ENV_VAR:-default}`` interpolation, checked field by field.

One file serves several environments: ``${NAME}`` is replaced by the
environment variable (an error if it is unset), ``${NAME:-default}`` falls
back to the default when it is unset or empty, and ``$$`` is a literal ``$``.
Interpolation happens on the text, before YAML parsing, so a value may
become a number.

Every mistake is reported with the file, the key, what was expected and what
was found; unknown keys are errors (a misspelt key silently ignored is a
setting silently lost). Relative paths in the file are relative to the
current directory, as on a command line.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from .exceptions import ConfigError

__all__ = [
    "BatchingConfig",
    "BreakerConfig",
    "DecisionConfig",
    "DecodeConfig",
    "FallbackStepConfig",
    "ModelConfig",
    "PipelineConfig",
    "RuntimeConfig",
    "SinkRetryConfig",
    "SloConfig",
    "import_object",
    "interpolate",
    "load_config",
    "parse_config",
]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# -- sources and sinks: a ``type`` key picks the kind -------------------------------------


class MemorySourceConfig(_Strict, tag="memory", tag_field="type"):
    """The in-process broker: a topic read by a consumer group."""

    topic: str
    group: str = "rtinfer"


class FileSourceConfig(_Strict, tag="file", tag_field="type"):
    """A JSON Lines file, one event per line; ``checkpoint`` makes restarts resume."""

    path: str
    checkpoint: str | None = None
    follow: bool = False


class MemorySinkConfig(_Strict, tag="memory", tag_field="type"):
    topic: str


class FileSinkConfig(_Strict, tag="file", tag_field="type"):
    path: str
    fsync: bool = False


class StdoutSinkConfig(_Strict, tag="stdout", tag_field="type"):
    pass


class RedisSourceConfig(_Strict, tag="redis", tag_field="type"):
    """A Redis stream read by a consumer group (see docs/redis.md)."""

    url: str
    stream: str
    group: str = "rtinfer"
    consumer: str | None = None
    start_id: str = "0"
    block_ms: int = 2_000
    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    value_field: str = "value"
    key_field: str | None = "key"
    partitions: int | None = None
    owned_partitions: list[int] | None = None
    username: str | None = None
    password: str | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    reconnect_timeout_s: float = 30.0


class RedisSinkConfig(_Strict, tag="redis", tag_field="type"):
    url: str
    stream: str
    maxlen: int | None = None
    field: str = "value"
    key_field: str | None = "key"
    id_field: str | None = "source_id"
    partitions: int | None = None
    username: str | None = None
    password: str | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    reconnect_timeout_s: float = 30.0


class NatsSourceConfig(_Strict, tag="nats", tag_field="type"):
    """A NATS JetStream stream read by a durable pull consumer (see docs/nats.md)."""

    url: str
    stream: str
    subject: str
    durable: str = "rtinfer"
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    max_ack_pending: int | None = None
    fetch_timeout_s: float = 5.0
    create_stream: bool = True
    partitions: int | None = None
    owned_partitions: list[int] | None = None
    creds_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    connect_timeout_s: float = 5.0


class NatsSinkConfig(_Strict, tag="nats", tag_field="type"):
    url: str
    subject: str
    stream: str | None = None
    msg_id_prefix: str | None = None
    max_pending: int = 1024
    publish_timeout_s: float = 5.0
    partitions: int | None = None
    creds_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    connect_timeout_s: float = 5.0


class KafkaSourceConfig(_Strict, tag="kafka", tag_field="type"):
    """Kafka topics read by a consumer group (see docs/kafka.md); ``config``: librdkafka's."""

    bootstrap_servers: str
    topics: str | list[str]
    group: str = "rtinfer"
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    # Dead-letter an event that stopped its worker this many times (None: no limit).
    max_deliveries: int | None = None
    deliveries_topic: str = "rtinfer-deliveries"
    # Events handed out one at a time after an unclean start (None: 4 x read_size x max_in_flight).
    careful_events: int | None = None
    revoke_wait_s: float = 5.0
    poll_timeout_s: float = 0.1


class KafkaSinkConfig(_Strict, tag="kafka", tag_field="type"):
    """A Kafka topic, idempotent producer; ``transactional_id``: exactly once (docs/kafka.md)."""

    bootstrap_servers: str
    topic: str
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    transactional_id: str | None = None


class MqttSourceConfig(_Strict, tag="mqtt", tag_field="type"):
    """An MQTT 5 topic filter, QoS 1, acknowledged after the sinks flushed (docs/mqtt.md)."""

    url: str
    topic: str
    client_id: str | None = None
    shared_group: str | None = None
    qos: int = 1
    key_property: str = "rtinfer-key"
    partitions: int | None = None
    owned_partitions: list[int] | None = None
    username: str | None = None
    password: str | None = None
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    clean_start: bool = False
    session_expiry_s: int = 3600
    end_session_on_close: bool | None = None
    receive_maximum: int = 1024
    keepalive_s: int = 60
    connect_timeout_s: float = 5.0


class MqttSinkConfig(_Strict, tag="mqtt", tag_field="type"):
    url: str
    topic: str
    qos: int = 1
    retain: bool = False
    client_id: str | None = None
    key_property: str = "rtinfer-key"
    message_expiry_s: int | None = None
    require_subscribers: bool = False
    partitions: int | None = None
    username: str | None = None
    password: str | None = None
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    max_pending: int = 1024
    max_inflight: int = 20
    publish_timeout_s: float = 10.0
    keepalive_s: int = 60
    connect_timeout_s: float = 5.0


SourceConfig = (
    MemorySourceConfig
    | FileSourceConfig
    | RedisSourceConfig
    | NatsSourceConfig
    | KafkaSourceConfig
    | MqttSourceConfig
)
SinkConfig = (
    MemorySinkConfig
    | FileSinkConfig
    | StdoutSinkConfig
    | RedisSinkConfig
    | NatsSinkConfig
    | KafkaSinkConfig
    | MqttSinkConfig
)


# -- stages -------------------------------------------------------------------------------


class DecodeConfig(_Strict):
    """How event bytes become data: codec, schema (a Struct's import path, or inline fields)."""

    codec: Literal["json", "msgpack", "raw"] = "json"
    schema: str | None = None
    fields: dict[str, Literal["str", "int", "float", "bool", "any"]] | None = None
    id_field: str | None = "id"
    event_time_field: str | None = None
    event_time_unit: Literal["s", "ms"] = "ms"

    def __post_init__(self) -> None:
        if self.schema is not None and self.fields is not None:
            raise ValueError("give either schema (an import path) or fields, not both")


class VectorizeStageConfig(_Strict, tag="vectorize", tag_field="type"):
    """Model input from named fields of the decoded event."""

    fields: list[str]
    input: str = "features"
    dtype: str = "float32"


class PythonStageConfig(_Strict, tag="python", tag_field="type"):
    """A stage written in Python. ``use`` names a class, built with ``args`` as keyword
    arguments; a function with ``args``, a factory called with them; or a function
    without ``args``, which is the stage itself."""

    use: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)


StageConfig = VectorizeStageConfig | PythonStageConfig


class BatchingConfig(_Strict):
    """The model's micro-batcher (see :class:`rtinfer.batching.MicroBatcher`)."""

    max_batch_size: int = 256
    max_delay_ms: float = 1.0
    max_in_flight: int = 1
    max_queue_rows: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {self.max_in_flight}")
        if self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be 0 or more, got {self.max_delay_ms}")


class BreakerConfig(_Strict):
    """A circuit breaker around the model call (see :class:`rtinfer.resilience.CircuitBreaker`).

    Open, the model's fallback steps answer; without fallback steps the stream waits
    (reading nothing new) until a probe gets through.
    """

    consecutive_failures: int = 5
    failure_rate: float | None = None
    window: int = 100
    min_calls: int = 20
    open_s: float = 5.0
    probes: int = 1
    slow_call_ms: float | None = None

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError(
                f"consecutive_failures must be at least 1, got {self.consecutive_failures}"
            )
        if self.failure_rate is not None and not 0 < self.failure_rate <= 1:
            raise ValueError(f"failure_rate must be in (0, 1], got {self.failure_rate}")
        if self.window < 1 or not 1 <= self.min_calls <= self.window:
            raise ValueError(
                f"need 1 <= min_calls <= window, got min_calls={self.min_calls}, "
                f"window={self.window}"
            )
        if not self.open_s > 0:
            raise ValueError(f"open_s must be more than 0, got {self.open_s}")
        if self.probes < 1:
            raise ValueError(f"probes must be at least 1, got {self.probes}")
        if self.slow_call_ms is not None and not self.slow_call_ms > 0:
            raise ValueError(f"slow_call_ms must be more than 0, got {self.slow_call_ms}")


class FallbackStepConfig(_Strict):
    """One step of the model's fallback chain: exactly one of another model (``path`` or
    ``factory``, with its own ``batching``), ``rules`` (``module:function``, taking the
    model's inputs and returning its outputs, vectorised) or ``default`` (the outputs of
    one row, given to every row). ``name`` tags the results (``"step"``)."""

    name: str | None = None
    path: str | None = None
    factory: str | None = None
    version: str | None = None
    allow_pickle: bool = False
    batching: BatchingConfig = msgspec.field(default_factory=BatchingConfig)
    rules: str | None = None
    default: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("path", "factory", "rules", "default") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of path or factory (a lighter model), rules "
                f"(module:function) or default (outputs), found {given or 'none'}"
            )
        if self.default is not None and not self.default:
            raise ValueError("default needs at least one output, e.g. {probabilities: [1, 0]}")
        if self.name == "primary":
            raise ValueError("'primary' is the name of the pipeline's own model; choose another")


class ModelConfig(_Strict):
    """Which model, how to run it: ``path`` to a model file, or ``factory`` returning one;
    ``breaker`` and ``fallback``: what answers when it cannot."""

    path: str | None = None
    factory: str | None = None
    name: str | None = None
    version: str | None = None
    allow_pickle: bool = False
    allow_nan: bool = False
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    providers: list[str] | None = None
    batching: BatchingConfig = msgspec.field(default_factory=BatchingConfig)
    breaker: BreakerConfig | None = None
    fallback: list[FallbackStepConfig] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.factory is None):
            raise ValueError("give exactly one of path (a model file) or factory (module:function)")


class DecisionConfig(_Strict):
    """Score to decision: ``thresholds`` maps each decision to the lowest score that earns it."""

    output: str = "probabilities"
    column: int | None = 1
    thresholds: dict[str, float] = msgspec.field(default_factory=dict)
    default: str = "approve"
    include: list[str] = msgspec.field(default_factory=list)


class SinkRetryConfig(_Strict):
    """Failing sinks (see :class:`rtinfer.pipeline.SinkResilience`): transient errors are
    retried with jittered backoff within a budget; a sink that keeps failing opens its
    breaker and the pipeline stops reading until a probe succeeds."""

    attempts: int = 3
    backoff_ms: float = 10.0
    max_backoff_ms: float = 1000.0
    budget: float = 0.1
    consecutive_failures: int = 5
    open_s: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1 (1: no retry), got {self.attempts}")
        if not 0 < self.backoff_ms <= self.max_backoff_ms:
            raise ValueError(
                f"need 0 < backoff_ms <= max_backoff_ms, got {self.backoff_ms} and "
                f"{self.max_backoff_ms}"
            )
        if not 0 <= self.budget <= 1:
            raise ValueError(f"budget must be between 0 and 1 (0.1: 10% extra), got {self.budget}")
        if self.consecutive_failures < 1:
            raise ValueError(
                f"consecutive_failures must be at least 1, got {self.consecutive_failures}"
            )
        if not self.open_s > 0:
            raise ValueError(f"open_s must be more than 0, got {self.open_s}")


class RuntimeConfig(_Strict):
    """How the pipeline runs: batch read size, batches in flight, flush interval, the
    traffic class of its model calls, failing sinks."""

    read_size: int = 256
    max_in_flight: int = 4
    flush_interval_ms: float = 10.0
    priority: Literal["critical", "best_effort"] = "critical"
    sink_retry: SinkRetryConfig = msgspec.field(default_factory=SinkRetryConfig)

    def __post_init__(self) -> None:
        if self.read_size < 1:
            raise ValueError(f"read_size must be at least 1, got {self.read_size}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {self.max_in_flight}")


class SloConfig(_Strict):
    """The pipeline's deadline: ``deadline_ms`` after ingestion for events that bring none,
    and what happens to an event whose deadline passed before the model ran it."""

    deadline_ms: float | None = None
    expired: Literal["dead_letter", "fallback", "late"] = "dead_letter"
    #: Dead-letter events already past their deadline when read, before decoding.
    shed: bool = False
    #: How shedding sets aside: ``event``, a dead letter with the payload per event; or
    #: ``range``, the source moved past a late backlog unread, a dead letter per range.
    shed_by: Literal["event", "range"] = "event"

    def __post_init__(self) -> None:
        if self.deadline_ms is not None and not self.deadline_ms > 0:
            raise ValueError(f"deadline_ms must be more than 0, got {self.deadline_ms}")
        if self.shed and self.deadline_ms is None:
            raise ValueError("shed needs deadline_ms: without a deadline nothing is ever late")
        if self.shed_by == "range" and not self.shed:
            raise ValueError("shed_by: range needs shed: true")


class PipelineConfig(_Strict):
    """A whole pipeline: source → decode → stages → model → decision → sinks."""

    source: SourceConfig
    model: ModelConfig
    sinks: list[SinkConfig]
    name: str = "pipeline"
    decode: DecodeConfig = msgspec.field(default_factory=DecodeConfig)
    stages: list[StageConfig] = msgspec.field(default_factory=list)
    decision: DecisionConfig | None = None
    dead_letters: SinkConfig | None = None
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    slo: SloConfig = msgspec.field(default_factory=SloConfig)


# -- loading ------------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\{([^}]*)\})")


def interpolate(text: str, environ: dict[str, str] | None = None, *, file: str = "<text>") -> str:
    """Replace ``${NAME}`` and ``${NAME:-default}`` with environment values; ``$$`` is ``$``."""
    env = os.environ if environ is None else environ
    out_lines = []
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if line.lstrip().startswith("#"):  # a comment line: left as it is
            out_lines.append(line)
            continue

        def substitute(match: re.Match[str], number: int = number) -> str:
            whole = match.group(0)
            if whole == "$$":
                return "$"
            if match.group(3) is not None:
                raise ConfigError(
                    f"line {number}: {whole!r} is not a valid variable; "
                    f"use ${{NAME}} or ${{NAME:-default}}",
                    file=file,
                )
            name, default = match.group(1), match.group(2)
            value = env.get(name)
            if value is None or (value == "" and ":-" in whole):
                if default is None:
                    raise ConfigError(
                        f"line {number}: environment variable {name} is not set and "
                        f"${{{name}}} has no default; set it or write ${{{name}:-default}}",
                        file=file,
                    )
                return default
            return value

        out_lines.append(_VAR.sub(substitute, line))
    return "".join(out_lines)


def parse_config(
    text: str, *, file: str = "<text>", environ: dict[str, str] | None = None
) -> PipelineConfig:
    """Parse and check a pipeline file's text."""
    try:
        raw = yaml.safe_load(interpolate(text, environ, file=file))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}invalid YAML: {problem}", file=file) from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"expected a mapping of settings (source, model, sinks, ...), "
            f"found {type(raw).__name__}",
            file=file,
        )
    try:
        return msgspec.convert(raw, PipelineConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise _explain(exc, raw, file) from None


def load_config(
    path: str | os.PathLike[str], *, environ: dict[str, str] | None = None
) -> PipelineConfig:
    """Read, interpolate and check a pipeline YAML file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("pipeline file not found", file=str(p)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the pipeline file: {exc}", file=str(p)) from None
    return parse_config(text, file=str(p), environ=environ)


_AT = re.compile(r" - at `\$(.*)`$")
_FIELD = re.compile(r"^Object (contains unknown|missing required) field `(.*)`$")
_GOT = re.compile(r"got `(\w+)`")
_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "null": type(None),
    "array": list,
    "object": dict,
}


def _explain(exc: msgspec.ValidationError, raw: Any, file: str) -> ConfigError:
    """Turn msgspec's message into one naming the dotted key, the value found there, and
    what would be accepted instead."""
    message = str(exc)
    match = _AT.search(message)
    parts: list[str] = []
    if match is not None:
        message = message[: match.start()]
        for name, index in re.findall(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]", match.group(1)):
            if index == "...":  # a value of a mapping: msgspec does not say which one
                index = _which_entry(_lookup(raw, ".".join(parts)), message)
            parts.append(name or index)
    field = _FIELD.match(message)
    if field is not None:
        info = _type_at(parts, raw)
        keys = [] if info is None else _struct_keys(info)
        name = field.group(2)
        parts.append(name)
        if field.group(1) == "missing required":
            message = f"missing required key {name!r}"
        else:
            message = f"unknown key {name!r}"
            close = difflib.get_close_matches(name, keys, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
            elif keys:
                message += f"; expected one of {', '.join(keys)}"
    elif message.startswith("Invalid value") and parts and parts[-1] == "type":
        union = _type_at(parts[:-1], raw, resolve=False)
        if isinstance(union, msgspec.inspect.UnionType):
            tags = [str(t.tag) for t in union.types if isinstance(t, msgspec.inspect.StructType)]
            message += f"; use one of {', '.join(tags)}"
    elif message.startswith("Invalid enum value"):
        literal = _type_at(parts, raw)
        if isinstance(literal, msgspec.inspect.LiteralType):
            message += f"; use one of {', '.join(map(str, literal.values))}"
    key = ".".join(parts)
    found = _lookup(raw, key)
    if found is not _MISSING and message.startswith("Expected"):
        message += f", found {found!r}"
    return ConfigError(message, file=file, key=key or None)


_MISSING = object()


def _lookup(raw: Any, key: str) -> Any:
    node = raw
    for part in key.split(".") if key else []:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _which_entry(mapping: Any, message: str) -> str:
    """The key of the first entry of ``mapping`` holding the kind of value msgspec refused."""
    got = _GOT.search(message)
    kind = _JSON_TYPES.get(got.group(1)) if got is not None else None
    if isinstance(mapping, dict):
        for name, value in mapping.items():
            if kind is int and isinstance(value, bool):  # msgspec calls a YAML bool `bool`
                continue
            if kind is None or isinstance(value, kind):
                return str(name)
    return "..."


def _type_at(parts: list[str], raw: Any, *, resolve: bool = True) -> Any:
    """The msgspec type info of the setting at ``parts``, a tagged union resolved by the
    ``type`` found in ``raw`` (unless not ``resolve``); ``None`` where it cannot be told."""
    info: Any = msgspec.inspect.type_info(PipelineConfig)
    node = raw
    for i in range(len(parts) + 1):
        if isinstance(info, msgspec.inspect.UnionType) and (resolve or i < len(parts)):
            options = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
            structs = [t for t in options if isinstance(t, msgspec.inspect.StructType)]
            if structs and structs[0].tag_field is not None and isinstance(node, dict):
                tag = node.get(structs[0].tag_field)
                options = [t for t in structs if t.tag == tag]
            if len(options) != 1:
                return None
            info = options[0]
        if i == len(parts):
            return info
        part = parts[i]
        node = _lookup(node, part)
        if isinstance(info, msgspec.inspect.StructType):
            fields = {f.encode_name: f.type for f in info.fields}
            info = fields.get(part)
        elif isinstance(info, msgspec.inspect.ListType):
            info = info.item_type
        elif isinstance(info, msgspec.inspect.DictType):
            info = info.value_type
        else:
            return None
    return info


def _struct_keys(info: Any) -> list[str]:
    if not isinstance(info, msgspec.inspect.StructType):
        return []
    names = [f.encode_name for f in info.fields]
    return [info.tag_field, *names] if info.tag_field is not None else names


def import_object(spec: str, *, key: str | None = None, file: str | None = None) -> Any:
    """Import ``package.module:attribute`` (what ``use`` and ``factory`` name)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"expected 'package.module:name', found {spec!r}", key=key, file=file)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raised while importing
        raise ConfigError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}",
            key=key,
            file=file,
        ) from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"module {module_name!r} has no attribute {attr!r}", key=key, file=file
            ) from None
    return obj
