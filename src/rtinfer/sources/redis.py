"""Read a Redis stream as a pipeline source, as one consumer of a consumer group.

:class:`RedisStreamSource` gives at-least-once delivery on Redis Streams:

- an entry read with ``XREADGROUP`` stays in the group's pending entries list
  (PEL) under this consumer's name until :meth:`~RedisStreamSource.ack` sends
  ``XACK``, which the pipeline does only after every sink flushed its result;
- the consumer name is **stable** (``<hostname>-<RTINFER_WORKER or 0>``), so a
  restarted worker finds its own pending entries, and re-reads them (``XREADGROUP``
  from id ``0``) before anything new;
- entries left pending by a consumer that died for good are claimed with
  ``XAUTOCLAIM`` once idle for ``claim_idle_ms``, and delivered again;
- an entry delivered more than ``max_deliveries`` times is not processed again:
  it is returned with the header :data:`DEAD_REASON_HEADER`, and the pipeline
  dead-letters (and so acknowledges) events carrying that header;
- with ``partitions=P`` it reads the partition streams ``<stream>.<p>`` this
  worker owns (:mod:`rtinfer.connectors.partitions`), one consumer group on each,
  all in one ``XREADGROUP``, so every key is read by one worker only.

The client comes from :func:`rtinfer.connectors.redis.connect`, which the Redis
sink (:mod:`rtinfer.sinks.redis`) uses too. ``redis`` is imported when a source
or sink is built, not when this module is, so ``rtinfer`` imports without the
``redis`` extra.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..connectors.partitions import check_partitions
from ..connectors.partitions import owned_partitions as owned_partitions_of
from ..connectors.redis import connect, require_redis, retrying
from ..exceptions import ConfigError
from ..types import DEAD_REASON_HEADER, Event, Position, Skipped

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["DEAD_REASON_HEADER", "RedisStreamSource", "default_consumer_name"]

logger = logging.getLogger(__name__)


def default_consumer_name() -> str:
    """``<hostname>-<RTINFER_WORKER>``, ``<hostname>-0`` when ``RTINFER_WORKER`` is unset.

    Stable across restarts of the same worker (unlike a process id), so a
    restarted worker re-reads the entries it had not acknowledged. Workers on one
    host must set distinct ``RTINFER_WORKER`` values (or pass distinct names).
    """
    return f"{socket.gethostname()}-{os.environ.get('RTINFER_WORKER', '0')}"


def _execute(client: Redis) -> Callable[..., Awaitable[Any]]:
    """``client.execute_command``, typed (redis-py leaves it untyped)."""
    execute: Callable[..., Awaitable[Any]] = client.execute_command
    return execute


def _text(value: bytes | str) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _stream_replies(reply: Any) -> list[tuple[str, list[Any]]]:
    """The ``(stream, entries)`` of an XREADGROUP reply: RESP2 ``[[name, entries], ...]``
    or RESP3 ``{name: entries}``; ``None`` (a timeout) has none."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    return [(_text(name), list(entries or ())) for name, entries in pairs]


# The consumer group's position, read counter and lag in a stream (``XINFO GROUPS``), and
# a comparison of two entry ids, shared by the two scripts of a skip.
_GROUP_STATE = """
local function group_state(stream, group)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == group then
      local read = f['entries-read']
      if not read and f['lag'] then  -- unknown, but the lag tells it
        local s = redis.call('XINFO', 'STREAM', stream)
        for i = 1, #s, 2 do
          if s[i] == 'entries-added' then read = s[i + 1] - f['lag'] end
        end
      end
      return f['last-delivered-id'], read, f['lag']
    end
  end
  return redis.error_reply('NOGROUP no consumer group ' .. group .. ' on ' .. stream)
end
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  return am < bm or (am == bm and tonumber(as) < tonumber(bs))
end
"""

