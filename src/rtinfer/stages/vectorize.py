"""Named fields of the decoded events to one model input array."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..exceptions import ConfigError
from ..types import Batch

__all__ = ["Vectorize"]


class Vectorize:
    """Build a model input from named fields of each decoded event.

    ``fields`` are read from each event's data (attributes of a Struct, or keys
    of a dict); booleans become 0/1. An event whose fields are missing, not
    numbers, or integers too large for ``dtype`` is dead-lettered alone.
    """

    __slots__ = ("_dtype", "_get", "fields", "input", "name")

    def __init__(self, fields: Sequence[str], *, input: str = "features", dtype: Any = "float32"):
        if not fields:
            raise ConfigError("vectorize needs at least one field", key="stages.vectorize.fields")
        self.name = "vectorize"
        self.fields = list(fields)
        self.input = input
        self._dtype = np.dtype(dtype)
        self._get = operator.attrgetter(*self.fields) if len(fields) > 1 else None

    def _row(self, data: Any) -> tuple[Any, ...]:
        if isinstance(data, dict):
            return tuple(data[f] for f in self.fields)
        if self._get is None:
            return (getattr(data, self.fields[0]),)
        return tuple(self._get(data))

    def _array(self, rows: list[tuple[Any, ...]]) -> np.ndarray[Any, Any]:
        # A float too large for the dtype becomes infinity (the model stage dead-letters
        # it, naming the column), without a warning per batch.
        with np.errstate(over="ignore", invalid="ignore"):
            return np.array(rows, dtype=self._dtype).reshape(len(rows), len(self.fields))

    def __call__(self, batch: Batch) -> Batch:
        rows: list[tuple[Any, ...]] = []
        at: list[int] = []
        bad: dict[int, str] = {}
        for i, event in enumerate(batch.events):
            try:
                row = self._row(event.data)
            except (AttributeError, KeyError, TypeError) as exc:
                bad[i] = f"missing field for model input {self.input!r}: {exc}"
                continue
            if not all(isinstance(v, int | float) for v in row):  # bool is an int
                kinds = {f: type(v).__name__ for f, v in zip(self.fields, row, strict=True)}
                bad[i] = f"model input {self.input!r} needs numbers, got {kinds}"
                continue
            rows.append(row)
            at.append(i)
        try:
            array = self._array(rows)
        except (OverflowError, ValueError):
            # An integer too large for the dtype: find the events holding one, drop them alone.
            kept: list[tuple[Any, ...]] = []
            for i, row in zip(at, rows, strict=True):
                try:
                    self._array([row])
                except (OverflowError, ValueError) as exc:
                    bad[i] = f"model input {self.input!r} cannot hold {row} as {self._dtype}: {exc}"
                else:
                    kept.append(row)
            array = self._array(kept)
        order = sorted(bad)
        batch.drop(order, self.name, [bad[i] for i in order])
        batch.inputs = {self.input: array}
        return batch
