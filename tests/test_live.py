"""The live view: plain lines when the stream is not a terminal, a table when it is."""

from __future__ import annotations

import asyncio
import io

from conftest import payload, python_model
from rtinfer.batching import MicroBatcher
from rtinfer.observability.live import LiveView
from rtinfer.pipeline import Pipeline
from rtinfer.sinks import ListSink
from rtinfer.stages import Decode, Outputs, Predict, Vectorize
from rtinfer.testing import ListSource


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def _run_with_view(stream: io.StringIO) -> Pipeline:
    pipeline = Pipeline(
        ListSource([payload(i) for i in range(500)]),
        [Decode(), Vectorize(["x", "y"]), Predict(MicroBatcher(python_model())), Outputs()],
        [ListSink()],
        name="viewed",
    )
    view = asyncio.create_task(
        LiveView(pipeline, extra=lambda: {"extra row": "42"}, stream=stream, interval=0.001).run()
    )
    await pipeline.run()
    await asyncio.sleep(0.01)  # let it draw once more
    view.cancel()
    await asyncio.gather(view, return_exceptions=True)
    return pipeline


async def test_plain_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    await _run_with_view(stream)
    lines = stream.getvalue().splitlines()
    assert lines
    assert "events in / out / dead: 500 / 500 / 0" in lines[-1]
    assert "extra row: 42" in lines[-1]


async def test_a_table_on_a_terminal_ends_with_the_final_figures() -> None:
    stream = _Terminal()
    await _run_with_view(stream)
    text = stream.getvalue()
    assert "events in / out / dead" in text
    assert "500 / 500 / 0" in text
    assert "closed" in text  # the last frame is drawn after the run ended