# KEYS[1] a stream, ARGV[1] a group, ARGV[2] how many to keep: the entries not yet
# delivered to the group but the newest ARGV[2], as {group's position, first id, last id,
# count}. The count is the group's lag less those kept, in O(kept); counting the entries
# instead (when the lag is unknown) reads every one of them, which took the core Redis
# shares with producers at 80,000 entries/s.
_FIND_SKIP = (
    _GROUP_STATE
    + """
local last, read, lag = group_state(KEYS[1], ARGV[1])
if type(last) == 'table' then return last end
local keep = tonumber(ARGV[2])
local newest = redis.call('XREVRANGE', KEYS[1], '+', '(' .. last, 'COUNT', keep + 1)
if #newest <= keep then return {} end
local until_id = newest[keep + 1][1]
local first = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
local n
if lag then n = lag - keep else n = #redis.call('XRANGE', KEYS[1], '(' .. last, until_id) end
return {last, first[1][1], until_id, n}
"""
)

# KEYS[1] a stream, ARGV[1] a group, ARGV[2] its position when the range was found,
# ARGV[3] the range's last id, ARGV[4] its count: move the group to the last id, never
# back (another consumer may have read past it), keeping its read counter (and so its
# lag) known where it can.
_SKIP = (
    _GROUP_STATE
    + """
local last, read = group_state(KEYS[1], ARGV[1])
if type(last) == 'table' then return last end
if not before(last, ARGV[3]) then return 0 end
if last == ARGV[2] and read then
  redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], ARGV[3],
             'ENTRIESREAD', read + tonumber(ARGV[4]))
else
  redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], ARGV[3])
end
return 1
"""
)


