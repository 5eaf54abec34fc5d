"""Running rtinfer's coroutines: on uvloop where it is installed, else on asyncio's own loop."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LOOP_SCHEDULES", "freeze_heap", "run", "schedule_loop", "schedule_normally"]

#: How the event loop's thread may be scheduled (``rtinfer serve --loop-sched``).
LOOP_SCHEDULES = ("batch", "normal")

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a new event loop (uvloop when available)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def freeze_heap() -> None:
    """Put what start-up made (modules, classes, models, configuration) out of the cyclic
    garbage collector's reach, for a process that rtinfer runs from start to end.

    A full collection otherwise walks every one of those objects, and it runs on the
    event loop: measured under overload on ``rtinfer serve`` (benchmarks/overload.py), its
    pauses went from 31 ms to 9 ms at most, and the p99 time to refuse a request at
    capacity from 19 ms to 4 ms. Garbage is collected once first. What is frozen is never
    collected as a cycle again: a model version unloaded later frees what of it is not in
    a reference cycle, and keeps the rest (once: versions loaded later are not frozen).
    """
    gc.collect()
    gc.freeze()


def schedule_loop(how: str) -> bool:
    """Schedule the calling thread (the event loop's) as ``how``: ``"batch"`` is Linux's
    ``SCHED_BATCH``, ``"normal"`` leaves it be. Returns whether ``SCHED_BATCH`` is now set.

    A model that shares its cores with the event loop computes while requests come in one
    at a time; under the default policy each one's wakeup preempts the model at once, and
    the core switches back and forth thousands of times a second. A batch thread's wakeup
    waits for the running thread's time slice instead (its fair share of the core is the
    same), and the loop then handles what arrived meanwhile together. Measured on one core
    (benchmarks/overload.py, a 1 ms model): goodput at 2x, 5x and 10x capacity 91%, 78%
    and 37% against 79%, 58% and 18%. The price is up to one time slice (a few ms) more
    before a request is read while the model computes. Threads started from this one
    afterwards inherit the policy. Where the platform has no ``SCHED_BATCH`` (or refuses
    it), nothing changes.
    """
    if how not in LOOP_SCHEDULES:
        raise ValueError(f"unknown loop schedule {how!r}; use one of {', '.join(LOOP_SCHEDULES)}")
    policy = getattr(os, "SCHED_BATCH", None)
    if how != "batch" or policy is None:
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        return False
    return True


def schedule_normally() -> None:
    """Give the calling thread the normal policy back if it inherited ``SCHED_BATCH``.

    A thread started from an event loop that :func:`schedule_loop` made a batch thread
    inherits the policy: a model thread calls this as it starts, so a version loaded
    while serving computes as the ones loaded before the loop yielded do. Raising no
    priority, it needs no privilege; where it is refused, nothing changes.
    """
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None:
        return
    try:
        if os.sched_getscheduler(0) == batch:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError:
        pass
