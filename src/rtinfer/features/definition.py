"""Features declared once: the windows, the aggregates, the key and the time they follow.

A :class:`FeatureSet` is what both the online stage
(:class:`~rtinfer.features.stage.FeatureStage`) and the offline backfill
(:func:`~rtinfer.features.backfill.backfill`) run, so a model is trained on
exactly the values it is served. Declare it in Python::

    FeatureSet(
        name="card",
        key="card",
        time="ts",
        time_unit="ms",
        features=[
            Feature("tx_10m", "count", window=Window.sliding("10m")),
            Feature("amount_10m", "sum", field="amount", window=Window.sliding("10m")),
        ],
    )

or in YAML (:func:`load_definition`), with the same names. Durations are
seconds, or strings such as ``"500ms"``, ``"30s"``, ``"10m"``, ``"1h"``, ``"1d"``.
Every check names the key at fault (``features.2.window``) and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..exceptions import ConfigError

__all__ = [
    "AGGREGATES",
    "LATE_POLICIES",
    "Feature",
    "FeatureSet",
    "Window",
    "load_definition",
    "parse_duration",
]

#: Every aggregate a feature may take; ``count`` alone needs no ``field``.
AGGREGATES = (
    "count", "sum", "mean", "min", "max", "std", "last", "distinct", "approx_distinct", "ewm",
)  # fmt: skip
#: What happens to an event later than the allowed lateness.
LATE_POLICIES = ("dead_letter", "side_output", "update")
WINDOW_KINDS = ("sliding", "tumbling", "hopping", "session")

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_duration(value: object, *, key: str) -> float:
    """Seconds from a number (seconds) or a string such as ``"10m"``; must be positive."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a duration, got {value!r}; write e.g. 30 or '10m'", key=key)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ConfigError(
            f"expected a duration (seconds, or a string like '500ms', '30s', '10m', '1h', "
            f"'1d'), got {value!r}",
            key=key,
        )
    if not seconds >= 0 or seconds == float("inf"):
        raise ConfigError(f"a duration must be 0 or more and finite, got {value!r}", key=key)
    return seconds


@dataclass(frozen=True, slots=True)
class Window:
    """Which of a key's events an event's feature is computed over.

    - ``sliding(size)``: the key's events in ``(t - size, t]``, ``t`` the event's time;
    - ``tumbling(size)``: those in the window ``[k * size, (k + 1) * size)`` holding ``t``;
    - ``hopping(size, hop)``: those in the newest window ``[k * hop, k * hop + size)``
      holding ``t``;
    - ``session(gap)``: those in the session holding the event: a run of events, in
      event time, each less than ``gap`` after the one before.

    Only events that have arrived so far count (the event itself included).
    """

    kind: str
    size: float
    hop: float | None = None

    @classmethod
    def sliding(cls, size: float | str) -> Window:
        return cls("sliding", parse_duration(size, key="window.sliding"))

    @classmethod
    def tumbling(cls, size: float | str) -> Window:
        return cls("tumbling", parse_duration(size, key="window.tumbling"))

    @classmethod
    def hopping(cls, size: float | str, hop: float | str) -> Window:
        return cls(
            "hopping",
            parse_duration(size, key="window.hopping"),
            parse_duration(hop, key="window.hop"),
        )

    @classmethod
    def session(cls, gap: float | str) -> Window:
        return cls("session", parse_duration(gap, key="window.session"))

    def check(self, key: str) -> None:
        if self.kind not in WINDOW_KINDS:
            raise ConfigError(
                f"unknown window kind {self.kind!r}; use one of {', '.join(WINDOW_KINDS)}",
                key=key,
            )
        if not self.size > 0:
            raise ConfigError(
                f"a {self.kind} window needs a size above 0, got {self.size}", key=key
            )
        if self.kind == "hopping":
            if self.hop is None or not 0 < self.hop <= self.size:
                raise ConfigError(
                    f"a hopping window needs 0 < hop <= size, got size {self.size} and hop "
                    f"{self.hop}",
                    key=key,
                )
        elif self.hop is not None:
            raise ConfigError(f"only a hopping window takes a hop, not a {self.kind} one", key=key)

    @classmethod
    def parse(cls, value: object, *, key: str) -> Window:
        """From YAML: ``{sliding: 10m}``, ``{tumbling: 1h}``, ``{hopping: 10m, hop: 1m}``,
        ``{session: 30m}``."""
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a window such as {{sliding: 10m}}, got {value!r}", key=key)
        kinds = [k for k in value if k in WINDOW_KINDS]
        extra = set(value) - set(WINDOW_KINDS) - {"hop"}
        if len(kinds) != 1 or extra:
            raise ConfigError(
                f"a window names exactly one of {', '.join(WINDOW_KINDS)} (and, for hopping, "
                f"hop), got keys {sorted(map(str, value))}",
                key=key,
            )
        kind = kinds[0]
        size = parse_duration(value[kind], key=f"{key}.{kind}")
        hop = parse_duration(value["hop"], key=f"{key}.hop") if "hop" in value else None
        window = cls(kind, size, hop)
        window.check(key)
        return window

    def describe(self) -> str:
        if self.kind == "hopping":
            return f"hopping({self.size:g}s, hop {self.hop:g}s)"
        return f"{self.kind}({self.size:g}s)"