def _share(max_events: int, streams: int) -> int:
    """``COUNT`` per stream of a read over ``streams`` streams returning about ``max_events``."""
    return max(1, -(-max_events // streams))


class RedisStreamSource:
    """Entries of the Redis stream ``stream`` at ``url``, read as consumer ``consumer``
    of consumer group ``group``.

    Each entry becomes an :class:`~rtinfer.types.Event`: ``value`` is the entry's
    ``value_field`` (default ``value``), ``key`` its ``key_field`` (default ``key``)
    if present, ``headers`` its other fields, ``ingest_time`` the time in its id
    (when Redis appended it, in seconds), and ``position``
    ``Position("redis://<stream>", <partition>, "<entry id>")`` (partition 0 when
    not partitioned).

    - :meth:`start` creates the group if needed (``XGROUP CREATE ... MKSTREAM``,
      from ``start_id``: ``"0"`` the whole stream, ``"$"`` only new entries).
    - :meth:`read` first re-reads this consumer's own pending entries (those it
      read but never acknowledged, before a restart), then new entries, blocking
      up to ``block_ms`` per ``XREADGROUP``; every ``claim_idle_ms / 2`` it also
      claims (``XAUTOCLAIM``) entries pending for more than ``claim_idle_ms`` under
      any consumer, and delivers them. Set ``claim_idle_ms`` above the longest time
      an entry may take from read to acknowledgement, or entries being processed
      are delivered twice. A cancelled read leaves the source usable.
    - :meth:`ack` acknowledges (``XACK``) in one round trip.

    **Partitions.** With ``partitions=P`` the source reads the streams
    ``<stream>.<p>`` of the partitions it owns: ``owned_partitions`` if given,
    else every ``p`` with ``p % N == i`` for worker ``i`` (``RTINFER_WORKER``) of
    ``N`` (``RTINFER_WORKERS``), as ``rtinfer run --workers N`` sets them. The
    group is created on each; one ``XREADGROUP`` reads them all; a position's
    partition names the stream its ``XACK`` goes to. Producers write key ``k`` to
    partition ``zlib.crc32(k) % P`` (:class:`~rtinfer.sinks.redis.RedisStreamSink`
    with the same ``partitions`` does). A worker owning no partition is a
    :class:`~rtinfer.exceptions.ConfigError`.

    **Dead-letter contract.** An entry delivered more than ``max_deliveries``
    times (its delivery count in ``XPENDING``: every read, re-read and claim counts)
    is returned once more, with the header ``{"rtinfer-dead-reason": b"delivered N
    times (max_deliveries is M)"}``, and so is an entry without ``value_field``
    (``b"entry has no 'value' field"``). The pipeline must not process an event
    carrying :data:`DEAD_REASON_HEADER`: it writes it to its dead letters and
    acknowledges it like any other. An entry deleted or trimmed from the stream
    while pending has no payload left: it is acknowledged here and logged.

    Connection options are those of :func:`rtinfer.connectors.redis.connect`.
    """

    __slots__ = (
        "_backlog",
        "_claim_cursor",
        "_claim_index",
        "_claim_interval",
        "_client",
        "_closed",
        "_connect_options",
        "_key_field",
        "_next_claim",
        "_partition_of",
        "_ready",
        "_scripts",
        "_stream_of",
        "_unacked",
        "_value_field",
        "block_ms",
        "claim_idle_ms",
        "consumer",
        "group",
        "max_deliveries",
        "name",
        "owned_partitions",
        "partitions",
        "reconnect_timeout_s",
        "start_id",
        "stream",
        "streams",
        "url",
    )

    def __init__(
        self,
        url: str,
        stream: str,
        *,
        group: str = "rtinfer",
        consumer: str | None = None,
        start_id: str = "0",
        block_ms: int = 2_000,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        value_field: str = "value",
        key_field: str | None = "key",
        partitions: int | None = None,
        owned_partitions: Sequence[int] | None = None,
        username: str | None = None,
        password: str | None = None,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        reconnect_timeout_s: float = 30.0,
    ) -> None:
        require_redis("the Redis Streams source")
        for option, value in (
            ("block_ms", block_ms),
            ("claim_idle_ms", claim_idle_ms),
            ("max_deliveries", max_deliveries),
        ):
            if value < 1:
                raise ValueError(f"{option} must be at least 1, got {value}")
        check_partitions(partitions)
        self.url = url
        self.stream = stream
        self.group = group
        self.consumer = consumer if consumer is not None else default_consumer_name()
        self.start_id = start_id
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.reconnect_timeout_s = reconnect_timeout_s
        self.name = f"redis://{stream}"
        self.partitions = partitions
        if partitions is None:
            if owned_partitions is not None:
                raise ConfigError(
                    f"{self.name}: owned_partitions needs partitions (how many partition "
                    "streams there are)"
                )
            self.owned_partitions: tuple[int, ...] = (0,)
            self._stream_of = {0: stream}
        else:
            self.owned_partitions = owned_partitions_of(
                partitions, owned_partitions, what=f"the Redis source {self.name}"
            )
            self._stream_of = {p: f"{stream}.{p}" for p in self.owned_partitions}
        #: The streams read: ``stream``, or the owned partition streams ``<stream>.<p>``.
        self.streams = tuple(self._stream_of.values())
        self._partition_of = {s: p for p, s in self._stream_of.items()}
        self._value_field = value_field.encode()
        self._key_field = key_field.encode() if key_field is not None else None
        self._connect_options: dict[str, str | None] = {
            "username": username,
            "password": password,
            "ssl_ca_certs": ssl_ca_certs,
            "ssl_certfile": ssl_certfile,
            "ssl_keyfile": ssl_keyfile,
        }
        self._client: Redis | None = None
        self._scripts: tuple[AsyncScript, AsyncScript] | None = None  # (_FIND_SKIP, _SKIP)
        self._closed = False
        # Streams whose pending entries of this consumer are still to be re-read, before
        # new ones, with the id to read on from.
        self._backlog: dict[str, str] = dict.fromkeys(self.streams, "0")
        self._claim_cursor = "0-0"
        self._claim_index = 0  # the stream the claim pass is on
        self._claim_interval = claim_idle_ms / 2000  # seconds
        self._next_claim = 0.0
        # Entries handed to the pipeline and not acknowledged yet, as (stream, id): a
        # re-read or a claim finding them again must not deliver them twice.
        self._unacked: set[tuple[str, str]] = set()
        # Read beyond what a read asked for (one XREADGROUP over several streams).
        self._ready: list[Event] = []

    def _reread_backlog(self) -> None:
        self._backlog = dict.fromkeys(self.streams, "0")

    async def start(self) -> None:
        """Connect; create the consumer group on each stream that lacks it (again after a close)."""
        if self._client is not None:
            return
        from redis.exceptions import ResponseError

        client = connect(self.url, **self._connect_options)
        try:
            for stream in self.streams:
                try:
                    await client.xgroup_create(stream, self.group, id=self.start_id, mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self._scripts = (client.register_script(_FIND_SKIP), client.register_script(_SKIP))
        self._closed = False
        self._unacked.clear()  # nothing of this source is in a pipeline yet
        self._ready = []
        self._reread_backlog()
        self._claim_cursor = "0-0"
        self._claim_index = 0
        self._next_claim = time.monotonic()  # claim what dead consumers left, once started

    async def read(self, max_events: int) -> list[Event]:
        """Wait for entries and return up to ``max_events``; ``[]`` only once closed.

        Own pending entries come first (after :meth:`start`, and after a read that
        was cancelled or failed), then claimed ones when a claim pass is due, then new
        ones.
        """
        client = self._client
        if self._closed:
            return []
        if client is None:
            raise RuntimeError(f"{self.name}: call start() before read()")
        if not self._ready:
            self._ready = await retrying(
                self.name,
                lambda: self._read(client, max_events),
                give_up_after=self.reconnect_timeout_s,
                closed=self._is_closed,
            )
        events = self._ready[:max_events]
        del self._ready[:max_events]
        return events

    async def _read(self, client: Redis, max_events: int) -> list[Event]:
        from redis.exceptions import ConnectionError as RedisConnectionError

        task = asyncio.current_task()
        while not self._is_closed():  # a call: aclose() may run while a command waits
            if task is not None and task.cancelling():
                # redis-py can swallow a cancellation that lands while it tears a
                # connection down; never start another blocking read after one.
                self._reread_backlog()
                raise asyncio.CancelledError
            try:
                if self._backlog:
                    events = await self._read_backlog(client, max_events)
                elif time.monotonic() >= self._next_claim:
                    events = await self._claim(client, max_events)
                else:
                    events = await self._read_new(client, max_events)
            except BaseException as exc:
                # Cancelled (or failed) while a command was out: Redis may have put entries
                # in this consumer's pending list whose reply never arrived. Re-read them.
                self._reread_backlog()
                if isinstance(exc, RedisConnectionError) and self._is_closed():
                    return []  # closed while waiting
                raise
            if events:
                return events
        return []

    async def _read_new(self, client: Redis, max_events: int) -> list[Event]:
        until_claim = int((self._next_claim - time.monotonic()) * 1000)
        block = max(1, min(self.block_ms, until_claim))
        streams = self.streams
        reply = await _execute(client)(
            "XREADGROUP", "GROUP", self.group, self.consumer,
            "COUNT", _share(max_events, len(streams)), "BLOCK", block,
            "STREAMS", *streams, *(">" for _ in streams),
        )  # fmt: skip
        events: list[Event] = []
        for stream, entries in _stream_replies(reply):
            for raw_id, fields in entries:
                entry_id = _text(raw_id)
                events.append(self._event(stream, entry_id, fields, 1))
                self._unacked.add((stream, entry_id))
        return events

    async def _read_backlog(self, client: Redis, max_events: int) -> list[Event]:
        """The next of this consumer's own pending entries (``XREADGROUP`` from an id)."""
        backlog = self._backlog
        streams = list(backlog)
        reply = await _execute(client)(
            "XREADGROUP", "GROUP", self.group, self.consumer,
            "COUNT", _share(max_events, len(streams)),
            "STREAMS", *streams, *(backlog[s] for s in streams),
        )  # fmt: skip
        found: list[tuple[str, Any]] = []
        replied = dict(_stream_replies(reply))
        for stream in streams:
            entries = replied.get(stream)
            if not entries:  # no pending entry left on this stream
                del backlog[stream]
                continue
            backlog[stream] = _text(entries[-1][0])
            found += [(stream, entry) for entry in entries]
        return await self._redeliver(client, found, deleted=[])

    async def _claim(self, client: Redis, max_events: int) -> list[Event]:
        """Claim entries idle for ``claim_idle_ms``, ``max_events`` at most, and deliver them.

        One stream at a time: a pass goes over every stream's pending entries in turn.
        """
        stream = self.streams[self._claim_index]
        reply = await _execute(client)(
            "XAUTOCLAIM", stream, self.group, self.consumer, self.claim_idle_ms,
            self._claim_cursor, "COUNT", max_events,
        )  # fmt: skip
        cursor = _text(reply[0])
        if cursor == "0-0":  # this stream is done: the next one, or the next pass later
            self._claim_index = (self._claim_index + 1) % len(self.streams)
            if self._claim_index == 0:
                self._next_claim = time.monotonic() + self._claim_interval
        self._claim_cursor = cursor
        deleted = [(stream, _text(i)) for i in reply[2]] if len(reply) > 2 else []
        return await self._redeliver(
            client, [(stream, entry) for entry in reply[1]], deleted=deleted
        )

    async def _redeliver(
        self, client: Redis, entries: Sequence[tuple[str, Any]], *, deleted: list[tuple[str, str]]
    ) -> list[Event]:
        """Events for entries read again (own pending or claimed), with their delivery counts.

        Entries still in the pipeline are skipped; entries deleted from the stream
        (no fields) are acknowledged and logged; entries now pending under another
        consumer (claimed meanwhile) or no longer pending are left to their owner.
        """
        fresh: list[tuple[str, str, Any]] = []
        for stream, (raw_id, fields) in entries:
            entry_id = _text(raw_id)
            if not fields:  # an entry that no longer exists: its id, then nil
                deleted.append((stream, entry_id))
            elif (stream, entry_id) not in self._unacked:
                fresh.append((stream, entry_id, fields))
        if deleted:
            await self._drop_deleted(client, deleted)
        if not fresh:
            return []
        async with client.pipeline(transaction=False) as pipe:
            for stream, entry_id, _ in fresh:
                pipe.execute_command("XPENDING", stream, self.group, entry_id, entry_id, 1)
            pending = await pipe.execute()
        mine = self.consumer.encode()
        events: list[Event] = []
        for (stream, entry_id, fields), detail in zip(fresh, pending, strict=True):
            if not detail:
                continue
            _, owner, _, deliveries = detail[0]
            if (owner if isinstance(owner, bytes) else owner.encode()) != mine:
                continue
            events.append(self._event(stream, entry_id, fields, int(deliveries)))
            self._unacked.add((stream, entry_id))
        return events

    async def _drop_deleted(self, client: Redis, entries: list[tuple[str, str]]) -> None:
        for stream, ids in _by_stream(entries).items():
            await client.xack(stream, self.group, *ids)
            logger.warning(
                "%s: %d pending entries of group %r were deleted or trimmed from stream %r "
                "before they were acknowledged; their payload is gone, so they were "
                "acknowledged without processing: %s",
                self.name,
                len(ids),
                self.group,
                stream,
                ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else ""),
            )

    def _event(self, stream: str, entry_id: str, fields: Any, deliveries: int) -> Event:
        if isinstance(fields, dict):
            pairs = dict(fields)
        else:
            it = iter(fields)
            pairs = dict(zip(it, it, strict=True))
        value = pairs.pop(self._value_field, None)
        key = pairs.pop(self._key_field, None) if self._key_field is not None else None
        headers: dict[str, bytes] = {
            (k.decode("utf-8", "replace") if isinstance(k, bytes) else k): v
            for k, v in pairs.items()
        }
        headers.pop(DEAD_REASON_HEADER, None)  # only this source says an entry is dead
        if value is None:
            reason = f"entry has no {self._value_field.decode()!r} field"
            headers[DEAD_REASON_HEADER] = reason.encode()
            value = b""
        elif deliveries > self.max_deliveries:
            reason = f"delivered {deliveries} times (max_deliveries is {self.max_deliveries})"
            headers[DEAD_REASON_HEADER] = reason.encode()
        return Event(
            value,
            key=key,
            headers=headers or None,
            ingest_time=int(entry_id.partition("-")[0]) / 1000,
            position=Position(self.name, self._partition_of[stream], entry_id),
        )

    async def ack(self, positions: Sequence[Position]) -> None:
        """Acknowledge the entries at ``positions``: one ``XACK`` per stream, one round trip.

        A position's partition names its stream (``<stream>.<partition>`` when
        partitioned); a partition this source does not read is refused.
        """
        client = self._client
        if client is None or not positions:
            return
        entries: list[tuple[str, str]] = []
        for position in positions:
            offset = position.offset
            if not isinstance(offset, str):
                raise TypeError(f"{self.name}: cannot ack {position!r}, its offset is not an id")
            stream = self._stream_of.get(position.partition)
            if stream is None:
                raise ValueError(
                    f"{self.name}: cannot ack {position!r}: this source does not read partition "
                    f"{position.partition} (it reads {list(self.owned_partitions)})"
                )
            entries.append((stream, offset))
        by_stream = _by_stream(entries)

        async def send() -> None:
            if len(by_stream) == 1:
                ((stream, ids),) = by_stream.items()
                await client.xack(stream, self.group, *ids)
                return
            async with client.pipeline(transaction=False) as pipe:
                for stream, ids in by_stream.items():
                    pipe.xack(stream, self.group, *ids)
                await pipe.execute()

        await retrying(self.name, send, give_up_after=self.reconnect_timeout_s)
        self._unacked.difference_update(entries)

    async def skip(self, record: Callable[[list[Skipped]], Awaitable[None]], keep: int = 0) -> int:
        """Move the group past every entry not yet delivered to it but the newest ``keep``
        (shared among the streams read), unread; return how many.

        Each stream's range (first and last id, and the count: the group's lag, or the
        entries counted where Redis does not know it) is found, then ``record`` is
        awaited with the ranges, then the group is moved to each range's last id
        (``XGROUP SETID``, in a script that never moves it back: another consumer may
        have read on meanwhile, and what it read is then both processed and recorded).
        The entries stay in the stream, for a replay, until it is trimmed. This
        consumer's pending entries are not touched.
        """
        client, scripts = self._client, self._scripts
        if client is None or scripts is None or self._closed:
            return 0
        find, move = scripts
        found: list[tuple[str, str, Skipped]] = []
        kept = _share(keep, len(self.streams)) if keep > 0 else 0
        for stream in self.streams:
            reply = await find(keys=[stream], args=[self.group, kept])
            if reply:
                at, first, last, n = reply
                skipped = Skipped(
                    self.name, self._partition_of[stream], _text(first), _text(last), int(n)
                )
                found.append((stream, _text(at), skipped))
        if not found:
            return 0
        await record([skipped for _, _, skipped in found])
        for stream, at, skipped in found:
            await move(keys=[stream], args=[self.group, at, skipped.last, skipped.entries])
        return sum(skipped.entries for _, _, skipped in found)

    async def lag(self) -> int | None:
        """Entries of the streams the group has not finished: never delivered, or pending.

        From ``XINFO GROUPS`` of each stream read (its ``lag`` needs Redis 7;
        ``None`` where it is unknown).
        """
        client = self._client
        if client is None:
            return None
        total = 0
        for stream in self.streams:
            for info in await client.xinfo_groups(stream):
                name = info.get("name")
                if name in (self.group, self.group.encode()):
                    lag, pending = info.get("lag"), info.get("pending")
                    if lag is None or pending is None:
                        return None
                    total += int(lag) + int(pending)
                    break
            else:
                return None
        return total

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    def _is_closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Close the connection; what was not acknowledged stays pending for this consumer."""
        self._closed = True
        self._ready = []
        self._scripts = None
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def __repr__(self) -> str:
        streams = "" if self.partitions is None else f" partitions={list(self.owned_partitions)}"
        return (
            f"<RedisStreamSource {self.name}{streams} group={self.group!r} "
            f"consumer={self.consumer!r}>"
        )


def _by_stream(entries: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for stream, entry_id in entries:
        grouped.setdefault(stream, []).append(entry_id)
    return grouped
