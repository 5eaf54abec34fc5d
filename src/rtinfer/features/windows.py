"""Which of a key's buffered events fall in an event's window, and which may be forgotten.

A key's state is a buffer of its events sorted by event time (equal times in
arrival order). For an event at time ``t`` inserted at index ``pos`` of the
buffer's ``times``, a window is a slice ``[lo, hi)`` of the buffer; every
aggregate of the window is computed over that slice. Each window kind is a
closure built once from the definition (:func:`range_of`), so the per-event path
makes no decision about kinds.

:func:`cut_of` says how much of a buffer no future event can see: every event
still to be accepted has a time at or after the *edge* (the watermark minus the
allowed lateness), so for windows that look back at most ``span`` it never sees
events at or before ``edge - span``; for sessions it never sees a session that
ended ``gap`` or more before the edge. Forgetting that prefix, or a whole key
whose buffer is all prefix, never changes a value.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence

from .definition import Window

__all__ = ["Cut", "Range", "cut_of", "range_of", "scaled"]

Time = float
#: ``(times, t, pos) -> (lo, hi)``: the slice of the buffer in the window of the event at ``pos``.
Range = Callable[[list[Time], Time, int], tuple[int, int]]
#: ``(times, edge) -> n``: how many of the buffer's oldest events no future event can see.
Cut = Callable[[list[Time], Time], int]


def scaled(seconds: float, scale: int) -> float:
    """A duration in the time field's unit; an integer when it is one (exact arithmetic)."""
    value = seconds * scale
    return int(value) if value == int(value) else value


def range_of(window: Window, scale: int) -> Range:
    """The slice function of ``window``, for times in units of ``1/scale`` seconds."""
    size = scaled(window.size, scale)
    if window.kind == "sliding":

        def sliding(times: list[Time], t: Time, pos: int) -> tuple[int, int]:
            return bisect_right(times, t - size), pos + 1

        return sliding
    if window.kind == "tumbling":

        def tumbling(times: list[Time], t: Time, pos: int) -> tuple[int, int]:
            start = (t // size) * size
            return bisect_left(times, start), bisect_left(times, start + size)

        return tumbling
    if window.kind == "hopping":
        assert window.hop is not None
        hop = scaled(window.hop, scale)

        def hopping(times: list[Time], t: Time, pos: int) -> tuple[int, int]:
            start = (t // hop) * hop  # the newest window holding t
            return bisect_left(times, start), bisect_left(times, start + size)

        return hopping
    if window.kind == "session":
        gap = size

        def session(times: list[Time], t: Time, pos: int) -> tuple[int, int]:
            lo = pos
            while lo and times[lo] - times[lo - 1] < gap:
                lo -= 1
            hi, n = pos + 1, len(times)
            while hi < n and times[hi] - times[hi - 1] < gap:
                hi += 1
            return lo, hi

        return session
    raise ValueError(f"unknown window kind {window.kind!r}")


def span_of(window: Window, scale: int) -> float:
    """How far before an event's time its window may reach (not for sessions)."""
    return scaled(window.size, scale)


def cut_of(windows: Sequence[Window], scale: int) -> Cut:
    """The function telling how many of a buffer's oldest events can be forgotten."""
    spans = [span_of(w, scale) for w in windows if w.kind != "session"]
    gaps = [scaled(w.size, scale) for w in windows if w.kind == "session"]
    span = max(spans) if spans else None
    gap = max(gaps) if gaps else None

    def before_sessions(times: list[Time], edge: Time) -> int:
        # Keep the whole session of the last event before the edge if a future event
        # (at or after the edge) or a kept event may still join it.
        assert gap is not None
        idx = bisect_left(times, edge)
        j = idx - 1
        if j < 0:
            return idx
        if times[j] > edge - gap or (idx < len(times) and times[idx] - times[j] < gap):
            while j and times[j] - times[j - 1] < gap:
                j -= 1
            return j
        return idx

    if gap is None:
        assert span is not None

        def cut(times: list[Time], edge: Time) -> int:
            return bisect_right(times, edge - span)

        return cut
    if span is None:
        return before_sessions

    def both(times: list[Time], edge: Time) -> int:
        return min(bisect_right(times, edge - span), before_sessions(times, edge))

    return both