@dataclass(frozen=True, slots=True)
class Feature:
    """One output column: ``agg`` of ``field`` over ``window`` (``count`` needs no field).

    ``std`` is the population standard deviation; ``last`` the value of the latest
    event in event time (the latest to arrive among equal times); ``distinct`` the
    exact number of distinct values; ``approx_distinct`` a HyperLogLog estimate of it
    (:mod:`~rtinfer.features.sketch`: relative standard error ``1.04 / sqrt(2 **
    precision)``, 1.6 % at the default ``precision`` 12), whose state per event is one
    small integer whatever the values; ``ewm`` the exponentially weighted mean in
    event-time order, weight ``alpha`` on the newest (``m = x0``, then ``m += alpha *
    (x - m)`` for each later value).

    ``current=False``: the window holds only the key's events *before* this one (in
    event time; equal times in arrival order), e.g. "the previous amount" (``last``)
    or "the usual amount so far" (``ewm``); when there are none the value is
    ``default`` (NaN unless given; ``count``, ``sum`` and the distinct counts give 0).
    """

    name: str
    agg: str
    field: str | None = None
    window: Window = dataclasses.field(default_factory=lambda: Window("sliding", 60.0))
    current: bool = True
    default: float | None = None
    alpha: float | None = None
    precision: int | None = None


