"""Write results to a Redis stream: buffered by ``write``, sent by ``flush`` in one pipeline.

Each result becomes one stream entry (``XADD``) with the fields ``value`` (the
result: ``bytes`` as they are, anything else as JSON), ``key`` (the event's key,
when it has one) and ``source_id`` (the event's id, else its position: see
:func:`~rtinfer.sinks.ids.source_id`), so that consumers of the
output can de-duplicate what a redelivery wrote twice. With ``partitions=P``
the entry goes to the stream ``<stream>.<p>``, ``p = crc32(key) % P``
(:mod:`rtinfer.connectors.partitions`), so each key stays in one stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from ..connectors.partitions import check_partitions, partition_of
from ..connectors.redis import connect, require_redis, retrying
from ..types import Event
from .ids import source_id

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisStreamSink"]

_encode = msgspec.json.Encoder().encode


class RedisStreamSink:
    """Appends each event's ``result`` to the Redis stream ``stream`` at ``url``.

    :meth:`write` encodes and buffers; :meth:`flush` sends every buffered ``XADD``
    in one pipeline (no transaction: one round trip, entries appended in write
    order) and returns once Redis has answered them all, so the pipeline
    acknowledges the source only after Redis holds the results. When a flush
    fails, its entries stay buffered and the next flush sends them again: some may
    then be in the stream twice (at least once; de-duplicate on ``source_id``).

    ``maxlen`` caps the stream with approximate trimming (``XADD MAXLEN ~ n``):
    Redis keeps at least ``maxlen`` entries, trimming whole nodes, so a little
    more. ``None`` (the default): no trimming. Trimming the output stream never
    touches the input stream or its consumer groups' pending entries.

    ``field``, ``key_field`` and ``id_field`` name the entry's fields
    (``key_field``/``id_field`` ``None``: leave that field out). Connection
    options are those of :func:`rtinfer.connectors.redis.connect`.

    ``partitions=P`` writes each result to the stream ``<stream>.<p>`` with
    ``p = zlib.crc32(key) % P`` (partition 0 for an event without a key), so
    that a partitioned :class:`~rtinfer.sources.redis.RedisStreamSource` reads
    every key on one worker. ``None`` (the default): the one stream ``stream``.
    """

    __slots__ = (
        "_buffer",
        "_client",
        "_connect_options",
        "_field",
        "_id_field",
        "_key_field",
        "maxlen",
        "name",
        "partitions",
        "reconnect_timeout_s",
        "stream",
        "url",
    )

    def __init__(
        self,
        url: str,
        stream: str,
        *,
        maxlen: int | None = None,
        field: str = "value",
        key_field: str | None = "key",
        id_field: str | None = "source_id",
        partitions: int | None = None,
        username: str | None = None,
        password: str | None = None,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        reconnect_timeout_s: float = 30.0,
    ) -> None:
        require_redis("the Redis Streams sink")
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"maxlen must be at least 1 (or None: no trimming), got {maxlen}")
        check_partitions(partitions)
        self.url = url
        self.partitions = partitions
        self.stream = stream
        self.maxlen = maxlen
        self.reconnect_timeout_s = reconnect_timeout_s
        self.name = f"redis://{stream}"
        self._field = field.encode()
        self._key_field = key_field.encode() if key_field is not None else None
        self._id_field = id_field.encode() if id_field is not None else None
        self._connect_options: dict[str, str | None] = {
            "username": username,
            "password": password,
            "ssl_ca_certs": ssl_ca_certs,
            "ssl_certfile": ssl_certfile,
            "ssl_keyfile": ssl_keyfile,
        }
        self._client: Redis | None = None
        # (stream, field -> value); Any matches redis-py's (invariant) mapping of encodables
        self._buffer: list[tuple[str, dict[Any, Any]]] = []

    async def start(self) -> None:
        """Build the client (it connects on the first flush)."""
        if self._client is None:
            self._client = connect(self.url, **self._connect_options)

    async def write(self, events: Sequence[Event]) -> None:
        """Encode each event's result as an entry and buffer it until :meth:`flush`."""
        field, key_field, id_field = self._field, self._key_field, self._id_field
        buffer = self._buffer
        stream, partitions = self.stream, self.partitions
        for event in events:
            result = event.result
            entry: dict[Any, Any] = {field: result if type(result) is bytes else _encode(result)}
            if key_field is not None and event.key is not None:
                entry[key_field] = event.key
            if id_field is not None:
                ident = event.id if event.id is not None else source_id(event)
                if ident is not None:
                    entry[id_field] = ident.encode()
            if partitions is None:
                buffer.append((stream, entry))
            else:
                buffer.append((f"{stream}.{partition_of(event.key, partitions)}", entry))

    async def flush(self) -> None:
        """Send the buffered entries in one pipeline; return once Redis acknowledged them."""
        if not self._buffer:
            return
        client = self._client
        if client is None:
            raise RuntimeError(f"{self.name}: call start() before flush()")
        buffer = self._buffer
        sending = len(buffer)
        maxlen = self.maxlen

        async def send() -> None:
            async with client.pipeline(transaction=False) as pipe:
                for stream, entry in buffer[:sending]:
                    pipe.xadd(stream, entry, maxlen=maxlen, approximate=True)
                await pipe.execute()

        # After an outage the whole buffer is sent again: entries that had arrived before
        # the connection broke are then written twice (consumers de-duplicate on source_id).
        await retrying(self.name, send, give_up_after=self.reconnect_timeout_s)
        del buffer[:sending]

    async def aclose(self) -> None:
        """Close the connection; entries written but never flushed are dropped."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def __repr__(self) -> str:
        return f"<RedisStreamSink {self.name} buffered={len(self._buffer)}>"
