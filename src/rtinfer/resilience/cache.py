"""The prediction cache: rows seen before are answered without running the model.

Each row of a request is keyed by the model's name and version and a hash
(BLAKE2b, 128 bits) of that row's bytes in every input, with the inputs' names,
dtypes and row shapes: a new model version, or the same numbers in another dtype,
never meets an old answer. Rows are cached one by one, so in a batch of 256 rows of
which 200 were seen, the model runs on 56 and the answer is reassembled in order.

Two stores:

- :class:`MemoryStore`: an in-process LRU with a time-to-live, bounded in entries;
- :class:`RedisStore`: Redis, shared by every worker and replica (``rtinfer[redis]``).

A cache is an optimisation, never a dependency: when the store fails, is slow (past
``timeout``) or its breaker is open, the rows count as misses, the model answers, and
the error is counted in ``rtinfer_cache_errors_total`` — a request never fails because
of its cache. Hits and misses are counted per row in ``rtinfer_cache_hits_total`` and
``rtinfer_cache_misses_total``. A model whose answer may differ for the same input
(sampling, time-dependent features) must not be cached: pass ``deterministic=False``
(or give the model a ``deterministic = False`` attribute) and the cache steps aside.

::

    cache = PredictionCache(MemoryStore(max_entries=100_000, ttl_seconds=60))
    outputs = await cache.predict(model.name, model.version, inputs, batcher.submit)
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import numpy as np

from ..exceptions import CircuitOpen, MissingDependency
from ..observability.metrics import Metrics
from ..types import Arrays, Model
from .breaker import CircuitBreaker

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "CacheStore",
    "MemoryStore",
    "PredictionCache",
    "RedisStore",
    "Row",
    "is_deterministic",
    "row_keys",
]

#: The outputs of one row: each output's row (shape = the output's shape without axis 0).
Row = dict[str, np.ndarray[Any, Any]]
Clock = Callable[[], float]
Predict = Callable[[Arrays], Awaitable[Arrays]]


def is_deterministic(model: Model) -> bool:
    """False when the model says its answers vary (a ``deterministic = False`` attribute)."""
    return bool(getattr(model, "deterministic", True))


def row_keys(model: str, version: str, inputs: Arrays) -> list[bytes] | None:
    """One 16-byte key per row of ``inputs``, or ``None`` if the inputs cannot be hashed.

    Object arrays (Python strings and the like) have no stable bytes and are not cached.
    """
    header = hashlib.blake2b(digest_size=16)
    header.update(f"{model}\0{version}\0".encode())
    columns = []
    rows = -1
    for name in sorted(inputs):
        array = inputs[name]
        if array.dtype.hasobject or array.ndim == 0:
            return None
        rows = len(array)
        header.update(f"{name}\0{array.dtype.str}\0{array.shape[1:]}\0".encode())
        columns.append(np.ascontiguousarray(array).reshape(rows, -1).view(np.uint8))
    keys = []
    for i in range(rows):
        h = header.copy()
        for column in columns:
            h.update(column[i])
        keys.append(h.digest())
    return keys


class CacheStore(Protocol):
    """Where cached rows live. ``get_many`` answers ``None`` for a key it does not hold."""

    name: str

    async def get_many(self, keys: Sequence[bytes]) -> list[Row | None]: ...

    async def set_many(self, items: Sequence[tuple[bytes, Row]]) -> None: ...

    async def aclose(self) -> None: ...


class MemoryStore:
    """An in-process LRU of at most ``max_entries`` rows, each kept ``ttl_seconds``.

    Rows are kept as numpy arrays (no copy, no encoding); use it from one event loop.
    ``clock`` (monotonic seconds) is injectable for tests.
    """

    name = "memory"

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        ttl_seconds: float = 60.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be more than 0, got {ttl_seconds}")
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, Row]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get_many(self, keys: Sequence[bytes]) -> list[Row | None]:
        now = self._clock()
        entries = self._entries
        found: list[Row | None] = []
        for key in keys:
            entry = entries.get(key)
            if entry is None:
                found.append(None)
            elif entry[0] <= now:
                del entries[key]
                found.append(None)
            else:
                entries.move_to_end(key)
                found.append(entry[1])
        return found

    async def set_many(self, items: Sequence[tuple[bytes, Row]]) -> None:
        expires = self._clock() + self.ttl_seconds
        entries = self._entries
        for key, row in items:
            entries[key] = (expires, row)
            entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    async def aclose(self) -> None:
        self._entries.clear()


class _EncodedRow(msgspec.Struct, array_like=True):
    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    data: list[bytes]


class RedisStore:
    """Rows in Redis under ``prefix`` + the key's hex, each with a TTL of ``ttl_seconds``.

    ``client`` is a ``redis.asyncio.Redis`` or a URL (``redis://host:6379/0``); a URL's
    client is made with short connect and socket timeouts (``timeout`` seconds) and no
    retries of its own, so a Redis that is gone costs a miss, not a stall. Rows are
    stored as MessagePack of each output's dtype, shape and bytes (never pickle).
    """

    name = "redis"

    def __init__(
        self,
        client: Redis | str,
        *,
        prefix: str = "rtinfer:cache:",
        ttl_seconds: float = 60.0,
        timeout: float = 0.05,
    ) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be more than 0, got {ttl_seconds}")
        if isinstance(client, str):
            try:
                from redis.asyncio import Redis
                from redis.asyncio.retry import Retry
                from redis.backoff import NoBackoff
            except ImportError as exc:
                raise MissingDependency("the Redis prediction cache", "redis") from exc
            # No retries inside the client: a cache miss is cheaper than a retry, and the
            # cache's breaker decides when to try Redis again.
            client = Redis.from_url(
                client,
                socket_connect_timeout=timeout,
                socket_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
            )
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError(
                "the Redis prediction cache stores bytes; give it a client made without "
                "decode_responses=True"
            )
        self.client = client
        self.prefix = prefix.encode()
        self.ttl_ms = max(1, round(ttl_seconds * 1000))
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(_EncodedRow)

    def _key(self, key: bytes) -> bytes:
        return self.prefix + key.hex().encode()

    async def get_many(self, keys: Sequence[bytes]) -> list[Row | None]:
        values = await self.client.mget([self._key(k) for k in keys])
        found: list[Row | None] = []
        for value in values:
            if not isinstance(value, bytes):  # absent (None)
                found.append(None)
                continue
            encoded = self._decoder.decode(value)
            found.append(
                {
                    name: np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
                    for name, dtype, shape, data in zip(
                        encoded.names, encoded.dtypes, encoded.shapes, encoded.data, strict=True
                    )
                }
            )
        return found

    async def set_many(self, items: Sequence[tuple[bytes, Row]]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for key, row in items:
                encoded = _EncodedRow(
                    names=list(row),
                    dtypes=[a.dtype.str for a in row.values()],
                    shapes=[a.shape for a in row.values()],
                    data=[np.ascontiguousarray(a).tobytes() for a in row.values()],
                )
                pipe.set(self._key(key), self._encoder.encode(encoded), px=self.ttl_ms)
            await pipe.execute()

    async def aclose(self) -> None:
        await self.client.aclose()


class PredictionCache:
    """Answers the rows it holds and runs ``predict`` on the others (see the module).

    ``store`` holds the rows; ``breaker`` guards a shared store (a :class:`RedisStore`
    gets one named ``cache:redis`` by default; ``None`` for a :class:`MemoryStore`);
    ``timeout`` bounds each store operation in seconds. Writes happen in the
    background, at most ``max_pending_writes`` at once (past that a write is skipped
    and counted), so filling the cache never delays an answer.
    """

    def __init__(
        self,
        store: CacheStore,
        *,
        breaker: CircuitBreaker | None = None,
        timeout: float = 0.05,
        max_pending_writes: int = 64,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        if breaker is None and isinstance(store, RedisStore):
            breaker = CircuitBreaker(
                f"cache:{store.name}", consecutive_failures=3, metrics=self.metrics
            )
        self.breaker = breaker
        self.timeout = timeout
        self.max_pending_writes = max_pending_writes
        self._writes: set[asyncio.Task[None]] = set()
        label = store.name
        self._m_get_errors = self.metrics.cache_errors.labels(label, "get")
        self._m_set_errors = self.metrics.cache_errors.labels(label, "set")
        self._m_skipped = self.metrics.cache_errors.labels(label, "set_skipped")
        self._label = label

    async def predict(
        self,
        model: str,
        version: str,
        inputs: Arrays,
        predict: Predict,
        *,
        deterministic: bool = True,
    ) -> Arrays:
        """The outputs for ``inputs``: cached rows from the store, the others from ``predict``.

        ``predict`` is called at most once, with only the rows the cache did not hold
        (in their order), or not at all when every row was a hit; its errors are the
        caller's. With ``deterministic=False`` it is simply called on everything.
        """
        if not deterministic:
            return await predict(inputs)
        keys = row_keys(model, version, inputs)
        if keys is None or not keys:
            return await predict(inputs)
        found = await self._get(keys)
        missing = [i for i, row in enumerate(found) if row is None]
        hits = len(keys) - len(missing)
        self.metrics.cache_hits.labels(self._label, model).inc(hits)
        self.metrics.cache_misses.labels(self._label, model).inc(len(missing))
        if not missing:
            rows = [r for r in found if r is not None]
            return {name: np.stack([r[name] for r in rows]) for name in rows[0]}
        if hits == 0:
            outputs = await predict(inputs)
        else:
            index = np.asarray(missing, dtype=np.intp)
            outputs = await predict({name: array[index] for name, array in inputs.items()})
        self._write(
            [(keys[i], {n: a[j] for n, a in outputs.items()}) for j, i in enumerate(missing)]
        )
        if hits == 0:
            return outputs
        merged: Arrays = {}
        for name, computed in outputs.items():
            full = np.empty((len(keys), *computed.shape[1:]), dtype=computed.dtype)
            full[missing] = computed
            for i, row in enumerate(found):
                if row is not None:
                    full[i] = row[name]
            merged[name] = full
        return merged

    async def _get(self, keys: list[bytes]) -> list[Row | None]:
        misses: list[Row | None] = [None] * len(keys)
        breaker = self.breaker
        try:
            probe = breaker.acquire() if breaker is not None else False
        except CircuitOpen:
            self._m_get_errors.inc()
            return misses
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                found = await self.store.get_many(keys)
        except Exception as exc:  # a cache never fails a request: every row is a miss
            if breaker is not None:
                breaker.release(probe, exc, time.monotonic() - started)
            self._m_get_errors.inc()
            return misses
        except BaseException as exc:
            if breaker is not None:
                breaker.release(probe, exc, 0.0)
            raise
        if breaker is not None:
            breaker.release(probe, None, time.monotonic() - started)
        return found

    def _write(self, items: list[tuple[bytes, Row]]) -> None:
        if len(self._writes) >= self.max_pending_writes:
            self._m_skipped.inc()
            return
        task = asyncio.get_running_loop().create_task(self._set(items))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _set(self, items: list[tuple[bytes, Row]]) -> None:
        breaker = self.breaker
        try:
            probe = breaker.acquire() if breaker is not None else False
        except CircuitOpen:
            self._m_set_errors.inc()
            return
        started = time.monotonic()
        error: BaseException | None = None
        try:
            async with asyncio.timeout(self.timeout):
                await self.store.set_many(items)
        except Exception as exc:
            error = exc
            self._m_set_errors.inc()
        except BaseException as exc:
            error = exc
            raise
        finally:
            if breaker is not None:
                breaker.release(probe, error, time.monotonic() - started)

    async def flush(self) -> None:
        """Wait for the background writes started so far."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    async def aclose(self) -> None:
        """Finish the background writes and close the store."""
        await self.flush()
        await self.store.aclose()
