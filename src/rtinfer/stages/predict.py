"""The model stage: a batch's inputs through the model's shared micro-batcher."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..batching import MicroBatcher
from ..exceptions import Closed, ConfigError, DeadlineExceeded, ModelInputError, Overloaded
from ..types import Batch

__all__ = ["Predict"]


class Predict:
    """Run the batch's inputs through a model's shared micro-batcher.

    Rows holding NaN or infinity are dead-lettered first unless ``allow_nan``.
    When the model fails on the batch, each event is retried alone, so only
    the events the model cannot handle are dead-lettered. Events whose deadline
    passes before the model runs them are dead-lettered as expired.
    ``column_names`` (per input) make the NaN message name the column.

    ``wait``: when the batcher is full, wait for room (streams: backpressure) or fail
    at once with :class:`~rtinfer.exceptions.Overloaded` (requests: 503). Overloaded
    and Closed are the caller's to handle; they never dead-letter an event.
    """

    def __init__(
        self,
        batcher: MicroBatcher,
        *,
        allow_nan: bool = False,
        column_names: Mapping[str, Sequence[str]] | None = None,
        wait: bool = True,
    ) -> None:
        self.name = "model"
        self.batcher = batcher
        self.wait = wait
        self.allow_nan = allow_nan
        self.column_names = {k: list(v) for k, v in (column_names or {}).items()}

    async def start(self) -> None:
        await self.batcher.start()

    async def aclose(self) -> None:
        await self.batcher.aclose()

    async def __call__(self, batch: Batch) -> Batch:
        if not batch.events:
            return batch
        if batch.inputs is None:
            raise ConfigError(
                "no stage before the model built its inputs; add a vectorize stage or a "
                "stage that sets batch.inputs"
            )
        if not self.allow_nan:
            self._drop_non_finite(batch)
            if not batch.events:
                return batch
        inputs = batch.inputs
        try:
            batch.outputs = await self.batcher.submit(
                inputs, deadline=batch.deadline(), wait=self.wait
            )
            batch.model_version = self.batcher.model.version
        except (DeadlineExceeded, ModelInputError) as exc:
            batch.drop_all(self.name, str(exc))
        except (Overloaded, Closed):
            raise
        except Exception as exc:
            if len(batch) == 1:  # it already ran alone: this event is what the model refuses
                batch.drop_all(self.name, f"model failed on this event: {exc}")
            else:
                await self._one_by_one(batch)
        return batch

    def _drop_non_finite(self, batch: Batch) -> None:
        assert batch.inputs is not None
        bad_mask: np.ndarray[Any, Any] | None = None
        for array in batch.inputs.values():
            if array.dtype.kind != "f":
                continue
            flat = array.reshape(array.shape[0], -1)
            row_bad = np.asarray(~np.isfinite(flat).all(axis=1))
            bad_mask = row_bad if bad_mask is None else bad_mask | row_bad
        if bad_mask is None or not bad_mask.any():
            return
        rows = np.flatnonzero(bad_mask).tolist()
        batch.drop(rows, self.name, [self._nan_reason(batch, r) for r in rows])

    def _nan_reason(self, batch: Batch, row: int) -> str:
        assert batch.inputs is not None
        for name, array in batch.inputs.items():
            if array.dtype.kind != "f":
                continue
            values = array[row].reshape(-1)
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                col = int(bad[0])
                names = self.column_names.get(name)
                label = f"{names[col]!r}" if names and col < len(names) else f"column {col}"
                return (
                    f"model input {name!r} {label} is {values[col]}; NaN and infinity are not "
                    f"allowed (set allow_nan to pass them to the model)"
                )
        return "NaN or infinity in the model input"

    async def _one_by_one(self, batch: Batch) -> None:
        assert batch.inputs is not None
        inputs = batch.inputs
        deadline = batch.deadline()
        results = await asyncio.gather(
            *(
                self.batcher.submit(
                    {k: v[i : i + 1] for k, v in inputs.items()},
                    deadline=deadline,
                    wait=self.wait,
                )
                for i in range(len(batch))
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, Overloaded | Closed):
                raise result
        bad = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        good = [r for r in results if not isinstance(r, BaseException)]
        batch.drop(bad, self.name, [f"model failed on this event: {results[i]}" for i in bad])
        if good:
            batch.outputs = {k: np.concatenate([g[k] for g in good]) for k in good[0]}
            batch.model_version = self.batcher.model.version
