"""A pipeline's stages as a request handler: JSON events in, the pipeline's results out.

:class:`PipelineScorer` serves the same stages a pipeline runs on its stream (decode
and validation against the pipeline's schema, feature stages, the model through its
shared :class:`~rtinfer.batching.MicroBatcher`, the decision), for requests: a body of
one event as a JSON object, or ``{"instances": [event, ...]}``, gives one result record
per event, in order. Each event is validated against the schema as a stream event
would be; an event that fails is the request's error (400, naming the instance), so a
caller never gets a partial answer.

Requests and the stream share the model's batcher, so concurrent requests are batched
with each other and with stream traffic. A request never waits for room in a full
batcher: it fails at once with :class:`~rtinfer.exceptions.Overloaded` (503 with
``Retry-After``), and its deadline is carried to the batcher, which never runs it
late (504).

With the stream, its model calls pass the limiter the server's requests for the model
pass (:meth:`PipelineScorer.share_limiter`), as the pipeline's ``runtime.priority``,
waiting for room where a request would be refused.

Feature stages keep their state across requests and stream events alike: a payment
scored over HTTP counts in its card's windows, as it would on the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec

from .exceptions import DeadlineExceeded, RtinferError
from .pipeline import Pipeline
from .resilience.limiter import AdaptiveLimiter
from .stages import Predict, compose
from .types import Batch, Event

__all__ = ["InvalidEvent", "PipelineScorer"]

log = logging.getLogger("rtinfer.scoring")


class InvalidEvent(RtinferError, ValueError):
    """An event of a request failed a stage of the pipeline (400): which one, and why."""


class _Instances(msgspec.Struct):
    instances: list[msgspec.Raw]


_decode_instances = msgspec.json.Decoder(_Instances).decode


class PipelineScorer:
    """Score request bodies with ``pipeline``'s stages.

    ``stream``: also run the pipeline itself (source → stages → sinks) while serving,
    so stream events and requests share the model and the feature state. Without it
    only the stages run, started and closed by this scorer.
    """

    def __init__(self, pipeline: Pipeline, *, stream: bool = False) -> None:
        predicts = [s for s in pipeline.stages if isinstance(s, Predict)]
        if len(predicts) != 1:
            raise RtinferError(
                f"pipeline {pipeline.name!r} has {len(predicts)} model stages; scoring needs one"
            )
        self.pipeline = pipeline
        self.name = pipeline.name
        self.stream = stream
        self.batcher = predicts[0].batcher
        self.breaker = predicts[0].breaker  # the model's, from model.breaker, or None
        self._predict = predicts[0]
        # The same stages, but the model stage fails fast when the batcher is full.
        request_stages = [s.for_requests() if s is predicts[0] else s for s in pipeline.stages]
        self._handler = compose(request_stages, metrics=pipeline.metrics, pipeline=pipeline.name)
        # The stages serve requests for as long as the server runs, even after a stream
        # that ended: this scorer starts and closes them, not the pipeline's run.
        pipeline.owns_stages = False
        self._stream_task: asyncio.Task[Any] | None = None
        self._started: list[Any] = []

    @property
    def ready(self) -> bool:
        """The model is warm (a stream that ended leaves the requests served)."""
        return self.batcher.ready

    def share_limiter(self, limiter: AdaptiveLimiter | None) -> None:
        """With ``stream``, admit the stream's model calls through ``limiter``, the one the
        server's requests for this model pass: a batch waits for room, as the pipeline's
        ``runtime.priority`` (a best-effort stream gives way to critical requests, and
        its source pauses meanwhile: nothing is dropped). Call it before :meth:`start`."""
        if self.stream:
            self._predict.admit_by(limiter)

    async def start(self) -> None:
        """Start the stages and, with ``stream``, the pipeline; wait until both are ready."""
        for stage in self.pipeline.stages:
            start = getattr(stage, "start", None)
            if start is not None:
                await start()
                self._started.append(stage)
        if self.stream:
            self._stream_task = asyncio.create_task(self.pipeline.run())
            ready = asyncio.create_task(self.pipeline.ready.wait())
            await asyncio.wait({self._stream_task, ready}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                ready.cancel()
                self._stream_task.result()  # raises the pipeline's start-up error
                raise RtinferError(f"pipeline {self.name!r} ended before it was running")
            self._stream_task.add_done_callback(self._stream_ended)

    def _stream_ended(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the stream of pipeline %r failed", self.name, exc_info=task.exception())
        else:
            log.info("the stream of pipeline %r ended; requests are still served", self.name)

    async def aclose(self) -> None:
        """Stop the pipeline (draining what it read) or close the stages started."""
        if self._stream_task is not None:
            self.pipeline.stop()
            await asyncio.gather(self._stream_task, return_exceptions=True)
            self._stream_task = None
        for stage in reversed(self._started):
            await stage.aclose()
        self._started.clear()

    async def score(self, body: bytes, *, deadline: float | None = None) -> list[Any]:
        """The result records for the events in ``body``, in order; see the module doc."""
        try:
            values = _decode_instances(body).instances
        except msgspec.DecodeError:
            values = [msgspec.Raw(body)]  # one event; the decode stage judges it
        if not values:
            raise InvalidEvent("instances is empty; send at least one event")
        now = time.time()
        events = [Event(bytes(value), ingest_time=now, deadline=deadline) for value in values]
        batch = await self._handler(Batch(events))
        if batch.dead:
            dead = batch.dead[0]
            index = next(i for i, event in enumerate(events) if event is dead.event)
            where = f"instance {index}" if len(events) > 1 else "the event"
            if dead.stage == "model" and deadline is not None and time.time() >= deadline:
                raise DeadlineExceeded(f"{where}: {dead.reason}")
            raise InvalidEvent(f"{where} was refused by stage {dead.stage!r}: {dead.reason}")
        return [event.result for event in batch.events]
