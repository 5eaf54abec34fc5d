"""The offline path: a feature set's values over historical events, for training.

::

    rtinfer features backfill features.yaml --input events.parquet --output train.parquet

reads the events (Parquet, CSV or JSON Lines, by extension) in the file's order,
which is taken as their arrival order, and runs them through the same
:class:`~.engine.Engine` and :class:`~.rows.RowReader` as the online
:class:`~.stage.FeatureStage`: replayed in that order, the stream gets the same
values, bit for bit, out-of-order and late events included. Events later than
the allowed lateness are left out (``dead_letter``, ``side_output``) or kept
(``update``), as online; events the stage would dead-letter for a bad field are
left out and counted.

The output holds, per kept event, the ``include`` columns (by default the
event's ``id`` when it has one, the key and the time) and one column per
feature, in the definition's order.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from ..exceptions import ConfigError, MissingDependency
from .definition import FeatureSet, load_definition
from .engine import Engine, Partition
from .rows import RowReader

__all__ = ["BackfillReport", "backfill", "backfill_rows", "read_events", "write_rows"]

_CHUNK = 4096  # rows per engine call: idle keys are evicted between chunks


@dataclass(slots=True)
class BackfillReport:
    """What a backfill did: rows read, rows written, and those left out, with the first reasons."""

    events: int = 0
    rows: int = 0
    late: int = 0
    invalid: int = 0
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "rows": self.rows,
            "late": self.late,
            "invalid": self.invalid,
            "reasons": self.reasons[:5],
        }


def backfill_rows(
    definition: FeatureSet | Mapping[str, Any] | str | Path,
    records: Iterable[Any],
    *,
    report: BackfillReport | None = None,
) -> Iterator[tuple[int, Any, list[float]]]:
    """``(index, record, values)`` for each kept record of ``records``, in order.

    ``records`` are dicts or ``msgspec.Struct`` events; the definition must take
    its key and time from fields (a file has no broker key or ingest time).
    """
    definition = load_definition(definition)
    if definition.key is None or definition.time in (None, "processing"):
        raise ConfigError(
            "the offline path reads key and time from fields: set the definition's key and "
            "time to field names",
            key="key" if definition.key is None else "time",
        )
    report = report if report is not None else BackfillReport()
    engine = Engine(definition)
    reader = RowReader(engine)
    part = Partition()
    keep_late = definition.late == "update"
    chunk: list[tuple[int, Any, tuple[Any, ...]]] = []
    for index, record in enumerate(records):
        report.events += 1
        try:
            chunk.append((index, record, reader.row(record)))
        except ValueError as exc:
            report.invalid += 1
            if len(report.reasons) < 5:
                report.reasons.append(f"event {index}: {exc}")
        if len(chunk) >= _CHUNK:
            yield from _run(engine, part, chunk, keep_late, report)
            chunk = []
    yield from _run(engine, part, chunk, keep_late, report)


def _run(
    engine: Engine,
    part: Partition,
    chunk: list[tuple[int, Any, tuple[Any, ...]]],
    keep_late: bool,
    report: BackfillReport,
) -> Iterator[tuple[int, Any, list[float]]]:
    if not chunk:
        return
    out, late = engine.apply(part, [row for _, _, row in chunk])
    engine.evict(part)
    part.touched.clear()
    part.evicted.clear()
    report.late += len(late)
    for (index, record, _), values in zip(chunk, out, strict=True):
        if values is not None:
            report.rows += 1
            yield index, record, values


def read_events(path: str | Path, *, key: str | None = None) -> Iterator[Any]:
    """The records of a Parquet, CSV or JSON Lines file, in order (dicts).

    CSV cells that read as integers or floats become numbers, parsed as JSON would parse
    them (Python's ``int`` and ``float``: the same bits); the ``key`` column stays text.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        decode = msgspec.json.Decoder().decode
        with path.open("rb") as file:
            for line in file:
                if line.strip():
                    yield decode(line)
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as file:
            for record in csv.DictReader(file):
                yield {k: v if k == key else _cell(v) for k, v in record.items()}
    elif suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq  # type: ignore[import-untyped]  # no stubs
        except ImportError as exc:
            raise MissingDependency("reading Parquet events for a backfill", "parquet") from exc
        yield from pq.read_table(path).to_pylist()
    else:
        raise ConfigError(
            f"cannot tell the format of {str(path)!r}: name it .parquet, .csv or .jsonl",
            key="input",
        )


def write_rows(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write rows to a Parquet, CSV or JSON Lines file, by extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        encode = msgspec.json.Encoder().encode
        with path.open("wb") as file:
            for row in rows:
                file.write(encode(dict(zip(columns, row, strict=True))) + b"\n")
    elif suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            writer.writerows([_csv(v) for v in row] for row in rows)
    elif suffix in (".parquet", ".pq"):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise MissingDependency("writing Parquet features", "parquet") from exc
        data = list(rows)
        table = pa.table({c: [r[i] for r in data] for i, c in enumerate(columns)})
        pq.write_table(table, path)
    else:
        raise ConfigError(
            f"cannot tell the format of {str(path)!r}: name it .parquet, .csv or .jsonl",
            key="output",
        )


def _cell(text: str) -> Any:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _csv(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value  # repr: the float round-trips


def backfill(
    definition: FeatureSet | Mapping[str, Any] | str | Path,
    input: str | Path,
    output: str | Path,
    *,
    include: Sequence[str] | None = None,
) -> BackfillReport:
    """Compute ``definition``'s features over the events in ``input``; write them to ``output``.

    ``include``: the input columns copied to each output row before the features
    (default: ``id`` when the events have one, then the key and the time).
    """
    definition = load_definition(definition)
    report = BackfillReport()
    records = read_events(input, key=definition.key)
    first = next(records, None)
    if first is None:
        write_rows(output, [*(include or []), *definition.names], [])
        return report
    if include is None:
        include = [c for c in ("id", definition.key, definition.time) if c and c in first]
    columns = [*include, *definition.names]

    def chained() -> Iterator[Any]:
        yield first
        yield from records

    def rows() -> Iterator[list[Any]]:
        for _, record, values in backfill_rows(definition, chained(), report=report):
            yield [record.get(c) for c in include] + values

    write_rows(output, columns, rows())
    return report


def main(definition: str | Path, input: str | Path, output: str | Path) -> int:
    """The ``rtinfer features backfill`` command: print the report as JSON, return 0."""
    report = backfill(definition, input, output)
    print(json.dumps(report.as_dict(), indent=2))
    return 0
