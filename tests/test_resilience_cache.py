"""The prediction cache: rows seen before skip the model; a broken store is only a miss.

A real Python model records the rows of every call, so a test sees exactly which rows
reached it. The Redis tests use the Redis at ``REDIS_URL`` (keys under a unique prefix,
deleted at the end), a port where nothing listens, and a private ``redis-server``
stopped and started again while it is in use.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from faults_helpers import REDIS_URL, RedisServer, free_port, redis_or_skip
from rtinfer.batching import MicroBatcher
from rtinfer.models import PythonModel
from rtinfer.observability.metrics import Metrics
from rtinfer.resilience import (
    BreakerState,
    CircuitBreaker,
    MemoryStore,
    PredictionCache,
    RedisStore,
    is_deterministic,
    row_keys,
)
from rtinfer.types import Arrays
from test_resilience_breaker import FakeClock

SAFETY = 10.0  # seconds: a safety net against a hang, never a timing assertion


class Scorer:
    """``score = 10 * x + y`` per row; records the ``x`` column of every call."""

    def __init__(self) -> None:
        self.calls: list[list[float]] = []

    def __call__(self, inputs: Arrays) -> Arrays:
        features = inputs["features"]
        self.calls.append(features[:, 0].tolist())
        score = 10 * features[:, :1] + features[:, 1:2]
        return {"score": score.astype(np.float32), "flag": (score[:, 0] > 25).astype(np.int64)}


@asynccontextmanager
async def scoring(metrics: Metrics) -> AsyncIterator[tuple[Scorer, MicroBatcher]]:
    scorer = Scorer()
    model = PythonModel(scorer, inputs={"features": ("float32", [None, 2])}, name="scorer")
    batcher = MicroBatcher(model, max_delay=0.0, metrics=metrics)
    await asyncio.wait_for(batcher.start(), SAFETY)
    scorer.calls.clear()  # forget the probe and warm-up calls
    try:
        yield scorer, batcher
    finally:
        await asyncio.wait_for(batcher.aclose(), SAFETY)


def features(*xs: float) -> Arrays:
    return {"features": np.asarray([[x, 1.0] for x in xs], dtype=np.float32)}


def expected(*xs: float) -> Arrays:
    return Scorer()(features(*xs))


def assert_same(got: Arrays, want: Arrays) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].tolist() == want[name].tolist(), name


def counted(metrics: Metrics, name: str, cache: str = "memory") -> float:
    value = metrics.registry.get_sample_value(name, {"cache": cache, "model": "scorer"})
    return 0.0 if value is None else value


def errors(metrics: Metrics, operation: str, cache: str = "redis") -> float:
    value = metrics.registry.get_sample_value(
        "rtinfer_cache_errors_total", {"cache": cache, "operation": operation}
    )
    return 0.0 if value is None else value


async def through(cache: PredictionCache, batcher: MicroBatcher, inputs: Arrays) -> Arrays:
    model = batcher.model
    outputs = await cache.predict(model.name, model.version, inputs, batcher.submit)
    await cache.flush()  # the background writes, so the next call sees them
    return outputs


# -- in process --------------------------------------------------------------------


async def test_rows_seen_before_skip_the_model() -> None:
    metrics = Metrics()
    cache = PredictionCache(MemoryStore(), metrics=metrics)
    async with scoring(metrics) as (scorer, batcher):
        assert_same(await through(cache, batcher, features(1, 2, 3)), expected(1, 2, 3))
        assert_same(await through(cache, batcher, features(1, 2, 3)), expected(1, 2, 3))
    assert scorer.calls == [[1, 2, 3]]
    assert counted(metrics, "rtinfer_cache_misses_total") == 3
    assert counted(metrics, "rtinfer_cache_hits_total") == 3


async def test_only_the_rows_not_cached_reach_the_model_and_the_answer_keeps_its_order() -> None:
    metrics = Metrics()
    cache = PredictionCache(MemoryStore(), metrics=metrics)
    async with scoring(metrics) as (scorer, batcher):
        await through(cache, batcher, features(2, 4))
        got = await through(cache, batcher, features(1, 2, 3, 4, 5))
    assert scorer.calls == [[2, 4], [1, 3, 5]]
    assert_same(got, expected(1, 2, 3, 4, 5))
    assert counted(metrics, "rtinfer_cache_hits_total") == 2


async def test_a_new_model_version_or_dtype_never_meets_an_old_answer() -> None:
    cache = PredictionCache(MemoryStore(), metrics=Metrics())
    calls: list[str] = []

    async def predict(inputs: Arrays) -> Arrays:
        calls.append(str(inputs["features"].dtype))
        return {"y": inputs["features"][:, :1].astype(np.float64)}

    x32 = features(1)
    x64 = {"features": x32["features"].astype(np.float64)}
    await cache.predict("m", "1", x32, predict)
    await cache.predict("m", "2", x32, predict)
    await cache.predict("m", "1", x64, predict)
    await cache.predict("other", "1", x32, predict)
    await cache.flush()
    await cache.predict("m", "1", x32, predict)
    assert calls == ["float32", "float32", "float64", "float32"]


def test_row_keys_depend_on_every_input_and_only_on_its_own_row() -> None:
    a = {"a": np.asarray([[1, 2], [3, 4]], dtype=np.int32), "b": np.asarray([1.0, 2.0])}
    keys = row_keys("m", "1", a)
    assert keys is not None
    assert len(set(keys)) == 2
    alone = row_keys("m", "1", {k: v[1:] for k, v in a.items()})
    assert alone == keys[1:]
    changed = row_keys("m", "1", {"a": a["a"], "b": np.asarray([1.0, 2.5])})
    assert changed is not None
    assert changed[0] == keys[0]
    assert changed[1] != keys[1]
    assert row_keys("m", "1", {"s": np.asarray(["x", "y"], dtype=object)}) is None


async def test_entries_expire_after_their_ttl() -> None:
    clock = FakeClock()
    metrics = Metrics()
    cache = PredictionCache(MemoryStore(ttl_seconds=30, clock=clock), metrics=metrics)
    async with scoring(metrics) as (scorer, batcher):
        await through(cache, batcher, features(1))
        clock.advance(29.9)
        await through(cache, batcher, features(1))
        clock.advance(0.1)
        await through(cache, batcher, features(1))
    assert scorer.calls == [[1], [1]]


async def test_the_least_recently_used_row_is_evicted_first() -> None:
    store = MemoryStore(max_entries=2)
    metrics = Metrics()
    cache = PredictionCache(store, metrics=metrics)
    async with scoring(metrics) as (scorer, batcher):
        await through(cache, batcher, features(1, 2))
        await through(cache, batcher, features(1))  # 1 is now the most recent
        await through(cache, batcher, features(3))  # evicts 2
        await through(cache, batcher, features(1, 2))
    assert len(store) == 2
    assert scorer.calls == [[1, 2], [3], [2]]


async def test_a_non_deterministic_model_is_never_cached() -> None:
    metrics = Metrics()
    cache = PredictionCache(MemoryStore(), metrics=metrics)
    async with scoring(metrics) as (scorer, batcher):
        model = batcher.model
        assert is_deterministic(model)
        model.deterministic = False  # type: ignore[attr-defined]
        assert not is_deterministic(model)
        for _ in range(2):
            await cache.predict(
                model.name, model.version, features(1), batcher.submit, deterministic=False
            )
    assert scorer.calls == [[1], [1]]
    assert counted(metrics, "rtinfer_cache_hits_total") == 0


async def test_the_models_errors_are_the_callers() -> None:
    cache = PredictionCache(MemoryStore(), metrics=Metrics())

    async def broken(inputs: Arrays) -> Arrays:
        raise RuntimeError("model down")

    with pytest.raises(RuntimeError, match="model down"):
        await cache.predict("m", "1", features(1), broken)
    assert len(cache.store) == 0  # type: ignore[arg-type]


# -- Redis ---------------------------------------------------------------------------


@pytest.fixture
async def shared_redis() -> AsyncIterator[tuple[str, Any]]:
    client = await redis_or_skip(REDIS_URL)
    prefix = f"test-resilience-cache-{uuid.uuid4().hex[:8]}:"
    try:
        yield prefix, client
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_redis_is_shared_by_two_workers(shared_redis: tuple[str, Any]) -> None:
    prefix, client = shared_redis
    metrics = Metrics()
    first = PredictionCache(RedisStore(REDIS_URL, prefix=prefix, ttl_seconds=30), metrics=metrics)
    second = PredictionCache(
        RedisStore(REDIS_URL, prefix=prefix, ttl_seconds=30), metrics=Metrics()
    )
    try:
        async with scoring(metrics) as (scorer, batcher):
            assert_same(await through(first, batcher, features(1, 2)), expected(1, 2))
            assert_same(await through(second, batcher, features(0, 1, 2)), expected(0, 1, 2))
        assert scorer.calls == [[1, 2], [0]]
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        assert len(keys) == 3
        for key in keys:
            assert 0 < await client.pttl(key) <= 30_000
    finally:
        await first.aclose()
        await second.aclose()


async def test_redis_gone_is_a_miss_and_its_breaker_stops_asking() -> None:
    metrics = Metrics()
    clock = FakeClock()
    breaker = CircuitBreaker(
        "cache:redis", consecutive_failures=2, open_seconds=30, clock=clock, metrics=metrics
    )
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    cache = PredictionCache(RedisStore(nowhere, timeout=1.0), breaker=breaker, metrics=metrics)
    try:
        async with scoring(metrics) as (scorer, batcher):
            for _ in range(4):
                assert_same(await through(cache, batcher, features(1, 2)), expected(1, 2))
        assert scorer.calls == [[1, 2]] * 4  # every request answered, by the model
        assert breaker.state is BreakerState.OPEN
        assert errors(metrics, "get") == 4
        # Two failed reads opened it; every later read and write was refused without Redis.
        rejected = metrics.registry.get_sample_value(
            "rtinfer_breaker_rejected_total", {"breaker": "cache:redis"}
        )
        assert (rejected or 0) >= 4
    finally:
        await cache.aclose()


async def test_redis_stopped_while_used_then_back(tmp_path: Path) -> None:
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        pytest.skip("redis-py is not installed (pip install 'rtinfer[redis]')")
    server = RedisServer(tmp_path)
    await server.start()
    metrics = Metrics()
    clock = FakeClock()
    breaker = CircuitBreaker(
        "cache:redis", consecutive_failures=1, open_seconds=30, clock=clock, metrics=metrics
    )
    cache = PredictionCache(
        RedisStore(server.url, timeout=1.0, ttl_seconds=3600), breaker=breaker, metrics=metrics
    )
    try:
        async with scoring(metrics) as (scorer, batcher):
            await through(cache, batcher, features(1))
            await through(cache, batcher, features(1))
            assert scorer.calls == [[1]]  # a hit
            await server.shutdown()
            assert_same(await through(cache, batcher, features(1)), expected(1))
            assert scorer.calls == [[1], [1]]  # a miss, answered by the model
            assert breaker.state is BreakerState.OPEN
            await server.start()  # same port, same data (append-only file)
            assert_same(await through(cache, batcher, features(1)), expected(1))
            assert scorer.calls == [[1], [1], [1]]  # still open: Redis is not asked yet
            clock.advance(30)
            assert_same(await through(cache, batcher, features(1)), expected(1))
            assert scorer.calls == [[1], [1], [1]]  # the probe read hit
            assert breaker.state is BreakerState.CLOSED
    finally:
        await cache.aclose()
        await server.cleanup()


def test_a_client_that_decodes_responses_is_refused() -> None:
    try:
        from redis.asyncio import Redis
    except ImportError:
        pytest.skip("redis-py is not installed (pip install 'rtinfer[redis]')")
    with pytest.raises(ValueError, match="decode_responses=True"):
        RedisStore(Redis.from_url(REDIS_URL, decode_responses=True))