@dataclass(frozen=True, slots=True)
class FeatureSet:
    """The features of one stream, computed per ``key`` in event ``time``.

    ``key``: the field of the decoded event the state is kept per (``None``: the
    event's broker key). ``time``: the field holding its event time, in
    ``time_unit`` (``"ms"`` or ``"s"``) since the epoch; ``None`` takes the event's
    ``event_time`` (set by the decode stage, in seconds); ``"processing"`` takes the
    time it was received (``ingest_time``), so nothing is ever late.

    The watermark is the latest event time seen minus ``out_of_orderness``
    (seconds). An event older than the watermark is late; one older than the
    watermark minus ``allowed_lateness`` is handled by ``late``: ``dead_letter``
    (the default), ``side_output`` (written to the stage's side output, not
    counted), or ``update`` (counted and emitted all the same, over whatever state
    the windows still keep).
    """

    name: str
    features: Sequence[Feature]
    key: str | None = None
    time: str | None = None
    time_unit: str = "ms"
    out_of_orderness: float = 0.0
    allowed_lateness: float = 0.0
    late: str = "dead_letter"

    def __post_init__(self) -> None:
        self.check()

    @property
    def names(self) -> list[str]:
        """The output columns, in order."""
        return [f.name for f in self.features]

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the key of the first mistake."""
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(
                f"a feature set's name must be a word (letters, digits, _), got {self.name!r}",
                key="name",
            )
        if self.time_unit not in ("ms", "s"):
            raise ConfigError(
                f"time_unit must be 'ms' or 's', got {self.time_unit!r}", key="time_unit"
            )
        if self.late not in LATE_POLICIES:
            raise ConfigError(
                f"late must be one of {', '.join(LATE_POLICIES)}, got {self.late!r}", key="late"
            )
        for name in ("out_of_orderness", "allowed_lateness"):
            parse_duration(getattr(self, name), key=name)
        if not self.features:
            raise ConfigError("a feature set needs at least one feature", key="features")
        seen: set[str] = set()
        for i, feature in enumerate(self.features):
            where = f"features.{i}"
            if not isinstance(feature.name, str) or not _NAME.match(feature.name):
                raise ConfigError(
                    f"a feature's name must be a word (letters, digits, _), got {feature.name!r}",
                    key=f"{where}.name",
                )
            if feature.name in seen:
                raise ConfigError(
                    f"feature {feature.name!r} is declared twice", key=f"{where}.name"
                )
            seen.add(feature.name)
            if feature.agg not in AGGREGATES:
                raise ConfigError(
                    f"unknown aggregate {feature.agg!r}; use one of {', '.join(AGGREGATES)}",
                    key=f"{where}.agg",
                )
            if feature.agg == "count" and feature.field is not None:
                raise ConfigError("count takes no field (it counts events)", key=f"{where}.field")
            if feature.agg != "count" and not feature.field:
                raise ConfigError(
                    f"{feature.agg} needs a field, the event field it aggregates",
                    key=f"{where}.field",
                )
            feature.window.check(f"{where}.window")
            _check_options(feature, where)


def _check_options(feature: Feature, where: str) -> None:
    if not isinstance(feature.current, bool):
        raise ConfigError(
            f"current is true or false, got {feature.current!r}", key=f"{where}.current"
        )
    if feature.default is not None:
        if feature.current:
            raise ConfigError(
                "default is the value when the window holds no earlier event: it needs "
                "current: false",
                key=f"{where}.default",
            )
        if isinstance(feature.default, bool) or not isinstance(feature.default, int | float):
            raise ConfigError(
                f"default is a number, got {feature.default!r}", key=f"{where}.default"
            )
    if feature.agg == "ewm":
        alpha = feature.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= 1:
            raise ConfigError(
                f"ewm needs alpha, the weight of the newest value, in (0, 1], got {alpha!r}",
                key=f"{where}.alpha",
            )
    elif feature.alpha is not None:
        raise ConfigError("only ewm takes alpha", key=f"{where}.alpha")
    if feature.agg == "approx_distinct":
        p = feature.precision
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or not 4 <= p <= 18):
            raise ConfigError(
                f"precision is an integer from 4 to 18 (2**precision registers), got {p!r}",
                key=f"{where}.precision",
            )
    elif feature.precision is not None:
        raise ConfigError("only approx_distinct takes precision", key=f"{where}.precision")


_SET_KEYS = {
    "name", "key", "time", "time_unit", "out_of_orderness", "allowed_lateness", "late", "features",
}  # fmt: skip
_FEATURE_KEYS = {
    "name", "agg", "field", "window", "current", "default", "alpha", "precision",
}  # fmt: skip


def definition_from_dict(data: object, *, file: str | None = None) -> FeatureSet:
    """A :class:`FeatureSet` from parsed YAML/JSON; errors name ``file`` and the key."""
    try:
        return _from_dict(data)
    except ConfigError as exc:
        if file is None:
            raise
        error = ConfigError(str(exc), file=file)
        error.key = exc.key
        raise error from None


def _from_dict(data: object) -> FeatureSet:
    if not isinstance(data, Mapping):
        raise ConfigError(f"a feature definition is a mapping, got {type(data).__name__}")
    unknown = set(data) - _SET_KEYS
    if unknown:
        raise ConfigError(
            f"unknown keys {sorted(map(str, unknown))}; known: {', '.join(sorted(_SET_KEYS))}",
            key=str(sorted(map(str, unknown))[0]),
        )
    for required in ("name", "features"):
        if required not in data:
            raise ConfigError(f"'{required}' is required", key=required)
    raw_features = data["features"]
    if not isinstance(raw_features, Sequence) or isinstance(raw_features, str):
        raise ConfigError("features is a list of features", key="features")
    features = []
    for i, item in enumerate(raw_features):
        where = f"features.{i}"
        if not isinstance(item, Mapping):
            raise ConfigError(f"a feature is a mapping, got {item!r}", key=where)
        unknown = set(item) - _FEATURE_KEYS
        if unknown:
            raise ConfigError(
                f"unknown keys {sorted(map(str, unknown))}; known: "
                f"{', '.join(sorted(_FEATURE_KEYS))}",
                key=f"{where}.{sorted(map(str, unknown))[0]}",
            )
        for required in ("name", "agg", "window"):
            if required not in item:
                raise ConfigError(f"'{required}' is required", key=f"{where}.{required}")
        features.append(
            Feature(
                name=item["name"],
                agg=item["agg"],
                field=item.get("field"),
                window=Window.parse(item["window"], key=f"{where}.window"),
                current=item.get("current", True),
                default=item.get("default"),
                alpha=item.get("alpha"),
                precision=item.get("precision"),
            )
        )
    for name in ("key", "time"):
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name} is a field name, got {value!r}", key=name)
    return FeatureSet(
        name=data["name"],
        features=features,
        key=data.get("key"),
        time=data.get("time"),
        time_unit=data.get("time_unit", "ms"),
        out_of_orderness=parse_duration(data.get("out_of_orderness", 0), key="out_of_orderness"),
        allowed_lateness=parse_duration(data.get("allowed_lateness", 0), key="allowed_lateness"),
        late=data.get("late", "dead_letter"),
    )


def load_definition(source: str | Path | FeatureSet | Mapping[str, Any]) -> FeatureSet:
    """A :class:`FeatureSet` from a YAML file's path, a parsed mapping, or itself."""
    if isinstance(source, FeatureSet):
        return source
    if isinstance(source, Mapping):
        return definition_from_dict(source)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the feature definition: {exc}", file=str(path)) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", file=str(path)) from exc
    return definition_from_dict(data, file=str(path))
