"""Enrichment look-ups: reference data fetched once per batch, cached for a while.

:class:`Enrich` reads each event's key field, looks up every key of the batch
that is not in its cache in **one** call (a Redis pipeline of ``HGETALL`` or one
``MGET``; one PostgreSQL query with ``= ANY($1)``), and appends the named fields
as columns of the model input. Answers (misses included) are cached for ``ttl``
seconds, at most ``max_entries`` of them (the oldest leave first).

Every look-up goes through a :class:`~rtinfer.resilience.CircuitBreaker`
(``enrich:NAME``, its state exported as ``rtinfer_breaker_state``). If a
look-up fails or takes longer than ``timeout`` seconds, the batch carries on
with each field's ``default`` (its fallback) and nothing is cached; the failure
opens the breaker (after ``consecutive_failures`` of them in a row, 1 by
default), and while it is open the batches that miss the cache take the
defaults at once, without calling: an outage costs one timeout per
``open_seconds`` (a probe), not one per batch. When a probe succeeds the breaker
closes and look-ups resume. Rows answered by the defaults are counted in
``rtinfer_fallback_outputs_total{chain="enrich:NAME",step="defaults"}`` (and
``step="lookup"`` for the others), failed look-ups in
``rtinfer_fallback_failures_total``; ``failures`` and ``short_circuited`` count
batches on the stage. A look-up awaits, so put this stage after the stages that
keep state in source order (:class:`~.stage.FeatureStage`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import msgspec
import numpy as np

from ..exceptions import CircuitOpen, ConfigError, MissingDependency
from ..observability.metrics import Metrics
from ..resilience import CircuitBreaker
from ..types import Batch

__all__ = ["Enrich", "Lookup", "PostgresLookup", "RedisLookup"]

log = logging.getLogger("rtinfer.features.enrich")


class Lookup(Protocol):
    """Fetches the records of many keys in one call; a missing key is left out."""

    async def fetch(self, keys: Sequence[Any]) -> dict[Any, Mapping[str, Any]]: ...

    async def aclose(self) -> None: ...


class RedisLookup:
    """Records in Redis under ``prefix + key``: hashes (``kind="hash"``) or JSON strings
    (``kind="json"``), fetched for a whole batch in one round trip."""

    def __init__(self, url: str, *, prefix: str = "", kind: str = "hash") -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:
            raise MissingDependency("enrichment from Redis", "redis") from exc
        if kind not in ("hash", "json"):
            raise ConfigError(f"kind must be hash or json, got {kind!r}", key="kind")
        self.prefix = prefix
        self.kind = kind
        self._client = aioredis.Redis.from_url(url)

    def _name(self, key: Any) -> bytes:
        raw = key if isinstance(key, bytes) else str(key).encode()
        return self.prefix.encode() + raw

    async def fetch(self, keys: Sequence[Any]) -> dict[Any, Mapping[str, Any]]:
        names = [self._name(k) for k in keys]
        found: dict[Any, Mapping[str, Any]] = {}
        if self.kind == "json":
            values = await self._client.mget(names)
            for key, value in zip(keys, values, strict=True):
                if value is not None:
                    found[key] = msgspec.json.decode(value)
            return found
        async with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(name)
            hashes = await pipe.execute()
        for key, fields in zip(keys, hashes, strict=True):
            if fields:
                found[key] = {k.decode(): v.decode() for k, v in fields.items()}
        return found

    async def aclose(self) -> None:
        await self._client.aclose()


class PostgresLookup:
    """Records from PostgreSQL through asyncpg: ``query`` takes the keys as ``$1`` (an
    array) and returns the key in its first column, e.g.
    ``SELECT card, risk, credit_limit FROM cards WHERE card = ANY($1)``."""

    def __init__(self, dsn: str, query: str, *, pool_size: int = 2) -> None:
        try:
            import asyncpg  # type: ignore[import-untyped]  # noqa: F401  # no stubs
        except ImportError as exc:
            raise MissingDependency("enrichment from PostgreSQL", "postgres") from exc
        if "$1" not in query:
            raise ConfigError("the query takes the batch's keys as $1 (= ANY($1))", key="query")
        self.dsn = dsn
        self.query = query
        self.pool_size = pool_size
        self._pool: Any = None

    async def fetch(self, keys: Sequence[Any]) -> dict[Any, Mapping[str, Any]]:
        import asyncpg

        if self._pool is None:
            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_size)
        records = await self._pool.fetch(self.query, list(keys))
        return {record[0]: dict(record.items()) for record in records}

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()


class Enrich:
    """Append looked-up fields to the model input, one look-up per batch, with a TTL cache.

    ``lookup``: a :class:`Lookup`, or a URL: ``redis://...`` (with ``prefix``,
    ``kind``) or ``postgresql://...`` (with ``query``). ``key``: the event field to
    look up. ``fields``: the record fields appended, in order, as numbers;
    ``defaults`` (per field; NaN when not given) stand in for a missing record, a
    missing field, a failure or a timeout.
    """

    def __init__(
        self,
        lookup: Lookup | str,
        *,
        key: str,
        fields: Sequence[str],
        defaults: Mapping[str, float] | None = None,
        input: str = "features",
        dtype: str = "float32",
        ttl: float = 60.0,
        max_entries: int = 100_000,
        timeout: float = 0.05,
        prefix: str = "",
        kind: str = "hash",
        query: str | None = None,
        name: str = "enrich",
        breaker: CircuitBreaker | Mapping[str, Any] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if not fields:
            raise ConfigError("enrichment needs at least one field", key="fields")
        if isinstance(lookup, str):
            if lookup.startswith(("redis://", "rediss://", "unix://")):
                lookup = RedisLookup(lookup, prefix=prefix, kind=kind)
            elif lookup.startswith(("postgres://", "postgresql://")):
                if query is None:
                    raise ConfigError("a PostgreSQL look-up needs a query", key="query")
                lookup = PostgresLookup(lookup, query)
            else:
                raise ConfigError(
                    f"unknown look-up {lookup!r}; use redis://... or postgresql://...",
                    key="lookup",
                )
        self.lookup: Lookup = lookup
        self.key = key
        self.fields = list(fields)
        defaults = dict(defaults or {})
        unknown = set(defaults) - set(self.fields)
        if unknown:
            raise ConfigError(f"defaults for unknown fields {sorted(unknown)}", key="defaults")
        self._defaults = tuple(float(defaults.get(f, math.nan)) for f in self.fields)
        self.input = input
        self.dtype = np.dtype(dtype)
        self.ttl = ttl
        self.max_entries = max_entries
        self.timeout = timeout
        self.name = name
        self._cache: dict[Any, tuple[float, tuple[float, ...]]] = {}
        self.metrics = metrics if metrics is not None else Metrics()
        if not isinstance(breaker, CircuitBreaker):
            settings: dict[str, Any] = {"consecutive_failures": 1, "open_seconds": 2.0}
            for key, value in (breaker or {}).items():  # open_s, as a pipeline file says it
                settings["open_seconds" if key == "open_s" else key] = value
            try:
                breaker = CircuitBreaker(f"enrich:{name}", metrics=self.metrics, **settings)
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    f"bad breaker settings {settings}: {exc}", key="breaker"
                ) from None
        self.breaker: CircuitBreaker = breaker
        chain = f"enrich:{name}"
        self._m_looked_up = self.metrics.fallback_outputs.labels(chain, "lookup")
        self._m_defaulted = self.metrics.fallback_outputs.labels(chain, "defaults")
        self._m_failed = self.metrics.fallback_failures.labels(chain, "lookup")
        #: Batches that fell back to the defaults because the look-up failed or timed out.
        self.failures = 0
        #: Batches that took the defaults without calling: the breaker was open.
        self.short_circuited = 0
        #: Rows that took the defaults because of a failure or an open breaker.
        self.defaulted = 0
        #: Look-up calls made, and keys fetched by them.
        self.calls = 0
        self.fetched = 0

    async def aclose(self) -> None:
        await self.lookup.aclose()

    def _values(self, record: Mapping[str, Any] | None) -> tuple[float, ...]:
        if record is None:
            return self._defaults
        out = []
        for name, default in zip(self.fields, self._defaults, strict=True):
            try:
                out.append(float(record[name]))
            except (KeyError, TypeError, ValueError):
                out.append(default)
        return tuple(out)

    async def _fetch(self, missing: list[Any]) -> dict[Any, Mapping[str, Any]] | None:
        """The records of ``missing`` through the breaker; ``None``: use the defaults."""
        try:
            probe = self.breaker.acquire()
        except CircuitOpen:
            self.short_circuited += 1
            return None
        self.calls += 1
        self.fetched += len(missing)
        started = time.monotonic()
        try:
            found = await asyncio.wait_for(self.lookup.fetch(missing), self.timeout)
        except BaseException as exc:
            self.breaker.release(probe, exc, time.monotonic() - started)
            if not isinstance(exc, Exception):
                raise  # cancelled: not the dependency's fault
            self.failures += 1
            self._m_failed.inc()
            log.warning(
                "enrichment look-up %r failed (%s: %s); using the defaults, breaker %s",
                self.name, type(exc).__name__, exc, self.breaker.state.label,
            )  # fmt: skip
            return None
        self.breaker.release(probe, None, time.monotonic() - started)
        return found

    def _key(self, data: Any) -> Any:
        return data[self.key] if isinstance(data, dict) else getattr(data, self.key)

    async def __call__(self, batch: Batch) -> Batch:
        keys = [self._key(e.data) for e in batch.events]
        now = time.monotonic()
        cache = self._cache
        answers: dict[Any, tuple[float, ...]] = {}
        missing = []
        defaulted = 0
        for key in dict.fromkeys(keys):
            hit = cache.get(key)
            if hit is not None and hit[0] > now:
                answers[key] = hit[1]
            else:
                missing.append(key)
        if missing:
            found = await self._fetch(missing)
            if found is None:  # the fallback: defaults, nothing cached
                for key in missing:
                    answers[key] = self._defaults
                gone = set(missing)
                defaulted = sum(1 for k in keys if k in gone)
                self.defaulted += defaulted
                self._m_defaulted.inc(defaulted)
            else:
                expires = now + self.ttl
                for key in missing:
                    values = answers[key] = self._values(found.get(key))
                    cache.pop(key, None)
                    cache[key] = (expires, values)
                while len(cache) > self.max_entries:
                    del cache[next(iter(cache))]
        self._m_looked_up.inc(len(keys) - defaulted)
        array = np.array([answers[k] for k in keys], dtype=self.dtype).reshape(
            len(keys), len(self.fields)
        )
        inputs = batch.inputs if batch.inputs is not None else {}
        if self.input in inputs:
            array = np.hstack([inputs[self.input], array.astype(inputs[self.input].dtype)])
        inputs[self.input] = array
        batch.inputs = inputs
        return batch
